"""Rendering a tissue label map as a post-contrast T1 image, with random appearance.

One renderer for the 3-D volumes ``cbir synth`` writes and for the 2-D slices training draws
afresh at every step (``model/train.py``), in the manner of SynthSeg's generator (Billot et al.,
Medical Image Analysis 2023), in this order:

1. a mean intensity per tissue class (``tissue.INTENSITY_PRIOR``, white matter = 1), and a
   per-voxel Gaussian spread around it (the per-voxel draw is also the texture);
2. a smooth multiplicative texture field;
3. partial volume and scanner resolution: a Gaussian blur, and along some axes a lower resolution
   (area-averaged down by a factor, linearly back), e.g. a thick axial slice; a 2-D training
   slice gets the through-plane partial volume of a thick-sliced scan from the slab of tissue
   levels around it (``render_thick``);
4. a smooth multiplicative bias field;
5. Rician noise;
6. the brain mask re-applied (BraTS volumes are skull-stripped with a background of exactly 0);
   until then the background has its own random intensity (``BACKGROUND_PRIOR``), as the skull,
   CSF and dura around a real brain are blurred into its edge before stripping;
7. intensity scaled by the 99.5th percentile of the brain, clipped to [0, 1] (the preprocessing
   rule, ``model/data/preprocess.py``), then a random gamma.

Every random draw comes from the generator the caller passes, in a fixed order for a given shape,
so two renderings of two label maps of one shape with the same seed share their noise, bias and
texture voxel for voxel: that is how a synthetic patient's lesion-free twin equals its image away
from the lesion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model.data.synth import tissue as T

INTENSITY_PERCENTILE = 0.995
BACKGROUND_PRIOR = (0.0, 0.6)  # white matter = 1: dark bone and CSF to the bright rim of dura


@dataclass(frozen=True)
class Appearance:
    """One draw of everything random about how a label map looks."""

    means: tuple[float, ...]  # per tissue class, white matter = 1
    spread: tuple[float, ...]  # per-voxel standard deviation per class, relative to its mean
    texture: float  # amplitude of the smooth multiplicative texture
    bias: float  # amplitude of the log bias field
    noise: float  # Rician noise sigma, white matter = 1
    blur: tuple[float, ...]  # Gaussian sigma per spatial axis, voxels
    resolution: tuple[float, ...]  # per axis: >= 1, the factor the resolution is lowered by
    gamma: float  # applied to the [0, 1] image
    scale_jitter: float  # the percentile scale times this (a slice is not its volume)


def sample_means(rng: np.random.Generator) -> tuple[float, ...]:
    """Class means from ``tissue.INTENSITY_PRIOR``: T1-Gd order kept, values drawn."""
    m = np.zeros(T.NUM_TISSUES)
    m[T.WM] = 1.0
    for cls, (lo, hi) in T.INTENSITY_PRIOR.items():
        m[cls] = rng.uniform(lo, hi)
    m[T.DEEP_GM] = m[T.GM] + rng.uniform(0.2, 0.8) * (1.0 - m[T.GM])
    m[T.VENTRICLE] = m[T.CSF] * rng.uniform(0.85, 1.1)
    # What lay outside the brain before skull stripping (CSF, bone, dura, fat): it takes part in
    # the blur and the thick slices, then the mask removes it, as in a stripped real scan.
    m[T.BACKGROUND] = rng.uniform(*BACKGROUND_PRIOR)
    return tuple(float(v) for v in m)


def sample_appearance(rng: np.random.Generator, ndim: int, thick_axis: int | None = None
                      ) -> Appearance:
    """A random appearance for an ``ndim``-D map; ``thick_axis`` may get thick slices.

    Volumes (``ndim`` 3, ``thick_axis`` 2, the axial axis): half of them thick-sliced by a factor
    of 2 to 6 (clinical 2-6 mm slices, brought back to 1 mm); 2-D training slices: in-plane
    resolution lowered by up to 2 in a third of them.
    """
    spread = rng.uniform(0.01, 0.06, T.NUM_TISSUES)
    spread[list(T.LESION_TISSUES)] = rng.uniform(0.03, 0.12, len(T.LESION_TISSUES))
    resolution = np.ones(ndim)
    if thick_axis is not None and rng.random() < 0.5:
        resolution[thick_axis] = rng.uniform(2.0, 6.0)
    elif rng.random() < 0.33:
        resolution[:] = rng.uniform(1.0, 2.0, ndim)
    return Appearance(
        means=sample_means(rng),
        spread=tuple(float(v) for v in spread),
        texture=float(rng.uniform(0.0, 0.12)),
        bias=float(rng.uniform(0.0, 0.35)),
        noise=float(rng.uniform(0.0, 0.06)),
        blur=tuple(float(v) for v in rng.uniform(0.0, 0.9, ndim)),
        resolution=tuple(float(v) for v in resolution),
        gamma=float(np.exp(rng.uniform(np.log(0.7), np.log(1.4)))),
        scale_jitter=float(rng.uniform(0.9, 1.1)) if ndim == 2 else 1.0,
    )


def _kernel(sigma: float, device: torch.device) -> Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def blur(x: Tensor, sigmas: tuple[float, ...]) -> Tensor:
    """Separable Gaussian blur of one image or volume ``x`` (spatial dims only), reflect edges."""
    for axis, sigma in enumerate(sigmas):
        if sigma < 0.2:
            continue
        k = _kernel(sigma, x.device)
        moved = x.movedim(axis, -1)
        shape = moved.shape
        flat = moved.reshape(-1, 1, shape[-1])
        pad = len(k) // 2
        flat = F.pad(flat, (pad, pad), mode="reflect" if shape[-1] > pad else "replicate")
        flat = F.conv1d(flat, k.view(1, 1, -1))
        x = flat.reshape(shape).movedim(-1, axis)
    return x


def _smooth_field(shape: tuple[int, ...], cells: int, generator: torch.Generator,
                  device: torch.device) -> Tensor:
    """A smooth random field in [-1, 1]: ``cells`` random values per axis, interpolated."""
    coarse = torch.randn((1, 1, *[cells] * len(shape)), generator=generator, device=device)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    field = F.interpolate(coarse, size=shape, mode=mode, align_corners=True)[0, 0]
    return field / field.abs().max().clamp_min(1e-6)


def _lower_resolution(x: Tensor, factors: tuple[float, ...]) -> Tensor:
    if all(f <= 1.05 for f in factors):
        return x
    shape = x.shape
    low = [max(2, round(n / f)) for n, f in zip(shape, factors, strict=True)]
    mode = "bilinear" if x.dim() == 2 else "trilinear"
    # Area averaging: blur by the factor first, then sample.
    x = blur(x, tuple(0.4 * f if f > 1.05 else 0.0 for f in factors))
    down = F.interpolate(x[None, None], size=low, mode=mode, align_corners=True)
    return F.interpolate(down, size=shape, mode=mode, align_corners=True)[0, 0]


def render_raw(tissue: Tensor, appearance: Appearance, generator: torch.Generator) -> Tensor:
    """Steps 1-6 on one label map (spatial dims only, int64 tissue ids): white matter about 1.

    Draws: per-voxel spread, texture field, bias field, then two noise volumes, always in that
    order and shape.
    """
    x = _textured(_tissue_intensity(tissue, appearance, generator), appearance, generator)
    return _acquire(x, tissue > 0, appearance, generator)


def _tissue_intensity(tissue: Tensor, appearance: Appearance, generator: torch.Generator
                      ) -> Tensor:
    """Step 1: each voxel its class mean times (1 + its class spread x a normal draw)."""
    means = torch.tensor(appearance.means, device=tissue.device)
    spread = torch.tensor(appearance.spread, device=tissue.device)
    return means[tissue] * (1 + spread[tissue] * torch.randn(
        tuple(tissue.shape), generator=generator, device=tissue.device))


def _textured(x: Tensor, appearance: Appearance, generator: torch.Generator) -> Tensor:
    """Step 2: a smooth multiplicative texture field."""
    cells = 6 if x.dim() == 2 else 5
    return x * (1 + appearance.texture * _smooth_field(tuple(x.shape), 4 * cells, generator,
                                                       x.device))


def _acquire(x: Tensor, brain: Tensor, appearance: Appearance, generator: torch.Generator
             ) -> Tensor:
    """Steps 3-6 on an intensity map: blur and resolution, bias field, Rician noise, mask."""
    device = x.device
    shape = tuple(x.shape)
    cells = 6 if len(shape) == 2 else 5
    x = _lower_resolution(blur(x, appearance.blur), appearance.resolution)
    x = x * torch.exp(appearance.bias * _smooth_field(shape, cells, generator, device))
    n1 = torch.randn(shape, generator=generator, device=device)
    n2 = torch.randn(shape, generator=generator, device=device)
    x = torch.sqrt((x + appearance.noise * n1) ** 2 + (appearance.noise * n2) ** 2)
    return torch.where(brain, x, torch.zeros((), device=device))


def brain_scale(raw: Tensor, brain: Tensor) -> Tensor:
    """Step 7's scale: the 99.5th percentile of the brain's voxels (1 when there are none)."""
    values = raw[brain]
    if values.numel() == 0:
        return torch.ones((), device=raw.device)
    if values.numel() > 2**24:  # torch.quantile's limit; a strided subset estimates it
        values = values[:: math.ceil(values.numel() / 2**24)]
    return torch.quantile(values.float(), INTENSITY_PERCENTILE)


def finish(raw: Tensor, brain: Tensor, appearance: Appearance, scale: Tensor | None = None
           ) -> Tensor:
    """Step 7: scale by ``scale`` (default: this image's own), clip, gamma; 0 outside ``brain``.

    A lesion-free twin is finished with its lesioned image's scale, as ``load_case`` normalises it.
    """
    if scale is None:
        scale = brain_scale(raw, brain)
    x = (raw / (scale * appearance.scale_jitter)).clamp(0, 1) ** appearance.gamma
    # A brain voxel stays > 0: the preprocessing rule tells brain from background by it.
    return torch.where(brain, x.clamp_min(1e-3), torch.zeros((), device=raw.device))


def render(tissue: Tensor, appearance: Appearance, generator: torch.Generator) -> Tensor:
    """One label map -> image in [0, 1], 0 outside the brain (steps 1-7)."""
    return finish(render_raw(tissue, appearance, generator), tissue > 0, appearance)


@dataclass(frozen=True)
class ThickSlice:
    """A clinical acquisition along the axial axis, resampled to 1 mm as BraTS preprocessing does:
    slices ``spacing`` mm apart and ``thickness`` mm thick (a gap when less), the first centre
    ``phase`` mm (in [0, spacing)) from the 1 mm level that is rendered."""

    spacing: float
    thickness: float
    phase: float


# The slab of 1 mm tissue levels a thick-slice rendering reads on each side of its level: the
# longest kernel, spacing 6 and phase 0, reaches 1.5 x 6 mm away.
SLAB_HALF = 9


def sample_thick_slice(rng: np.random.Generator) -> ThickSlice:
    """Clinical 2-6 mm axial slices (the prior of ``sample_appearance``'s thick volumes), each
    70-100 % of its spacing thick, at a random phase to the 1 mm grid."""
    spacing = float(rng.uniform(2.0, 6.0))
    return ThickSlice(spacing=spacing, thickness=spacing * float(rng.uniform(0.7, 1.0)),
                      phase=float(rng.uniform(0.0, spacing)))


def through_plane_weights(acquisition: ThickSlice, half: int = SLAB_HALF) -> np.ndarray:
    """What each 1 mm level at offsets -half..half contributes to the level at offset 0.

    The acquired slices on either side of level 0 (centres ``phase - spacing`` and ``phase``)
    each average the tissue under their box profile; level 0 is their linear interpolation, as a
    thick-sliced scan resampled to 1 mm is. Level d covers [d - 0.5, d + 0.5]; the weights sum
    to 1 (``half`` must reach 1.5 x spacing).
    """
    s, t, phase = acquisition.spacing, acquisition.thickness, acquisition.phase
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    weights = np.zeros_like(offsets)
    for centre, share in ((phase - s, phase / s), (phase, 1.0 - phase / s)):
        lo = np.maximum(offsets - 0.5, centre - t / 2)
        hi = np.minimum(offsets + 0.5, centre + t / 2)
        weights += share * np.clip(hi - lo, 0.0, None) / t
    return weights


def render_thick(slab: Tensor, acquisition: ThickSlice, appearance: Appearance,
                 generator: torch.Generator) -> Tensor:
    """The centre level of a (2 x half + 1, H, W) tissue slab as a thick-sliced scan shows it:
    partial volume through the plane (``through_plane_weights``), then the 2-D ``appearance``.
    Tissue outside the brain takes part until the centre level's brain mask removes it."""
    slab = slab.long()
    half = slab.shape[0] // 2
    weights = torch.tensor(through_plane_weights(acquisition, half), device=slab.device,
                           dtype=torch.float32)
    x = (weights[:, None, None] * _tissue_intensity(slab, appearance, generator)).sum(0)
    x = _textured(x, appearance, generator)
    brain = slab[half] > 0
    return finish(_acquire(x, brain, appearance, generator), brain, appearance)


def render_batch(tissue: Tensor, generator: torch.Generator, rng: np.random.Generator,
                 slabs: Tensor | None = None, thick: float = 0.0) -> Tensor:
    """(B, H, W) label slices -> (B, 1, H, W) images, each with its own random appearance.

    With ``slabs`` ((B, 2 x half + 1, H, W), the levels around each slice), each slice is, with
    probability ``thick``, drawn as a thick-sliced acquisition (``render_thick``); ``thick`` 0
    draws exactly what it draws without slabs.
    """
    images = []
    for i, t in enumerate(tissue):
        look = sample_appearance(rng, 2)
        if slabs is not None and thick > 0 and rng.random() < thick:
            images.append(render_thick(slabs[i], sample_thick_slice(rng), look, generator))
        else:
            images.append(render(t, look, generator))
    return torch.stack(images)[:, None]
