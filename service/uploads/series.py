"""A .zip upload holding one DICOM series: read within bounds, then the model-space path.

Before anything is inflated the archive's directory is checked: at most ``max_zip_members``
files (CBIR_MAX_ZIP_MEMBERS); no member named with an absolute path, a drive or a ``..`` part
(path traversal: nothing is written to disk, but such an archive is not one a scanner or PACS
export writes), no symbolic link, no encrypted member; the sizes it declares together at most
``max_zip_bytes`` (CBIR_MAX_ZIP_MB). Members are then inflated one at a time, each no further
than the size it declares plus one byte and the whole no further than the limit, so an archive
whose sizes lie (a zip bomb) is refused having inflated at most the limit.

The DICOM files in it go through ``ingest.dicom.read_series`` (series picked by its documented
rule, geometry from the headers), ``ingest.cases.to_model_space``, and then the same slice steps
as a NIfTI volume (``base.volume_slice``). Members that are not DICOM (a DICOMDIR's
neighbours, a README) are passed over. No tag is kept or logged.
"""

from __future__ import annotations

import io
import stat
import zipfile
import zlib

from ingest import dicom
from ingest.cases import NotInModelSpace, to_model_space
from service.uploads.base import (
    DecodeBudget,
    Limits,
    QuerySlice,
    UnsupportedUpload,
    UploadError,
    UploadTooLarge,
    mb,
    reserve,
    volume_slice,
)

# Working memory per inflated byte, measured on the code below (tracemalloc peak over the
# inflated size, 7.2 for a 240 x 240 x 155 series of 16-bit slices), rounded up: the datasets,
# their decoded pixels, the float32 volume (2 x its 16-bit pixels) and its reoriented copy.
BYTES_PER_INFLATED_BYTE = 8


def _unsafe_name(name: str) -> str | None:
    """Why a member's name is refused, or None."""
    path = name.replace("\\", "/")
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        return "an absolute path"
    if ".." in path.split("/"):
        return "a '..' part (path traversal)"
    return None


def _members(archive: zipfile.ZipFile, limits: Limits) -> list[zipfile.ZipInfo]:
    files = [info for info in archive.infolist() if not info.is_dir()]
    if len(files) > limits.max_zip_members:
        raise UploadTooLarge(f"the zip holds {len(files)} files, more than "
                             f"CBIR_MAX_ZIP_MEMBERS ({limits.max_zip_members})")
    for info in files:
        if why := _unsafe_name(info.filename):
            raise UploadError(f"the zip member {info.filename!r} is named with {why}; refused")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UploadError(f"the zip member {info.filename!r} is a symbolic link; refused")
        if info.flag_bits & 0x1:
            raise UploadError(f"the zip member {info.filename!r} is encrypted")
    declared = sum(info.file_size for info in files)
    if declared > limits.max_zip_bytes:
        raise UploadTooLarge(f"the zip's files inflate to {declared} bytes, more than "
                             f"CBIR_MAX_ZIP_MB ({mb(limits.max_zip_bytes)} MB)")
    return files


def _datasets(archive: zipfile.ZipFile, files: list[zipfile.ZipInfo], limits: Limits) -> list:
    """The DICOM datasets of the members, inflated and parsed one at a time (a member's bytes
    are let go once parsed); members that are not DICOM are passed over."""
    out, total = [], 0
    for info in files:
        try:
            with archive.open(info) as member:
                data = member.read(info.file_size + 1)
        except (zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError, ValueError,
                OSError) as exc:
            raise UploadError(f"the zip member {info.filename!r} cannot be inflated ({exc})") \
                from exc
        total += len(data)
        if len(data) > info.file_size or total > limits.max_zip_bytes:
            raise UploadTooLarge(f"the zip member {info.filename!r} inflates past the size its "
                                 f"archive declares (a zip bomb?); refused")
        try:
            ds = dicom.parse(data)
        except dicom.DicomError as exc:
            raise UploadError(f"the zip member {info.filename!r}: {exc}") from exc
        if ds is not None:
            out.append(ds)
    return out


def series_slice(data: bytes, slice_index: int | None, limits: Limits,
                 budget: DecodeBudget | None, series_uid: str | None = None) -> QuerySlice:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as exc:
        raise UploadError(f"not a readable zip file ({exc})") from exc
    with archive:
        files = _members(archive, limits)
        declared = sum(info.file_size for info in files)
        with reserve(budget, BYTES_PER_INFLATED_BYTE * declared, "the zip of a DICOM series"):
            datasets = _datasets(archive, files, limits)
            if not datasets:
                raise UnsupportedUpload("the zip holds no DICOM file: send a .zip of one "
                                        "DICOM series (or a NIfTI volume, PNG or JPEG)")
            try:
                series = dicom.read_series(datasets, series_uid,
                                           max_voxels=limits.max_volume_voxels)
            except dicom.SeriesTooLarge as exc:
                raise UploadTooLarge(f"DICOM series: {exc} (CBIR_MAX_VOLUME_VOXELS)") from exc
            except dicom.DicomError as exc:
                raise UploadError(f"DICOM series: {exc}") from exc
            del datasets
            try:
                volume = to_model_space(series.volume)
            except NotInModelSpace as exc:
                raise UploadError(f"DICOM series: {exc}") from exc
            return volume_slice(volume.array, slice_index, "dicom")
