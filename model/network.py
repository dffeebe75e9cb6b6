"""The decomposition network: encoder, two quantizers, segmentation and image decoders.

A slice x is encoded into a normal anatomy code z_q- and an abnormal anatomy code z_q+
(each 64 x 8 x 8, each position one of 512 codebook vectors). The segmentation decoder reads the
lesion from z_q+; the image decoder redraws the slice from z_q-, with the lesion added through
SPADE: f(z_q-, condition(logits)) = x_hat+ and f(z_q-, 0) = x_hat- (pseudo-normal).

The encode / decode API is what the indexer and the service call; ``forward`` returns what
training needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.config import ModelConfig
from model.decoders import ImageDecoder, SegmentationDecoder
from model.encoder import Encoder
from model.quantizer import Quantized, VectorQuantizer
from model.spade import SPADE


@dataclass
class Codes:
    """The two codes of a batch of slices, as ``DecompositionNet.encode`` returns them."""

    normal: Tensor  # z_q-: (B, 64, 8, 8) quantized normal anatomy code
    abnormal: Tensor  # z_q+: (B, 64, 8, 8) quantized abnormal anatomy code
    normal_indices: Tensor  # (B, 8, 8) int64 rows of the normal codebook
    abnormal_indices: Tensor  # (B, 8, 8) int64 rows of the abnormal codebook
    normal_pre: Tensor  # z_e-: (B, 64, 8, 8) encoder output before quantization
    abnormal_pre: Tensor  # z_e+: (B, 64, 8, 8)


@dataclass
class DecompositionOutput:
    """Everything one training step needs from a batch."""

    normal_pre: Tensor  # z_e-: (B, 64, 8, 8)
    abnormal_pre: Tensor  # z_e+: (B, 64, 8, 8)
    normal: Quantized  # quantizer pass on z_e-: z_q-, indices, commitment, distances
    abnormal: Quantized  # quantizer pass on z_e+ (its distances feed L_dis, eq. 3)
    logits: Tensor  # (B, 4, 256, 256) segmentation logits: background, TC, ED, ET
    reconstruction: Tensor  # x_hat+ = f(z_q-, condition(logits)): (B, 1, 256, 256)
    pseudo_normal: Tensor  # x_hat- = f(z_q-, 0): (B, 1, 256, 256)


def he_init(module: nn.Module) -> None:
    """He (Kaiming) normal init of every convolution, zero biases (Appendix D)."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DecompositionNet(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        quantizer_args = {
            "codebook_size": config.codebook_size,
            "code_dim": config.code_dim,
            "decay": config.ema_decay,
            "eps": config.ema_eps,
            "dead_code_ratio": config.dead_code_ratio,
        }
        self.normal_quantizer = VectorQuantizer(**quantizer_args)
        self.abnormal_quantizer = VectorQuantizer(**quantizer_args)
        self.segmentation_decoder = SegmentationDecoder(config)
        self.image_decoder = ImageDecoder(config)
        self.apply(he_init)
        for module in self.image_decoder.modules():
            if isinstance(module, SPADE):
                module.reset_modulation()

    def _quantize(self, x: Tensor) -> tuple[Tensor, Tensor, Quantized, Quantized]:
        normal_pre, abnormal_pre = self.encoder(x)  # (B, 64, 8, 8) each
        return (
            normal_pre,
            abnormal_pre,
            self.normal_quantizer(normal_pre),
            self.abnormal_quantizer(abnormal_pre),
        )

    def encode(self, x: Tensor) -> Codes:
        """Slices (B, 1, 256, 256) -> both codes and their indices.

        Call it in eval mode: in training mode the quantizers update their codebooks.
        """
        normal_pre, abnormal_pre, normal, abnormal = self._quantize(x)
        return Codes(
            normal=normal.quantized,
            abnormal=abnormal.quantized,
            normal_indices=normal.indices,
            abnormal_indices=abnormal.indices,
            normal_pre=normal_pre,
            abnormal_pre=abnormal_pre,
        )

    def segment(self, abnormal: Tensor) -> Tensor:
        """Abnormal code z_q+ (B, 64, 8, 8) -> segmentation logits (B, 4, 256, 256)."""
        return self.segmentation_decoder(abnormal)

    @staticmethod
    def condition(logits: Tensor) -> Tensor:
        """The SPADE condition for x_hat+: the logits, detached, zero where background wins.

        As in the authors' code. Detached: the image losses do not train the segmentation
        decoder to smuggle appearance into the condition, so z_q+ and the logits stay a lesion
        description trained by L_seg alone. Zeroed where the argmax is background: a slice with
        no predicted lesion gets exactly the null condition of x_hat-, so x_hat+ == x_hat- there,
        and outside a predicted lesion the condition is the same as for x_hat-, which is what
        L_res (eq. 10) asks the two images to share.
        """
        logits = logits.detach()
        background = logits.argmax(dim=1, keepdim=True) == 0  # (B, 1, H, W)
        return logits.masked_fill(background, 0.0)  # (B, 4, H, W)

    def null_condition(self, batch: int, like: Tensor) -> Tensor:
        """The all-zero condition of x_hat-: (B, 4, 256, 256) on ``like``'s device and dtype."""
        size = self.config.image_size
        return like.new_zeros(batch, self.config.num_classes, size, size)

    def decode(self, normal: Tensor, condition: Tensor | None) -> Tensor:
        """f(z_q-, condition) -> (B, 1, 256, 256); ``None`` is the null (all-zero) condition."""
        if condition is None:
            condition = self.null_condition(normal.shape[0], normal)
        return self.image_decoder(normal, condition)

    def reconstruct(self, x: Tensor) -> Tensor:
        """x_hat+: the slice redrawn from both of its codes."""
        codes = self.encode(x)
        return self.decode(codes.normal, self.condition(self.segment(codes.abnormal)))

    def pseudo_normal(self, x: Tensor) -> Tensor:
        """x_hat-: the slice redrawn from its normal code alone (the lesion removed)."""
        return self.decode(self.encode(x).normal, None)

    def decode_indices(self, normal_indices: Tensor, abnormal_indices: Tensor) -> Tensor:
        """Draw the image of a pair of index maps (B, 8, 8), e.g. one slice's normal code with
        another's abnormal code for a composed query."""
        normal = self.normal_quantizer.lookup(normal_indices)  # (B, 64, 8, 8)
        abnormal = self.abnormal_quantizer.lookup(abnormal_indices)  # (B, 64, 8, 8)
        if normal.shape != abnormal.shape:
            raise ValueError(
                f"normal and abnormal indices differ in shape: "
                f"{tuple(normal_indices.shape)} and {tuple(abnormal_indices.shape)}"
            )
        return self.decode(normal, self.condition(self.segment(abnormal)))

    def forward(self, x: Tensor) -> DecompositionOutput:
        normal_pre, abnormal_pre, normal, abnormal = self._quantize(x)
        logits = self.segment(abnormal.quantized)  # (B, 4, 256, 256)
        reconstruction = self.decode(normal.quantized, self.condition(logits))  # x_hat+
        pseudo_normal = self.decode(normal.quantized, torch.zeros_like(logits))  # x_hat-
        return DecompositionOutput(
            normal_pre=normal_pre,
            abnormal_pre=abnormal_pre,
            normal=normal,
            abnormal=abnormal,
            logits=logits,
            reconstruction=reconstruction,
            pseudo_normal=pseudo_normal,
        )
