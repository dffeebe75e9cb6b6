"""What skull stripping leaves at a real brain's edge, drawn on 2-D training slices.

A real BraTS-space post-contrast T1 keeps, along parts of its brain mask's edge, tissue the
stripping did not remove: dura, and around the posterior fossa, along the falx and at the vertex
the venous sinuses, which enhance brighter than any brain tissue. A phantom's mask is its brain's
own edge, so a model trained on phantoms never sees such a band, and stage 5 takes the real
case's for tumour (the model card: its false lesions lie along the cerebellum's edge).

``strip_residue`` turns a band of background pixels along 1-3 arcs of the brain's edge into dura
or sinus tissue: up to 1-6 px wide (about 1-6 mm at 256 px), tapering to nothing at the arc's
ends, as a sinus's cross-section does. Where the arcs fall is drawn uniformly around the slice:
the rule is the same for every brain, not placed where one real case has its sinuses. The labels
stay: the band is normal tissue, and it only ever replaces background.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model.data.synth import tissue as T

WIDTH_PX = (1.0, 6.0)  # the band's widest point
ARCS = (1, 3)  # arcs per slice
HALF_ANGLE_DEG = (15.0, 80.0)  # each arc's half-width around the brain's centroid
SINUS_SHARE = 0.5  # of the arcs, drawn as sinus (brighter) rather than dura


def _grow(mask: Tensor) -> Tensor:
    """(L, H, W) bool -> the mask grown by one pixel into its 8 neighbours (separable)."""
    p = F.pad(mask.to(torch.uint8), (1, 1, 1, 1))
    rows = p[:, :, :-2] | p[:, :, 1:-1] | p[:, :, 2:]
    return (rows[:, :-2] | rows[:, 1:-1] | rows[:, 2:]).bool()


def _outside_distance(brain: Tensor, reach: int) -> Tensor:
    """(L, H, W) bool -> the chessboard distance (1..reach) of each background pixel to the
    brain, 0 inside it and beyond ``reach``."""
    distance = torch.zeros(brain.shape, dtype=torch.int64, device=brain.device)
    inside = brain.clone()
    for step in range(1, reach + 1):
        grown = _grow(inside)
        distance[grown & ~inside] = step
        inside = grown
    return distance


def strip_residue(tissue: Tensor, rng: np.random.Generator) -> Tensor:
    """One (H, W) tissue slice, or an (L, H, W) slab of levels around one, with a residue band
    drawn along its brain's edge; a slab gets the same arcs at every level, each level along its
    own edge. A slice without brain comes back unchanged."""
    levels = tissue[None] if tissue.dim() == 2 else tissue
    centre = levels[levels.shape[0] // 2] > 0
    if not centre.any():
        return tissue
    h, w = centre.shape
    ys, xs = centre.nonzero(as_tuple=True)
    cy, cx = ys.float().mean(), xs.float().mean()
    yy, xx = torch.meshgrid(torch.arange(h, device=tissue.device, dtype=torch.float32),
                            torch.arange(w, device=tissue.device, dtype=torch.float32),
                            indexing="ij")
    angle = torch.atan2(yy - cy, xx - cx)
    reach = math.ceil(WIDTH_PX[1])
    distance = _outside_distance(levels > 0, reach)
    out = levels.clone()
    for _ in range(int(rng.integers(ARCS[0], ARCS[1] + 1))):
        middle = rng.uniform(-math.pi, math.pi)
        half = math.radians(rng.uniform(*HALF_ANGLE_DEG))
        width = rng.uniform(*WIDTH_PX)
        kind = T.SINUS if rng.random() < SINUS_SHARE else T.DURA
        off = torch.remainder(angle - middle + math.pi, 2 * math.pi) - math.pi
        taper = (1 - (off / half) ** 2).clamp_min(0).sqrt()  # 1 at the middle, 0 at the ends
        band = (distance > 0) & (distance <= (width * taper).ceil()) & (off.abs() < half)
        out[band & (out == T.BACKGROUND)] = kind
    return out[0] if tissue.dim() == 2 else out


def draw_residues(tissue: Tensor, slabs: Tensor | None, probability: float,
                  rng: np.random.Generator) -> tuple[Tensor, Tensor | None]:
    """Each of a batch's (B, H, W) tissue slices, with ``probability``, with a residue band;
    its slab of levels (B, L, H, W), when given, with the same arcs (the slab's centre level is
    the slice: the band is drawn once, on the slab, and the slice takes its centre)."""
    tissue = tissue.clone()
    slabs = None if slabs is None else slabs.clone()
    for i in range(len(tissue)):
        if rng.random() >= probability:
            continue
        if slabs is None:
            tissue[i] = strip_residue(tissue[i], rng)
        else:
            slabs[i] = strip_residue(slabs[i], rng)
            tissue[i] = slabs[i, slabs.shape[1] // 2]
    return tissue, slabs
