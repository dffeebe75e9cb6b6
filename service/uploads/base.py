"""What every upload decoder shares: the limits, the decoded slice, the errors, the memory budget
and the magic numbers that tell the kinds apart."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from model.data import preprocess

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"


class UploadError(ValueError):
    """A query file that cannot be used; the message says what is wrong with it."""


class EmptyUpload(UploadError):
    pass


class UnsupportedUpload(UploadError):
    """Not a PNG, JPEG, NIfTI or DICOM file."""


class UploadTooLarge(UploadError):
    """More pixels, voxels, inflated bytes or decoding memory than the limits allow."""


class NotABrainSlice(UploadError):
    """Decoded, but the slice holds no brain by the indexing rule."""


class DecoderBusy(RuntimeError):
    """The decoding memory budget stayed taken by other uploads for too long."""


@dataclass(frozen=True)
class Limits:
    max_image_pixels: int = preprocess.MAX_IMAGE_PIXELS
    max_volume_voxels: int = 512 * 512 * 512
    max_zip_members: int = 4096  # files in a .zip of a DICOM series
    max_zip_bytes: int = 256 * 2**20  # their total size once inflated


@dataclass(frozen=True)
class QuerySlice:
    image: np.ndarray  # (256, 256) float32 in [0, 1]
    kind: str  # png, jpeg, nifti, dicom (a single file or a .zip of a series)
    slice: int | None = None  # axial slice / frame read from a volume
    slice_count: int | None = None  # axial slices / frames in the volume


class DecodeBudget:
    """Bytes of decoding memory shared by every upload in the process (CBIR_DECODE_MEMORY_MB).

    A decode reserves its estimated peak before it allocates; one that does not fit waits for
    others to finish, up to ``wait_s``, then gives up with ``DecoderBusy``. One that could never
    fit is refused at once.
    """

    def __init__(self, total_bytes: int, wait_s: float = 30.0):
        self.total = int(total_bytes)
        self.wait_s = wait_s
        self._free = self.total
        self._cond = threading.Condition()

    @property
    def in_use(self) -> int:
        with self._cond:
            return self.total - self._free

    @contextmanager
    def reserve(self, nbytes: int, what: str) -> Iterator[None]:
        nbytes = int(nbytes)
        if nbytes > self.total:
            raise UploadTooLarge(
                f"decoding {what} needs about {mb(nbytes)} MB, more than the decoding memory "
                f"of this server ({mb(self.total)} MB, CBIR_DECODE_MEMORY_MB)")
        with self._cond:
            if not self._cond.wait_for(lambda: self._free >= nbytes, timeout=self.wait_s):
                raise DecoderBusy(f"the server is decoding other uploads; its decoding memory "
                                  f"({mb(self.total)} MB) stayed full for {self.wait_s:g} s")
            self._free -= nbytes
        try:
            yield
        finally:
            with self._cond:
                self._free += nbytes
                self._cond.notify_all()


def mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.0f}"


@contextmanager
def reserve(budget: DecodeBudget | None, nbytes: int, what: str) -> Iterator[None]:
    if budget is None:
        yield
        return
    with budget.reserve(nbytes, what):
        yield


def volume_slice(volume: np.ndarray, slice_index: int | None, kind: str) -> QuerySlice:
    """Axial slice ``slice_index`` (default: the middle one) of a RAS+ volume, through the steps
    an indexed volume goes through (``model.data.preprocess`` rules 2 to 4)."""
    np.nan_to_num(volume, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    depth = volume.shape[2]
    index = depth // 2 if slice_index is None else slice_index
    if not 0 <= index < depth:
        raise UploadError(f"slice {index} is out of range: the volume has {depth} axial slices "
                          f"(0..{depth - 1})")
    try:
        scale = preprocess.intensity_scale(volume)  # rule 2, per volume
    except ValueError as exc:
        name = {"nifti": "NIfTI volume", "dicom": "DICOM series"}.get(kind, kind)
        raise UploadError(f"{name}: {exc}") from exc
    # Rule 2 is voxel-wise: normalising one slice with the volume's scale equals slicing the
    # normalised volume, without a second volume-sized copy.
    one = preprocess.normalize_intensity(volume[:, :, index:index + 1], scale=scale)
    image = preprocess.axial_slices(one)[0]  # rules 3 and 4
    return QuerySlice(image=image, kind=kind, slice=index, slice_count=depth)
