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

import torch.nn.functional as F
from torch import Tensor, nn


class SPADE(nn.Module):
    """x -> BN(x) * (1 + gamma(label)) + beta(label), with a parameter-free BatchNorm.

    gamma and beta come from the label map by a shared conv3x3 -> ReLU, then one conv3x3 each.
    The label map is average-pooled to the feature map's size when it is larger.
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

    def forward(self, x: Tensor, label: Tensor) -> Tensor:
        if label.shape[-2:] != x.shape[-2:]:
            label = F.adaptive_avg_pool2d(label, x.shape[-2:])  # (B, L, H, W)
        hidden = self.shared(label)  # (B, hidden, H, W)
        return self.norm(x) * (1 + self.gamma(hidden)) + self.beta(hidden)  # (B, C, H, W)
