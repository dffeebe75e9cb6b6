"""Held-out metrics: local SSIM maps, and Dice per abnormal class from pixel counts."""

from __future__ import annotations

import torch
from torch import Tensor

from model import ssim

SSIM_WINDOW = ssim.WINDOW  # Wang et al. (2004): 11 x 11 Gaussian window, sigma 1.5


def ssim_map(a: Tensor, b: Tensor) -> Tensor:
    """Local SSIM of two (B, 1, H, W) images in [0, 1]: (B, 1, H - 10, W - 10), valid windows."""
    return ssim.ssim_map(a, b, data_range=1.0)


def dice_counts(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Per class c >= 1: (intersection, |pred|, |target|) pixel counts, shape (num_classes-1, 3)."""
    rows = []
    for c in range(1, num_classes):
        p, t = pred == c, target == c
        rows.append(torch.stack([(p & t).sum(), p.sum(), t.sum()]))
    return torch.stack(rows).double()


def dice_from_counts(counts: Tensor) -> list[float | None]:
    """Dice per class from accumulated counts; None where neither prediction nor truth has it."""
    out = []
    for inter, p, t in counts.tolist():
        out.append(None if p + t == 0 else 2 * inter / (p + t))
    return out
