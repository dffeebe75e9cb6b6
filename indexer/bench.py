"""``cbir bench index``: end-to-end indexing throughput against the bare encode throughput of the
same model and batch size, measured in the same run.

The goal is an end-to-end rate of at least 90 % of the bare rate: reading and preprocessing the
NIfTI files (DataLoader workers), writing thumbnails and adding vectors should hide behind the
encoder. Figures are printed, never asserted: they depend on the machine and its load.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from indexer.build import Indexer
from indexer.encoding import default_device
from model.checkpoint import load_model

GOAL = 0.9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def bare_encode_rates(model, batch_size: int, device: torch.device, repeats: int,
                      warmup: int = 1) -> list[float]:
    """Slices/s of ``model.encode`` on random (B, 1, 256, 256) batches, one figure per repeat."""
    x = torch.rand(batch_size, 1, 256, 256, device=device)
    rates = []
    for i in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        model.encode(x)
        _sync(device)
        if i >= warmup:
            rates.append(batch_size / (time.perf_counter() - start))
    return rates


def indexing_throughput(data: list[Path], checkpoint: Path, batch_size: int = 32,
                        workers: int = 2, repeats: int = 5) -> dict:
    """Bare encode slices/s (median of ``repeats`` batches timed before the build and as many
    after it, so that a change of machine load during the run hits both sides) and the
    slices/s of a real ``Indexer.build`` of ``data`` into a temporary directory
    (``slices_added / encode_seconds``: reading, encoding, thumbnails and vectors, without
    loading the model or writing the final index files)."""
    device = default_device()
    model, ckpt = load_model(Path(checkpoint), device)
    bare = bare_encode_rates(model, batch_size, device, repeats)
    with tempfile.TemporaryDirectory(prefix="cbir-bench-index-") as tmp:
        report = Indexer(Path(tmp) / "index").build(
            [Path(d) for d in data], Path(checkpoint), batch_size=batch_size, workers=workers,
            progress=False)
    bare += bare_encode_rates(model, batch_size, device, repeats)
    encode = statistics.median(bare)
    indexing = report.slices_per_s
    return {"preset": ckpt["preset"], "device": str(device), "batch": batch_size,
            "workers": workers, "repeats": len(bare), "patients": len(report.patients_added),
            "slices": report.slices_added, "seconds": report.encode_seconds,
            "skipped": report.skipped, "encode_slices_per_s": encode,
            "indexing_slices_per_s": indexing, "ratio": indexing / encode if encode else 0.0,
            "goal": GOAL}
