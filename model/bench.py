"""Encode throughput against the bare convolution stack, measured side by side in one run."""

from __future__ import annotations

import statistics
import time

import torch

from model.config import preset as model_preset
from model.network import DecompositionNet


def _time(fn, x: torch.Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.inference_mode()
def encode_throughput(preset: str, batch: int = 32, repeats: int = 5, warmup: int = 1,
                      device: str | None = None) -> dict:
    """Median slices/s of ``encode`` (codes + indices) and of the bare encoder stack.

    The two are timed alternately on the same random batch so that machine noise hits both.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = DecompositionNet(model_preset(preset)).to(dev).eval()
    x = torch.rand(batch, 1, 256, 256, device=dev)
    bare, full = [], []
    for i in range(warmup + repeats):
        t_bare = _time(model.encoder, x, dev)
        t_full = _time(model.encode, x, dev)
        if i >= warmup:
            bare.append(batch / t_bare)
            full.append(batch / t_full)
    b, f = statistics.median(bare), statistics.median(full)
    return {"preset": preset, "device": str(dev), "batch": batch, "repeats": repeats,
            "bare_slices_per_s": b, "encode_slices_per_s": f, "ratio": f / b}
