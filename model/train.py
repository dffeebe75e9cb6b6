"""Training the decomposition network: ``cbir train``.

Reproducible and resumable: every epoch re-seeds torch from (seed, epoch) before shuffling,
augmenting and restarting dead codes, so an epoch run after ``--resume`` draws exactly what it
would have drawn in an uninterrupted run. A checkpoint is written atomically after every epoch,
and one JSON line of metrics is appended to ``<out>.metrics.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from model.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from model.config import preset as model_preset
from model.data.brats import find_cases
from model.data.dataset import SliceDataset
from model.losses import DecompositionLoss, LossWeights
from model.metrics import dice_counts, dice_from_counts, masked_ssim_sums
from model.network import DecompositionNet

log = logging.getLogger(__name__)

CLASS_NAMES = ("TC", "ED", "ET")


@dataclass
class TrainConfig:
    preset: str = "small"
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-4  # the authors' code; the paper's 5e-3 is recorded separately in the card
    weight_decay: float = 1e-5  # the authors' code
    seed: int = 0
    val_fraction: float = 0.1  # patients held out for the per-epoch metrics
    augment: bool = True  # horizontal flip, scale 0.9-1.1, rotation +-10 degrees
    max_steps_per_epoch: int | None = None  # cap for quick runs; None: the whole training set
    weights: LossWeights = field(default_factory=LossWeights)

    def to_dict(self) -> dict:
        return asdict(self)


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


@torch.no_grad()
def evaluate(model: DecompositionNet, loader: DataLoader, device: torch.device) -> dict:
    """Held-out metrics: reconstruction SSIM in the brain; pseudo-normal SSIM against the healthy
    ground truth inside the lesion and in the brain outside it; Dice per class."""
    model.eval()
    sums = {"rec": [0.0, 0], "pn_in": [0.0, 0], "pn_out": [0.0, 0]}
    counts = torch.zeros(len(CLASS_NAMES), 3, dtype=torch.float64)
    for batch in loader:
        x = batch["image"].to(device)
        out = model(x)
        lesion = (batch["abnormal"] > 0)[:, None].to(device)
        brain = x > 0
        # Inside the brain: over the whole slice the zero background alone scores ~0.6.
        s, n = masked_ssim_sums(out.reconstruction.clamp(0, 1), x, brain)
        sums["rec"][0] += s
        sums["rec"][1] += n
        healthy = batch["healthy"].to(device)
        has_healthy = (healthy >= 0).flatten(1).all(1)
        if has_healthy.any():
            pn, h = out.pseudo_normal[has_healthy].clamp(0, 1), healthy[has_healthy]
            les = lesion[has_healthy]
            for key, region in (("pn_in", les), ("pn_out", ~les & brain[has_healthy])):
                s, n = masked_ssim_sums(pn, h, region)
                sums[key][0] += s
                sums[key][1] += n
        has_seg = batch["has_seg"].to(device)
        if has_seg.any():
            pred = out.logits[has_seg].argmax(1)
            counts += dice_counts(pred.cpu(), batch["abnormal"][has_seg.cpu()], 4)
    model.train()
    metrics = {
        "ssim_reconstruction": sums["rec"][0] / max(sums["rec"][1], 1),
        "ssim_pseudo_normal_in_lesion": (sums["pn_in"][0] / sums["pn_in"][1]
                                         if sums["pn_in"][1] else None),
        "ssim_pseudo_normal_outside_lesion": (sums["pn_out"][0] / sums["pn_out"][1]
                                              if sums["pn_out"][1] else None),
    }
    for name, d in zip(CLASS_NAMES, dice_from_counts(counts), strict=True):
        metrics[f"dice_{name}"] = d
    return metrics


def _usage(hist: torch.Tensor) -> dict:
    p = hist / hist.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"perplexity": float(entropy.exp()), "used_fraction": float((hist > 0).float().mean())}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train(data: list[Path], out: Path, config: TrainConfig, resume: bool = False,
          progress: bool = True, log_line: Callable[[str], None] | None = None) -> dict:
    """Train, checkpointing to ``out`` every epoch. Returns the last epoch's metrics record."""
    out = Path(out)
    cases, skipped = [], []
    for root in data:
        try:
            scan = find_cases(root)
        except FileNotFoundError as exc:
            raise TrainingError(str(exc)) from exc
        cases += scan.cases
        skipped += scan.skipped
    if not cases:
        raise TrainingError(f"no patient with a t1ce image under {', '.join(map(str, data))}")
    fingerprint = data_fingerprint(
        [(c.pid, [f for f in (c.t1ce, c.seg) if f is not None]) for c in cases])

    model_config = model_preset(config.preset)
    start_epoch = 0
    state = None
    if resume and out.exists():
        try:
            state = read_checkpoint(out)
        except CheckpointError as exc:
            raise TrainingError(f"cannot resume: {exc}") from exc
        if state["preset"] != config.preset or state["config"] != model_config.to_dict():
            raise TrainingError(f"cannot resume: {out} is a '{state['preset']}' checkpoint, "
                                f"this run asks for '{config.preset}'")
        if state.get("data_fingerprint") != fingerprint:
            raise TrainingError(f"cannot resume: {out} was trained on other data "
                                f"(fingerprint differs)")
        start_epoch = int(state["epoch"]) + 1
    elif not resume and out.exists():
        raise TrainingError(f"{out} exists: pass --resume to continue it, or choose another "
                            f"--out")

    dataset = SliceDataset(cases, progress=progress)
    skipped += dataset.skipped
    if len(dataset) == 0:
        raise TrainingError("no readable brain slice in the data")
    held_out = split_patients([p.pid for p in dataset.patients], config.val_fraction,
                              config.seed)
    val_idx = dataset.indices_of(held_out)
    train_idx = sorted(set(range(len(dataset))) - set(val_idx))

    device = _device()
    torch.manual_seed(config.seed)
    model = DecompositionNet(model_config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr,
                                 weight_decay=config.weight_decay)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    criterion = DecompositionLoss(config.weights)
    use_amp = device.type == "cuda"
    val_loader = DataLoader(Subset(dataset, val_idx), batch_size=config.batch_size)
    metrics_path = out.with_name(out.name + ".metrics.jsonl")
    record: dict = {}

    for epoch in range(start_epoch, config.epochs):
        torch.manual_seed(config.seed * 100_003 + epoch)  # shuffling, augmentation, restarts
        g = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        loader = DataLoader(Subset(dataset, train_idx), batch_size=config.batch_size,
                            shuffle=True, generator=g, drop_last=len(train_idx) > config.batch_size)
        steps = len(loader) if config.max_steps_per_epoch is None else min(
            len(loader), config.max_steps_per_epoch)
        model.train()
        totals: dict[str, float] = {}
        hists = [torch.zeros(model_config.codebook_size, device=device) for _ in range(2)]
        started = time.perf_counter()
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step",
                   disable=not progress)
        for step, batch in enumerate(loader):
            if step >= steps:
                break
            if config.augment:
                batch = augment(batch, g)
            x = batch["image"].to(device, non_blocking=True)
            target = batch["abnormal"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                output = model(x)
                loss, terms = criterion(output, x, target)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at epoch {epoch + 1}, step "
                                    f"{step + 1}: lower the learning rate (--lr)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            for h, q in zip(hists, (output.normal, output.abnormal), strict=True):
                h += torch.bincount(q.indices.flatten(), minlength=model_config.codebook_size)
            bar.set_postfix({k: f"{v:.3g}" for k, v in terms.items()
                             if k in ("total", "lat", "dis", "seg", "rec", "res")})
            bar.update()
        bar.close()
        record = {
            "epoch": epoch + 1,
            "steps": steps,
            "seconds": round(time.perf_counter() - started, 2),
            "slices_per_s": round(steps * config.batch_size / (time.perf_counter() - started), 2),
            "loss": {k: v / max(steps, 1) for k, v in totals.items()},
            "codebook_normal": _usage(hists[0].cpu()),
            "codebook_abnormal": _usage(hists[1].cpu()),
            "held_out": evaluate(model, val_loader, device) if val_idx else {},
        }
        save_checkpoint(out, model, config.preset, extra={
            "epoch": epoch,
            "optimizer": optimizer.state_dict(),
            "train_config": config.to_dict() | {"weights": config.weights.to_dict()},
            "data_fingerprint": fingerprint,
            "held_out_patients": sorted(held_out),
            "metrics": record,
        })
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if log_line:
            log_line(_summary(record))
    return {"record": record, "skipped": skipped, "train_slices": len(train_idx),
            "held_out_slices": len(val_idx), "start_epoch": start_epoch}


def _summary(record: dict) -> str:
    loss = record["loss"]
    held = record["held_out"]

    def f(v):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    return (f"epoch {record['epoch']}: loss {loss.get('total', float('nan')):.4g} "
            f"({record['slices_per_s']} slices/s); held-out SSIM rec "
            f"{f(held.get('ssim_reconstruction'))}, pseudo-normal in/out lesion "
            f"{f(held.get('ssim_pseudo_normal_in_lesion'))}/"
            f"{f(held.get('ssim_pseudo_normal_outside_lesion'))}, Dice TC/ED/ET "
            f"{f(held.get('dice_TC'))}/{f(held.get('dice_ED'))}/{f(held.get('dice_ET'))}")
