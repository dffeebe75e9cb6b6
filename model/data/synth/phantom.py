"""One synthetic patient: a tissue label map drawn from the template, 0 to 2 tumours, and its image.

Everything is a backward map from the BraTS-like output grid to the template, sampled once:

    output voxel p  --mass effect-->  q  --affine + elastic-->  m  --ventricle scaling-->  template

At each output voxel the template's grey-matter, white-matter and CSF probabilities are read and
the tissue is their argmax after adding a smooth random field to each log-probability
(``_tissue_from_maps``): every patient's cortex folds, sulci and grey-white boundary differ from
the template's and from each other's by a few millimetres, and a random offset on CSF widens or
narrows the sulci (atrophy). Then the normal tissue that enhances (``structures.py``) and the
tumours (``lesion.py``) are drawn over it, and the map is rendered once with a random appearance
(``appearance.py``) into the image.

The healthy volume is the same map without the tumours and their mass effect, rendered with the
same appearance and the same random draws (noise, bias, texture), and normalised with the
lesioned image's scale, so it equals the lesioned image everywhere outside the lesion's region of
influence: the labels (which include the edema), the mass effect's reach (at most
``MASS_EFFECT_REACH_MM`` beyond the radius the tumour label always covers; it fades out over
``SKULL_MM`` below the brain's edge, which the skull holds in place) and what the rendering
spreads (blur and lower resolution, ``RENDER_REACH_MM``). ``INFLUENCE_MARGIN_MM`` bounds how far
from any labelled voxel the two volumes can differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage as ndi

from model.data.synth import appearance as A
from model.data.synth import lesion as L
from model.data.synth import structures as S
from model.data.synth import tissue as T
from model.data.synth.template import Template

GRID_SHAPE = (240, 240, 155)
# BraTS stores voxels in LPS order: x = -i, y = 239 - j, z = k (mm).
BRATS_AFFINE = np.array(
    [[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]
)
# Output RAS voxel (a, b, c) sits at nominal MNI mm (a - 119.5, b - 136.5, c - 70): the grid is
# centred on the brain in x and y and starts just below the cerebellum.
GRID_TO_MNI = np.array([-119.5, -136.5, -70.0], dtype=np.float32)
# The template is larger than the SRI24 atlas brain that BraTS registers to, and sits off its
# centre: reading the template at (p + SRI24_SHIFT_MM) * SRI24_SCALE instead of p raises the
# overlap of the two brain masks on the grid from Dice 0.849 to 0.927 (grid search on the atlas
# and the template only, ``python -m bench.preprocess_real --placement``). Patients are drawn
# around that placement, so their brains are where and as large as real BraTS-space brains.
SRI24_SHIFT_MM = np.array([-0.4, 9.0, 2.0], dtype=np.float32)
SRI24_SCALE = 1.08
# Part of the output grid the brain can reach (RAS voxel index ranges, end exclusive).
BOX = (slice(38, 202), slice(20, 218), slice(0, 155))

MASS_EFFECT_REACH_MM = 12.0
# How far the rendering carries a difference between two label maps: three blur sigmas, and
# the lower resolution's blur (0.4 x factor) and interpolation (one low-resolution voxel).
RENDER_REACH_MM = 3 * 0.9 + 3 * 0.4 * 6.0 + 6.0 + 1.0
INFLUENCE_MARGIN_MM = MASS_EFFECT_REACH_MM + RENDER_REACH_MM + 2.0
LESION_COUNT_P = (0.25, 0.55, 0.20)  # P(0), P(1), P(2) tumours per patient
DEEP_GM_DEPTH_MM = 15.0  # grey matter deeper than this below the brain's edge is deep grey matter
TISSUE_NOISE_MM = 2.0  # correlation length of the fields that move tissue boundaries


@dataclass
class Patient:
    """The sampled parameters of one synthetic patient."""

    rotation: np.ndarray  # (3, 3) template -> patient
    scale: np.ndarray  # (3,)
    shift: np.ndarray  # (3,) mm
    elastic: np.ndarray  # (3, gx, gy, gz) displacement (mm) on a 10 mm grid over BOX
    ventricle_scale: float
    boundary_noise: float  # amplitude of the log-probability fields (tissue boundaries)
    atrophy: float  # added to the CSF log-probability: wider sulci when > 0
    gain: float  # stored intensity of 1.0
    lesions: list[L.Lesion] = field(default_factory=list)


def _box_mm() -> tuple[np.ndarray, np.ndarray]:
    lo = np.array([s.start for s in BOX], np.float32) + GRID_TO_MNI
    hi = np.array([s.stop - 1 for s in BOX], np.float32) + GRID_TO_MNI
    return lo, hi


def _smooth_field(rng: np.random.Generator, spacing: float, amp: float, comps: int) -> np.ndarray:
    lo, hi = _box_mm()
    shape = tuple(int(np.ceil((h - lo_) / spacing)) + 2 for lo_, h in zip(lo, hi, strict=True))
    f = rng.standard_normal((comps, *shape)).astype(np.float32)
    f = np.stack([ndi.gaussian_filter(c, 1.0) for c in f])
    return f * (amp / max(float(np.abs(f).max()), 1e-6))


def _grid_sample(volumes: np.ndarray, coords: np.ndarray, nearest: bool = False) -> np.ndarray:
    """Values of (C, X, Y, Z) volumes at voxel coordinates (3, N): (C, N), 0 outside.

    Trilinear (or nearest) interpolation as ``scipy.ndimage.map_coordinates`` with order 1 (0)
    and ``mode="constant"``, through one ``torch.grid_sample`` call for all C volumes (several
    times faster on the CPU).
    """
    vol = torch.from_numpy(np.ascontiguousarray(volumes, dtype=np.float32))[None]
    size = torch.tensor(volumes.shape[1:], dtype=torch.float32)
    c = torch.from_numpy(np.ascontiguousarray(coords, dtype=np.float32))
    grid = (2 * c / (size[:, None] - 1) - 1).flip(0).T.reshape(1, 1, 1, -1, 3)
    out = torch.nn.functional.grid_sample(vol, grid, mode="nearest" if nearest else "bilinear",
                                          padding_mode="zeros", align_corners=True)
    return out[0, :, 0, 0].numpy()


def _eval_field(f: np.ndarray, p: np.ndarray, spacing: float) -> np.ndarray:
    """Trilinear value of a coarse field at output mm points p (3, N), edge values beyond."""
    lo, _ = _box_mm()
    g = (p - lo[:, None]) / spacing
    g = np.clip(g, 0, np.array(f.shape[1:], np.float32)[:, None] - 1)
    return _grid_sample(f, g)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.uniform([-10, -6, -12], [10, 6, 12]))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return (rz @ ry @ rx).astype(np.float32)


def sample_patient(rng: np.random.Generator) -> Patient:
    return Patient(
        rotation=_rotation(rng),
        # m = R^T (p - shift) / scale: around scale 1 / SRI24_SCALE and shift -SRI24_SHIFT_MM
        scale=(rng.uniform(0.88, 1.1, 3) / SRI24_SCALE).astype(np.float32),
        shift=(rng.uniform(-5, 5, 3) - SRI24_SHIFT_MM).astype(np.float32),
        elastic=_smooth_field(rng, 10.0, rng.uniform(2.0, 6.0), 3),
        ventricle_scale=float(np.exp(rng.uniform(np.log(0.7), np.log(2.0)))),
        boundary_noise=float(rng.uniform(0.3, 1.0)),
        atrophy=float(rng.uniform(-0.5, 1.0)),
        gain=float(rng.uniform(600, 1400)),
    )


# Ventricle scaling acts in template space, weighted by a Gaussian around the ventricles.
VENTRICLE_CENTRE = np.array([0.0, -10.0, 15.0], np.float32)
VENTRICLE_SIGMA = np.array([22.0, 35.0, 18.0], np.float32)


SKULL_MM = 10.0  # the mass effect fades to nothing over this depth below the brain's edge


def _mass_effect(p: np.ndarray, lesion: L.Lesion, damping: np.ndarray | None = None
                 ) -> np.ndarray:
    """Radial push away from the tumour; ``damping`` (N,) in [0, 1] scales it per point."""
    d = p - lesion.centre[:, None]
    r = np.sqrt((d * d).sum(0))
    radius = lesion.inner_radius
    reach = radius + MASS_EFFECT_REACH_MM
    a = lesion.push * radius
    t = np.clip((reach - r) / (reach - radius), 0, 1)
    disp = np.where(r < radius, a * r / radius, a * t * t)
    if damping is not None:
        disp = disp * damping
    return p - d * (disp / np.maximum(r, 1e-6))


def to_template(patient: Patient, p: np.ndarray, with_lesions: bool, origin: np.ndarray,
                damping: np.ndarray | None = None):
    """Output mm points (3, N) -> template voxel coordinates (3, N); ``damping`` scales the
    mass effect per point (``_mass_effect``)."""
    q = p
    if with_lesions:
        for lesion in patient.lesions:
            q = _mass_effect(q, lesion, damping)
    # Written out per element (not a matmul) so that a point maps to the same bits whether it
    # is computed alone or in a batch: the healthy and lesioned volumes must agree exactly.
    c = q - patient.shift[:, None]
    rt = patient.rotation
    m = np.stack([(rt[0, i] * c[0] + rt[1, i] * c[1] + rt[2, i] * c[2]) / patient.scale[i]
                  for i in range(3)])
    m = m + _eval_field(patient.elastic, q, 10.0)
    dv = m - VENTRICLE_CENTRE[:, None]
    w = np.exp(-((dv / VENTRICLE_SIGMA[:, None]) ** 2).sum(0))
    m = m - (1 - 1 / patient.ventricle_scale) * w * dv
    return (m + origin[:, None]).astype(np.float32)


def _sample(tpl: Template, coords: np.ndarray) -> dict[str, np.ndarray]:
    linear, labels = _stacked_maps(id(tpl), tpl)
    gm, wm, brain, depth = _grid_sample(linear, coords)
    anatomy, structures = _grid_sample(labels, coords, nearest=True)
    return {"gm": gm, "wm": wm, "brain": brain > 0.5, "depth": depth,
            "anatomy": anatomy.astype(np.uint8), "structures": structures.astype(np.uint8)}


_STACKED: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _stacked_maps(key: int, tpl: Template) -> tuple[np.ndarray, np.ndarray]:
    """The template's maps stacked for ``_grid_sample``: made once per template, then reused."""
    if key not in _STACKED:
        _STACKED[key] = (np.stack([tpl.gm, tpl.wm, tpl.brain, tpl.depth]).astype(np.float32),
                         np.stack([tpl.anatomy, S.template_structures()]).astype(np.float32))
    return _STACKED[key]


def _tissue_from_maps(maps: dict[str, np.ndarray], noise: np.ndarray, patient: Patient
                      ) -> np.ndarray:
    """Tissue ids: argmax of the noisy log-probabilities of white, grey matter and CSF."""
    gm, wm = maps["gm"], maps["wm"]
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    eps = 1e-3
    logits = np.stack([np.log(wm + eps), np.log(gm + eps), np.log(csf + eps) + patient.atrophy])
    logits += patient.boundary_noise * noise
    tissue = np.array([T.WM, T.GM, T.CSF], np.uint8)[logits.argmax(0)]
    cerebrum = (maps["anatomy"] == 1) | (maps["anatomy"] == 2)
    tissue[(tissue == T.GM) & cerebrum & (maps["depth"] > DEEP_GM_DEPTH_MM)] = T.DEEP_GM
    tissue[(maps["anatomy"] == 5) | (maps["anatomy"] == 6)] = T.VENTRICLE
    tissue[~maps["brain"]] = T.BACKGROUND
    return tissue


def _tissue_noise(rng: np.random.Generator, box_shape: tuple[int, ...]) -> np.ndarray:
    """(3, N) smooth unit-variance fields on the box: one per tissue log-probability."""
    coarse = tuple(math.ceil(n / TISSUE_NOISE_MM) + 1 for n in box_shape)
    f = torch.from_numpy(rng.standard_normal((1, 3, *coarse)).astype(np.float32))
    f = torch.nn.functional.interpolate(f, size=box_shape, mode="trilinear",
                                        align_corners=True)[0].reshape(3, -1)
    return (f / f.std(dim=1, keepdim=True).clamp_min(1e-6)).numpy()


def _place_lesions(rng, patient, p, maps) -> None:
    """Draw 0-2 tumours: centres in the cerebrum (90%) or cerebellum, not in a ventricle."""
    count = rng.choice(3, p=LESION_COUNT_P)
    anatomy = maps["anatomy"]
    for _ in range(count):
        radius = float(rng.uniform(*L.RADIUS_MM))
        labels = (1, 2) if rng.random() < 0.9 else (3, 4)
        zone = np.flatnonzero(np.isin(anatomy, labels) & (maps["depth"] > 2.0))
        if zone.size == 0:
            continue
        for _attempt in range(20):
            centre = p[:, rng.choice(zone)]
            if all(np.linalg.norm(centre - other.centre) > radius + 10
                   for other in patient.lesions):
                patient.lesions.append(L.sample_lesion(rng, centre, radius))
                break


def render_patient(seed_seq: np.random.SeedSequence, tpl: Template, structures: bool = True
                   ) -> dict:
    """Draw and render one patient. Returns RAS+ arrays on ``GRID_SHAPE`` and a summary.

    ``structures`` False draws no normal tissue that enhances (an ablation; the random draws of
    everything else stay the same).
    ``image`` and ``healthy`` are int16, ``seg`` uint8 BraTS labels, ``anatomy`` uint8 0..6,
    ``tissue`` uint8 tissue ids (``tissue.py``) of the lesioned patient.
    """
    rng = np.random.default_rng(seed_seq)
    patient = sample_patient(rng)
    box_shape = tuple(s.stop - s.start for s in BOX)
    idx = np.indices(box_shape, dtype=np.float32).reshape(3, -1)
    p = idx + (np.array([s.start for s in BOX], np.float32) + GRID_TO_MNI)[:, None]
    noise = _tissue_noise(rng, box_shape)
    coverage = _tissue_noise(rng, box_shape)[0]  # a smooth field, where structures show

    maps_h = _sample(tpl, to_template(patient, p, False, tpl.origin))
    tissue_h = _tissue_from_maps(maps_h, noise, patient)
    drawn = S.overlay(tissue_h, maps_h["structures"], np.tanh(coverage), rng)
    vol = drawn.reshape(box_shape)
    vessels = S.vessels(vol, maps_h["depth"].reshape(box_shape), rng).ravel()
    dura = S.dura(vol > 0, np.tanh(coverage).reshape(box_shape), rng).ravel()
    if structures:
        tissue_h = drawn
        tissue_h[vessels] = T.VESSEL
        tissue_h[dura] = T.DURA
    _place_lesions(rng, patient, p, maps_h)

    tissue_l = tissue_h.copy()
    anatomy_l = maps_h["anatomy"].copy()
    if patient.lesions:
        near = np.zeros(p.shape[1], bool)
        pushed = np.zeros(p.shape[1], bool)
        for lesion in patient.lesions:
            dist2 = ((p - lesion.centre[:, None]) ** 2).sum(0)
            near |= dist2 < lesion.extent**2
            pushed |= dist2 < (lesion.inner_radius + MASS_EFFECT_REACH_MM) ** 2
        sub = np.flatnonzero(near)
        moved = tissue_h[sub].copy()
        wm = maps_h["wm"][sub].copy()
        anatomy_sub = maps_h["anatomy"][sub].copy()
        # Only where the mass effect reaches is the template read again: elsewhere the healthy
        # tissue stands, bit for bit.
        inner = pushed[sub]
        m = sub[inner]
        # The skull does not move: the push fades out towards the brain's edge.
        damping = np.clip(maps_h["depth"][m] / SKULL_MM, 0.0, 1.0)
        maps_l = _sample(tpl, to_template(patient, p[:, m], True, tpl.origin, damping))
        redrawn = _tissue_from_maps(maps_l, noise[:, m], patient)
        # The normal enhancing structures stay where they are drawn on the output grid.
        kept = np.isin(tissue_h[m], T.NORMAL_ENHANCING)
        moved[inner] = np.where(kept & (redrawn > 0), tissue_h[m], redrawn)
        wm[inner] = maps_l["wm"]
        anatomy_sub[inner] = maps_l["anatomy"]
        for lesion in patient.lesions:
            moved = L.draw(lesion, p[:, sub] - lesion.centre[:, None], moved, wm)
        tissue_l[sub] = moved
        anatomy_l[sub] = anatomy_sub

    look = A.sample_appearance(rng, 3, thick_axis=2)
    seed = int(rng.integers(2**62))
    raw = {}
    for name, tis in (("image", tissue_l), ("healthy", tissue_h)):
        gen = torch.Generator().manual_seed(seed)  # the same draws for both
        raw[name] = A.render_raw(torch.from_numpy(tis.reshape(box_shape).astype(np.int64)),
                                 look, gen)
    brain_l = torch.from_numpy((tissue_l > 0).reshape(box_shape))
    scale = A.brain_scale(raw["image"], brain_l)
    images = {
        "image": A.finish(raw["image"], brain_l, look, scale),
        "healthy": A.finish(raw["healthy"], torch.from_numpy((tissue_h > 0).reshape(box_shape)),
                            look, scale),
    }
    seg = T.seg_of(tissue_l)
    anatomy = np.where(tissue_l > 0, anatomy_l, 0).astype(np.uint8)

    def stored(x: torch.Tensor) -> np.ndarray:
        v = x.numpy().ravel()
        return np.where(v > 0, np.clip(np.rint(v * patient.gain), 1, 32767), 0).astype(np.int16)

    out = {}
    for name, arr, dtype in (
        ("image", stored(images["image"]), np.int16),
        ("healthy", stored(images["healthy"]), np.int16),
        ("seg", seg, np.uint8),
        ("anatomy", anatomy, np.uint8),
        ("tissue", tissue_l, np.uint8),
    ):
        full = np.zeros(GRID_SHAPE, dtype)
        full[BOX] = arr.reshape(box_shape)
        out[name] = full
    out["summary"] = {
        "lesions": len(patient.lesions),
        "kinds": [les.kind for les in patient.lesions],
        "voxels": {int(k): int((out["seg"] == k).sum()) for k in (1, 2, 4)},
    }
    return out
