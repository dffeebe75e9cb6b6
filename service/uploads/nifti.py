"""NIfTI uploads, plain or gzipped: the header first, then exactly the bytes it declares.

A ``.nii.gz`` is inflated header first (``HEAD`` bytes); the header gives the volume's shape, bytes
per voxel and data offset, so the whole file's length is known before the rest is inflated. The
stream is inflated to that length and one byte further: a stream that goes on is refused (413)
before anything more is inflated, one that ends early is refused as truncated (422). The slice
then goes through the same steps an indexed volume does (``model.data.preprocess`` rules 1 to 4).

With ``preprocess`` (the API's default), a volume that needs it (``ingest.preprocess``'s rule:
outside the model's space and large enough to hold a head) is first brought to the model's space:
skull stripping and registration to the 240 x 240 x 155 BraTS grid, as ``cbir preprocess`` does;
``slice`` then counts the grid's axial slices.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from ingest.preprocess import needs_preprocessing, to_model_space
from model.data.nifti import reorient_to_ras
from service.uploads.base import (
    GZIP_MAGIC,
    DecodeBudget,
    Limits,
    QuerySlice,
    UnsupportedUpload,
    UploadError,
    UploadTooLarge,
    reserve,
    volume_slice,
)

HEAD = 544  # inflated bytes enough for either header (348 + 4, or 540 + 4)
# Working memory per voxel on top of twice the file (inflated bytes, array read from them),
# measured on the code below: float32 volume, brain mask, brain voxels and the percentile's
# partitioned copy.
BYTES_PER_VOXEL = 14


def nifti_version(data: bytes) -> int:
    """1 or 2 for a single-file NIfTI header (either byte order), 0 otherwise."""
    if len(data) < 4:
        return 0
    for order in "<>":
        (size,) = struct.unpack(order + "i", data[:4])
        if size == 348 and len(data) >= 348 and data[344:347] in (b"n+1", b"ni1"):
            return 1
        if size == 540 and len(data) >= 8 and data[4:7] in (b"n+2", b"ni2"):
            return 2
    return 0


@dataclass(frozen=True)
class _NiftiLayout:
    version: int
    shape: tuple[int, ...]
    itemsize: int
    offset: int

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def length(self) -> int:
        """The file's length as its header declares it."""
        return self.offset + self.voxels * self.itemsize


def _nifti_layout(head: bytes) -> _NiftiLayout:
    """Shape, bytes per voxel and data offset from a single-file NIfTI header's first bytes."""
    version = nifti_version(head)
    magic = head[344:347] if version == 1 else head[4:7]
    if magic in (b"ni1", b"ni2"):
        raise UploadError("a NIfTI header of a .hdr/.img pair: send a single-file .nii or .nii.gz")
    order = "<" if struct.unpack("<i", head[:4])[0] in (348, 540) else ">"
    if version == 1:
        dims = struct.unpack(order + "8h", head[40:56])
        (datatype,) = struct.unpack(order + "h", head[70:72])
        (offset,) = struct.unpack(order + "f", head[108:112])
        minimum = 352
    else:
        (datatype,) = struct.unpack(order + "h", head[12:14])
        dims = struct.unpack(order + "8q", head[16:80])
        (offset,) = struct.unpack(order + "q", head[168:176])
        minimum = 544
    ndim = dims[0]
    if not 1 <= ndim <= 7 or any(d < 1 for d in dims[1:ndim + 1]):
        raise UploadError(f"unreadable NIfTI header: dimensions {list(dims[:ndim + 1])}")
    try:
        itemsize = nib.nifti1.data_type_codes.dtype[datatype].itemsize
    except KeyError:
        raise UploadError(f"unreadable NIfTI header: unknown data type code {datatype}") from None
    if itemsize == 0 or not np.isfinite(offset):
        raise UploadError(f"unreadable NIfTI header: data type code {datatype}, offset {offset}")
    # nibabel reads single files from vox_offset, or from just after the header when it is less.
    return _NiftiLayout(version, tuple(int(d) for d in dims[1:ndim + 1]), itemsize,
                        max(int(offset), minimum))


class _Inflater:
    """Inflates a gzip stream (one or more members) only as far as it is asked to."""

    def __init__(self, data: bytes):
        self._rest = data
        self._z = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        self.exhausted = False  # the last member ended cleanly and nothing follows

    def read(self, n: int) -> bytes:
        """Up to ``n`` inflated bytes; fewer only where the stream ends (or is truncated)."""
        out = []
        while n > 0 and not self.exhausted:
            try:
                piece = self._z.decompress(self._rest, n)
            except zlib.error as exc:
                raise UploadError(f"corrupt gzip data ({exc})") from exc
            self._rest = self._z.unconsumed_tail
            out.append(piece)
            n -= len(piece)
            if self._z.eof:
                tail = self._z.unused_data
                if tail.startswith(GZIP_MAGIC):  # another member follows
                    self._rest = tail
                    self._z = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                    continue
                if tail.strip(b"\0"):
                    raise UploadError("data after the end of the gzip stream")
                self.exhausted = True
            elif not piece and not self._rest:
                break  # input used up before the stream's end
        return b"".join(out)


def _gzip_layout(inflater: _Inflater, head: bytes) -> _NiftiLayout:
    """The layout of the NIfTI header at the start of a gzip stream (``head``: its first bytes)."""
    if not nifti_version(head):
        if not inflater.exhausted and len(head) < HEAD:
            raise UploadError("truncated gzip file: the compressed data ends early")
        raise UnsupportedUpload("a gzip file that does not hold a NIfTI volume: send .nii.gz, "
                                ".nii, PNG, JPEG or DICOM")
    return _nifti_layout(head)


def _inflate_rest(inflater: _Inflater, head: bytes, layout: _NiftiLayout) -> bytes:
    """Inflate a .nii.gz exactly to the length its header declares; refuse any other length."""
    declared = layout.length
    if len(head) > declared:
        raise UploadError(f"the gzip stream holds more than the {declared} bytes its NIfTI "
                          f"header declares")
    body = inflater.read(declared - len(head))
    got = len(head) + len(body)
    if got < declared:
        if inflater.exhausted:
            raise UploadError(f"the gzip stream inflates to {got} bytes, fewer than the "
                              f"{declared} its NIfTI header declares (a {layout.shape} volume)")
        raise UploadError("truncated gzip file: the compressed data ends early")
    if inflater.read(1):
        raise UploadTooLarge(f"the gzip stream inflates past the {declared} bytes its NIfTI "
                             f"header declares (a {layout.shape} volume); refused before "
                             f"inflating the rest")
    if not inflater.exhausted:
        raise UploadError("truncated gzip file: the compressed data ends early")
    return head + body


def _check_voxels(layout: _NiftiLayout, limits: Limits) -> None:
    if layout.voxels > limits.max_volume_voxels:
        raise UploadTooLarge(f"the NIfTI header declares a {layout.shape} volume, "
                             f"{layout.voxels} voxels, more than CBIR_MAX_VOLUME_VOXELS "
                             f"({limits.max_volume_voxels})")


def nifti_slice(data: bytes, gzipped: bool, slice_index: int | None, limits: Limits,
                 budget: DecodeBudget | None, preprocess_volume: bool = False) -> QuerySlice:
    if gzipped:
        inflater = _Inflater(data)
        head = inflater.read(HEAD)
        layout = _gzip_layout(inflater, head)
        _check_voxels(layout, limits)
        with reserve(budget, 2 * layout.length + BYTES_PER_VOXEL * layout.voxels,
                      "the NIfTI volume"):
            raw = _inflate_rest(inflater, head, layout)
            return _nifti_volume_slice(raw, layout, slice_index, preprocess_volume)
    layout = _nifti_layout(data)
    _check_voxels(layout, limits)
    if layout.length > len(data):
        raise UploadError(f"truncated NIfTI file: the header declares a {layout.shape} volume, "
                          f"the data is shorter")
    with reserve(budget, layout.length + BYTES_PER_VOXEL * layout.voxels,
                  "the NIfTI volume"):
        return _nifti_volume_slice(data, layout, slice_index, preprocess_volume)


def _nifti_volume_slice(data: bytes, layout: _NiftiLayout, slice_index: int | None,
                        preprocess_volume: bool = False) -> QuerySlice:
    shape = layout.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 4:
        raise UploadError(f"a 4-D NIfTI volume {shape}: send one 3-D volume (a single time "
                          f"point or modality)")
    if len(shape) != 3:
        raise UploadError(f"a {len(shape)}-D NIfTI image {shape}: expected a 3-D volume")
    cls = nib.Nifti1Image if layout.version == 1 else nib.Nifti2Image
    try:
        img = cls.from_bytes(data)
        if len(img.shape) == 4:
            img = img.slicer[..., 0]
        ras = reorient_to_ras(img)
        volume = np.asanyarray(ras.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for a bad header or data
        raise UploadError(f"unreadable NIfTI file ({type(exc).__name__}: {exc})") from exc
    np.nan_to_num(volume, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    if preprocess_volume and volume.max() > 0 and needs_preprocessing(volume, ras.affine):
        try:
            volume = to_model_space(volume, ras.affine).image
        except ValueError as exc:
            raise UploadError(f"NIfTI volume: {exc}; send preprocess=false to use the volume "
                              f"as it is") from exc
    return volume_slice(volume, slice_index, "nifti")
