"""SSIM (Wang et al., 2004) with its Gaussian window applied as two banded matrix products.

The same quantity as MONAI's ``compute_ssim_and_cs`` / ``SSIMLoss`` (11 x 11 Gaussian window,
sigma 1.5, valid windows only, K1 = 0.01, K2 = 0.03), which convolve with the full 2-D kernel.
A 2-D Gaussian is the outer product of two 1-D ones, so filtering an image X (H x W) with it is
``G_H @ X @ G_W^T``, where ``G_n`` is the (n - 10) x n matrix whose row i holds the 1-D window at
columns i .. i + 10. Two small matrix products replace 121 taps per pixel: about 1.4x faster
training steps on the CPU (issue 10), same value, gradients within 2e-6
(tests/model/test_ssim.py compares both with MONAI).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03


@functools.lru_cache(maxsize=16)
def _window_matrix(n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(n - WINDOW + 1, n) banded matrix of the normalised 1-D Gaussian window."""
    if n < WINDOW:
        raise ValueError(f"SSIM needs images of at least {WINDOW} pixels a side, got {n}")
    x = torch.arange(WINDOW, dtype=torch.float64) - (WINDOW - 1) / 2
    g = torch.exp(-0.5 * (x / SIGMA) ** 2)
    g = g / g.sum()
    rows = n - WINDOW + 1
    m = torch.zeros(rows, n, dtype=torch.float64)
    for i in range(rows):
        m[i, i:i + WINDOW] = g
    return m.to(device=device, dtype=dtype)


def ssim_map(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """Local SSIM of (B, C, H, W) images: (B, C, H - 10, W - 10), one value per valid window.

    Computed in float32 whatever the surrounding autocast says.
    """
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"expected two (B, C, H, W) images of one shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    with torch.autocast(device_type=a.device.type, enabled=False):
        a, b = a.float(), b.float()
        gh = _window_matrix(a.shape[-2], a.device, a.dtype)  # (H', H)
        gw = _window_matrix(a.shape[-1], a.device, a.dtype)  # (W', W)
        # The five local moments in one batch of products: (5, B, C, H, W) -> (5, B, C, H', W')
        stack = torch.stack([a, b, a * a, b * b, a * b])
        mu_a, mu_b, m_aa, m_bb, m_ab = gh @ stack @ gw.t()
        c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
        var_a, var_b = m_aa - mu_a * mu_a, m_bb - mu_b * mu_b
        cov = m_ab - mu_a * mu_b
        contrast = (2 * cov + c2) / (var_a + var_b + c2)
        return (2 * mu_a * mu_b + c1) / (mu_a * mu_a + mu_b * mu_b + c1) * contrast


def ssim_loss(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """1 - mean SSIM over every valid window of every image (MONAI ``SSIMLoss``'s value)."""
    return 1.0 - ssim_map(a, b, data_range).mean()
