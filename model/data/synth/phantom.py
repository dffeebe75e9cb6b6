"""One synthetic patient: the template deformed into a new brain, with 0 to 2 glioma-like lesions.

Everything is a backward map from the BraTS-like output grid to the template, sampled once:

    output voxel p  --mass effect-->  q  --affine + elastic-->  m  --ventricle scaling-->  template

The healthy volume is the same map without the mass effect, and the same bias field and noise,
so it equals the lesioned image everywhere outside the lesion's region of influence: the labels
(which include the edema) and the mass effect's reach (at most ``MASS_EFFECT_REACH_MM`` beyond
the nominal tumour radius). ``INFLUENCE_MARGIN_MM`` bounds how far from any labelled voxel the two
volumes can differ.

Lesion model (Gd-enhanced T1 glioma): a tumour of nominal radius r with an irregular outline
(a sum of random plane waves perturbs the radius by up to 30%), a necrotic core (label 1, dark)
inside an enhancing rim (label 4, bright), a mildly hypointense edema halo (label 2) that spreads
further along white matter, and a radial push of the surrounding tissue that fades to zero at
``r + MASS_EFFECT_REACH_MM``. The push is monotone in the radius, so tissue never folds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from model.data.synth.template import Template

GRID_SHAPE = (240, 240, 155)
# BraTS stores voxels in LPS order: x = -i, y = 239 - j, z = k (mm).
BRATS_AFFINE = np.array(
    [[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]
)
# Output RAS voxel (a, b, c) sits at nominal MNI mm (a - 119.5, b - 136.5, c - 70): the grid is
# centred on the brain in x and y and starts just below the cerebellum.
GRID_TO_MNI = np.array([-119.5, -136.5, -70.0], dtype=np.float32)
# Part of the output grid the brain can reach (RAS voxel index ranges, end exclusive).
BOX = (slice(38, 202), slice(20, 218), slice(0, 155))

TUMOUR_RADIUS_MM = (6.0, 20.0)
MASS_EFFECT_REACH_MM = 12.0
OUTLINE_JITTER = 0.3  # the tumour outline is at r / (1 + 0.3 n), n in [-1, 1]
# Labels cover the ball of radius r / (1 + jitter) around a tumour's centre, and the mass effect
# stops at r + reach; voxels further than this from every label are identical in both volumes.
INFLUENCE_MARGIN_MM = (
    MASS_EFFECT_REACH_MM + TUMOUR_RADIUS_MM[1] * OUTLINE_JITTER / (1 + OUTLINE_JITTER) + 2.0
)
LESION_COUNT_P = (0.25, 0.55, 0.20)  # P(0), P(1), P(2) lesions per patient


@dataclass(frozen=True)
class Lesion:
    centre: np.ndarray  # (3,) output mm
    radius: float  # nominal tumour radius (mm)
    core_frac: float  # necrotic core inside rho < core_frac (0: no necrosis)
    edema: float  # edema reaches rho < 1 + edema
    push: float  # mass effect: tissue at the tumour edge came from radius (1 - push) * r
    rim_gain: float  # enhancing rim brightness relative to white matter
    core_level: float  # necrosis brightness relative to white matter
    edema_gain: float  # edema multiplies the tissue intensity by this
    waves: np.ndarray  # (3, W, 4): per field, W plane waves (kx, ky, kz, phase)

    @property
    def reach(self) -> float:
        return self.radius + MASS_EFFECT_REACH_MM

    @property
    def extent(self) -> float:
        """Radius beyond which no label of this lesion can lie."""
        edema_rho = 1 + self.edema + 0.35  # white matter lowers the edema's rho by up to 0.35
        return max(self.reach, self.radius * edema_rho / (1 - 0.25))


@dataclass
class Patient:
    """The sampled parameters of one synthetic patient."""

    rotation: np.ndarray  # (3, 3) template -> patient
    scale: np.ndarray  # (3,)
    shift: np.ndarray  # (3,) mm
    elastic: np.ndarray  # (3, gx, gy, gz) displacement (mm) on a 10 mm grid over BOX
    ventricle_scale: float
    gamma: float
    gain: float
    bias: np.ndarray  # (gx, gy, gz) log bias field on a 30 mm grid over BOX
    noise_sigma: float
    lesions: list[Lesion] = field(default_factory=list)


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


def _eval_field(f: np.ndarray, p: np.ndarray, spacing: float) -> np.ndarray:
    """Trilinear value of a coarse field at output mm points p (3, N)."""
    lo, _ = _box_mm()
    g = (p - lo[:, None]) / spacing
    return np.stack([ndi.map_coordinates(c, g, order=1, mode="nearest") for c in f])


def _rotation(rng: np.random.Generator) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.uniform([-8, -5, -8], [8, 5, 8]))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return (rz @ ry @ rx).astype(np.float32)


def sample_patient(rng: np.random.Generator) -> Patient:
    return Patient(
        rotation=_rotation(rng),
        scale=rng.uniform(0.92, 1.06, 3).astype(np.float32),
        shift=rng.uniform(-4, 4, 3).astype(np.float32),
        elastic=_smooth_field(rng, 10.0, rng.uniform(2.0, 4.0), 3),
        ventricle_scale=float(np.exp(rng.uniform(np.log(0.8), np.log(1.7)))),
        gamma=float(rng.uniform(0.8, 1.25)),
        gain=float(rng.uniform(600, 1400)),
        bias=_smooth_field(rng, 30.0, rng.uniform(0.05, 0.2), 1),
        noise_sigma=float(rng.uniform(0.01, 0.03)),
    )


# Ventricle scaling acts in template space, weighted by a Gaussian around the ventricles.
VENTRICLE_CENTRE = np.array([0.0, -10.0, 15.0], np.float32)
VENTRICLE_SIGMA = np.array([22.0, 35.0, 18.0], np.float32)


def _mass_effect(p: np.ndarray, lesion: Lesion) -> np.ndarray:
    d = p - lesion.centre[:, None]
    r = np.sqrt((d * d).sum(0))
    a = lesion.push * lesion.radius
    t = np.clip((lesion.reach - r) / (lesion.reach - lesion.radius), 0, 1)
    disp = np.where(r < lesion.radius, a * r / lesion.radius, a * t * t)
    return p - d * (disp / np.maximum(r, 1e-6))


def to_template(patient: Patient, p: np.ndarray, with_lesions: bool, origin: np.ndarray):
    """Output mm points (3, N) -> template voxel coordinates (3, N)."""
    q = p
    if with_lesions:
        for lesion in patient.lesions:
            q = _mass_effect(q, lesion)
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
    return {
        "t1": ndi.map_coordinates(tpl.t1, coords, order=1, mode="constant", cval=0.0),
        "brain": ndi.map_coordinates(tpl.brain, coords, order=1, mode="constant") > 0.5,
        "anatomy": ndi.map_coordinates(tpl.anatomy, coords, order=0, mode="constant"),
    }


def _waves(rng: np.random.Generator, radius: float, n: int = 6) -> np.ndarray:
    k = rng.standard_normal((3, n, 3))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    k *= (2 * np.pi / (radius * rng.uniform(0.8, 2.0, (3, n, 1))))
    phase = rng.uniform(0, 2 * np.pi, (3, n, 1))
    return np.concatenate([k, phase], axis=-1).astype(np.float32)


def _wave_field(waves: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Smooth noise in [-1, 1] at offsets d (3, N) from a sum of plane waves (W, 4)."""
    arg = waves[:, :3] @ d + waves[:, 3:4]
    return np.cos(arg).sum(0) / len(waves)


def _place_lesions(rng, patient, tpl, p, coords_h, anat_h) -> None:
    """Draw 0-2 lesions with centres deep inside the cerebrum, not in a ventricle."""
    count = rng.choice(3, p=LESION_COUNT_P)
    cerebrum = np.flatnonzero((anat_h == 1) | (anat_h == 2))
    for _ in range(count):
        radius = float(rng.uniform(*TUMOUR_RADIUS_MM))
        for _attempt in range(3):
            cand = rng.choice(cerebrum, size=min(400, cerebrum.size), replace=False)
            depth = ndi.map_coordinates(tpl.depth, coords_h[:, cand], order=0)
            ok = depth >= radius / (1 - OUTLINE_JITTER) + 3
            for lesion in patient.lesions:  # keep tumours apart
                gap = np.linalg.norm(p[:, cand] - lesion.centre[:, None], axis=0)
                ok &= gap > lesion.radius + radius + 10
            if ok.any():
                centre = p[:, cand[np.flatnonzero(ok)[0]]]
                break
            radius *= 0.75
        else:
            continue
        patient.lesions.append(Lesion(
            centre=centre.astype(np.float32),
            radius=radius,
            core_frac=float(rng.uniform(0.35, 0.75) if radius > 9 else rng.uniform(0, 0.3)),
            edema=float(rng.uniform(0.15, 0.8)),
            push=float(rng.uniform(0.25, 0.6)),
            rim_gain=float(rng.uniform(1.1, 1.4)),
            core_level=float(rng.uniform(0.2, 0.45)),
            edema_gain=float(rng.uniform(0.65, 0.85)),
            waves=_waves(rng, radius),
        ))


def render_patient(seed_seq: np.random.SeedSequence, tpl: Template) -> dict:
    """Draw and render one patient. Returns RAS+ arrays on ``GRID_SHAPE`` and a summary.

    ``image`` and ``healthy`` are int16, ``seg`` uint8 BraTS labels, ``anatomy`` uint8 0..6.
    """
    rng = np.random.default_rng(seed_seq)
    patient = sample_patient(rng)
    box_shape = tuple(s.stop - s.start for s in BOX)
    idx = np.indices(box_shape, dtype=np.float32).reshape(3, -1)
    p = idx + (np.array([s.start for s in BOX], np.float32) + GRID_TO_MNI)[:, None]

    coords_h = to_template(patient, p, False, tpl.origin)
    healthy = _sample(tpl, coords_h)
    _place_lesions(rng, patient, tpl, p, coords_h, healthy["anatomy"])

    lesioned = {k: v.copy() for k, v in healthy.items()}
    seg = np.zeros(p.shape[1], np.uint8)
    if patient.lesions:
        near = np.zeros(p.shape[1], bool)
        for lesion in patient.lesions:
            near |= ((p - lesion.centre[:, None]) ** 2).sum(0) < lesion.extent**2
        sub = np.flatnonzero(near)
        coords_l = to_template(patient, p[:, sub], True, tpl.origin)
        for k, v in _sample(tpl, coords_l).items():
            lesioned[k][sub] = v
        wm = ndi.map_coordinates(tpl.wm, coords_l, order=1, mode="constant")
        edema_gain = np.ones(sub.size, np.float32)
        tumour_level = np.zeros(sub.size, np.float32)
        for lesion in patient.lesions:
            d = p[:, sub] - lesion.centre[:, None]
            r = np.sqrt((d * d).sum(0))
            rho = r / lesion.radius * (1 + OUTLINE_JITTER * _wave_field(lesion.waves[0], d))
            rho_e = (r / lesion.radius * (1 + 0.25 * _wave_field(lesion.waves[1], d))
                     - 0.35 * wm)
            tex = _wave_field(lesion.waves[2], d * 3)
            s = seg[sub]
            tumour = rho < 1
            core = tumour & (rho < lesion.core_frac)
            rim = tumour & ~core
            ventricle = (lesioned["anatomy"][sub] == 5) | (lesioned["anatomy"][sub] == 6)
            edema = ~tumour & (rho_e < 1 + lesion.edema) & lesioned["brain"][sub] & ~ventricle
            edema &= (s == 0)
            s = np.where(core, 1, np.where(rim, 4, np.where(edema, 2, s)))
            seg[sub] = s
            tumour_level = np.where(core, lesion.core_level * (1 + 0.1 * tex), tumour_level)
            tumour_level = np.where(rim, lesion.rim_gain * (1 + 0.12 * tex), tumour_level)
            edema_gain = np.where(edema, lesion.edema_gain * (1 + 0.04 * tex), edema_gain)

    wm_level = 0.87**patient.gamma
    bias = np.exp(_eval_field(patient.bias, p, 30.0)[0])
    noise = rng.standard_normal(p.shape[1]).astype(np.float32) * patient.noise_sigma

    def intensity(t1: np.ndarray, brain: np.ndarray) -> np.ndarray:
        return np.where(brain, t1**patient.gamma, 0.0).astype(np.float32)

    base_h = intensity(healthy["t1"], healthy["brain"])
    base_l = intensity(lesioned["t1"], lesioned["brain"])
    if patient.lesions:
        tumour = (seg[sub] == 1) | (seg[sub] == 4)
        vals = base_l[sub] * edema_gain
        vals = np.where(tumour, tumour_level * wm_level, vals)
        base_l[sub] = vals
    brain_l = lesioned["brain"] | (seg > 0)

    def finish(base: np.ndarray, brain: np.ndarray) -> np.ndarray:
        v = np.rint((base * bias + noise) * patient.gain)
        return np.where(brain, np.clip(v, 1, 32767), 0).astype(np.int16)

    out = {}
    for name, arr, dtype in (
        ("image", finish(base_l, brain_l), np.int16),
        ("healthy", finish(base_h, healthy["brain"]), np.int16),
        ("seg", seg, np.uint8),
        ("anatomy", np.where(brain_l, lesioned["anatomy"], 0).astype(np.uint8), np.uint8),
    ):
        full = np.zeros(GRID_SHAPE, dtype)
        full[BOX] = arr.reshape(box_shape)
        out[name] = full
    out["summary"] = {
        "lesions": len(patient.lesions),
        "radii_mm": [round(les.radius, 1) for les in patient.lesions],
        "voxels": {int(k): int((out["seg"] == k).sum()) for k in (1, 2, 4)},
    }
    return out
