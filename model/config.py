"""Hyper-parameters of the decomposition network, in one dataclass that travels in checkpoints.

Presets:

- ``paper``: the widths of Tables A.1 and A.2;
- ``small``: a quarter of those widths (about 1/16 of the parameters);
- ``cpu``: the network at 128 x 128 inside (four encoder stages, widths 16-32-64-128, decoder
  128-64-32-16-8), what trains on a 2-core CPU at about 12x the ``small`` speed;
- ``tiny``: very narrow, for tests.

Every preset reads and draws 256 x 256 slices and shares the latent layout: 64 x 8 x 8 codes and
two 512 x 64 codebooks, so indices built with any preset have the same dimensions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class ModelConfig:
    in_channels: int = 1  # grey slices (Gd-enhanced T1)
    image_size: int = 256  # square side of the slices the model reads and draws, pixels
    # Square side the network itself runs at: slices are area-averaged down to it on the way in
    # and outputs are resized back to image_size on the way out (DecompositionNet.to_model_size,
    # .to_image_size). Equal to image_size in the paper.
    model_size: int = 256
    # Table A.1: width of the 5x5 stem, then of each residual stage; one 2x2 average pool follows
    # each, so the code side is model_size / 2 ** len(encoder_widths) = 8.
    encoder_widths: tuple[int, ...] = (32, 64, 128, 256, 512)
    # Table A.2: width of the conv-block on the code, then of each upsample + res-block stage
    # (one x2 upsampling each, back to model_size).
    decoder_widths: tuple[int, ...] = (512, 256, 128, 64, 32, 16)
    code_dim: int = 64  # D: channels of each code and length of each codebook vector
    codebook_size: int = 512  # K: vectors per codebook (one codebook per code)
    num_classes: int = 4  # segmentation classes: background, TC, ED, ET
    spade_hidden: int = 128  # hidden width of SPADE's conv3x3 -> ReLU (NVlabs/SPADE uses 128)
    ema_decay: float = 0.99  # codebook EMA decay (VQ-VAE-2; authors' code)
    ema_eps: float = 1e-5  # Laplace smoothing of the EMA cluster sizes
    # A code whose EMA usage falls below this fraction of the uniform share (total EMA usage / K)
    # is dead and is re-seeded from an encoder output of the current batch (training only).
    dead_code_ratio: float = 0.01
    # Row 0 of the abnormal codebook is the zero vector, never moved: positions without
    # abnormality are trained to it and lesion positions away from it (model/losses.py), so every
    # lesion-free position has one and the same abnormal code. Off in the paper.
    abnormal_null_code: bool = False
    # Not in the paper: the abnormal code times a slice-level gate in (0, 1) read from the
    # trunk's globally pooled features (model/encoder.py). A code position sees only its part
    # of the slice; the gate lets a lesion anywhere decide the code at every position.
    abnormal_gate: bool = False
    # With abnormal_gate: the gate's logit is the maximum over code positions of a per-position
    # lesion logit instead of a linear map of the pooled trunk, so a lesion in one cell opens it
    # however small its share of the slice. The logits come from a small CNN of their own that
    # max-pools (model/encoder.py, LesionDetector); training can supervise each position
    # (LossWeights.gate). Not in the paper.
    gate_by_position: bool = False

    def __post_init__(self) -> None:
        self.encoder_widths = tuple(self.encoder_widths)
        self.decoder_widths = tuple(self.decoder_widths)
        if len(self.decoder_widths) != len(self.encoder_widths) + 1:
            raise ValueError(
                f"decoder_widths needs one entry more than encoder_widths (one per upsampling "
                f"plus the conv-block), got {len(self.decoder_widths)} and "
                f"{len(self.encoder_widths)}"
            )
        if self.model_size % 2 ** len(self.encoder_widths):
            raise ValueError(
                f"model_size {self.model_size} is not divisible by "
                f"2 ** {len(self.encoder_widths)} (one halving per encoder stage)"
            )
        if not 0 < self.model_size <= self.image_size or self.image_size % self.model_size:
            raise ValueError(
                f"model_size {self.model_size} must divide image_size {self.image_size} "
                f"(the network runs at the same or a coarser resolution)"
            )
        positive = {
            "in_channels": self.in_channels,
            "code_dim": self.code_dim,
            "codebook_size": self.codebook_size,
            "num_classes": self.num_classes,
            "spade_hidden": self.spade_hidden,
            "ema_eps": self.ema_eps,
            **{f"encoder_widths[{i}]": w for i, w in enumerate(self.encoder_widths)},
            **{f"decoder_widths[{i}]": w for i, w in enumerate(self.decoder_widths)},
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.gate_by_position and not self.abnormal_gate:
            raise ValueError("gate_by_position needs abnormal_gate")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {self.ema_decay}")
        if not 0.0 <= self.dead_code_ratio < 1.0:
            raise ValueError(f"dead_code_ratio must lie in [0, 1), got {self.dead_code_ratio}")

    @property
    def code_size(self) -> int:
        """Side of the code grid (8 in every preset)."""
        return self.model_size // 2 ** len(self.encoder_widths)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (tuples become lists)."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Inverse of ``to_dict``; unknown keys are an error, missing keys take the defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        return cls(**values)


_PRESETS: dict[str, ModelConfig] = {
    "paper": ModelConfig(),
    "small": ModelConfig(
        encoder_widths=(8, 16, 32, 64, 128),
        decoder_widths=(128, 64, 32, 16, 8, 4),
        spade_hidden=32,
    ),
    "cpu": ModelConfig(
        model_size=128,
        encoder_widths=(16, 32, 64, 128),
        decoder_widths=(128, 64, 32, 16, 8),
        spade_hidden=32,
    ),
    "tiny": ModelConfig(
        encoder_widths=(4, 4, 8, 8, 16),
        decoder_widths=(16, 8, 8, 4, 4, 4),
        spade_hidden=8,
    ),
}

PRESETS: tuple[str, ...] = tuple(_PRESETS)


def preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset: ``paper``, ``small``, ``cpu`` or ``tiny``."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(_PRESETS[name])


__all__ = ["PRESETS", "ModelConfig", "preset"]
