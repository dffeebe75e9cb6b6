"""The two decoders of Table A.2: segmentation (BatchNorm) and image (SPADE).

Both share the table's layout: a conv-block lifts the 64 x 8 x 8 code to 512 x 8 x 8, five
'Upsample (SPADE-)Res-block' rows double the side up to 16 x 256 x 256, a 5x5 conv gives the
output. Appendix A gives SPADE to the segmentation decoder; the main text and Figure B.1 give it
to the image decoder, which is the design the method needs (PAPER-NOTES).

We read each 'Upsample (SPADE-)Res-block' row, whose three 3x3 convs have two output shapes, as
x2 nearest upsampling and a 3x3 conv to the row's width (first shape), then a residual block of
two 3x3 convs at that width (second shape). Every conv there is followed by the decoder's norm:
BatchNorm in the segmentation decoder, SPADE on the label map in the image decoder.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig
from model.spade import SPADE


class _BatchNorm(nn.BatchNorm2d):
    """BatchNorm with SPADE's call signature; it ignores the label map."""

    def forward(self, x: Tensor, label: Tensor | None = None) -> Tensor:
        return super().forward(x)


def _norm(channels: int, label_channels: int | None, spade_hidden: int) -> nn.Module:
    if label_channels is None:
        return _BatchNorm(channels)
    return SPADE(channels, label_channels, spade_hidden)


class UpsampleResBlock(nn.Module):
    """Table A.2, one 'Upsample (SPADE-)Res-block [3x3 C] [3x3 C] [3x3 C]' row."""

    def __init__(
        self, in_channels: int, out_channels: int, label_channels: int | None, spade_hidden: int
    ) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm0 = _norm(out_channels, label_channels, spade_hidden)
        self.conv1 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm1 = _norm(out_channels, label_channels, spade_hidden)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm2 = _norm(out_channels, label_channels, spade_hidden)

    def forward(self, x: Tensor, label: Tensor | None = None) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")  # (B, C_in, 2H, 2W)
        x = F.relu(self.norm0(self.conv0(x), label))  # (B, C, 2H, 2W)
        h = F.relu(self.norm1(self.conv1(x), label))  # (B, C, 2H, 2W)
        h = self.norm2(self.conv2(h), label)  # (B, C, 2H, 2W)
        return F.relu(x + h)  # (B, C, 2H, 2W)


class Decoder(nn.Module):
    """Table A.2: code (B, 64, 8, 8) -> (B, out_channels, S, S), S = model_size.

    With ``label_channels`` set, every upsampling row is normalized by SPADE on a label map of
    that many channels, average-pooled to the row's size (Figure B.1).
    """

    def __init__(
        self, config: ModelConfig, out_channels: int, label_channels: int | None = None
    ) -> None:
        super().__init__()
        self.code_dim = config.code_dim
        self.label_channels = label_channels
        first, *widths = config.decoder_widths
        self.conv_block = nn.Sequential(  # Table A.2, row 'Conv-block [3x3 512] [3x3 512]'
            nn.Conv2d(config.code_dim, first, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(first),
            nn.ReLU(),
            nn.Conv2d(first, first, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(first),
            nn.ReLU(),
        )
        blocks = []
        width = first
        for next_width in widths:  # Table A.2, the five 'Upsample (SPADE-)Res-block' rows
            blocks.append(UpsampleResBlock(width, next_width, label_channels, config.spade_hidden))
            width = next_width
        self.blocks = nn.ModuleList(blocks)
        # Table A.2, last row 'Conv [5x5 1]'; linear output (intensities, or logits).
        self.out = nn.Conv2d(width, out_channels, kernel_size=5, padding=2)

    def _check_code(self, code: Tensor) -> None:
        if code.dim() != 4 or code.shape[1] != self.code_dim:
            raise ValueError(
                f"expected a (B, {self.code_dim}, H, W) code to decode, got {tuple(code.shape)}"
            )

    def _decode(self, code: Tensor, label: Tensor | None) -> Tensor:
        self._check_code(code)
        h = self.conv_block(code)  # (B, 512, 8, 8)
        for block in self.blocks:
            side = 2 * h.shape[-1]
            # Pool once per row here, so the row's three SPADEs find the map at their size.
            level_label = None if label is None else F.adaptive_avg_pool2d(label, side)
            h = block(h, level_label)  # (B, C, 2H, 2W): 256x16x16 ... 16x256x256
        return self.out(h)  # (B, out_channels, 256, 256)


class SegmentationDecoder(Decoder):
    """Abnormal code z_q+ (B, 64, 8, 8) -> logits (B, 4, 256, 256): background, TC, ED, ET."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, out_channels=config.num_classes)

    def forward(self, code: Tensor) -> Tensor:
        return self._decode(code, None)


class ImageDecoder(Decoder):
    """f(z_q-, condition): normal code (B, 64, 8, 8) and a (B, 4, H, W) label map -> image.

    The condition is the masked segmentation logits for x_hat+ and all zeros for x_hat-
    (see ``DecompositionNet.condition``).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, out_channels=config.in_channels, label_channels=config.num_classes)

    def forward(self, code: Tensor, condition: Tensor | None) -> Tensor:
        """``condition=None`` is the all-zero condition of x_hat-, computed without building it
        (``SPADE._null_modulation``)."""
        if condition is None:
            return self._decode(code, None)
        if (
            condition.dim() != 4
            or condition.shape[0] != code.shape[0]
            or condition.shape[1] != self.label_channels
        ):
            raise ValueError(
                f"expected a ({code.shape[0]}, {self.label_channels}, H, W) condition for a "
                f"batch of {code.shape[0]} codes, got {tuple(condition.shape)}"
            )
        return self._decode(code, condition)
