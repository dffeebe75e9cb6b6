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
import torch.nn.functional as F
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
    """Everything one training step needs from a batch, at the network's own resolution
    S = ``config.model_size`` (128 in the ``cpu`` preset, 256 in the others)."""

    normal_pre: Tensor  # z_e-: (B, 64, 8, 8)
    abnormal_pre: Tensor  # z_e+: (B, 64, 8, 8)
    normal: Quantized  # quantizer pass on z_e-: z_q-, indices, commitment, distances
    abnormal: Quantized  # quantizer pass on z_e+ (its distances feed L_dis, eq. 3)
    logits: Tensor  # (B, 4, S, S) segmentation logits: background, TC, ED, ET
    reconstruction: Tensor  # x_hat+ = f(z_q-, condition(logits)): (B, 1, S, S)
    pseudo_normal: Tensor  # x_hat- = f(z_q-, 0): (B, 1, S, S)
    gate_logit: Tensor | None = None  # (B,) logit of the abnormal gate; None without one
    # (B, 8, 8) per-position lesion logits whose maximum is gate_logit (gate_by_position)
    gate_positions: Tensor | None = None


@dataclass
class Drawn:
    """What the model draws for a batch of slices, at the slices' size (256 x 256)."""

    codes: Codes
    logits: Tensor  # (B, 4, 256, 256) segmentation logits
    reconstruction: Tensor  # x_hat+: (B, 1, 256, 256)
    pseudo_normal: Tensor  # x_hat-: (B, 1, 256, 256)


def he_init(module: nn.Module) -> None:
    """He (Kaiming) normal init of every convolution, zero biases (Appendix D)."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DecompositionNet(nn.Module):
    """Slices in and images out are ``config.image_size`` square; the network in between runs
    at ``config.model_size``. The two resizings live in ``to_model_size`` / ``to_image_size``
    and nowhere else; the codes are 64 x 8 x 8 either way.
    """

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
        self.abnormal_quantizer = VectorQuantizer(**quantizer_args,
                                                  null_code=config.abnormal_null_code)
        self.segmentation_decoder = SegmentationDecoder(config)
        self.image_decoder = ImageDecoder(config)
        self.apply(he_init)
        for module in self.image_decoder.modules():
            if isinstance(module, SPADE):
                module.reset_modulation()

    # -- the one place where resolution changes ---------------------------------------------------

    def to_model_size(self, x: Tensor) -> Tensor:
        """Slices (B, C, 256, 256) -> (B, C, S, S) by area averaging (a no-op when S = 256)."""
        size = self.config.image_size
        if x.dim() != 4 or tuple(x.shape[-2:]) != (size, size):
            raise ValueError(f"expected slices of shape (B, C, {size}, {size}), "
                             f"got {tuple(x.shape)}")
        if self.config.model_size == size:
            return x
        return F.interpolate(x, size=self.config.model_size, mode="area")

    def to_image_size(self, y: Tensor) -> Tensor:
        """Network outputs (B, C, S, S) -> (B, C, 256, 256), bilinear (a no-op when S = 256)."""
        if y.shape[-1] == self.config.image_size:
            return y
        return F.interpolate(y, size=self.config.image_size, mode="bilinear",
                             align_corners=False)

    # -- encoding ---------------------------------------------------------------------------------

    def _quantize(self, x: Tensor, lesion: Tensor | None = None
                  ) -> tuple[Tensor, Tensor, Quantized, Quantized, Tensor | None, Tensor | None]:
        # (B, 64, 8, 8) each, the gate's logit (B,) and its per-position logits (B, 8, 8)
        x = self.to_model_size(x)
        normal_pre, abnormal_pre, gate, positions = self.encoder.split(self.encoder.trunk(x), x)
        return (
            normal_pre,
            abnormal_pre,
            self.normal_quantizer(normal_pre),
            # Appendix C trains the abnormal code towards its codebook only where abnormality
            # exists: only those slices move its EMA, seed it and restart its dead codes.
            self.abnormal_quantizer(abnormal_pre, update=lesion),
            gate,
            positions,
        )

    def encode(self, x: Tensor) -> Codes:
        """Slices (B, 1, 256, 256) -> both codes and their indices.

        Call it in eval mode: in training mode the quantizers update their codebooks.
        """
        normal_pre, abnormal_pre, normal, abnormal, _, _ = self._quantize(x)
        return Codes(
            normal=normal.quantized,
            abnormal=abnormal.quantized,
            normal_indices=normal.indices,
            abnormal_indices=abnormal.indices,
            normal_pre=normal_pre,
            abnormal_pre=abnormal_pre,
        )

    # -- decoding ---------------------------------------------------------------------------------

    def segment(self, abnormal: Tensor) -> Tensor:
        """Abnormal code z_q+ (B, 64, 8, 8) -> segmentation logits (B, 4, 256, 256)."""
        return self.to_image_size(self.segmentation_decoder(abnormal))

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

    def decode(self, normal: Tensor, condition: Tensor | None) -> Tensor:
        """f(z_q-, condition) -> (B, 1, 256, 256); ``None`` is the null (all-zero) condition.

        A condition of any size is average-pooled to each decoder level."""
        return self.to_image_size(self.image_decoder(normal, condition))

    def draw(self, x: Tensor) -> Drawn:
        """Codes, segmentation, x_hat+ and x_hat- of slices (B, 1, 256, 256), all at 256 x 256.

        The condition of x_hat+ is taken from the logits at the network's resolution, as in
        training, before anything is resized."""
        codes = self.encode(x)
        logits = self.segmentation_decoder(codes.abnormal)  # (B, 4, S, S)
        reconstruction = self.image_decoder(codes.normal, self.condition(logits))
        pseudo_normal = self.image_decoder(codes.normal, None)
        return Drawn(codes=codes, logits=self.to_image_size(logits),
                     reconstruction=self.to_image_size(reconstruction),
                     pseudo_normal=self.to_image_size(pseudo_normal))

    def reconstruct(self, x: Tensor) -> Tensor:
        """x_hat+: the slice redrawn from both of its codes."""
        return self.draw(x).reconstruction

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
        condition = self.condition(self.segmentation_decoder(abnormal))  # (B, 4, S, S)
        return self.to_image_size(self.image_decoder(normal, condition))

    def forward(self, x: Tensor, lesion: Tensor | None = None,
                null_shortcut: bool = True) -> DecompositionOutput:
        """Training pass on slices (B, 1, 256, 256); outputs at the network's size S.

        ``lesion`` marks the slices (B,) or the code positions (B, 8, 8) with abnormality: in
        training, only they update the abnormal codebook. ``None`` lets every slice update it.
        ``null_shortcut=False`` draws x_hat- from an explicit all-zero map instead of
        ``SPADE._null_modulation`` (the plain computation the shortcut is tested against).
        """
        normal_pre, abnormal_pre, normal, abnormal, gate, positions = self._quantize(x, lesion)
        logits = self.segmentation_decoder(abnormal.quantized)  # (B, 4, S, S)
        reconstruction = self.image_decoder(normal.quantized, self.condition(logits))  # x_hat+
        null = None if null_shortcut else torch.zeros_like(logits)
        pseudo_normal = self.image_decoder(normal.quantized, null)  # x_hat-
        return DecompositionOutput(
            normal_pre=normal_pre,
            abnormal_pre=abnormal_pre,
            normal=normal,
            abnormal=abnormal,
            logits=logits,
            reconstruction=reconstruction,
            pseudo_normal=pseudo_normal,
            gate_logit=gate,
            gate_positions=positions,
        )
