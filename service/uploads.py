"""Uploaded query files -> one (256, 256) slice in the model's domain, all in memory.

The kind is sniffed from the bytes, never trusted from a name or a content type:

- PNG (``\\x89PNG``) and JPEG (``\\xff\\xd8\\xff``): preprocessing rule 5 (``image_to_slice``).
- NIfTI-1/2, plain or gzipped: read from memory by nibabel, then the same steps an indexed volume
  goes through (RAS+ reorientation, per-volume intensity scaling, radiological axial slice,
  centre fit); ``slice`` picks the axial slice, the middle one by default.
- DICOM (``DICM`` at byte 128): pixel data only. Frames are slices; the per-image intensity rule
  of a volume is applied to the frames, and large frames are shrunk like a 2-D image. No tag but
  the ones pixel decoding needs is read, and none is kept or logged.

Every size is checked before memory is spent on it: header dimensions before pixel data, and
gzip output against a limit while it is inflated (decompression bombs).
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from model.data import preprocess
from model.data.nifti import reorient_to_ras

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
GZIP_MAGIC = b"\x1f\x8b"
_NIFTI_BYTES_PER_VOXEL_MAX = 16  # complex128 / float128: the widest NIfTI data types


class UploadError(ValueError):
    """A query file that cannot be used; the message says what is wrong with it."""


class EmptyUpload(UploadError):
    pass


class UnsupportedUpload(UploadError):
    """Not a PNG, JPEG, NIfTI or DICOM file."""


class UploadTooLarge(UploadError):
    """More pixels, voxels or inflated bytes than the limits allow."""


@dataclass(frozen=True)
class Limits:
    max_image_pixels: int = preprocess.MAX_IMAGE_PIXELS
    max_volume_voxels: int = 512 * 512 * 512


@dataclass(frozen=True)
class QuerySlice:
    image: np.ndarray  # (256, 256) float32 in [0, 1]
    kind: str  # png, jpeg, nifti, dicom
    slice: int | None = None  # axial slice / frame read from a volume
    slice_count: int | None = None  # axial slices / frames in the volume


def sniff(data: bytes) -> str:
    """The kind of an upload from its first bytes: png, jpeg, gzip, nifti, dicom."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data.startswith(GZIP_MAGIC):
        return "gzip"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if _nifti_version(data):
        return "nifti"
    raise UnsupportedUpload(
        "not a supported file: send a PNG or JPEG slice, a NIfTI volume (.nii or .nii.gz) or a "
        "DICOM file (the content is checked, not the file name)")


def _nifti_version(data: bytes) -> int:
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


def decode_query(data: bytes, slice_index: int | None = None,
                 limits: Limits | None = None) -> QuerySlice:
    """Turn uploaded bytes into the query slice, or raise an ``UploadError`` naming the problem."""
    limits = limits or Limits()
    if not data:
        raise EmptyUpload("empty file")
    kind = sniff(data)
    if kind in ("png", "jpeg"):
        if slice_index not in (None, 0):
            raise UploadError(f"slice {slice_index} asked of a 2-D {kind.upper()} image, which "
                              f"has one slice (0)")
        if kind == "png" and len(data) >= 24 and data[12:16] == b"IHDR":
            width, height = struct.unpack(">II", data[16:24])  # before any decoding
            if width * height > limits.max_image_pixels:
                raise UploadTooLarge(f"the PNG header claims {width}x{height} pixels, more than "
                                     f"the limit of {limits.max_image_pixels} pixels")
        try:
            image = preprocess.image_to_slice(data, max_pixels=limits.max_image_pixels)
        except ValueError as exc:
            cls = UploadTooLarge if "pixels" in str(exc) or "too large" in str(exc) else UploadError
            raise cls(str(exc)) from exc
        return QuerySlice(image=image, kind=kind)
    if kind == "gzip":
        data = _gunzip(data, _max_nifti_bytes(limits))
        if not _nifti_version(data):
            raise UnsupportedUpload("a gzip file that does not hold a NIfTI volume: send "
                                    ".nii.gz, .nii, PNG, JPEG or DICOM")
        kind = "nifti"
    if kind == "nifti":
        return _nifti_slice(data, slice_index, limits)
    return _dicom_slice(data, slice_index, limits)


def _max_nifti_bytes(limits: Limits) -> int:
    return limits.max_volume_voxels * _NIFTI_BYTES_PER_VOXEL_MAX + (1 << 20)


def _gunzip(data: bytes, max_bytes: int) -> bytes:
    """Inflate gzip data, stopping with an error once more than ``max_bytes`` would come out."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, max_bytes + 1)
    except zlib.error as exc:
        raise UploadError(f"corrupt gzip data ({exc})") from exc
    if len(out) > max_bytes or inflater.unconsumed_tail:
        raise UploadTooLarge(f"the gzip file inflates to more than {max_bytes // (1 << 20)} MB, "
                             f"over the volume limit")
    if not inflater.eof:
        raise UploadError("truncated gzip file: the compressed data ends early")
    return out


def _nifti_slice(data: bytes, slice_index: int | None, limits: Limits) -> QuerySlice:
    version = _nifti_version(data)
    magic = data[344:347] if version == 1 else data[4:7]
    if magic in (b"ni1", b"ni2"):
        raise UploadError("a NIfTI header of a .hdr/.img pair: send a single-file .nii or .nii.gz")
    cls = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    try:
        img = cls.from_bytes(data)
    except Exception as exc:
        raise UploadError(f"unreadable NIfTI file ({type(exc).__name__}: {exc})") from exc
    shape = tuple(int(n) for n in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 4:
        raise UploadError(f"a 4-D NIfTI volume {shape}: send one 3-D volume (a single time "
                          f"point or modality)")
    if len(shape) != 3:
        raise UploadError(f"a {len(shape)}-D NIfTI image {shape}: expected a 3-D volume")
    voxels = int(np.prod(shape))
    if voxels > limits.max_volume_voxels:
        raise UploadTooLarge(f"the NIfTI volume {shape} has {voxels} voxels, more than the limit "
                             f"of {limits.max_volume_voxels}")
    if img.header.get_data_dtype().itemsize * voxels + int(img.header["vox_offset"]) > len(data):
        raise UploadError(f"truncated NIfTI file: the header promises a {shape} volume, the "
                          f"data is shorter")
    try:
        if len(img.shape) == 4:
            img = img.slicer[..., 0]
        ras = reorient_to_ras(img)
        volume = np.asanyarray(ras.dataobj, dtype=np.float32)
    except Exception as exc:
        raise UploadError(f"unreadable NIfTI data ({type(exc).__name__}: {exc})") from exc
    volume = np.nan_to_num(volume, nan=0.0, posinf=0.0, neginf=0.0)
    try:
        volume = preprocess.normalize_intensity(volume)  # rule 2, per volume
    except ValueError as exc:
        raise UploadError(f"NIfTI volume: {exc}") from exc
    depth = volume.shape[2]
    index = depth // 2 if slice_index is None else slice_index
    if not 0 <= index < depth:
        raise UploadError(f"slice {index} is out of range: the volume has {depth} axial slices "
                          f"(0..{depth - 1})")
    image = preprocess.axial_slices(volume[:, :, index:index + 1])[0]  # rules 3 and 4
    return QuerySlice(image=image, kind="nifti", slice=index, slice_count=depth)


def _dicom_slice(data: bytes, slice_index: int | None, limits: Limits) -> QuerySlice:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    except (InvalidDicomError, AttributeError, ValueError, TypeError, EOFError) as exc:
        raise UploadError("not a readable DICOM image (no pixel data description)") from exc
    if "PixelData" not in ds:
        raise UploadError("the DICOM file holds no pixel data")
    if rows * cols > limits.max_image_pixels or rows * cols * frames > limits.max_volume_voxels:
        raise UploadTooLarge(f"the DICOM image is {frames} x {rows} x {cols}, over the pixel "
                             f"limits")
    index = frames // 2 if slice_index is None else slice_index
    if not 0 <= index < frames:
        raise UploadError(f"slice {index} is out of range: the DICOM file has {frames} "
                          f"frame(s) (0..{frames - 1})")
    try:
        pixels = np.asarray(ds.pixel_array, dtype=np.float64)
    except Exception as exc:
        raise UploadError(f"cannot decode the DICOM pixel data ({type(exc).__name__}); "
                          f"uncompressed transfer syntaxes are supported") from exc
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if samples == 3:  # RGB: luma, as for a 2-D image (rule 5)
        pixels = pixels @ np.array([0.299, 0.587, 0.114])
    if frames == 1:
        pixels = pixels[None]
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        pixels = pixels.max() - pixels  # MONOCHROME1 shows the lowest value white
    try:
        pixels = preprocess.normalize_intensity(pixels - min(pixels.min(), 0.0))  # rule 2
    except ValueError as exc:
        raise UploadError(f"DICOM image: {exc}") from exc
    image = preprocess.fit_image(pixels[index].astype(np.float64))
    return QuerySlice(image=np.clip(image, 0, 1).astype(np.float32), kind="dicom",
                      slice=index if frames > 1 else None,
                      slice_count=frames if frames > 1 else None)
