"""Brain tumours as they look on post-contrast T1: shapes, enhancement patterns, edema, sites.

A tumour is a union of one to four distorted ellipsoids (lobes) around a centre, whose outline is
perturbed by a sum of random plane waves (``_wave_field``): irregular and multi-lobed, not a ball.
Its enhancement pattern is one of four kinds:

| kind | share | what it is |
|---|---|---|
| ``ring`` | 0.35 | necrotic core inside an enhancing rim of irregular thickness (glioblastoma) |
| ``patchy`` | 0.30 | non-enhancing tumour with patches of enhancement (grade 2-3 glioma) |
| ``solid`` | 0.15 | mostly enhancing, little or no necrosis (metastasis, lymphoma) |
| ``non-enhancing`` | 0.20 | no enhancement at all, sometimes a small cyst (low-grade glioma) |

Edema surrounds the tumour and reaches further along white matter (its distance is shortened by
the white-matter probability; the cortex holds it back), with finger-like edges; it is absent or
thin in some tumours and up to about 2.5 cm wide in others. Sites: anywhere in the cerebrum,
cortex included (90%), or the cerebellum (10%); never centred in a ventricle. Mass effect: tissue
around the tumour is pushed outwards (``phantom._mass_effect``).

Labels: necrosis and non-enhancing tumour are BraTS label 1 (TC), edema 2 (ED), enhancement 4
(ET) (``tissue.TISSUE_TO_SEG``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.data.synth import tissue as T

KINDS = ("ring", "patchy", "solid", "non-enhancing")
KIND_P = (0.35, 0.30, 0.15, 0.20)
RADIUS_MM = (5.0, 24.0)  # nominal radius of the largest lobe
OUTLINE_JITTER = 0.3  # the outline is at rho = 1 / (1 + 0.3 n), n in [-1, 1]
EDEMA_MAX_MM = 15.0  # edema reaches this far beyond the tumour at most (before white matter)
WM_FOLLOW_MAX_MM = 10.0  # and this much further where white matter is certain


@dataclass(frozen=True)
class Lesion:
    centre: np.ndarray  # (3,) output mm
    radius: float  # nominal radius of the main lobe (mm)
    kind: str  # one of KINDS
    offsets: np.ndarray  # (L, 3) lobe centres relative to ``centre``, mm (lobe 0 at 0)
    axes: np.ndarray  # (L, 3, 3) per lobe: maps an offset (mm) to ellipsoid units
    core_frac: float  # necrosis inside rho < core_frac (0: none)
    enhancing: float  # patchy: share of the tumour that enhances
    edema: float  # edema reaches about this far (mm) beyond the tumour's outline
    wm_follow: float  # and this much further (mm) times the white-matter probability
    push: float  # mass effect: tissue at the inner radius came from (1 - push) * it
    waves: np.ndarray  # (3, W, 4) plane waves: outline, edema, rim
    patches: np.ndarray  # (1, 12, 4) finer plane waves: where a patchy tumour enhances

    @property
    def inner_radius(self) -> float:
        """Radius of a ball around ``centre`` the tumour label always covers (mm)."""
        return float(1.0 / np.linalg.norm(self.axes[0], 2) / (1 + OUTLINE_JITTER))

    @property
    def extent(self) -> float:
        """Radius beyond which no label of this lesion can lie (mm)."""
        lobes = [np.linalg.norm(o) + 1.0 / np.linalg.svd(a, compute_uv=False).min()
                 for o, a in zip(self.offsets, self.axes, strict=True)]
        reach = (1 + (self.edema + self.wm_follow) / self.radius) / 0.75
        return float(max(lobes) * reach / (1 - OUTLINE_JITTER))


def _waves(rng: np.random.Generator, scale: float, fields: int, n: int = 6,
           spread: tuple[float, float] = (0.5, 2.0)) -> np.ndarray:
    k = rng.standard_normal((fields, n, 3))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    k *= 2 * np.pi / (scale * rng.uniform(*spread, (fields, n, 1)))
    phase = rng.uniform(0, 2 * np.pi, (fields, n, 1))
    return np.concatenate([k, phase], axis=-1).astype(np.float32)


def _wave_field(waves: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Smooth noise in [-1, 1] at offsets d (3, N) from a sum of plane waves (W, 4)."""
    return np.cos(waves[:, :3] @ d + waves[:, 3:4]).sum(0) / len(waves)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def sample_lesion(rng: np.random.Generator, centre: np.ndarray, radius: float) -> Lesion:
    kind = str(rng.choice(KINDS, p=KIND_P))
    lobes = int(rng.integers(1, 5))
    offsets = np.zeros((lobes, 3))
    axes = np.zeros((lobes, 3, 3))
    for i in range(lobes):
        r = radius if i == 0 else radius * rng.uniform(0.4, 0.85)
        if i:
            v = rng.standard_normal(3)
            offsets[i] = v / np.linalg.norm(v) * radius * rng.uniform(0.3, 0.8)
        stretch = rng.uniform(0.65, 1.35, 3)
        rot = _rotation(rng)
        axes[i] = np.diag(1.0 / (r * stretch)) @ rot.T
    large = radius > 12
    core = {"ring": rng.uniform(0.35, 0.8),
            "patchy": rng.uniform(0.0, 0.4) if rng.random() < 0.4 else 0.0,
            "solid": rng.uniform(0.0, 0.35) if rng.random() < 0.5 else 0.0,
            "non-enhancing": rng.uniform(0.2, 0.6) if rng.random() < 0.3 else 0.0}[kind]
    edema_hi = EDEMA_MAX_MM if kind in ("ring", "solid") else EDEMA_MAX_MM / 2
    return Lesion(
        centre=centre.astype(np.float32),
        radius=float(radius),
        kind=kind,
        offsets=offsets.astype(np.float32),
        axes=axes.astype(np.float32),
        core_frac=float(core if large or kind != "ring" else core * 0.6),
        enhancing=float(rng.uniform(0.1, 0.5)),
        edema=float(rng.uniform(0.0, edema_hi) if rng.random() < 0.85 else 0.0),
        wm_follow=float(rng.uniform(2.0, WM_FOLLOW_MAX_MM)),
        push=float(rng.uniform(0.05, 0.3) if kind == "non-enhancing"
                   else rng.uniform(0.15, 0.55)),
        waves=_waves(rng, radius, 3),
        patches=_waves(rng, radius, 1, n=12, spread=(0.25, 0.7)),
    )


def lesion_rho(lesion: Lesion, d: np.ndarray) -> np.ndarray:
    """Normalised distance (< 1 inside the tumour) at offsets d (3, N) mm from the centre."""
    rho = np.full(d.shape[1], np.inf, np.float32)
    for off, ax in zip(lesion.offsets, lesion.axes, strict=True):
        u = ax @ (d - off[:, None])
        rho = np.minimum(rho, np.sqrt((u * u).sum(0)))
    return rho * (1 + OUTLINE_JITTER * _wave_field(lesion.waves[0], d))


def draw(lesion: Lesion, d: np.ndarray, tissue: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Tissue ids at offsets d (3, N) from the centre with this lesion drawn over ``tissue``.

    The tumour and its edema replace brain tissue only (not background, ventricles or
    CSF-filled sulci for the edema); an earlier lesion's labels are kept.
    """
    rho = lesion_rho(lesion, d)
    brain = (tissue > 0) & (tissue != T.VENTRICLE)
    free = brain & ~np.isin(tissue, T.LESION_TISSUES)
    tumour = free & (rho < 1)
    out = tissue.copy()
    if lesion.kind == "patchy":
        patches = _wave_field(lesion.patches[0], d)
        cut = np.quantile(patches[tumour], 1 - lesion.enhancing) if tumour.any() else 1.0
        out[tumour] = np.where(patches[tumour] > cut, T.ENHANCING, T.NON_ENHANCING)
    elif lesion.kind == "non-enhancing":
        out[tumour] = T.NON_ENHANCING
    else:
        out[tumour] = T.ENHANCING
    if lesion.core_frac > 0:
        core_edge = lesion.core_frac * (1 + 0.3 * _wave_field(lesion.waves[2], d))
        out[tumour & (rho < core_edge)] = T.NECROSIS
    rho_e = (rho * (1 + 0.25 * _wave_field(lesion.waves[1], d * 1.5))
             - lesion.wm_follow / lesion.radius * wm)
    # Edema spreads through white matter; the cortex holds it back (a third of the reach).
    reach = np.where(tissue == T.GM, lesion.edema / 3, lesion.edema) / lesion.radius
    edema = free & ~tumour & (rho_e < 1 + reach)
    edema &= np.isin(tissue, (T.WM, T.GM, T.DEEP_GM))
    out[edema] = T.EDEMA
    return out
