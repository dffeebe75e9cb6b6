"""The retrieval engine the API serves: one generation of an index, loaded whole.

Nothing here knows HTTP. ``Retrieval.open`` loads an index directory's active generation and the
checkpoint it was built with (refusing any other), and keeps in memory what every request needs:
the codebooks, the FAISS indices of the three spaces and the generation's view of the catalogue
(each slice's code indices, patient, label flags and areas; ``service.catalogue_view``), so no
request reads the catalogue. ``reopen`` loads a newer generation beside a served one
(``service.live`` swaps them). Uploaded pixels live only in the arguments and return values of
these methods.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sqlalchemy.orm import Session

from indexer import store
from indexer.catalog import active_build, bring_up_to_date, open_catalog
from indexer.faiss_lib import faiss
from indexer.layout import DIMS, LAYOUT_VERSION, SPACES, position_distances, space_vectors
from indexer.lesion_maps import LesionMaps, decode_maps, lesion_term
from indexer.reference import COLUMNS, Reference, codebook_tables
from model.data.render import SEG_PALETTE, grey_rgb, overlay
from service.catalogue_view import (
    CatalogueChanged,
    CatalogueView,
    PatientRecord,
    SliceRecord,
    read_view,
)
from service.loading import (
    GenerationRefused,
    LoadedModel,
    RetrievalError,
    Source,
    ThumbnailCache,
    load_matching_checkpoint,
    read_manifest,
)

log = logging.getLogger(__name__)

CLASS_TO_BRATS = np.array([0, 1, 2, 4], np.uint8)  # model class -> BraTS label (TC 1, ED 2, ET 4)
BRATS_CLASSES = {"TC": 1, "ED": 2, "ET": 4}  # necrotic tumour core, edema, enhancing tumour
# The composed query's weightings; the first is /compose's and `cbir eval`'s default.
COMPOSE_WEIGHTINGS = ("overlap", "balanced", "plain")
# ``overlap``: what a lesion map that covers the donor's exactly (soft Dice 1) is worth, in units
# of the anatomy half's typical best-match distance. Chosen on the seed-102 tuning cohort (512
# queries, the 16-patient seed-100 index, stage 7) as the largest of 1, 1.5, 2, 3 that cost the
# anatomy Dice at most 0.01 (0.688 -> 0.679; lesion Dice 0.6x -> 5.6x random); see the card.
OVERLAP_WEIGHT = 2.0


class NotFound(LookupError):
    """No such slice or patient in the index."""


@dataclass
class Timings:
    """Seconds spent per stage of one request (decode, encode, search, catalogue, render)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass
class Codes:
    """One query's code indices, (8, 8) each."""

    normal: np.ndarray
    abnormal: np.ndarray


@dataclass
class Drawn:
    """What the model draws for a query slice: code indices and three images."""

    codes: Codes
    reconstruction: np.ndarray  # x_hat+, (256, 256) in [0, 1]
    pseudo_normal: np.ndarray  # x_hat-, (256, 256) in [0, 1]
    labels: np.ndarray  # predicted BraTS labels (256, 256) uint8


@dataclass
class Hit:
    rank: int
    slice_id: int
    patient_id: str
    slice_index: int
    distance: float
    has_abnormality: bool | None
    has_labels: bool
    position_distances: np.ndarray  # (8, 8)
    match_percentile: float | None = None  # see service/reference.py
    study_uid: str | None = None  # a DICOM-sourced patient's StudyInstanceUID
    series_uid: str | None = None  # and the SeriesInstanceUID indexed


def png_bytes(rgb_or_grey: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb_or_grey).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def grey_png(image: np.ndarray) -> bytes:
    """A [0, 1] slice as an 8-bit grey PNG."""
    return png_bytes(np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8))


def overlay_png(image: np.ndarray, labels: np.ndarray) -> bytes:
    """A [0, 1] slice with BraTS labels blended over it, as an RGB PNG."""
    return png_bytes(overlay(image, labels, SEG_PALETTE) if labels.any() else grey_rgb(image))


class Retrieval:
    """One generation of an index, loaded whole: its FAISS indices, its view of the catalogue,
    and the model it was built with. Nothing in it changes after loading (``reopen`` loads a
    newer generation beside it), so every method is safe to call from several threads and a
    request that holds it answers from one generation throughout."""

    def __init__(self, source: Source, model: LoadedModel, view: CatalogueView,
                 indices: dict[str, faiss.Index]):
        self.source = source
        self.index_dir = source.index_dir
        self.engine = source.engine
        self.device = source.device
        self.loaded_model = model
        self.model = model.model
        self.codebooks = model.codebooks
        self.model_note = model.note
        self.eval_headline = model.eval_headline
        self.model_card = model.card
        self.indices = indices
        self.search_indices = {s: store.search_index(i) for s, i in indices.items()}
        self.faiss_gpu = faiss.get_num_gpus() > 0
        self.view = view
        self.build = view.build
        self.slice_ids = view.slice_ids  # (N,) sorted
        self.slice_patient = view.slice_patient  # (N,) internal patient id
        self.slice_index = view.slice_index  # (N,) axial index
        self.slice_abnormal = view.slice_abnormal  # (N,) int8: 1, 0, or -1 without labels
        self.codes = view.codes  # (N, 2, 8, 8) uint16: normal, abnormal
        # internal id -> (external id, has labels)
        self.patients = {pid: (p.external_id, p.has_labels) for pid, p in view.patients.items()}
        self.patient_by_external = {ext: pid for pid, (ext, _) in self.patients.items()}
        # internal id -> (StudyInstanceUID, SeriesInstanceUID), DICOM-sourced patients only
        self.patient_uids = {pid: (p.study_uid, p.series_uid) for pid, p in view.patients.items()
                             if p.study_uid or p.series_uid}
        self._inference = source.inference
        # (K, K) squared distances between codebook rows, 2 MiB each: the balanced compose
        self.code_tables = codebook_tables(self.codebooks)
        # Each slice's lesion as the model reads it from its abnormal code: the overlap compose
        self.lesion_maps = LesionMaps.for_index(self.index_dir, model.weights_sha256,
                                                self.codes[:, 1], self.model, self.device)
        self.slices_per_patient = int(np.bincount(
            np.unique(self.slice_patient, return_inverse=True)[1]).max()) if len(
            self.slice_patient) else 0
        # Stored when the generation was written; measured here for an index written before.
        self.reference = Reference.load(
            store.reference_path(self.index_dir, self.build.generation), self.codebooks)
        if self.reference is None or self.reference.status is None or (
                self.reference.example is None):  # none, or without status or example
            self.reference = Reference.measure(self.codebooks, self.codes, self.slice_patient,
                                               self.slice_abnormal)

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, index_dir: Path | str, db_url: str | None = None,
             checkpoint: Path | str | None = None, device: str = "auto",
             inference_workers: int = 1) -> Retrieval:
        """The index directory's active generation."""
        index_dir = Path(index_dir)
        manifest = read_manifest(index_dir)
        url = db_url or manifest.get("db_url") or store.default_db_url(index_dir)
        torch_device = torch.device(
            "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available())
            else "cpu")
        try:
            bring_up_to_date(url)  # an index written by an earlier version: same data, new columns
        except Exception as exc:
            raise RetrievalError(f"{index_dir}: cannot bring its catalogue up to date: "
                                 f"{type(exc).__name__}: {exc}") from exc
        source = Source(index_dir=index_dir, engine=open_catalog(url, migrate=False),
                        checkpoint=Path(checkpoint) if checkpoint else None, device=torch_device,
                        inference=threading.Semaphore(inference_workers),
                        thumbnails=ThumbnailCache(index_dir))
        return cls._load(source, manifest, model=None)

    def reopen(self) -> Retrieval:
        """The generation the catalogue has active now, loaded beside this one, which keeps
        serving meanwhile. Reuses the model when the new generation was built with the same
        weights. ``GenerationRefused`` names the generation that could not be loaded."""
        return self._load(self.source, None, model=self.loaded_model)

    @classmethod
    def _load(cls, source: Source, manifest: dict | None,
              model: LoadedModel | None) -> Retrieval:
        index_dir = source.index_dir
        try:
            view = read_view(source.engine)
        except CatalogueChanged as exc:
            raise RetrievalError(f"{index_dir}: {exc}") from exc
        except Exception as exc:  # no tables: a build never committed
            raise RetrievalError(f"{index_dir}: the catalogue has no index build; run "
                                 f"`cbir index build`") from exc
        if view is None:
            raise RetrievalError(f"{index_dir}: the catalogue has no active index build")
        build = view.build
        try:
            if build.layout_version != LAYOUT_VERSION:
                raise RetrievalError(f"the index uses vector layout {build.layout_version}; this "
                                     f"code reads layout {LAYOUT_VERSION}: rebuild the index")
            if model is None or model.weights_sha256 != build.checkpoint_sha256:
                model = load_matching_checkpoint(
                    source.checkpoint, manifest or read_manifest(index_dir), build, source.device)
            try:
                indices = store.read_generation(index_dir, build.generation)
            except store.IndexStoreError as exc:
                raise RetrievalError(str(exc)) from exc
            retrieval = cls(source, model, view, indices)
            problems = retrieval.consistency_problems()
            if problems:
                raise RetrievalError("index and catalogue disagree: " + "; ".join(problems))
        except RetrievalError as exc:
            raise GenerationRefused(build.generation, str(exc)) from exc
        log.info("loaded generation %d: %d slices of %d patients, preset %s", build.generation,
                 len(view.slice_ids), len(view.patients), build.preset)
        return retrieval

    def consistency_problems(self) -> list[str]:
        """What /readyz checks: every index holds exactly the catalogue's slice ids."""
        problems = []
        for space in SPACES:
            index = self.indices[space]
            if index.d != DIMS[space]:
                problems.append(f"{space} index has {index.d} dimensions, not {DIMS[space]}")
            if index.ntotal != len(self.slice_ids):
                problems.append(f"{space} index holds {index.ntotal} vectors, the catalogue "
                                f"{len(self.slice_ids)} slices")
            elif not np.array_equal(np.sort(store.index_ids(index)), self.slice_ids):
                problems.append(f"{space} index ids differ from the catalogue's")
        if self.build.slices != len(self.slice_ids):
            problems.append(f"build {self.build.generation} records {self.build.slices} slices, "
                            f"the catalogue holds {len(self.slice_ids)}")
        return problems

    def active_generation(self) -> int | None:
        """The generation the catalogue has active now: past the one held after an add or
        remove, until ``reopen`` loads it."""
        with Session(self.engine) as session:
            build = active_build(session)
            return None if build is None else build.generation

    def close(self) -> None:
        """Closes what every generation of this process shares: call once, at shutdown."""
        self.engine.dispose()


    # -- the model -------------------------------------------------------------------------------

    @torch.inference_mode()
    def draw(self, image: np.ndarray, timings: Timings) -> Drawn:
        """Encode a (256, 256) slice; draw x_hat+, x_hat- and the predicted lesion."""
        with self._inference, timings.stage("encode"):
            x = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None]
            x = x.to(self.device)
            drawn = self.model.draw(x)  # codes, logits, x_hat+, x_hat-: (1, ., 256, 256)
            codes = drawn.codes
            return Drawn(
                codes=Codes(codes.normal_indices[0].cpu().numpy(),
                            codes.abnormal_indices[0].cpu().numpy()),
                reconstruction=drawn.reconstruction[0, 0].clamp(0, 1).float().cpu().numpy(),
                pseudo_normal=drawn.pseudo_normal[0, 0].clamp(0, 1).float().cpu().numpy(),
                labels=CLASS_TO_BRATS[drawn.logits[0].argmax(0).cpu().numpy()],
            )

    @torch.inference_mode()
    def draw_pair(self, normal: np.ndarray, abnormal: np.ndarray,
                  timings: Timings) -> tuple[np.ndarray, np.ndarray]:
        """The composite image of one normal and one abnormal index map, and its lesion labels."""
        with self._inference, timings.stage("encode"):
            n = torch.from_numpy(normal.astype(np.int64))[None].to(self.device)
            a = torch.from_numpy(abnormal.astype(np.int64))[None].to(self.device)
            logits = self.model.segment(self.model.abnormal_quantizer.lookup(a))
            image = self.model.decode_indices(n, a)
            return (image[0, 0].clamp(0, 1).float().cpu().numpy(),
                    CLASS_TO_BRATS[logits[0].argmax(0).cpu().numpy()])

    # -- search ----------------------------------------------------------------------------------

    def search(self, space: str, codes: Codes, k: int, timings: Timings,
               exclude_patient: str | None = None, has_abnormality: bool | None = None,
               exclude_patient_ids: tuple[int, ...] = (), group_by_patient: bool = False,
               lesion: bool | None = None) -> list[Hit]:
        """The k nearest slices to a query's codes in ``space``, filters applied inside FAISS.

        ``group_by_patient``: the nearest slice of each of the k nearest patients. Fewer than k
        come back only when fewer than k slices (patients) pass the filters. ``lesion``: whether
        the query has one (predicted, or the stored slice's flag), which reference its match
        percentiles are read against (``Reference.group``).
        """
        if space not in SPACES:
            raise ValueError(f"unknown space {space!r}: use one of {', '.join(SPACES)}")
        with timings.stage("search"):
            query = space_vectors(self.codebooks, codes.normal[None], codes.abnormal[None],
                                  spaces=(space,))[space]
            keep = self._kept(exclude_patient, exclude_patient_ids, has_abnormality)
            filtered = not keep.all()
            available = int(keep.sum())
            # Grouped: each patient holds at most `slices_per_patient` of the nearest m, so the
            # nearest k * slices_per_patient hold k distinct patients whenever k exist.
            wanted = k * self.slices_per_patient if group_by_patient else k
            k_eff = int(min(wanted, available))
            if k_eff == 0:
                return []
            if filtered or k_eff > 2048:
                # The selector sees slice ids (a flat index's IndexIDMap2 translates it to its
                # rows; a codebook index holds the ids itself), in parameters of the index's kind.
                # GPU indices take no selector (and no k over 2048): those run on the CPU copy.
                params = (store.search_parameters(
                    self.indices[space], faiss.IDSelectorBatch(self.slice_ids[keep]))
                    if filtered else None)
                distances, ids = self.indices[space].search(query, k_eff, params=params)
            else:
                distances, ids = self.search_indices[space].search(query, k_eff)
            distances, ids = distances[0], ids[0]
            valid = ids >= 0
            distances, ids = distances[valid], ids[valid]
            rows = np.searchsorted(self.slice_ids, ids)
            if group_by_patient:
                # FAISS returns them nearest first: a patient's first row is its nearest slice.
                _, first = np.unique(self.slice_patient[rows], return_index=True)
                pick = np.sort(first)[:k]
                distances, ids, rows = distances[pick], ids[pick], rows[pick]
            # A match is only as good as the query is a brain slice like those indexed: an
            # image whose anatomy is unlike every indexed slice's (noise, another body part)
            # matches nothing, even where its lesion code is the common null code.
            unlike = space != "normal" and self.anatomy_unlike(codes, lesion)
        with timings.stage("catalogue"):
            hits = []
            for rank, (dist, sid, row) in enumerate(zip(distances, ids, rows, strict=True),
                                                    start=1):
                stored = self.codes[row]
                other = space_vectors(self.codebooks, stored[0][None].astype(np.int64),
                                      stored[1][None].astype(np.int64), spaces=(space,))[space]
                ext, has_labels = self.patients[int(self.slice_patient[row])]
                flag = int(self.slice_abnormal[row])
                study, series = self.patient_uids.get(int(self.slice_patient[row]), (None, None))
                hits.append(Hit(rank=rank, slice_id=int(sid), patient_id=ext,
                                study_uid=study, series_uid=series,
                                slice_index=int(self.slice_index[row]),
                                distance=float(dist), has_abnormality=None if flag < 0 else
                                bool(flag), has_labels=has_labels,
                                position_distances=position_distances(query, other),
                                match_percentile=None if self.reference is None else
                                0.0 if unlike else
                                self.reference.match_percentile(space, float(dist), lesion)))
        return hits

    def example(self) -> dict | None:
        """The page's example slice (``indexer.reference.choose_example``): slice_id, patient_id
        and slice_index; None when the index has none."""
        row = -1 if self.reference is None or self.reference.example is None else (
            self.reference.example)
        if not 0 <= row < len(self.slice_ids):
            return None
        return {"slice_id": int(self.slice_ids[row]),
                "patient_id": self.patients[int(self.slice_patient[row])][0],
                "slice_index": int(self.slice_index[row])}

    def anatomy_unlike(self, codes: Codes, lesion: bool | None) -> bool:
        """Whether the query's normal code lies farther from every indexed slice's than any
        sampled indexed slice lies from its nearest slice of another patient (one 1-NN search
        in the normal space; False without a reference)."""
        if self.reference is None or not len(self.slice_ids):
            return False
        query = space_vectors(self.codebooks, codes.normal[None], codes.abnormal[None],
                              spaces=("normal",))["normal"]
        distance = float(self.search_indices["normal"].search(query, 1)[0][0, 0])
        return self.reference.far("normal", distance, lesion) is not None

    def _kept(self, exclude_patient: str | None, exclude_patient_ids: tuple[int, ...],
              has_abnormality: bool | None) -> np.ndarray:
        """(N,) bool: the rows the filters let through."""
        excluded = list(exclude_patient_ids)
        if exclude_patient is not None:
            excluded.append(self.patient_id(exclude_patient))
        keep = np.ones(len(self.slice_ids), bool)
        if excluded:
            keep &= ~np.isin(self.slice_patient, excluded)
        if has_abnormality is not None:
            keep &= self.slice_abnormal == int(has_abnormality)
        return keep

    def compose_weights(self, lesion: bool | None) -> tuple[float, float]:
        """Weights of the normal and abnormal halves of a balanced composed distance: one over
        each space's median best-match distance for a query of this status (1, 1 without a
        reference). A median of 0 (most slices of this status share one code exactly, as
        lesion-free ones share the null code) gives weight 1: any other code then counts by its
        squared distance, far beyond a typical match of the other half."""
        if self.reference is None:
            return 1.0, 1.0
        medians = [self.reference.median(s, lesion) for s in ("normal", "abnormal")]
        return tuple(1.0 / m if m > 0 else 1.0 for m in medians)

    def compose_halves(self, codes: Codes, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Squared L2 of each half ("normal", "abnormal") between a query's codes and the stored
        codes of ``rows`` (indices into the loaded arrays), each (len(rows),): exact, through the
        codebooks' distance tables (64 look-ups per half and slice, ``COLUMNS`` slices at a
        time), with no FAISS search."""
        tables = {name: self.code_tables[name][np.asarray(idx, np.int64).reshape(64)]  # (64, K)
                  for name, idx in (("normal", codes.normal), ("abnormal", codes.abnormal))}
        positions = np.arange(64)[None, :]
        halves = {name: np.empty(len(rows)) for name in tables}
        for start in range(0, len(rows), COLUMNS):
            block = self.codes[rows[start:start + COLUMNS]].reshape(-1, 2, 64)
            for c, name in enumerate(("normal", "abnormal")):
                halves[name][start:start + COLUMNS] = tables[name][
                    positions, block[:, c].astype(np.int64)].sum(1)
        return halves

    def compose(self, codes: Codes, k: int, timings: Timings, weighting: str = "overlap",
                exclude_patient: str | None = None, has_abnormality: bool | None = None,
                exclude_patient_ids: tuple[int, ...] = (), group_by_patient: bool = False,
                lesion: bool | None = True) -> list[Hit]:
        """The k slices nearest to one slice's anatomy (``codes.normal``) joined with another's
        lesion (``codes.abnormal``).

        ``overlap`` (default): the anatomy half's squared distance over its typical best-match
        distance, plus ``OVERLAP_WEIGHT`` times one minus the soft Dice between the lesion the
        model reads from the donor's abnormal code and the one it reads from each slice's
        (``indexer.lesion_maps``): this anatomy, with a lesion where the donor has one. A donor
        in which the model sees no lesion leaves the anatomy to decide.
        ``balanced``: each half's squared distance over its typical best-match distance
        (``compose_weights``), summed. A lesion-free slice's null code can lie nearer a lesion
        code than another lesion elsewhere does, and a lesion code's distance outweighs small
        anatomy differences, so the lesion donor's own neighbours tend to come back.
        ``plain``: the paper's L2 in the concat space, where the half with the larger norms
        decides (a lesion code's: the lesion donor's own neighbours come back, issue 22).
        ``overlap`` and ``balanced`` are computed exactly from the stored codes
        (``compose_halves``); a hit's ``distance`` is the ranked sum and its match percentile
        the lower of its two halves'.
        """
        if weighting == "plain":
            return self.search("concat", codes, k, timings, exclude_patient=exclude_patient,
                               has_abnormality=has_abnormality,
                               exclude_patient_ids=exclude_patient_ids,
                               group_by_patient=group_by_patient, lesion=lesion)
        if weighting not in COMPOSE_WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}: use "
                             f"{', '.join(COMPOSE_WEIGHTINGS)}")
        w_normal, w_abnormal = self.compose_weights(lesion)
        if weighting == "overlap":
            with self._inference, timings.stage("encode"):
                donor = decode_maps(self.model, np.asarray(codes.abnormal).reshape(1, 8, 8),
                                    self.device)[0]
        with timings.stage("search"):
            keep = np.flatnonzero(self._kept(exclude_patient, exclude_patient_ids,
                                             has_abnormality))
            if keep.size == 0 or k <= 0:
                return []
            halves = self.compose_halves(codes, keep)
            if weighting == "overlap":
                overlap = self.lesion_maps.overlap(donor, keep)
                total = w_normal * halves["normal"] + OVERLAP_WEIGHT * (1.0 - overlap)
            else:
                total = w_normal * halves["normal"] + w_abnormal * halves["abnormal"]
            order = np.argsort(total, kind="stable")
            if group_by_patient:
                _, first = np.unique(self.slice_patient[keep[order]], return_index=True)
                order = order[np.sort(first)]
            order = order[:k]
        with timings.stage("catalogue"):
            query = space_vectors(self.codebooks, codes.normal[None], codes.abnormal[None],
                                  spaces=("normal", "abnormal"))
            hits = []
            for rank, i in enumerate(order, start=1):
                row = int(keep[i])
                stored = self.codes[row].astype(np.int64)
                other = space_vectors(self.codebooks, stored[0][None], stored[1][None],
                                      spaces=("normal", "abnormal"))
                ext, has_labels = self.patients[int(self.slice_patient[row])]
                flag = int(self.slice_abnormal[row])
                match = None if self.reference is None else min(
                    self.reference.match_percentile("normal", halves["normal"][i], lesion),
                    self.reference.match_percentile("abnormal", halves["abnormal"][i], lesion))
                study, series = self.patient_uids.get(int(self.slice_patient[row]), (None, None))
                hits.append(Hit(
                    rank=rank, slice_id=int(self.slice_ids[row]), patient_id=ext,
                    study_uid=study, series_uid=series,
                    slice_index=int(self.slice_index[row]), distance=float(total[i]),
                    has_abnormality=None if flag < 0 else bool(flag), has_labels=has_labels,
                    position_distances=w_normal * position_distances(
                        query["normal"], other["normal"]) + (
                        lesion_term(donor, self.lesion_maps.of_rows(np.array([row]))[0],
                                    OVERLAP_WEIGHT * (1.0 - overlap[i]))
                        if weighting == "overlap" else
                        w_abnormal * position_distances(query["abnormal"], other["abnormal"])),
                    match_percentile=match))
        return hits

    def patient_id(self, external_id: str) -> int:
        """The internal id of an indexed patient; ``NotFound`` names an unknown one."""
        pid = self.patient_by_external.get(external_id)
        if pid is None:
            raise NotFound(f"patient {external_id!r} is not in the index")
        return pid

    def far_warning(self, space: str, hits: list[Hit], lesion: bool | None = None) -> str | None:
        """A reader's warning when even the nearest hit is farther from the query than any
        sampled indexed slice is from its nearest slice of another patient (match percentile 0
        against slices of the query's status): the query is unlike this archive. ``space``
        "compose" reads the balanced composed hits' match (the lower of their two halves')."""
        if not hits or self.reference is None:
            return None
        if space == "compose":
            if hits[0].match_percentile is None or hits[0].match_percentile > 0:
                return None
            return ("No indexed slice has both this anatomy and a lesion like this one as "
                    "closely as indexed patients typically resemble each other: the nearest "
                    "results differ from the composed query, in anatomy, lesion or both. Read "
                    "them with caution.")
        if hits[0].match_percentile is None or hits[0].match_percentile > 0:
            return None
        # match 0 within the space's own reference: the anatomy (search's cap) decided
        anatomy = self.reference.far(space, hits[0].distance, lesion) is None
        what = "its anatomy" if anatomy or space == "normal" else {
            "abnormal": "its lesion" if lesion else "its lesion code",
            "concat": "its anatomy and lesion together"}[space]
        return (f"Nothing in this archive resembles this image closely ({what}, in the {space} "
                f"space): even the nearest slice is farther from it than indexed patients' "
                f"slices typically are from each other. The image may not be an axial "
                f"post-contrast T1 brain slice like those indexed (another sequence, "
                f"orientation or body part), or it comes from a scanner or preprocessing unlike "
                f"the archive's. Read these results with caution.")

    def patient_list(self) -> list[tuple[str, int, bool, int]]:
        """Every indexed patient: external id, slices, whether labelled, slices with a lesion."""
        counts = np.bincount(self.slice_patient, minlength=max(self.patients, default=0) + 1)
        lesion = np.bincount(self.slice_patient, weights=self.slice_abnormal == 1,
                             minlength=len(counts))
        return sorted((ext, int(counts[pid]), has, int(lesion[pid]))
                      for pid, (ext, has) in self.patients.items())

    def slice_codes(self, slice_id: int) -> tuple[Codes, int]:
        """An indexed slice's codes and its (internal) patient id."""
        row = self._row(slice_id)
        stored = self.codes[row].astype(np.int64)
        return Codes(stored[0], stored[1]), int(self.slice_patient[row])

    def stored_flag(self, slice_id: int) -> bool | None:
        """Whether an indexed slice's labels hold a lesion; None without labels."""
        flag = int(self.slice_abnormal[self._row(slice_id)])
        return None if flag < 0 else bool(flag)

    def _row(self, slice_id: int) -> int:
        row = int(np.searchsorted(self.slice_ids, slice_id))
        if row >= len(self.slice_ids) or self.slice_ids[row] != slice_id:
            raise NotFound(f"slice {slice_id} is not in the index")
        return row

    # -- catalogue and images --------------------------------------------------------------------

    def slice_row(self, slice_id: int) -> tuple[SliceRecord, str]:
        """A slice's catalogue row and its patient's external id, as this generation holds
        them (read at load, so a newer generation's changes never show here)."""
        record = self.view.record(self._row(slice_id))
        return record, self.patients[record.patient_id][0]

    def patient(self, external_id: str) -> tuple[PatientRecord,
                                                 list[tuple[int, int, bool | None]]]:
        """A patient's row and its slices (id, axial index, lesion flag) by axial index."""
        pid = self.patient_id(external_id)
        rows = np.flatnonzero(self.slice_patient == pid)
        rows = rows[np.argsort(self.slice_index[rows], kind="stable")]
        slices = [(int(self.slice_ids[r]), int(self.slice_index[r]),
                   None if self.slice_abnormal[r] < 0 else bool(self.slice_abnormal[r]))
                  for r in rows]
        return self.view.patients[pid], slices

    def has_labels(self, slice_id: int) -> bool:
        return self.patients[int(self.slice_patient[self._row(slice_id)])][1]

    def slice_pixels(self, slice_id: int) -> tuple[np.ndarray, np.ndarray | None]:
        """An indexed slice's image (256, 256) in [0, 1] and its BraTS labels, if any."""
        row = self._row(slice_id)
        pid, index = int(self.slice_patient[row]), int(self.slice_index[row])
        try:
            thumbs = self.source.thumbnails.get(pid)
        except FileNotFoundError:
            # A newer generation removed the patient and its writer deleted the file while a
            # request held this one: the patient is no longer in the index.
            raise NotFound(f"patient {self.patients[pid][0]} was removed from the index after "
                           f"this request started") from None
        at = np.flatnonzero(thumbs["slice_index"] == index)
        if at.size != 1:
            raise NotFound(f"slice {slice_id}: no stored image (thumbnails of patient "
                           f"{self.patients[pid][0]} lack slice {index})")
        image = thumbs["image"][at[0]].astype(np.float32) / 255.0
        labels = thumbs["labels"][at[0]] if "labels" in thumbs else None
        return image, labels

    def counts(self) -> dict[str, int]:
        return {"patients": len(self.patients), "slices": len(self.slice_ids),
                "abnormal_slices": int((self.slice_abnormal == 1).sum())}
