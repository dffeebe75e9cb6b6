"""Normal tissue that enhances on post-contrast T1: venous sinuses, falx, dura, choroid plexus,
cortical vessels.

Skull-stripped real T1-Gd keeps some of each: the superior sagittal sinus as a bright triangle at
the anterior and posterior midline edge, the straight and transverse sinuses at the tentorium,
bright dura where the stripping left it, the falx as a bright midline line, the tentorium as a
bright V between the occipital lobes and the cerebellum, choroid plexus in the atria of the
lateral ventricles, and bright dots and curves of cortical vessels in the sulci.

Sizes are roughly anatomy's, not a thin outline: the superior sagittal sinus about 7 mm
across, a transverse sinus about 8 mm wide, the torcula (their confluence) about 10 mm. On axial
slices through the posterior fossa the transverse sinuses and the tentorium are the widest bright
bands of a normal T1-Gd; a model that only ever saw a 2 mm rim there calls them tumour.

The fixed structures (sinuses, falx, choroid plexus) are drawn once on the template's grid
(``template_structures``, positions in MNI mm), and each patient keeps a random part of each
(``overlay``); vessels and dura are drawn per patient on the output grid.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage as ndi

from model.data.synth import tissue as T
from model.data.synth.template import Template, load_template

# Fixed structures on the template grid: ids of this map, not tissue ids.
SSS, STRAIGHT, TRANSVERSE, FALX, CHOROID_ZONE, TORCULA, TENTORIUM = 1, 2, 3, 4, 5, 6, 7
STRUCTURE_TISSUE = {SSS: T.SINUS, STRAIGHT: T.SINUS, TRANSVERSE: T.SINUS, FALX: T.DURA,
                    CHOROID_ZONE: T.CHOROID, TORCULA: T.SINUS, TENTORIUM: T.DURA}
# Probability that a patient's image shows each (skull stripping keeps or removes them).
STRUCTURE_SHOWN = {SSS: 0.7, STRAIGHT: 0.5, TRANSVERSE: 0.7, FALX: 0.4, CHOROID_ZONE: 0.8,
                   TORCULA: 0.6, TENTORIUM: 0.6}


def _tube(shape: tuple[int, ...], points: np.ndarray, radius: float) -> np.ndarray:
    """Voxels within ``radius`` of any of ``points`` (N, 3 voxel coordinates)."""
    seed = np.zeros(shape, bool)
    idx = np.round(points).astype(int)
    ok = ((idx >= 0) & (idx < np.array(shape))).all(1)
    seed[tuple(idx[ok].T)] = True
    r = int(np.ceil(radius))
    ball = np.linalg.norm(np.indices((2 * r + 1,) * 3) - r, axis=0) <= radius
    return ndi.binary_dilation(seed, structure=ball)


@functools.cache
def template_structures() -> np.ndarray:
    """uint8 map on the template grid of the fixed structures (ids above), 0 elsewhere."""
    tpl: Template = load_template()
    o = tpl.origin
    shape = tpl.brain.shape
    brain = tpl.brain > 0
    out = np.zeros(shape, np.uint8)
    x = np.arange(shape[0]) - o[0]
    y = np.arange(shape[1]) - o[1]
    z = np.arange(shape[2]) - o[2]

    # Superior sagittal sinus: just outside the brain's outline in the midsagittal plane, over
    # the convexity from the frontal pole to the occiput (MNI z > 0, or y < -70 and z > -8).
    mid = brain[int(round(o[0]))]
    shell = ndi.binary_dilation(mid, iterations=3) & ~ndi.binary_dilation(mid, iterations=1)
    yy, zz = np.nonzero(shell)
    keep = (z[zz] > 0) | ((y[yy] < -70) & (z[zz] > -8))
    pts = np.stack([np.full(keep.sum(), o[0]), yy[keep], zz[keep]], 1)
    out[_tube(shape, pts, 3.5)] = SSS

    # Transverse sinuses: a band 7-8 mm wide hugging the posterior outline at the tentorium's
    # level, descending laterally; the torcula at the midline joins them to the sagittal sinus.
    outer = ndi.binary_dilation(brain, iterations=5) & ~ndi.binary_dilation(brain, iterations=1)
    level = -8.0 - 0.25 * np.abs(x)[:, None, None]
    band = (np.abs(z[None, None, :] - level) < 4.0) & (y[None, :, None] < -55)
    out[outer & band & (out == 0)] = TRANSVERSE
    # The torcula: a ball of about 10 mm where the sinuses meet behind the occipital poles.
    back = np.nonzero(mid[:, int(round(o[2] - 4))])[0]  # brain rows of the midline, z = -4 mm
    if back.size:
        torcula = np.array([[o[0], back.min() - 2.0, o[2] - 4.0]])
        out[_tube(shape, torcula, 5.0) & (out == 0)] = TORCULA

    # Straight sinus: from the vein of Galen to the torcula, along the tentorium's midline.
    t = np.linspace(0, 1, 120)[:, None]
    galen, torcula = np.array([0.0, -48.0, 6.0]), np.array([0.0, -98.0, -6.0])
    line = galen + t * (torcula - galen) + o
    tube = _tube(shape, line, 2.0) & (out == 0)
    out[tube] = STRAIGHT

    # Falx: the midline voxel column where the interhemispheric fissure holds CSF, above the
    # corpus callosum.
    falx = np.zeros(shape, bool)
    xm = int(round(o[0]))
    falx[xm] = (tpl.csf[xm] > 0.3) & (z[None, :] > 12)
    out[falx & (out == 0)] = FALX

    # Choroid plexus zone: the atria and posterior bodies of the lateral ventricles.
    vent = (tpl.anatomy == 5) | (tpl.anatomy == 6)
    out[vent & (y[None, :, None] < -22) & (out == 0)] = CHOROID_ZONE

    # Tentorium cerebelli: the dural sheet between the occipital and temporal lobes above and
    # the cerebellum below, 2 mm of cerebrum along their interface.
    cerebellum = (tpl.anatomy == 3) | (tpl.anatomy == 4)
    cerebrum = (tpl.anatomy == 1) | (tpl.anatomy == 2)
    sheet = ndi.binary_dilation(cerebellum, iterations=2) & cerebrum
    out[sheet & (out == 0)] = TENTORIUM
    return out


def overlay(tissue: np.ndarray, structures: np.ndarray, coverage: np.ndarray,
            rng: np.random.Generator) -> np.ndarray:
    """Tissue ids (N,) with a random part of each fixed structure drawn over them.

    ``structures`` holds the template structure id at each point, ``coverage`` a smooth field in
    [-1, 1] at each point: a shown structure keeps the points where coverage is above a random
    threshold, so what remains is a few connected stretches, not salt and pepper.
    """
    out = tissue.copy()
    for sid, cls in STRUCTURE_TISSUE.items():
        if rng.random() >= STRUCTURE_SHOWN[sid]:
            continue
        keep = (structures == sid) & (coverage > rng.uniform(-1.0, 0.3))
        if cls == T.CHOROID:
            keep &= out == T.VENTRICLE
        out[keep] = cls
    return out


def dura(brain: np.ndarray, coverage: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A partial bright rim (1-2 voxels) on the brain's outer surface: dura stripping left."""
    if rng.random() < 0.3:
        return np.zeros_like(brain)
    inner = ndi.binary_erosion(brain, iterations=int(rng.integers(1, 3)))
    return brain & ~inner & (coverage > rng.uniform(0.0, 0.8))


def vessels(tissue: np.ndarray, depth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Cortical vessels: a few random smooth curves through sulcal CSF near the surface.

    ``tissue`` and ``depth`` (mm from the brain's edge) are volumes on the output grid. Returns
    a mask of vessel voxels inside CSF or cortical grey matter.
    """
    mask = np.zeros(tissue.shape, bool)
    count = int(rng.integers(0, 40))
    seeds = np.flatnonzero((tissue.ravel() == T.CSF) & (depth.ravel() < 12))
    if count == 0 or seeds.size == 0:
        return mask
    shape = np.array(tissue.shape)
    for start in rng.choice(seeds, size=count):
        p = np.array(np.unravel_index(start, tissue.shape), float)
        d = rng.standard_normal(3)
        d /= np.linalg.norm(d)
        points = []
        for _ in range(int(rng.integers(10, 70))):
            points.append(p.copy())
            d = d + rng.normal(0, 0.25, 3)
            d /= np.linalg.norm(d)
            p = p + d
            if ((p < 0) | (p >= shape - 1)).any():
                break
        radius = rng.uniform(0.5, 1.5)
        r = int(np.ceil(radius))
        offsets = np.argwhere(np.linalg.norm(np.indices((2 * r + 1,) * 3) - r, axis=0)
                              <= radius) - r
        idx = (np.round(np.array(points))[:, None, :] + offsets[None]).reshape(-1, 3).astype(int)
        ok = ((idx >= 0) & (idx < shape)).all(1)
        mask[tuple(idx[ok].T)] = True
    return mask & ((tissue == T.CSF) | (tissue == T.GM))
