"""Checkpoints: written atomically, self-describing, and checked when read.

A checkpoint is one ``torch.save`` file holding the model config (so it alone rebuilds its
model), the preset name, the preprocessing version, the training data fingerprint, the epoch,
the model/optimizer state and ``weights_sha256``: a hash of the model weights (names, dtypes,
shapes, bytes) that indices record to refuse mixing codes from different models.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from model.atomic import atomic_write
from model.config import ModelConfig
from model.data.preprocess import PREPROCESSING_VERSION
from model.network import DecompositionNet

FORMAT = "compositional-cbir/checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""

    def __init__(self, path: Path | str, problem: str):
        self.path = Path(path)
        super().__init__(f"{self.path}: {problem}")


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: Path | str, model: DecompositionNet, preset: str,
                    extra: dict[str, Any] | None = None) -> str:
    """Write ``path`` atomically (temporary file, fsync, os.replace). Returns weights_sha256."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    sha = weights_sha256(state)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "preset": preset,
        "config": model.config.to_dict(),
        "preprocessing_version": PREPROCESSING_VERSION,
        "weights_sha256": sha,
        "model": state,
        **(extra or {}),
    }
    atomic_write(path, lambda fh: torch.save(payload, fh))
    return sha


def read_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load and check a checkpoint file; raise ``CheckpointError`` naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(path, f"not a readable checkpoint ({type(exc).__name__})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(path, "not a compositional-cbir checkpoint")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(path, f"checkpoint format {payload.get('format_version')} is not "
                                    f"{FORMAT_VERSION}")
    if payload.get("preprocessing_version") != PREPROCESSING_VERSION:
        raise CheckpointError(path, f"made with preprocessing version "
                                    f"{payload.get('preprocessing_version')}, this code uses "
                                    f"{PREPROCESSING_VERSION}")
    if weights_sha256(payload["model"]) != payload.get("weights_sha256"):
        raise CheckpointError(path, "weights do not match their recorded sha256 (corrupt file)")
    return payload


def load_model(path: Path | str, device: str | torch.device = "cpu"):
    """The model a checkpoint describes, in eval mode on ``device``, and the checkpoint dict."""
    payload = read_checkpoint(path)
    try:
        model = DecompositionNet(ModelConfig.from_dict(payload["config"]))
        model.load_state_dict(payload["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(path, f"weights do not fit the recorded config ({exc})") from exc
    return model.to(device).eval(), payload


def export_checkpoint(src: Path | str, dst: Path | str, note: str | None = None,
                      eval_headline: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy a training checkpoint without its optimizer state: what is shipped and served.

    The weights, and so ``weights_sha256``, are unchanged; ``--resume`` needs the original.
    ``note`` (e.g. what it was trained on and its limits) travels with it and the service shows it,
    and so does ``eval_headline``: the headline figures of a ``cbir eval`` run of these weights.
    """
    payload = read_checkpoint(src)
    payload.pop("optimizer", None)
    payload["exported_from"] = Path(src).name
    if note is not None:
        payload["note"] = note
    if eval_headline is not None:
        payload["eval_headline"] = eval_headline
    atomic_write(dst, lambda fh: torch.save(payload, fh))
    return payload


# What describes one training run's state, not averaged weights: dropped from a soup.
_RUN_FIELDS = ("optimizer", "step", "train_seconds", "metrics", "best_score", "margin_bank",
               "exported_from", "note", "eval_headline")


def average_checkpoints(srcs: list[Path | str], dst: Path | str) -> dict[str, Any]:
    """A uniform "model soup" (Wortsman et al., ICML 2022): the element-wise mean of the weights
    of checkpoints fine-tuned from one start, written atomically to ``dst``.

    Floating-point tensors (weights, BatchNorm statistics, the codebooks and their EMA sums) are
    averaged in float32; counters and flags (``num_batches_tracked``, a quantizer's
    ``initialized``) are the first's. The inputs must share preset, model config and tensor
    names and shapes (``CheckpointError`` names the first mismatch); averaging only helps where
    their codebook rows still correspond, as in fine-tunes of one checkpoint. The soup keeps the
    first's recipe (``train_config``: what ``--from-config`` reads) and records its ingredients
    (``soup_of``: file name and weights sha256 of each); per-run records (step, metrics, note,
    eval headline, optimizer state) are dropped.
    """
    if len(srcs) < 2:
        raise CheckpointError(Path(dst), "a soup needs two checkpoints or more")
    payloads = [read_checkpoint(s) for s in srcs]
    first = payloads[0]
    for src, p in zip(srcs[1:], payloads[1:], strict=True):
        if p["preset"] != first["preset"] or p["config"] != first["config"]:
            raise CheckpointError(Path(src), f"another model than {Path(srcs[0]).name} (preset "
                                             f"or config differs): cannot average them")
        for name, tensor in first["model"].items():
            if name not in p["model"] or p["model"][name].shape != tensor.shape:
                raise CheckpointError(Path(src), f"tensor {name} is missing or of another shape "
                                                 f"than in {Path(srcs[0]).name}")
        if set(p["model"]) != set(first["model"]):
            raise CheckpointError(Path(src), f"holds tensors {Path(srcs[0]).name} does not")
    state = {}
    for name, tensor in first["model"].items():
        if tensor.is_floating_point():
            total = sum(p["model"][name].float() for p in payloads)
            state[name] = (total / len(payloads)).to(tensor.dtype)
        else:
            state[name] = tensor.clone()
    payload = {k: v for k, v in first.items() if k not in _RUN_FIELDS}
    payload["model"] = state
    payload["weights_sha256"] = weights_sha256(state)
    payload["soup_of"] = [{"file": Path(s).name, "weights_sha256": p["weights_sha256"]}
                          for s, p in zip(srcs, payloads, strict=True)]
    atomic_write(dst, lambda fh: torch.save(payload, fh))
    return payload
