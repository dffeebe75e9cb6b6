"""The real anatomy the synthetic cohort is built on: the MNI152 ICBM 2009a symmetric template.

The 1 mm T1 template (197 x 233 x 189, skull-stripped, RAS+) and its grey- and white-matter
probability maps ship inside the ``nilearn`` wheel; they are read from the installed package,
never downloaded. CSF is what the brain holds beyond both: ``clip(1 - gm - wm, 0, 1)``. The
synthesis draws each patient's tissue labels from these three maps (``model/data/synth/tissue.py``),
not from the template's T1 intensities.

The six normal labels are derived from the template once, by rules a reader can check:

- hemisphere: the sign of MNI x (the template is symmetric about x = 0);
- cerebellum: brighter tissue (T1 > 140 of 255), eroded once and cut from a midline brainstem
  box, falls into two large connected components: cerebrum and cerebellum, split at the dark
  tentorial CSF. Every brain voxel takes the component of its nearest tissue voxel.
- lateral ventricles: dark CSF (T1 < 110) in a box around the ventricles, the connected
  components reached from seeds in each ventricle body, minus a 3 mm midline band (septum,
  third ventricle) and anything below MNI z = -8 (cisterns).
- the brainstem box (|x| < 16, -48 < y < -5, z < -5 mm, outside the cerebellum) is left 0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
CEREBELLUM_TISSUE_T1 = 140
VENTRICLE_CSF_T1 = 110


@dataclass(frozen=True)
class Template:
    """Template arrays on the template's own 1 mm RAS+ grid; ``origin`` is the voxel of MNI 0."""

    t1: np.ndarray  # (197, 233, 189) float32, 0..1
    brain: np.ndarray  # float32 0/1: T1 > 0
    gm: np.ndarray  # float32 grey-matter probability 0..1
    wm: np.ndarray  # float32 white-matter probability 0..1
    csf: np.ndarray  # float32 CSF probability inside the brain: clip(1 - gm - wm, 0, 1)
    anatomy: np.ndarray  # uint8 labels 0..6 (see model.data.brats.ANATOMY_LABELS)
    depth: np.ndarray  # float32 distance (mm) from each brain voxel to the brain's edge
    origin: np.ndarray  # (3,) voxel index of MNI (0, 0, 0)


def template_dir() -> Path:
    import nilearn

    folder = Path(nilearn.__file__).parent / "datasets" / "data"
    missing = [name for name in TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the installed nilearn ({folder}) lacks {missing}; install nilearn >= 0.10.3"
        )
    return folder


def _mni_coords(shape: tuple[int, ...], origin: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(
        (np.arange(n, dtype=np.float32) - o).reshape([-1 if a == i else 1 for a in range(3)])
        for i, (n, o) in enumerate(zip(shape, origin, strict=True))
    )


def derive_anatomy(t1: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """The six normal labels from the 0..255 template T1 (rules in the module docstring)."""
    x, y, z = _mni_coords(t1.shape, origin)
    brain = t1 > 0
    stem = (np.abs(x) < 16) & (y > -48) & (y < -5) & (z < -5)

    tissue = ndi.binary_erosion(brain & (t1 > CEREBELLUM_TISSUE_T1) & ~stem)
    comp, _ = ndi.label(tissue)
    o = origin.astype(int)
    cerebellum_id = comp[o[0] + 25, o[1] - 65, o[2] - 35]  # MNI (25, -65, -35)
    cerebrum_id = comp[o[0] + 40, o[1], o[2] + 20]  # MNI (40, 0, 20)
    if cerebellum_id == 0 or cerebrum_id == 0 or cerebellum_id == cerebrum_id:
        raise RuntimeError("template: cerebellum and cerebrum did not separate")
    core = np.where(comp == cerebellum_id, 2, np.where(comp == cerebrum_id, 1, 0)).astype(np.uint8)
    nearest = core[tuple(ndi.distance_transform_edt(core == 0, return_distances=False,
                                                    return_indices=True))]
    cerebellum = brain & (nearest == 2) & ~stem

    box = (np.abs(x) < 35) & (y > -55) & (y < 45) & (z > -8) & (z < 45)
    dark, _ = ndi.label(brain & (t1 < VENTRICLE_CSF_T1) & box)
    seeds = dark[[o[0] - 14, o[0] + 14], o[1] - 12:o[1] + 13, o[2] + 16:o[2] + 21]
    ventricle = np.isin(dark, np.unique(seeds[seeds > 0])) & (np.abs(x) >= 2)

    left = x < 0
    labels = np.zeros(t1.shape, np.uint8)
    labels[brain & left] = 1
    labels[brain & ~left] = 2
    labels[cerebellum & left] = 3
    labels[cerebellum & ~left] = 4
    labels[brain & stem & ~cerebellum] = 0
    labels[ventricle & left] = 5
    labels[ventricle & ~left] = 6
    return labels


@functools.cache
def load_template() -> Template:
    """Load and derive once per process (about 10 s); forked workers inherit it."""
    folder = template_dir()
    t1_img = nib.as_closest_canonical(nib.load(folder / TEMPLATE_FILES["t1"]))
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)

    def probability(kind: str) -> np.ndarray:
        img = nib.as_closest_canonical(nib.load(folder / TEMPLATE_FILES[kind]))
        return np.asarray(img.dataobj, dtype=np.float32) / 255.0

    gm, wm = probability("gm"), probability("wm")
    origin = np.linalg.solve(t1_img.affine, [0, 0, 0, 1])[:3]
    brain = t1 > 0
    return Template(
        t1=t1 / 255.0,
        brain=brain.astype(np.float32),
        gm=gm,
        wm=wm,
        csf=np.where(brain, np.clip(1.0 - gm - wm, 0.0, 1.0), 0.0).astype(np.float32),
        anatomy=derive_anatomy(t1, origin),
        depth=ndi.distance_transform_edt(brain).astype(np.float32),
        origin=origin.astype(np.float32),
    )
