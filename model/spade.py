"""Spatially-adaptive normalization (SPADE; Park et al., 2019) for the image decoder.

Written here rather than taken from ``monai.networks.blocks.SPADE`` (MONAI 1.6), which differs in
three ways that matter for this method:

- its gamma and beta convolutions are MONAI ``Convolution`` blocks with their default
  InstanceNorm, so gamma and beta have zero spatial mean and unit variance per slice: a lesion
  in one corner changes the modulation everywhere else, against eq. (10) (x_hat- and x_hat+ must
  agree outside the lesion), and their scale cannot be learned;
- it resizes the label map by nearest-neighbour sampling; from 256 to 16 that reads one pixel in
  256 and misses small lesions, where the paper (Figure B.1) and the authors' code average-pool;
- LeakyReLU in the shared layer where NVlabs/SPADE and the authors' code use ReLU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SPADE(nn.Module):
    """x -> BN(x) * (1 + gamma(label)) + beta(label), with a parameter-free BatchNorm.

    gamma and beta come from the label map by a shared conv3x3 -> ReLU, then one conv3x3 each.
    The label map is average-pooled to the feature map's size when it is larger. ``label=None``
    is the all-zero label map (the condition of x_hat-), computed without building it.
    """

    def __init__(self, channels: int, label_channels: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.shared = nn.Sequential(
            nn.Conv2d(label_channels, hidden, kernel_size=3, padding=1), nn.ReLU()
        )
        self.gamma = nn.Conv2d(hidden, channels, kernel_size=3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, kernel_size=3, padding=1)

    def reset_modulation(self) -> None:
        """Zero the gamma and beta convolutions: SPADE starts as plain BatchNorm.

        Our choice, not the paper's (which He-initialises everything): with He-initialised
        gamma, the condition multiplies activations by (1 + gamma) in each of the image
        decoder's 15 SPADE layers, and an untrained x_hat+ came out tens of times outside [0, 1]
        (L_rec+ ~ 185 against L_rec- ~ 3 in the first epoch of a short CPU run).
        """
        for conv in (self.gamma, self.beta):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def _null_modulation(self, height: int, width: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """gamma and beta of the all-zero label map, (1, C, H, W), exactly and cheaply.

        On zeros, the shared conv gives its bias everywhere (the zero padding adds nothing), so
        its ReLU output is one constant vector; gamma and beta, convolutions of a constant map
        with zero padding, are then constant except on the one-pixel border. Computing them on a
        3 x 3 map gives the corner, edge and interior values, and indexing spreads them to
        H x W: the same numbers as on the full map, up to summation order.
        """
        label_channels = self.shared[0].in_channels
        if min(height, width) < 3:  # no interior to share: compute on the full map
            zeros = like.new_zeros(1, label_channels, height, width)
            hidden = self.shared(zeros)
            return self.gamma(hidden), self.beta(hidden)
        hidden = self.shared(like.new_zeros(1, label_channels, 3, 3))  # (1, hidden, 3, 3)
        rows = _border_index(height, like.device)  # (H,) into 0 (top), 1 (inside), 2 (bottom)
        cols = _border_index(width, like.device)
        spread = [m[:, :, rows][:, :, :, cols] for m in (self.gamma(hidden), self.beta(hidden))]
        return spread[0], spread[1]  # (1, C, H, W) each

    def forward(self, x: Tensor, label: Tensor | None) -> Tensor:
        if label is None:
            gamma, beta = self._null_modulation(x.shape[-2], x.shape[-1], x)  # (1, C, H, W)
            return self.norm(x) * (1 + gamma) + beta  # (B, C, H, W)
        if label.shape[-2:] != x.shape[-2:]:
            label = F.adaptive_avg_pool2d(label, x.shape[-2:])  # (B, L, H, W)
        hidden = self.shared(label)  # (B, hidden, H, W)
        return self.norm(x) * (1 + self.gamma(hidden)) + self.beta(hidden)  # (B, C, H, W)


def _border_index(n: int, device: torch.device) -> Tensor:
    """[0, 1, 1, ..., 1, 2] of length n >= 2: which row of a 3-row map each of n rows equals."""
    index = torch.ones(n, dtype=torch.long, device=device)
    index[0], index[-1] = 0, 2
    return index
