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
    """Median slices/s of ``encode`` (codes + indices) and of the bare encoder stack, both fed
    the same 256 x 256 slices through the preset's resize to its model size.

    The two are timed alternately on the same random batch so that machine noise hits both.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = DecompositionNet(model_preset(preset)).to(dev).eval()
    x = torch.rand(batch, 1, 256, 256, device=dev)
    bare, full = [], []
    for i in range(warmup + repeats):
        t_bare = _time(lambda s: model.encoder(model.to_model_size(s)), x, dev)
        t_full = _time(model.encode, x, dev)
        if i >= warmup:
            bare.append(batch / t_bare)
            full.append(batch / t_full)
    b, f = statistics.median(bare), statistics.median(full)
    return {"preset": preset, "device": str(dev), "batch": batch, "repeats": repeats,
            "bare_slices_per_s": b, "encode_slices_per_s": f, "ratio": f / b}


# Training-step variants: each switch alone on top of the plain computation, then all four.
SWITCHES = ("bf16", "null_shortcut", "separable_ssim", "channels_last")


def _train_step_fn(preset: str, switches: set[str], batch: int, device: torch.device):
    """A closure running one full training step (forward, losses, backward, Adam)."""
    from monai.losses import SSIMLoss

    from model.losses import DecompositionLoss, LossWeights
    from model.train import use_bf16

    torch.manual_seed(0)
    fmt = torch.channels_last if "channels_last" in switches else torch.contiguous_format
    model = DecompositionNet(model_preset(preset)).to(device).to(memory_format=fmt).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    ssim = None if "separable_ssim" in switches else SSIMLoss(spatial_dims=2, data_range=1.0)
    criterion = DecompositionLoss(LossWeights(rec=5.0), **({"ssim": ssim} if ssim else {}))
    bf16 = "bf16" in switches and use_bf16(device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, 256, 256, generator=g).to(device).contiguous(memory_format=fmt)
    target = torch.zeros(batch, 256, 256, dtype=torch.long)
    target[: batch // 2, 100:140, 90:150] = 2
    target[: batch // 2, 110:125, 110:130] = 1
    target = target.to(device)
    lesion = (target > 0).flatten(1).any(1)

    def step(_=None) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x, lesion=lesion, null_shortcut="null_shortcut" in switches)
        loss, _ = criterion(out, x.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def train_throughput(preset: str, batch: int = 8, repeats: int = 5, warmup: int = 1,
                     device: str | None = None) -> dict:
    """Median training slices/s of the plain step, of each speed-up alone and of all of them.

    The variants take turns step by step on the same batch, so machine noise hits all alike.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    variants = {"plain": set(), **{f"+ {s}": {s} for s in SWITCHES},
                "all four": set(SWITCHES)}
    steps = {name: _train_step_fn(preset, switches, batch, dev)
             for name, switches in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(warmup + repeats):
        for name, fn in steps.items():
            t = _time(fn, None, dev)
            if i >= warmup:
                times[name].append(batch / t)
    return {"preset": preset, "device": str(dev), "batch": batch, "repeats": repeats,
            "variants": {name: statistics.median(v) for name, v in times.items()}}
