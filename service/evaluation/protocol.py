"""``cbir eval``: run the query slices through the model and the served searches, and score what
comes back against the references' labels and against baselines (issue 11).

Queries come from cohorts the index does not hold (the paper's protocol: queries from one set,
references from another). For each query slice the model draws its codes, x_hat+, x_hat- and its
segmentation; each space is searched through ``Retrieval.search``, the engine the API serves.
Baselines run on the same queries and references in the same run: raw-pixel L2, random, and the
label oracle. A composed query takes the normal code of query A and the abnormal code of query B
(another patient, with a lesion) and is searched as /compose searches it (``Retrieval.compose``:
the anatomy half with the lesion maps' overlap by default, ``compose_weighting="balanced"`` or
the paper's plain concat L2 with ``"plain"``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from indexer.encoding import encode_slices
from indexer.faiss_lib import faiss
from model.data.brats import ANATOMY_LABELS
from service.evaluation import figures, metrics
from service.evaluation.cohorts import (
    EvaluationError,
    Queries,
    References,
    load_queries,
    load_references,
)
from service.retrieval import Codes, Retrieval, RetrievalError, Timings

log = logging.getLogger(__name__)

FORMAT = "compositional-cbir/eval"
FORMAT_VERSION = 1
SEARCH_SPACES = ("normal", "abnormal", "concat")
NORMAL_LABELS = [k for k in ANATOMY_LABELS if k > 0]  # the paper's six
LESION_CLASSES = {"tc_dice": 1, "ed_dice": 2, "et_dice": 3}
PIXEL_SIZE = 64  # the raw-pixel baseline's slices: 256 / 4 on each side


@dataclass
class Drawn:
    """What the model gives for each query slice."""

    normal_idx: np.ndarray  # (Q, 8, 8)
    abnormal_idx: np.ndarray  # (Q, 8, 8)
    reconstruction: np.ndarray  # (Q, 256, 256) x_hat+ in [0, 1]
    pseudo_normal: np.ndarray  # (Q, 256, 256) x_hat- in [0, 1]
    predicted: np.ndarray  # (Q, 256, 256) uint8 classes 0..3


@dataclass
class Evaluation:
    """``result`` is eval.json; the arrays are what the HTML report draws from."""

    result: dict
    queries: Queries
    references: References
    drawn: Drawn
    neighbours: dict[str, np.ndarray]  # normal/abnormal/concat/pixels/compose -> (Q, k_max) rows
    pairs: np.ndarray  # (Q,) row of B for the composed query whose A is this row; -1 for none
    scores: dict[str, figures.Scores] = field(default_factory=dict)  # per-pair label scores
    examples: list[int] = field(default_factory=list)  # query rows shown in the report
    compose_example: tuple[int, int, np.ndarray] | None = None  # A, B, decoded composite


@torch.inference_mode()
def draw(model, images: np.ndarray, batch_size: int, device: torch.device) -> Drawn:
    """Codes, x_hat+, x_hat- and the predicted labels of (Q, 256, 256) slices, in batches."""
    parts: dict[str, list[np.ndarray]] = {f.name: [] for f in fields(Drawn)}
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start:start + batch_size][:, None]).to(device)
        codes = model.encode(x)
        logits = model.segment(codes.abnormal)  # (B, 4, 256, 256)
        rec = model.decode(codes.normal, model.condition(logits))  # x_hat+
        pseudo = model.decode(codes.normal, None)  # x_hat-
        parts["normal_idx"].append(codes.normal_indices.cpu().numpy())
        parts["abnormal_idx"].append(codes.abnormal_indices.cpu().numpy())
        parts["reconstruction"].append(rec[:, 0].clamp(0, 1).float().cpu().numpy())
        parts["pseudo_normal"].append(pseudo[:, 0].clamp(0, 1).float().cpu().numpy())
        parts["predicted"].append(logits.argmax(1).cpu().numpy().astype(np.uint8))
    return Drawn(**{k: np.concatenate(v) for k, v in parts.items()})


def search_rows(retrieval: Retrieval, space: str, normal_idx: np.ndarray,
                abnormal_idx: np.ndarray, k: int, bar: tqdm,
                weighting: str = "overlap") -> np.ndarray:
    """(Q, k) reference rows (positions in ``retrieval.slice_ids``) the service returns;
    ``space`` "compose": composed queries, as /compose searches them with ``weighting``."""
    out = np.empty((len(normal_idx), k), np.int64)
    for i in range(len(normal_idx)):
        codes = Codes(normal_idx[i], abnormal_idx[i])
        hits = (retrieval.compose(codes, k, Timings(), weighting=weighting) if space == "compose"
                else retrieval.search(space, codes, k, Timings()))
        out[i] = np.searchsorted(retrieval.slice_ids, [h.slice_id for h in hits])
        bar.update()
    return out


def pixel_vectors(images: np.ndarray) -> np.ndarray:
    """(n, 256, 256) in [0, 1] -> (n, 64 * 64) float32, 4 x 4 area averages."""
    n, size = len(images), images.shape[-1]
    f = size // PIXEL_SIZE
    small = np.asarray(images, np.float32).reshape(n, PIXEL_SIZE, f, PIXEL_SIZE, f).mean((2, 4))
    return np.ascontiguousarray(small.reshape(n, -1), np.float32)


def pair_scores(queries: Queries, refs: References) -> dict[str, figures.Scores]:
    """Every label score of every query slice against every reference slice."""
    out: dict[str, figures.Scores] = {}
    n = len(refs.patient)
    if queries.anatomy is not None and refs.anatomy is not None:
        out["normal_dice"] = figures.Scores(
            np.arange(len(queries.image)),
            metrics.mean_label_dice(queries.anatomy, refs.anatomy, NORMAL_LABELS))
    lesion_rows = np.flatnonzero(queries.has_lesion)
    if lesion_rows.size:
        out["lesion_dice"] = figures.Scores(
            lesion_rows, metrics.dice_matrix(queries.lesion[lesion_rows], refs.lesion))
        out["lesion_precision"] = figures.Scores(
            lesion_rows, np.broadcast_to(refs.has_lesion.astype(np.float32),
                                         (lesion_rows.size, n)))
    for name, label in LESION_CLASSES.items():
        rows = np.flatnonzero((queries.lesion == label).any(axis=(1, 2)))
        if rows.size:
            out[name] = figures.Scores(rows, metrics.dice_matrix(queries.lesion[rows],
                                                                 refs.lesion, label))
    free = np.flatnonzero(~queries.has_lesion)
    if free.size:
        out["healthy_precision"] = figures.Scores(
            free, np.broadcast_to((~refs.has_lesion).astype(np.float32), (free.size, n)))
    return out


def compose_pairs(queries: Queries, rng: np.random.Generator) -> np.ndarray:
    """For each query A, a query B with a lesion from another patient (-1 where none exists)."""
    lesion_rows = np.flatnonzero(queries.has_lesion)
    pairs = np.full(len(queries.image), -1, np.int64)
    for a in range(len(pairs)):
        donors = lesion_rows[queries.patient[lesion_rows] != queries.patient[a]]
        if donors.size:
            pairs[a] = rng.choice(donors)
    return pairs


def _model_slice_figures(queries: Queries, drawn: Drawn) -> dict[str, list[float | None]]:
    per: dict[str, list[float | None]] = {name: [] for name in (
        "reconstruction_ssim_brain", "pseudo_normal_mae_lesion", "pseudo_normal_ssim_lesion",
        "pseudo_normal_mae_outside", "pseudo_normal_ssim_outside", "input_mae_lesion",
        "input_ssim_lesion", "input_mae_outside", "input_ssim_outside",
        "segmentation_dice_tc", "segmentation_dice_ed", "segmentation_dice_et",
        "segmentation_dice_whole")}
    rec_ssim = metrics.ssim_maps(drawn.reconstruction, queries.image)
    if queries.healthy is not None:
        against_twin = {"pseudo_normal": (drawn.pseudo_normal,
                                          metrics.ssim_maps(drawn.pseudo_normal, queries.healthy)),
                        "input": (queries.image, metrics.ssim_maps(queries.image, queries.healthy))}
    for i, image in enumerate(queries.image):
        brain = image > 0
        per["reconstruction_ssim_brain"].append(metrics.region_ssim(rec_ssim[i], brain))
        for name, label in zip(("tc", "ed", "et"), (1, 2, 3), strict=True):
            per[f"segmentation_dice_{name}"].append(
                metrics.class_dice(drawn.predicted[i], queries.lesion[i], label))
        per["segmentation_dice_whole"].append(
            metrics.class_dice(drawn.predicted[i] > 0, queries.lesion[i] > 0, True))
        if queries.healthy is None:
            continue
        twin = queries.healthy[i]
        lesion = queries.lesion[i] > 0
        regions = {"lesion": lesion, "outside": (brain | (twin > 0)) & ~lesion}
        for where, region in regions.items():
            for who, (images, ssim) in against_twin.items():
                per[f"{who}_mae_{where}"].append(metrics.region_mae(images[i], twin, region))
                per[f"{who}_ssim_{where}"].append(metrics.region_ssim(ssim[i], region))
    return {k: v for k, v in per.items() if v}


def _examples(queries: Queries) -> list[int]:
    """Up to three query slices with the largest lesions (one per patient) and one without."""
    area = (queries.lesion > 0).sum(axis=(1, 2))
    chosen, seen = [], set()
    for row in np.argsort(-area, kind="stable"):
        if area[row] == 0 or len(chosen) == 3:
            break
        if queries.patient[row] not in seen:
            chosen.append(int(row))
            seen.add(queries.patient[row])
    free = np.flatnonzero(area == 0)
    if free.size:
        brain = (queries.image[free] > 0).sum(axis=(1, 2))
        chosen.append(int(free[np.argmax(brain)]))
    return chosen


# The model's own per-slice figures a headline carries: what fails first on real scans.
HEADLINE_MODEL = ("segmentation_dice_tc", "segmentation_dice_ed", "segmentation_dice_et",
                  "segmentation_dice_whole", "reconstruction_ssim_brain")


def headline(result: dict) -> dict:
    """A few figures at one k (5 when evaluated, else the middle k), for cards and /info, and
    the model's segmentation Dice and reconstruction SSIM (per-slice means)."""
    ks = result["k"]
    k = str(5 if 5 in ks else ks[len(ks) // 2])
    picks = [("normal", "normal_dice"), ("normal", "lesion_invariance"),
             ("abnormal", "lesion_dice"), ("abnormal", "lesion_precision"),
             ("abnormal", "healthy_precision"),
             ("compose", "normal_dice_a"), ("compose", "lesion_dice_b")]
    rows = []
    for space, name in picks:
        fig = result["figures"][space].get(name, {})
        if "at_k" not in fig:
            continue
        rows.append({"space": space, "figure": name, "label": fig["label"],
                     **{m: round(v["value"], 4) for m, v in fig["at_k"][k].items()}})
    model = {name: {"value": None if fig["value"] is None else round(fig["value"], 4),
                    "slices": fig["slices"]}
             for name in HEADLINE_MODEL if (fig := result["model"].get(name)) is not None}
    return {"k": int(k), "figures": rows, "model": model}


def _parse_ks(ks: list[int], references: int) -> list[int]:
    ks = sorted(set(ks))
    if not ks or ks[0] < 1:
        raise EvaluationError(f"k must be at least 1, got {ks}")
    if ks[-1] > references:
        raise EvaluationError(f"k = {ks[-1]} exceeds the {references} reference slices")
    return ks


def evaluate(index_dir: Path, query_dirs: list[Path], ks: Sequence[int] = (1, 5, 10),
             max_queries: int | None = 64, seed: int = 0,
             reference_dirs: list[Path] | None = None, db_url: str | None = None,
             checkpoint: Path | None = None, device: str = "auto", batch_size: int = 16,
             draws: int = 1000, command: str = "", progress: bool = True,
             compose_weighting: str = "overlap") -> Evaluation:
    """Run the whole protocol; raises ``EvaluationError`` naming a bad input."""
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    try:
        retrieval = Retrieval.open(index_dir, db_url=db_url, checkpoint=checkpoint,
                                   device=device)
    except RetrievalError as exc:
        raise EvaluationError(str(exc)) from exc
    seconds["open"] = time.perf_counter() - clock
    try:
        n_refs = len(retrieval.slice_ids)
        ks = _parse_ks(list(ks), n_refs)
        k_max = ks[-1]
        clock = time.perf_counter()
        refs = load_references(retrieval, reference_dirs, progress)
        seconds["references"] = time.perf_counter() - clock
        clock = time.perf_counter()
        queries = load_queries(query_dirs, set(retrieval.patient_by_external), max_queries,
                               seed, progress)
        seconds["queries"] = time.perf_counter() - clock

        clock = time.perf_counter()
        model, dev = retrieval.model, retrieval.device
        drawn = draw(model, queries.image, batch_size, dev)
        twin_rows = (np.flatnonzero(queries.has_lesion) if queries.healthy is not None
                     else np.zeros(0, np.int64))
        twin_normal, twin_abnormal = (encode_slices(model, queries.healthy[twin_rows],
                                                    batch_size, dev)
                                      if twin_rows.size else (None, None))
        rng = np.random.default_rng(seed)
        pairs = compose_pairs(queries, rng)
        seconds["model"] = time.perf_counter() - clock

        clock = time.perf_counter()
        q = len(queries.image)
        searches = 3 * q + twin_rows.size + int((pairs >= 0).sum())
        neighbours: dict[str, np.ndarray] = {}
        with tqdm(total=searches, desc="searches", unit="query", disable=not progress) as bar:
            for space in SEARCH_SPACES:
                neighbours[space] = search_rows(retrieval, space, drawn.normal_idx,
                                                drawn.abnormal_idx, k_max, bar)
            twin_model = (search_rows(retrieval, "normal", twin_normal, twin_abnormal, k_max,
                                      bar) if twin_rows.size else None)
            a_rows = np.flatnonzero(pairs >= 0)
            neighbours["compose"] = np.full((q, k_max), -1, np.int64)
            neighbours["compose"][a_rows] = search_rows(
                retrieval, "compose", drawn.normal_idx[a_rows],
                drawn.abnormal_idx[pairs[a_rows]], k_max, bar, compose_weighting)
        pixel_index = faiss.IndexFlatL2(PIXEL_SIZE * PIXEL_SIZE)
        pixel_index.add(pixel_vectors(refs.image.astype(np.float32) / 255.0))
        neighbours["pixels"] = pixel_index.search(pixel_vectors(queries.image), k_max)[1]
        twin_pixels = (pixel_index.search(pixel_vectors(queries.healthy[twin_rows]), k_max)[1]
                       if twin_rows.size else None)
        seconds["search"] = time.perf_counter() - clock

        clock = time.perf_counter()
        scores = pair_scores(queries, refs)
        seconds["scores"] = time.perf_counter() - clock

        clock = time.perf_counter()
        groups = queries.patient
        result_figures: dict[str, dict] = {}
        for space, names in figures.SPACE_FIGURES.items():
            if space == "compose":
                continue
            methods = {"model": neighbours[space], "pixels": neighbours["pixels"]}
            out = {}
            for name in names:
                if name == "lesion_invariance":
                    out[name] = (figures.invariance_figure(
                        twin_rows, methods, {"model": twin_model, "pixels": twin_pixels},
                        n_refs, ks, groups, rng, draws) if twin_rows.size else
                        figures.missing(name, "no query slice with a lesion has a lesion-free "
                                              "twin (healthy volume)"))
                elif name in scores:
                    out[name] = figures.score_figure(name, scores[name], methods, ks, groups,
                                                     rng, draws)
                else:
                    out[name] = figures.missing(name, _why_missing(name, queries, refs))
            result_figures[space] = out
        result_figures["compose"] = _compose_figures(scores, pairs, neighbours["compose"], ks,
                                                     groups, rng, draws, queries, refs)
        curves = {space: {name: figures.precision_curve(
                              scores[name], {"model": neighbours[space],
                                             "pixels": neighbours["pixels"]}, k_max)
                          for name in ("lesion_precision", "healthy_precision")
                          if name in scores}
                  for space in ("abnormal", "concat")}
        model_figures = figures.slice_figures(_model_slice_figures(queries, drawn), groups,
                                              rng, draws)
        examples = _examples(queries)
        compose_example = _compose_example(model, dev, queries, drawn, pairs)
        seconds["figures"] = time.perf_counter() - clock
        seconds["total"] = time.perf_counter() - started
        build = retrieval.build
        result = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "command": command,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "checkpoint": {"weights_sha256": build.checkpoint_sha256, "preset": build.preset,
                           "note": retrieval.model_note},
            "index": {"dir": str(Path(index_dir).resolve()), "generation": build.generation,
                      **retrieval.counts()},
            "references": {"fingerprint": refs.fingerprint,
                           "slices_with_lesion": int(refs.has_lesion.sum()),
                           "patients_without_anatomy": refs.without_anatomy},
            "queries": _query_summary(queries, query_dirs, max_queries, seed),
            "k": ks, "bootstrap_draws": draws, "methods": figures.METHODS,
            "figures": result_figures, "precision_curves": curves, "model": model_figures,
            "examples": [{"patient": str(queries.patient[i]),
                          "slice_index": int(queries.slice_index[i])} for i in examples],
            "seconds": {k: round(v, 2) for k, v in seconds.items()},
        }
        result["headline"] = headline(result)
        return Evaluation(result=result, queries=queries, references=refs, drawn=drawn,
                          neighbours=neighbours, pairs=pairs, scores=scores, examples=examples,
                          compose_example=compose_example)
    finally:
        retrieval.close()


def _why_missing(name: str, queries: Queries, refs: References) -> str:
    if name == "normal_dice":
        if refs.anatomy is None:
            return (f"no anatomy labels for reference patients "
                    f"{', '.join(refs.without_anatomy[:5])} (pass --references)")
        return "the query patients have no anatomy labels"
    if name == "healthy_precision":
        return "every query slice has a lesion"
    return "no query slice has this lesion class" if name in LESION_CLASSES else \
        "no query slice has a lesion"


def _compose_figures(scores, pairs, compose_rows, ks, groups, rng, draws, queries, refs):
    a_rows = np.flatnonzero(pairs >= 0)
    if a_rows.size == 0:
        reason = "needs query slices with a lesion from at least two query patients"
        return {name: figures.missing(name, reason) for name in ("normal_dice_a",
                                                                   "lesion_dice_b")}
    out = {}
    methods = {"model": compose_rows}
    if "normal_dice" in scores:
        # normal_dice covers every query row, in order.
        out["normal_dice_a"] = figures.score_figure(
            "normal_dice_a", figures.Scores(a_rows, scores["normal_dice"].values[a_rows]),
            methods, ks, groups, rng, draws)
    else:
        out["normal_dice_a"] = figures.missing("normal_dice_a",
                                               _why_missing("normal_dice", queries, refs))
    lesion = scores["lesion_dice"]
    at = np.searchsorted(lesion.rows, pairs[a_rows])
    out["lesion_dice_b"] = figures.score_figure(
        "lesion_dice_b", figures.Scores(a_rows, lesion.values[at]), methods, ks, groups, rng,
        draws)
    return out


@torch.inference_mode()
def _compose_example(model, device, queries: Queries, drawn: Drawn,
                     pairs: np.ndarray) -> tuple[int, int, np.ndarray] | None:
    """The pair shown in the report: a lesion-free A with the largest lesion B it was paired
    with (any A when every query has a lesion), and the image the decoder draws from it."""
    a_rows = np.flatnonzero(pairs >= 0)
    if a_rows.size == 0:
        return None
    preferred = a_rows[~queries.has_lesion[a_rows]]
    candidates = preferred if preferred.size else a_rows
    area = (queries.lesion[pairs[candidates]] > 0).sum(axis=(1, 2))
    a = int(candidates[np.argmax(area)])
    b = int(pairs[a])
    n = torch.from_numpy(drawn.normal_idx[a][None].astype(np.int64)).to(device)
    ab = torch.from_numpy(drawn.abnormal_idx[b][None].astype(np.int64)).to(device)
    image = model.decode_indices(n, ab)[0, 0].clamp(0, 1).float().cpu().numpy()
    return a, b, image


def _query_summary(queries: Queries, dirs: list[Path], max_queries, seed) -> dict:
    patients = {}
    for pid, available in queries.available.items():
        mine = queries.patient == pid
        patients[pid] = {"brain_slices": available, "drawn": int(mine.sum()),
                         "with_lesion": int((mine & queries.has_lesion).sum())}
    return {"cohorts": [str(Path(d).resolve()) for d in dirs],
            "fingerprint": queries.fingerprint, "max_queries": max_queries, "seed": seed,
            "slices": len(queries.image), "with_lesion": int(queries.has_lesion.sum()),
            "with_twin": queries.healthy is not None, "with_anatomy": queries.anatomy is not None,
            "patients": patients}
