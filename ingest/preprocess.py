"""A clinical volume -> the model's space: one path for `cbir preprocess`, indexing, uploads.

Steps, in order (``to_model_space``):

1. Reorient to RAS+ (``model.data.nifti``; a permutation and flip, no interpolation).
2. Resample to 1 mm isotropic voxels (linear), keeping the scan's own axes.
3. Brain extraction with deepBET (Fisch et al., 2024; MIT; its two TorchScript models ship
   inside the ``deepbet`` wheel, so nothing is fetched): the largest connected component of
   the brain, voids filled.
4. Registration of the extracted brain to the SRI24 atlas on the BraTS grid
   (``ingest.registration``): rigid by default, as the BraTS protocol does it (the BrainLesion
   preprocessing that made BraTS-space volumes registers to SRI24 rigidly: a brain keeps its
   size and shape), then affine only with ``affine=True``. Measured on the real case
   (``bench/preprocess_real.py``, for measuring only): brain-mask Dice 0.955 rigid, 0.943 with
   the affine stage, which scales the brain toward the atlas's size. No deformable stage: it
   cannot do better than rigid against a rigid reference, and it would bend the lesion.
5. The original scan (not the 1 mm copy: one interpolation only) is resampled onto the
   240 x 240 x 155 grid through that transform (linear); the brain mask (linear, > 0.5) sets
   everything outside the brain to exactly 0, as BraTS volumes have it.
6. Intensity normalisation as for every indexed volume (``model.data.preprocess`` rule 2).

Other modalities of the same study (T1, T2, FLAIR) are registered rigidly to the T1-Gd in
their shared scanner frame, starting from identity, then carried to the grid through the
T1-Gd's transform and masked with the T1-Gd's brain mask.

**The rule for a volume already in the model's space** (``in_model_space``), left untouched:
read in RAS+ order, its grid is 240 x 240 x 155 voxels of 1 mm (to 1e-3 mm) with axes along
the world axes (no rotation or shear), and at least half of its voxels are exactly 0 (the
background of a skull-stripped BraTS volume; a head with skull fills most of any grid with
non-zero noise). The origin is not checked: BraTS releases, the SRI24 files and our synthetic
cohorts each write a different one for the same grid.

**What is brought there** (``needs_preprocessing``), by indexing and uploads alike: a volume
outside the model's space that can hold a head, at least ``MIN_EXTENT_MM`` (100 mm) along each
axis. A smaller one (a slab, a crop, a test's 48 mm miniature) cannot be registered to a whole
brain and is used as it is, as before this package existed; ``cbir preprocess`` refuses it.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from ingest import registration as R
from ingest.labels import to_internal
from ingest.layouts import Case
from ingest.volumes import CaseVolumes, load_case
from model.data import preprocess
from model.data.nifti import VolumeError, read_nifti
from model.data.synth.phantom import BRATS_AFFINE, GRID_SHAPE

log = logging.getLogger(__name__)

# The rule's tolerances (module docstring).
SPACING_ATOL_MM = 1e-3
MIN_BACKGROUND_FRACTION = 0.5
# A volume that covers less than this along any axis cannot hold a head to register.
MIN_EXTENT_MM = 100.0
BRAIN_THRESHOLD = 0.5  # deepBET's own default on its brain probability
# Step 5's resampling of the images (the mask stays linear, the labels nearest neighbour).
INTERPOLATIONS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline,
                  "lanczos": sitk.sitkLanczosWindowedSinc}


@dataclass
class ModelSpaceVolume:
    """A study on the BraTS grid, RAS+ voxel order, affine ``registration.GRID_AFFINE``."""

    image: np.ndarray  # (240, 240, 155) float32 in [0, 1], rule 2; 0 outside the brain
    brain: np.ndarray  # (240, 240, 155) bool
    scale: float  # rule 2's scale, in the input's units
    others: dict[str, np.ndarray] = field(default_factory=dict)  # co-registered modalities
    labels: np.ndarray | None = None  # uint8 label map carried along (nearest neighbour)
    transform: sitk.Transform | None = None  # grid -> native T1-Gd points; None: untouched
    seconds: float = 0.0

    @property
    def affine(self) -> np.ndarray:
        return R.GRID_AFFINE


def on_grid(shape: tuple[int, ...], affine: np.ndarray) -> bool:
    """The rule's grid part, from a header alone (any voxel order): 240 x 240 x 155 voxels of
    1 mm along the world axes."""
    axes = np.abs(np.asarray(affine)[:3, :3])
    world = axes.argmax(axis=0)  # the world axis each voxel axis runs along
    if len(shape) != 3 or sorted(world) != [0, 1, 2]:
        return False
    if not np.allclose(axes, np.eye(3)[world].T, atol=SPACING_ATOL_MM):
        return False
    return tuple(shape[list(world).index(w)] for w in range(3)) == GRID_SHAPE


def holds_a_head(shape: tuple[int, ...], affine: np.ndarray) -> bool:
    """At least ``MIN_EXTENT_MM`` along each axis: enough field of view to register a brain."""
    return bool(np.min(_extent(shape, affine)) >= MIN_EXTENT_MM)


def _extent(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    return np.array(shape[:3]) * np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def needs_preprocessing(array: np.ndarray, affine: np.ndarray) -> bool:
    """The module docstring's "what is brought there"."""
    return holds_a_head(np.shape(array), affine) and not in_model_space(array, affine)


def in_model_space(array: np.ndarray, affine: np.ndarray) -> bool:
    """The documented rule (module docstring)."""
    if not on_grid(np.shape(array), affine):
        return False
    return float((np.asarray(array) == 0).mean()) >= MIN_BACKGROUND_FRACTION


@functools.cache
def _extractor():
    from deepbet.bet import BrainExtraction  # imports torch: only when a volume needs it

    return BrainExtraction(no_gpu=True)


def extract_brain(array: np.ndarray) -> np.ndarray:
    """deepBET's brain mask (bool) of a RAS+-ordered head volume of about 1 mm voxels."""
    bet = _extractor()
    prob = bet.run_model(np.ascontiguousarray(array, dtype=np.float32))
    return bet.postprocess(prob > BRAIN_THRESHOLD).astype(bool)


def _native(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    arr = np.nan_to_num(np.asarray(array, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return R.to_sitk(arr, affine)


def to_model_space(array: np.ndarray, affine: np.ndarray,
                   others: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                   labels: np.ndarray | None = None, affine_stage: bool = False,
                   interpolation: str = "linear") -> ModelSpaceVolume:
    """A T1-Gd volume (RAS+ array and affine, as ``read_nifti`` gives) -> the model's space.

    ``others``: more modalities of the study, name -> (array, affine); ``labels``: a label map
    on the T1-Gd's grid, carried along by nearest neighbour; ``affine_stage`` adds the affine
    stage after the rigid one; ``interpolation`` names how step 5 resamples the images (a key
    of ``INTERPOLATIONS``; linear by default, ``bench.preprocess_real --interpolations``
    compares the others). A volume
    that meets the rule of ``in_model_space`` comes back as it is, only normalised (rule 2).
    Raises ``ValueError`` naming what is wrong.
    """
    started = time.perf_counter()
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}: use one of "
                         f"{', '.join(INTERPOLATIONS)}")
    interpolator = INTERPOLATIONS[interpolation]
    if in_model_space(array, affine):
        scale = preprocess.intensity_scale(array)
        return ModelSpaceVolume(
            image=preprocess.normalize_intensity(array, scale), brain=np.asarray(array) > 0,
            scale=scale,
            others={k: preprocess.normalize_intensity(a) for k, (a, _) in (others or {}).items()},
            labels=labels, seconds=time.perf_counter() - started)
    extent = _extent(array.shape, affine)
    if extent.min() < MIN_EXTENT_MM:
        raise ValueError(f"the volume covers {' x '.join(f'{e:.0f}' for e in extent)} mm, less "
                         f"than the {MIN_EXTENT_MM:.0f} mm a head needs along each axis: it "
                         f"cannot be registered to the model's grid")
    native = _native(array, affine)
    iso = R.resample_isotropic(native)  # step 2
    iso_array, iso_affine = R.from_sitk(iso)
    brain = extract_brain(iso_array)  # step 3
    if not brain.any():
        raise ValueError("brain extraction found no brain in the volume")
    mask_img = R.to_sitk(brain.astype(np.float32), iso_affine)
    stripped = R.to_sitk(np.where(brain, iso_array, 0).astype(np.float32), iso_affine)
    grid = load_grid()
    transform = R.register(grid, stripped, affine=affine_stage)  # step 4
    on_grid = R.from_sitk(R.resample(native, grid, transform, interpolator))[0]  # step 5
    mask = R.from_sitk(R.resample(mask_img, grid, transform))[0] > 0.5
    image, scale = _finish(on_grid, mask)
    out = ModelSpaceVolume(image=image, brain=mask, scale=scale, transform=transform)
    for name, (arr, aff) in (others or {}).items():
        moving = _native(arr, aff)
        rigid = R.register(native, moving, affine=False, initial=sitk.Euler3DTransform())
        warped = R.resample(moving, grid, R.chain(transform, rigid), interpolator)
        out.others[name] = _finish(R.from_sitk(warped)[0], mask)[0]
    if labels is not None:
        lab = R.to_sitk(np.asarray(labels, dtype=np.uint8), affine)
        out.labels = R.from_sitk(R.resample(lab, grid, transform, sitk.sitkNearestNeighbor))[0]
    out.seconds = time.perf_counter() - started
    log.info("preprocessed a %s volume to the model's space in %.1f s", array.shape, out.seconds)
    return out


def _finish(on_grid: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float]:
    """Step 5's masking and step 6's normalisation: (image, its scale)."""
    brain = np.where(mask, np.maximum(on_grid, 0), 0).astype(np.float32)
    if not (brain > 0).any():
        raise ValueError("no brain voxel > 0 left after registration")
    scale = preprocess.intensity_scale(brain)
    return preprocess.normalize_intensity(brain, scale), scale


def load_case_in_model_space(case: Case) -> CaseVolumes:
    """``ingest.volumes.load_case`` for indexing (image and labels), with a T1-Gd that needs it
    (``needs_preprocessing``) brought to the model's space first, its label map carried along.

    Raises ``VolumeError`` for an unreadable file, ``ValueError`` when preprocessing fails.
    """
    try:
        header = nib.load(case.t1ce)
    except Exception:  # nibabel raises many types; load_case names the file and the problem
        return load_case(case, with_healthy=False, with_anatomy=False)
    shape = header.shape[:3] if case.channel is not None else header.shape  # 4-D: one channel
    if on_grid(shape, header.affine) or not holds_a_head(shape, header.affine):
        vols = load_case(case, with_healthy=False, with_anatomy=False)
        if not needs_preprocessing(vols.image, vols.affine):  # the background test needs voxels
            return vols
    image = read_nifti(case.t1ce, channel=case.channel)
    seg = None
    if case.seg is not None:
        vol = read_nifti(case.seg, dtype=None)
        try:
            seg = to_internal(vol.array, case.layout)
        except ValueError as exc:
            raise VolumeError(case.seg, str(exc)) from exc
    out = to_model_space(image.array, image.affine, labels=seg)
    return CaseVolumes(case=case, image=out.image, scale=out.scale, affine=out.affine,
                       seg=out.labels)


def load_grid() -> sitk.Image:
    """The registration target: the SRI24 atlas on the BraTS grid."""
    return R.load_atlas().image()


def to_brats_storage(ras: np.ndarray) -> nib.Nifti1Image:
    """A RAS+ array on the grid -> a NIfTI stored as BraTS stores it (LPS voxels, BRATS_AFFINE)."""
    img = nib.Nifti1Image(np.ascontiguousarray(ras[::-1, ::-1, :]), BRATS_AFFINE)
    img.header.set_xyzt_units("mm")
    return img


def preprocess_file(src: Path | str, dst: Path | str,
                    others: dict[str, tuple[Path, Path]] | None = None) -> ModelSpaceVolume:
    """``cbir preprocess``: a T1-Gd NIfTI -> ``dst`` in the model's space (BraTS storage).

    ``others``: name -> (source NIfTI, destination) for more modalities of the same study.
    """
    volume = read_nifti(src)
    other_volumes = {k: (read_nifti(s).array, read_nifti(s).affine)
                     for k, (s, _) in (others or {}).items()}
    out = to_model_space(volume.array, volume.affine, other_volumes)
    _save(out.image, Path(dst))
    for name, (_, path) in (others or {}).items():
        _save(out.others[name], Path(path))
    return out


def _save(ras: np.ndarray, dst: Path) -> None:
    """Written to a temporary name and moved into place: never half-written."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".nii.gz", dir=dst.parent)
    os.close(fd)
    try:
        nib.save(to_brats_storage(ras), tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
