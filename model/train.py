"""Training the decomposition network: ``cbir train``.

Step-based, reproducible and resumable: the batch of step t is drawn from the (seed, epoch)
shuffle, and torch is re-seeded from (seed, t) before augmenting and restarting dead codes, so a
step run after ``--resume`` draws exactly what it would have drawn in an uninterrupted run. A
wall-clock budget (``minutes``) or a signal stops a run cleanly: it evaluates, checkpoints and
returns. Every evaluation appends one JSON line to ``<out>.metrics.jsonl`` and redraws
``<out>.curves.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ingest.layouts import find_cases_in
from model.atomic import exclusive_lock
from model.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from model.config import preset as model_preset
from model.curves import plot_curves, read_log
from model.data.dataset import SliceDataset
from model.data.synth.appearance import SLAB_HALF, render_batch
from model.data.synth.residue import draw_residues
from model.distributed import GlobalBatchNorm, Processes, from_environment, shutdown, wrap
from model.held_out import evaluate
from model.losses import DecompositionLoss, LossWeights
from model.network import DecompositionNet

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """The recipe of a run. It travels in the checkpoint; ``--resume`` continues with it."""

    preset: str = "cpu"
    steps: int = 20_000  # planned optimizer steps: the learning-rate schedule spans them
    batch_size: int = 8
    lr: float = 1e-3  # peak Adam learning rate (the paper's 5e-3 collapsed the codebooks here)
    min_lr: float = 5e-5  # cosine decay ends here at ``steps``
    warmup_steps: int = 200  # linear warm-up from lr / 10 to lr
    weight_decay: float = 1e-5  # the authors' code
    seed: int = 0
    val_fraction: float = 0.1  # patients held out for the evaluations
    eval_every: int = 500  # steps between held-out evaluations (and checkpoints)
    # Evaluate on this many held-out slices, evenly spaced through them (None or 0: all of
    # them). A sample ranks checkpoints less surely: 300 of 1,209 slices read stage 5 0.13-0.24
    # higher than three other 300-slice samples did (the model card, 2026-12-07).
    eval_slices: int | None = None
    augment: bool = True  # horizontal flip, scale 0.9-1.1, rotation +-10 degrees
    # Probability that a training slice with a tissue map (synthetic cohorts) is drawn afresh
    # from it with a random appearance (model/data/synth/appearance.py) instead of its stored
    # image: learning from label maps, as SynthSeg does. 0: the stored images only.
    render: float = 0.0
    # Of those drawn afresh, the probability that one is drawn as a thick-sliced clinical scan
    # resampled to 1 mm shows it: partial volume through the plane, from the tissue levels around
    # the slice (appearance.render_thick). 0: every drawn slice is a 1 mm one.
    thick_slices: float = 0.0
    # Of those drawn afresh, the probability that one gets a band of dura or sinus along parts of
    # its brain's edge, as skull stripping leaves on real scans (model/data/synth/residue.py).
    residue: float = 0.0
    # Decay of an exponential moving average of the weights (Polyak averaging), updated after
    # every optimizer step; 0: off. When on, the held-out evaluations, the selection and
    # ``<out stem>.best.pt`` read the averaged weights, while the optimizer keeps training the
    # live ones (both travel in the training checkpoint). 0.999 averages over about the last
    # 1,000 steps; with it, evaluations 500 steps apart still moved by up to 0.08 in score
    # (runs T and U, the model card).
    ema: float = 0.0
    # Cohorts of real scans measured at every evaluation (model/held_out.py, monitor_figures):
    # logged beside the held-out figures, never trained on, never used to select a checkpoint.
    monitor: list[str] = field(default_factory=list)
    # Only slices with a lesion move the abnormal codebook (EMA, data init, restarts): Appendix C
    # trains the abnormal code towards its codebook only where abnormality exists.
    lesion_codebook: bool = True
    # The abnormal code by position, with a fixed null code for lesion-free positions
    # (ModelConfig.abnormal_null_code; model/losses.py). Off: the paper's slice-level L_dis.
    null_code: bool = False
    # With null_code: the unit that takes the null code is the SLICE, not the code position. A
    # lesion-free slice takes it at every position, a slice with a lesion commits every position
    # to the other codes, so in the abnormal space every lesion-free slice is one point, far
    # from every slice with a lesion (model/losses.py, ``null_by_slice``).
    null_by_slice: bool = False
    abnormal_gate: bool = False  # ModelConfig.abnormal_gate: a slice-level gate on the code
    gate_by_position: bool = False  # ModelConfig.gate_by_position: the gate from its positions
    # Warm start: the model weights of this checkpoint (an exported or a training one); the
    # optimizer, the schedule and the step start afresh. None: He initialisation.
    init_from: str | None = None
    bf16: bool = True  # bf16 autocast where the CPU or GPU supports it; losses, VQ in fp32
    channels_last: bool = True  # NHWC memory format (faster convolutions on the CPU)
    weights: LossWeights = field(default_factory=lambda: LossWeights(rec=5.0))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        values = dict(values)
        weights = LossWeights(**values.pop("weights", {}))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainingError(f"unknown training settings in the checkpoint: "
                                f"{', '.join(unknown)}")
        return cls(**values, weights=weights)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up from lr / 10, then cosine decay to min_lr at ``config.steps``."""
    if step < config.warmup_steps:
        return config.lr * (0.1 + 0.9 * step / config.warmup_steps)
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def use_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast runs natively here (AVX-512 BF16 / AMX on the CPU, or CUDA)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class TrainingError(ValueError):
    """Bad training input, named: an empty data folder, a mismatched checkpoint."""


def data_fingerprint(case_files: list[tuple[str, list[Path]]]) -> str:
    """sha256 over patient ids and the bytes of their image and label files."""
    h = hashlib.sha256()
    for pid, files in sorted(case_files):
        h.update(pid.encode())
        for f in files:
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def _data_change(recorded: list[str] | None, found: list[str]) -> str:
    """Why two data fingerprints differ, as far as the recorded patient list tells."""
    if recorded is None:  # a checkpoint written before the list was recorded
        return "fingerprint differs"
    added, removed = sorted(set(found) - set(recorded)), sorted(set(recorded) - set(found))
    if not added and not removed:
        return (f"the same {len(found)} patients, but their image or label files differ in "
                f"bytes")
    return (f"{len(added)} patients not in the recorded data (e.g. {(added or ['-'])[0]}), "
            f"{len(removed)} recorded ones missing (e.g. {(removed or ['-'])[0]})")


def split_patients(pids: list[str], fraction: float, seed: int) -> set[str]:
    """The held-out patient ids: a seeded draw of round(fraction * n), at least 1 when n >= 2."""
    if len(pids) < 2 or fraction <= 0:
        return set()
    count = min(len(pids) - 1, max(1, round(fraction * len(pids))))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pids), generator=g).tolist()
    return {sorted(pids)[i] for i in order[:count]}


def augment(batch: dict, generator: torch.Generator) -> dict:
    """Flip, scale and rotate each slice of a batch and its labels identically (training only)."""
    image = batch["image"]
    b = image.shape[0]
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    scale = 0.9 + 0.2 * torch.rand(b, generator=generator)
    angle = torch.deg2rad(-10 + 20 * torch.rand(b, generator=generator))
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, torch.zeros(b)], 1),
                         torch.stack([sin * flip, cos, torch.zeros(b)], 1)], 1)
    theta = theta.to(image.device, image.dtype)
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    out = dict(batch)
    out["image"] = F.grid_sample(image, grid, mode="bilinear", align_corners=False)
    labels = batch["abnormal"][:, None].to(image.dtype)
    out["abnormal"] = F.grid_sample(labels, grid, mode="nearest",
                                    align_corners=False)[:, 0].long()
    return out


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _batch(dataset: SliceDataset, items: list[int], patient_number: dict[str, int]) -> dict:
    rows = [dataset[i] for i in items]
    batch = {key: torch.stack([r[key] for r in rows])
             for key in ("image", "abnormal", "tissue", "tissue_slab") if key in rows[0]}
    batch["patient"] = torch.tensor([patient_number[r["pid"]] for r in rows])
    batch["has_tissue"] = torch.tensor([bool(r["has_tissue"]) for r in rows])
    return batch


def redraw(batch: dict, probability: float, seed: int, device: torch.device,
           thick: float = 0.0, residue: float = 0.0) -> dict:
    """Replace each slice that has a tissue map, with ``probability``, by a fresh rendering of
    it (``appearance.render_batch``; with ``thick`` and the batch's ``tissue_slab``, some as
    thick-sliced scans; with ``residue``, some with a stripping residue at the brain's edge,
    ``residue.draw_residues``); its labels stay. Every draw is a function of ``seed``, and
    ``residue`` 0 draws exactly what it draws without it."""
    g = torch.Generator().manual_seed(seed)
    draw = torch.rand(len(batch["image"]), generator=g) < probability
    chosen = draw & batch["has_tissue"].cpu()
    if not chosen.any():
        return batch
    rows = chosen.nonzero().flatten().to(device)
    slabs = batch.get("tissue_slab")
    tissue = batch["tissue"][rows].long()
    slabs = None if slabs is None else slabs[rows]
    if residue > 0:
        tissue, slabs = draw_residues(tissue, slabs, residue, np.random.default_rng([seed, 2]))
    fresh = render_batch(tissue,
                         torch.Generator(device=device).manual_seed(seed),
                         np.random.default_rng(seed),
                         slabs=slabs, thick=thick)
    out = dict(batch)
    out["image"] = batch["image"].index_copy(0, rows, fresh.to(batch["image"].dtype))
    return out


class WeightAverage:
    """An exponential moving average of a model's state (``decay`` per update), kept in a copy
    of the model that the evaluations read.

    Floating-point tensors (weights, BatchNorm statistics, the codebooks and their EMA sums)
    are averaged; counters and flags (``num_batches_tracked``, a quantizer's ``initialized``)
    follow the live model, as ``model.checkpoint.average_checkpoints`` treats them.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise TrainingError(f"--ema must lie in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        live = model.state_dict()
        for name, average in self.model.state_dict().items():
            value = live[name]
            if average.is_floating_point():
                average.lerp_(value.to(average.dtype), 1.0 - self.decay)
            else:
                average.copy_(value)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


def _order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled training order of one epoch: a function of (seed, epoch) only."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class _StopFlag:
    """Set by SIGINT/SIGTERM: the run finishes its step, evaluates, checkpoints and returns."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: dict = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._set)
        return self

    def _set(self, signum, frame) -> None:
        if self.raised:  # a second signal: stop now
            raise KeyboardInterrupt
        self.raised = True
        log.warning("stop requested: finishing the step, evaluating and checkpointing")

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _load_cases(data: list[Path] | list[str]) -> tuple[list, list]:
    try:
        scan = find_cases_in(data)
    except FileNotFoundError as exc:  # a missing folder, or none with a usable case
        raise TrainingError(str(exc)) from exc
    return scan.cases, scan.skipped


def _monitor_dataset(folders: list[str], progress: bool) -> SliceDataset | None:
    if not folders:
        return None
    cases, _ = _load_cases(folders)
    dataset = SliceDataset(cases, progress=progress)
    if len(dataset) == 0:
        raise TrainingError(f"no readable brain slice to monitor in {', '.join(folders)}")
    return dataset


_GATE_LAYERS = ("encoder.abnormal_gate.", "encoder.position_gate.")


def _warm_start(model: DecompositionNet, path: Path, preset: str) -> None:
    """Load the model weights of ``path`` into ``model`` (same preset and shapes)."""
    try:
        state = read_checkpoint(path)
    except CheckpointError as exc:
        raise TrainingError(f"cannot start from {path}: {exc}") from exc
    if state["preset"] != preset:
        raise TrainingError(f"cannot start from {path}: it is a '{state['preset']}' "
                            f"checkpoint, this run trains '{preset}'")
    try:
        # A gate the source lacks keeps its init; a gate of another kind than this run's
        # (pooled or by position) is left behind.
        missing, unexpected = model.load_state_dict(state["model"], strict=False)
    except RuntimeError as exc:
        raise TrainingError(f"cannot start from {path}: its weights do not fit the "
                            f"'{preset}' model ({str(exc).splitlines()[0]})") from exc
    misfit = [k for k in missing if not k.startswith(_GATE_LAYERS)]
    misfit += [k for k in unexpected
               if not (k.startswith(_GATE_LAYERS) and model.config.abnormal_gate)]
    if misfit:
        raise TrainingError(f"cannot start from {path}: its weights do not fit the "
                            f"'{preset}' model ({', '.join(misfit[:4])})")
    if model.config.abnormal_null_code:  # a source trained without one: row 0 becomes it
        model.abnormal_quantizer.reset_null_code()


def slice_dataset(cases: list, config: TrainConfig, held_out: set[str],
                  progress: bool = False) -> SliceDataset:
    """The slices a run with ``config`` reads: twins for the ``held_out`` patients, tissue maps
    when it re-renders, and slabs of levels when it draws thick slices. ``bench.selection_samples``
    scores other checkpoints on the same slices."""
    return SliceDataset(cases, progress=progress, twins=held_out, tissue=config.render > 0,
                        slab_half=SLAB_HALF if config.thick_slices > 0 else 0)


def _resume_state(out: Path, config: TrainConfig, fingerprint: str, patients: list[str],
                  accept_new_data: bool, log_line: Callable[[str], None] | None) -> dict:
    try:
        state = read_checkpoint(out)
    except CheckpointError as exc:
        raise TrainingError(f"cannot resume: {exc}") from exc
    if "step" not in state or "optimizer" not in state:
        raise TrainingError(f"cannot resume: {out} has no training state (an exported "
                            f"checkpoint?); resume from the training checkpoint")
    if state["preset"] != config.preset:
        raise TrainingError(f"cannot resume: {out} is a '{state['preset']}' checkpoint, "
                            f"this run asks for '{config.preset}'")
    if state.get("data_fingerprint") != fingerprint:
        what = _data_change(state.get("data_patients"), patients)
        if not accept_new_data:
            raise TrainingError(
                f"cannot resume: {out} was trained on other data ({what}); if these are the "
                f"same cases written again (a cohort re-synthesized or copied on another "
                f"machine), pass --accept-new-data")
        if log_line is not None:
            log_line(f"resuming on data other than {out} recorded ({what}): accepted by "
                     f"--accept-new-data")
    recorded = TrainConfig.from_dict(state["train_config"])
    if recorded != config:
        ours, theirs = config.to_dict(), recorded.to_dict()
        diff = ", ".join(f"{k} {theirs[k]} -> {ours[k]}" for k in ours if ours[k] != theirs[k])
        raise TrainingError(f"cannot resume: {out} was trained with other settings ({diff}); "
                            f"resume with the recorded ones")
    return state


def train(data: list[Path], out: Path, config: TrainConfig, resume: bool = False,
          minutes: float | None = None, progress: bool = True,
          log_line: Callable[[str], None] | None = None, accept_new_data: bool = False) -> dict:
    """Train until ``config.steps`` or until ``minutes`` of wall time have passed in this run.

    Evaluates on the held-out patients and checkpoints ``out`` atomically every
    ``config.eval_every`` steps and when it stops; ``<out stem>.best.pt`` holds the checkpoint
    with the best held-out score so far. One JSON line per evaluation goes to
    ``<out>.metrics.jsonl`` and the curves to ``<out>.curves.png``. A run resumed with
    ``resume=True`` continues exactly where the checkpoint stopped (same batches, same
    augmentation, same schedule), so one training can be split into several runs. It refuses
    data whose fingerprint differs from the recorded one unless ``accept_new_data``: a cohort
    synthesized again on another machine can differ in bytes (floating point), not in cases.

    Launched by ``torchrun --nproc-per-node N``, the N processes train together
    (model/distributed.py): each step is the one-process step on the same global batch of
    ``config.batch_size`` slices, rank 0 evaluates and checkpoints, and a resume may use another N.
    """
    processes = from_environment()
    try:
        with _writer_lock(Path(out), processes is None or processes.main):
            return _train(data, out, config, resume, minutes, progress, log_line, processes,
                          accept_new_data)
    finally:
        shutdown(processes)


@contextmanager
def _writer_lock(out: Path, held: bool) -> Iterator[None]:
    """One training run per ``out``: an exclusive lock on ``<out>.lock`` for the whole run, so
    that a second ``cbir train --out`` on the same checkpoint (a ``--resume`` started while the
    first is still evaluating on its way out) fails at once instead of loading a state the first
    is about to replace and then overwriting the first's checkpoint, best weights and record.
    Only the process that writes (rank 0 of a distributed run) holds it."""
    if not held:
        yield
        return
    path = out.with_name(out.name + ".lock")
    with exclusive_lock(path, lambda: TrainingError(
            f"{out}: another cbir train is writing this checkpoint (it holds {path}); wait for "
            f"it to stop, or choose another --out")):
        yield


def _train(data: list[Path], out: Path, config: TrainConfig, resume: bool,
           minutes: float | None, progress: bool, log_line: Callable[[str], None] | None,
           processes: Processes | None, accept_new_data: bool = False) -> dict:
    started = time.monotonic()
    main = processes is None or processes.main
    progress = progress and main
    if processes is not None and config.batch_size % processes.world:
        raise TrainingError(f"--batch-size {config.batch_size} (the global batch) does not "
                            f"split over {processes.world} processes: use a multiple of "
                            f"{processes.world}")
    out = Path(out)
    if (config.weights.gate or config.gate_by_position) and not config.abnormal_gate:
        raise TrainingError("a gate weight or a gate by position needs the gate: add "
                            "--abnormal-gate")
    if config.gate_by_position and not config.weights.gate:
        raise TrainingError("the gate by position learns from its cross-entropy alone: give "
                            "it a --gate-weight")
    if config.thick_slices > 0 and config.render == 0:
        raise TrainingError("--thick-slices draws some of the slices --render draws afresh: "
                            "give --render too")
    if config.residue > 0 and config.render == 0:
        raise TrainingError("--residue draws on some of the slices --render draws afresh: "
                            "give --render too")
    cases, skipped = _load_cases(data)
    patients = sorted(c.pid for c in cases)
    fingerprint = data_fingerprint(
        [(c.pid, [f for f in (c.t1ce, c.seg) if f is not None]) for c in cases])
    model_config = dataclasses.replace(model_preset(config.preset),
                                       abnormal_null_code=config.null_code,
                                       abnormal_gate=config.abnormal_gate,
                                       gate_by_position=config.gate_by_position)
    state = None
    if resume and out.exists():
        state = _resume_state(out, config, fingerprint, patients, accept_new_data,
                              log_line if main else None)
    elif not resume and out.exists():
        raise TrainingError(f"{out} exists: pass --resume to continue it, or choose another "
                            f"--out")
    if processes is not None:  # every rank has checked `out` before rank 0 writes it
        processes.barrier()

    # The split is drawn from the patients found; only held-out ones need their twins in memory.
    held_out = split_patients([c.pid for c in cases], config.val_fraction, config.seed)
    dataset = slice_dataset(cases, config, held_out, progress)
    skipped += dataset.skipped
    if len(dataset) == 0:
        raise TrainingError("no readable brain slice in the data")
    held_out &= {p.pid for p in dataset.patients}
    monitor = _monitor_dataset(config.monitor, progress)
    val_idx = dataset.indices_of(held_out)
    train_idx = sorted(set(range(len(dataset))) - set(val_idx))
    eval_idx = val_idx
    if config.eval_slices and len(val_idx) > config.eval_slices:
        stride = len(val_idx) / config.eval_slices
        eval_idx = [val_idx[int(i * stride)] for i in range(config.eval_slices)]
    steps_per_epoch = max(len(train_idx) // config.batch_size, 1)

    device = processes.device if processes is not None else _device()
    torch.manual_seed(config.seed)
    model = DecompositionNet(model_config).to(device)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr,
                                 weight_decay=config.weight_decay)
    step, train_seconds, best = 0, 0.0, float("-inf")
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, train_seconds = int(state["step"]), float(state.get("train_seconds", 0.0))
        best = float(state.get("best_score", float("-inf")))
    elif config.init_from is not None:
        _warm_start(model, Path(config.init_from), config.preset)
    # The averaged weights start from the live ones (a warm start's, or the resumed run's when
    # its checkpoint predates --ema) and are what evaluations and the best checkpoint read.
    average = WeightAverage(model, config.ema) if config.ema > 0 else None
    if average is not None and state is not None and "ema" in state:
        average.load_state_dict(state["ema"])
    evaluated = average.model if average is not None else model
    # The forward pass of several processes: DDP, the rows of this rank (model/distributed.py).
    forward = wrap(model, processes) if processes is not None else model
    rows = processes.rows(config.batch_size) if processes is not None else slice(None)
    criterion = DecompositionLoss(config.weights, null_code=config.null_code,
                                  null_by_slice=config.null_by_slice)
    if state is not None and criterion.margin is not None and "margin_bank" in state:
        criterion.margin.load_state_dict(state["margin_bank"])
    patient_number = {p.pid: i for i, p in enumerate(dataset.patients)}
    bf16 = config.bf16 and use_bf16(device)
    metrics_path = out.with_name(out.name + ".metrics.jsonl")
    best_path = out.with_name(out.stem + ".best" + out.suffix)
    extra = {"train_config": config.to_dict(), "data_fingerprint": fingerprint,
             "data_patients": patients,
             "held_out_patients": sorted(held_out), "train_data": [str(d) for d in data],
             "hardware": _hardware(device, processes)}

    def checkpoint(record: dict) -> None:
        nonlocal best
        payload = {**extra, "step": step, "train_seconds": round(train_seconds, 1),
                   "optimizer": optimizer.state_dict(), "metrics": record}
        if criterion.margin is not None:  # the bank of recent codes, for an exact resume
            payload["margin_bank"] = criterion.margin.state_dict()
        if average is not None:  # the averaged weights, for an exact resume
            payload["ema"] = average.state_dict()
        score = record.get("held_out", {}).get("score")
        improved = score is not None and score > best
        if improved:
            best = score
        payload["best_score"] = best
        save_checkpoint(out, model, config.preset, extra=payload)
        if improved:
            save_checkpoint(best_path, evaluated, config.preset, extra={
                k: v for k, v in payload.items() if k not in ("optimizer", "margin_bank", "ema")}
                | {"weights": "ema" if average is not None else "live"})

    def evaluation(totals: dict, since: int, seconds: float) -> dict:
        if not main:  # rank 0 evaluates and checkpoints; the others wait for it
            processes.barrier()
            return {}
        t0 = time.monotonic()
        held = evaluate(evaluated, dataset, eval_idx, device, monitor=monitor) if eval_idx \
            else {}
        record = {
            "step": step,
            "slices_seen": step * config.batch_size,
            "train_min": round(train_seconds / 60, 2),
            "slices_per_s": round(since * config.batch_size / seconds, 2) if seconds else 0.0,
            "train_loss": {k: round(v / max(since, 1), 5) for k, v in totals.items()},
            "held_out": held,
            "lr": learning_rate(config, step),
            "eval_s": round(time.monotonic() - t0, 1),
        }
        checkpoint(record)
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        plot_curves(read_log(metrics_path), out.with_name(out.name + ".curves.png"),
                    title=f"{out.name}: preset {config.preset}, batch {config.batch_size}")
        if log_line:
            log_line(_summary(record))
        if processes is not None:
            processes.barrier()
        return record

    start_step = step
    record: dict = {}
    if step == 0 and val_idx:
        record = evaluation({}, 0, 0.0)  # the untrained baseline of the curves
    budget = None if minutes is None else minutes * 60
    last_eval_s = 0.0
    model.train()
    totals: dict[str, float] = {}
    since, window_start = 0, time.monotonic()
    bar = tqdm(total=config.steps, initial=step, desc="training", unit="step",
               disable=not progress)
    with _StopFlag() as stop:
        while step < config.steps:
            epoch, position = divmod(step, steps_per_epoch)
            order = _order(len(train_idx), config.seed, epoch)
            items = [train_idx[i] for i in order[position * config.batch_size:
                                                (position + 1) * config.batch_size]]
            # Augmentation, dead-code restarts and dropout-like draws: a function of the step.
            torch.manual_seed(config.seed * 1_000_003 + step)
            batch = _batch(dataset, items, patient_number)
            # Augment where the model runs: on a GPU the resampling would otherwise bound the step.
            batch = {k: v.to(device) for k, v in batch.items()}
            if config.render > 0:
                batch = redraw(batch, config.render, config.seed * 3_000_017 + step, device,
                               thick=config.thick_slices, residue=config.residue)
            if config.augment:
                batch = augment(batch, torch.Generator().manual_seed(config.seed * 7919 + step))
            x = batch["image"].contiguous(memory_format=memory_format)
            target = batch["abnormal"]
            lesion = None
            if config.lesion_codebook and config.null_code and not config.null_by_slice:
                cells = model_config.code_size
                lesion = F.adaptive_max_pool2d((target > 0)[:, None].float(), cells)[:, 0] > 0
            elif config.lesion_codebook:  # by slice
                lesion = (target > 0).flatten(1).any(1)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step)
            t0 = time.monotonic()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                if processes is None:
                    output = model(x, lesion=lesion)
                else:  # this rank's rows, the outputs of all (model/distributed.py)
                    with GlobalBatchNorm(processes):
                        output = forward(x[rows], lesion=None if lesion is None else
                                         lesion[rows])
                    output = processes.gather_output(output)
            loss, terms = criterion(output, x.float(), target, batch["patient"])
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at step {step + 1}: lower the "
                                    f"learning rate (--lr)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if average is not None:
                average.update(model)
            step += 1
            train_seconds += time.monotonic() - t0
            since += 1
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            totals["lesion_slices"] = totals.get("lesion_slices", 0.0) + float(
                (target > 0).flatten(1).any(1).sum())
            bar.set_postfix({k: f"{float(terms[k]):.3g}" for k in ("total", "seg", "rec")})
            bar.update()
            out_of_time = budget is not None and (
                time.monotonic() - started + last_eval_s >= budget)
            stop_now = stop.raised
            if processes is not None:  # every rank stops at the same step
                out_of_time, stop_now = processes.any(out_of_time), processes.any(stop_now)
            if step % config.eval_every == 0 or step == config.steps or out_of_time \
                    or stop_now:
                record = evaluation(totals, since, time.monotonic() - window_start)
                last_eval_s = record.get("eval_s", 0.0) + 5.0
                totals, since, window_start = {}, 0, time.monotonic()
            if out_of_time or stop_now:
                break
    bar.close()
    return {"record": record, "skipped": skipped, "train_slices": len(train_idx),
            "held_out_slices": len(val_idx), "start_step": start_step, "step": step,
            "finished": step >= config.steps, "best_path": best_path if best_path.exists()
            else None}


def _hardware(device: torch.device, processes: Processes | None = None) -> str:
    times = f"{processes.world} processes x " if processes is not None else ""
    if device.type == "cuda":
        return f"{times}{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"{times}CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


def _summary(record: dict) -> str:
    held = record["held_out"]

    def f(key):
        v = held.get(key)
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    return (f"step {record['step']} ({record['train_min']} min, {record['slices_per_s']} "
            f"slices/s): loss {record['train_loss'].get('total', float('nan')):.4g}; held-out "
            f"Dice whole {f('dice_whole')} (TC/ED/ET {f('dice_TC')}/{f('dice_ED')}/"
            f"{f('dice_ET')}), SSIM rec {f('rec_ssim_brain')}, pseudo-normal SSIM out "
            f"{f('pn_ssim_out')}, MAE in lesion {f('pn_mae_in')} (input {f('input_mae_in')}), "
            f"abnormal top-5 lesion/clean {f('abn_lesion_at5')}/{f('abn_clean_at5')}, normal "
            f"twin {f('normal_twin_at5')}; score {f('score')}" + _monitor_summary(held))


def _monitor_summary(held: dict) -> str:
    mon = held.get("monitor")
    if not mon:
        return ""

    def f(key):
        v = mon.get(key)
        return "n/a" if v is None else f"{v:.3f}"

    return (f"; monitor ({mon['slices']} slices, not for selection): abnormal top-5 "
            f"lesion/clean {f('abn_lesion_at5')}/{f('abn_clean_at5')}, Dice whole "
            f"{f('dice_whole')} (TC/ED/ET {f('dice_TC')}/{f('dice_ED')}/{f('dice_ET')}), "
            f"SSIM rec {f('rec_ssim_brain')}")
