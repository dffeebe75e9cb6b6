"""NIfTI reading: one reader that returns a volume in the closest canonical (RAS+) orientation.

After MONAI's ``NibabelReader``: every later step sees one convention, whatever orientation the
file was stored in. Reorientation to the closest canonical orientation is a permutation and flip
of voxel axes (no interpolation), so image and label maps stay voxel-exact.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

# Two grids match when their affines agree to this tolerance (mm).
AFFINE_ATOL_MM = 1e-3


class VolumeError(ValueError):
    """A NIfTI file that cannot be used; the message names the file and the problem."""

    def __init__(self, path: Path | str, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class Volume:
    """A 3-D array in RAS+ voxel order, with the affine of that order and the file it came from."""

    array: np.ndarray  # (X, Y, Z): X to the patient's right, Y anterior, Z superior
    affine: np.ndarray  # (4, 4) voxel -> world (mm), for `array` as oriented
    path: Path

    @property
    def zooms(self) -> tuple[float, float, float]:
        return tuple(float(z) for z in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))


def reorient_to_ras(img: nib.spatialimages.SpatialImage) -> nib.spatialimages.SpatialImage:
    """The image with its voxel axes permuted/flipped to the closest canonical (RAS+) order."""
    return nib.as_closest_canonical(img)


def read_nifti(path: Path | str, dtype: np.dtype | None = np.float32,
               channel: int | None = None) -> Volume:
    """Read a 3-D NIfTI file fully into memory, reoriented to RAS+.

    ``dtype`` None keeps the stored data type (used for label maps). A trailing singleton 4th
    dimension is dropped; any other 4-D file is refused unless ``channel`` names the 3-D volume
    to read from it (the others are not kept in memory). Every failure raises ``VolumeError``
    naming the file: missing, not NIfTI, truncated or corrupt compressed data, wrong rank.
    """
    path = Path(path)
    if not path.is_file():
        raise VolumeError(path, "file not found")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for a bad header
        raise VolumeError(path, f"not a readable NIfTI file ({exc})") from exc
    shape = img.shape
    if channel is not None and (len(shape) != 4 or not 0 <= channel < shape[3]):
        raise VolumeError(path, f"expected a 4-D volume with a channel {channel}, got shape "
                                f"{tuple(shape)}")
    if channel is None and len(shape) == 4 and shape[3] == 1:
        channel = 0
    elif channel is None and len(shape) != 3:
        raise VolumeError(path, f"expected a 3-D volume, got shape {tuple(shape)}")
    try:
        if channel is not None:
            img = img.slicer[..., channel]  # the proxy reads this channel alone into memory
        # Reorienting a non-RAS file reads its data, so a truncated or corrupt file fails here,
        # inside the try, and is reported with its name.
        img = reorient_to_ras(img)
        data = np.asanyarray(img.dataobj)
    except (EOFError, OSError, zlib.error, ValueError) as exc:
        raise VolumeError(path, f"truncated or corrupt data ({exc})") from exc
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise VolumeError(path, "contains NaN or infinite values")
    return Volume(array=np.ascontiguousarray(data), affine=img.affine.copy(), path=path)


def check_same_grid(image: Volume, other: Volume) -> None:
    """Raise ``VolumeError`` on ``other`` unless it lies on the same voxel grid as ``image``."""
    if image.array.shape != other.array.shape:
        raise VolumeError(
            other.path,
            f"shape {other.array.shape} does not match image {image.path.name} "
            f"shape {image.array.shape}",
        )
    if not np.allclose(image.affine, other.affine, atol=AFFINE_ATOL_MM):
        raise VolumeError(
            other.path,
            f"affine does not match image {image.path.name} "
            f"(max difference {np.abs(image.affine - other.affine).max():.4g} mm)",
        )
