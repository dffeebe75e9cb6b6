"""The encoder of Table A.1: one slice -> a 512 x 8 x 8 trunk -> normal and abnormal maps.

Table A.1 names the layers but not their normalization or shortcut; we use ResNet basic blocks
(conv-BN-ReLU, conv-BN, add, ReLU) with a 1x1 conv + BN projection where the width changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig


class ResBlock(nn.Module):
    """Table A.1 'Res-block [3x3 C] [3x3 C]'."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))  # (B, C, H, W)
        h = self.bn2(self.conv2(h))  # (B, C, H, W)
        return F.relu(h + self.shortcut(x))  # (B, C, H, W)


class LesionDetector(nn.Module):
    """The gate by position's own small CNN: a slice (B, 1, S, S) -> one lesion logit per code
    position (B, 8, 8). Conv-ReLU then a 2x2 max pool per stage, so a lesion of a few pixels
    keeps its contrast down to the 8 x 8 grid; the trunk average-pools, which dilutes it 4x per
    stage."""

    def __init__(self, in_channels: int, stages: int, width: int = 32) -> None:
        super().__init__()
        rows: list[nn.Module] = []
        channels = in_channels
        for stage in range(stages):
            out = width // 2 if stage == 0 else width
            rows += [nn.Conv2d(channels, out, kernel_size=3, padding=1), nn.ReLU(),
                     nn.MaxPool2d(2)]
            channels = out
        self.body = nn.Sequential(*rows)
        self.head = nn.Conv2d(channels, 1, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))[:, 0]  # (B, 8, 8)


class Encoder(nn.Module):
    """x (B, 1, S, S) -> (z_e- normal, z_e+ abnormal), each (B, 64, 8, 8); S = model_size.

    ``body`` holds Table A.1's rows in order (Conv, AvgPool, Res-block, AvgPool, ...), so its
    children's outputs are the table's output shapes.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.in_channels = config.in_channels
        self.model_size = config.model_size
        stem_width, *stage_widths = config.encoder_widths
        rows: list[nn.Module] = [
            nn.Sequential(  # Table A.1, row 'Conv [5x5 32]'
                nn.Conv2d(config.in_channels, stem_width, kernel_size=5, padding=2, bias=False),
                nn.BatchNorm2d(stem_width),
                nn.ReLU(),
            ),
            nn.AvgPool2d(2),
        ]
        width = stem_width
        for stage_width in stage_widths:  # Table A.1, rows 'Res-block' + 'AvgPool'
            rows += [ResBlock(width, stage_width), nn.AvgPool2d(2)]
            width = stage_width
        self.body = nn.Sequential(*rows)
        # Table A.1, row 'Split [3x3 64], [3x3 64]'.
        self.normal_head = nn.Conv2d(width, config.code_dim, kernel_size=3, padding=1)
        self.abnormal_head = nn.Conv2d(width, config.code_dim, kernel_size=3, padding=1)
        # Not in the paper (ModelConfig.abnormal_gate): one gate per slice on the abnormal code.
        self.abnormal_gate: nn.Linear | None = None  # global max and mean of each trunk channel
        self.position_gate: LesionDetector | None = None  # one lesion logit per code position
        if config.abnormal_gate and config.gate_by_position:
            self.position_gate = LesionDetector(config.in_channels, len(stage_widths) + 1)
        elif config.abnormal_gate:
            # Starts open, sigmoid(6) = 0.998 (zero weights), so a warm start from a source
            # without a gate begins where its source was. The gate by position keeps its He
            # init: under Adam a bias of 6 would take some 20,000 steps at lr 3e-4 to come down
            # (measured: stuck open for 500 steps).
            self.abnormal_gate = nn.Linear(2 * width, 1)
            nn.init.zeros_(self.abnormal_gate.weight)
            nn.init.constant_(self.abnormal_gate.bias, 6.0)

    def trunk(self, x: Tensor) -> Tensor:
        """The shared features before the split: (B, 1, S, S) -> (B, 512, 8, 8)."""
        expected = (self.in_channels, self.model_size, self.model_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"expected slices of shape (B, {', '.join(map(str, expected))}), "
                f"got {tuple(x.shape)}"
            )
        return self.body(x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        normal, abnormal, _, _ = self.split(self.trunk(x), x)
        return normal, abnormal  # (B, 64, 8, 8) each

    def split(self, h: Tensor, x: Tensor | None = None
              ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Trunk features (B, 512, 8, 8) and the slices they came from (B, 1, S, S), which only
        the gate by position reads -> the normal code, the (gated) abnormal code, the gate's
        logit (B,) and the per-position lesion logits (B, 8, 8) it is the maximum of. Without a
        gate both logits are None; the pooled gate has no per-position logits. Training can
        supervise them with where the slice has a lesion (``LossWeights.gate``)."""
        abnormal = self.abnormal_head(h)  # (B, 64, 8, 8)
        gate = positions = None
        if self.position_gate is not None:
            if x is None:
                raise ValueError("the gate by position reads the slices: pass x to split()")
            positions = self.position_gate(x)  # (B, 8, 8)
            gate = positions.amax((1, 2))  # (B,)
            # The detector learns from its own cross-entropy alone: L_dis, through the gate,
            # outweighed it 20 to 1 and raised whichever position was the maximum, lesion or
            # not (measured: lower logits at lesion cells than elsewhere after 500 steps).
            scale = torch.sigmoid(gate.detach())
        elif self.abnormal_gate is not None:
            pooled = torch.cat([h.amax((2, 3)), h.mean((2, 3))], 1)  # (B, 2 x 512)
            gate = self.abnormal_gate(pooled)[:, 0]  # (B,)
            scale = torch.sigmoid(gate)
        if gate is not None:
            abnormal = abnormal * scale[:, None, None, None]
        return self.normal_head(h), abnormal, gate, positions
