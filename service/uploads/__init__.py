"""Uploaded query files -> one (256, 256) slice in the model's domain, all in memory.

The kind is sniffed from the bytes, never trusted from a name or a content type:

- PNG (``\\x89PNG``) and JPEG (``\\xff\\xd8\\xff``): preprocessing rule 6
  (``preprocess.normalize_image``): the image is scaled by its own 99.5th percentile, as a volume
  is, so a 12-bit export in a 16-bit PNG or a dark 8-bit export becomes the same query.
- NIfTI-1/2, plain or gzipped: the same steps an indexed volume goes through (RAS+ reorientation,
  per-volume intensity scale, radiological axial slice, centre fit); ``slice`` picks the axial
  slice, the middle one by default. With ``preprocess``, a volume not in the model's space is
  skull-stripped and registered to the BraTS grid first (``ingest.preprocess``).
- A .zip (``PK\\x03\\x04``) holding one DICOM series (``series.py``): read within bounds on
  members and inflated size, the series picked and placed by ``ingest.dicom``, brought to the
  model's space by ``ingest.cases.to_model_space``, then the NIfTI steps.
- DICOM (``DICM`` at byte 128): pixel data only. Frames are slices; the per-image intensity rule
  of a volume is applied to the frames, and large frames are shrunk like a 2-D image. No tag but
  the ones pixel decoding needs is read, and none is kept or logged.

Nothing is decoded before its size is known and allowed: image dimensions come from the PNG/JPEG
header, a volume's from its NIfTI header, which for a ``.nii.gz`` is inflated first and alone.
The header declares the file's exact length (``vox_offset`` + voxels x bytes per voxel); the
gzip stream is inflated up to that length and no further, and one that ends early or goes on is
refused. Each decode then reserves its memory from a ``DecodeBudget`` shared by all requests, so
concurrent uploads wait (or are refused) rather than exhaust the host.

Finally the slice must hold brain by the rule indexing skips slices by (at least
``preprocess.MIN_BRAIN_PIXELS`` pixels > 0) and show some contrast. Whether it looks like an
axial brain MRI slice in the model's space is asked apart, by ``sanity``: the routes warn (or,
with ``strict=true``, refuse) on its answer.
"""

from __future__ import annotations

from model.data import preprocess
from service.uploads.base import (
    GZIP_MAGIC,
    JPEG_MAGIC,
    PNG_MAGIC,
    ZIP_MAGIC,
    DecodeBudget,
    DecoderBusy,
    EmptyUpload,
    Limits,
    NotABrainSlice,
    QuerySlice,
    UnsupportedUpload,
    UploadError,
    UploadTooLarge,
)
from service.uploads.dicom import dicom_slice
from service.uploads.images import image_slice
from service.uploads.nifti import nifti_slice, nifti_version
from service.uploads.series import series_slice

__all__ = ["DecodeBudget", "DecoderBusy", "EmptyUpload", "Limits", "NotABrainSlice",
           "QuerySlice", "UnsupportedUpload", "UploadError", "UploadTooLarge", "decode_query",
           "sniff"]


def sniff(data: bytes) -> str:
    """The kind of an upload from its first bytes: png, jpeg, gzip, zip, nifti, dicom."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data.startswith(GZIP_MAGIC):
        return "gzip"
    if data.startswith(ZIP_MAGIC):
        return "zip"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if nifti_version(data):
        return "nifti"
    raise UnsupportedUpload(
        "not a supported file: send a PNG or JPEG slice, a NIfTI volume (.nii or .nii.gz), a "
        "DICOM file or a .zip of one DICOM series (the content is checked, not the file name)")


def decode_query(data: bytes, slice_index: int | None = None, limits: Limits | None = None,
                 budget: DecodeBudget | None = None, series_uid: str | None = None,
                 preprocess: bool = False) -> QuerySlice:
    """Turn uploaded bytes into the query slice, or raise an ``UploadError`` naming the problem.

    ``budget``, when given, bounds the memory of this decode together with every other one.
    ``series_uid`` picks the series of a .zip holding several (default: the T1-Gd rule).
    ``preprocess`` brings a NIfTI volume that is not in the model's space there first
    (``ingest.preprocess``); the API passes its ``preprocess`` option, true by default.
    """
    limits = limits or Limits()
    if not data:
        raise EmptyUpload("empty file")
    kind = sniff(data)
    if kind in ("png", "jpeg"):
        query = image_slice(data, kind, slice_index, limits, budget)
    elif kind in ("gzip", "nifti"):
        query = nifti_slice(data, kind == "gzip", slice_index, limits, budget, preprocess)
    elif kind == "zip":
        query = series_slice(data, slice_index, limits, budget, series_uid)
    else:
        query = dicom_slice(data, slice_index, limits, budget)
    _require_brain(query)
    return query


def _require_brain(query: QuerySlice) -> None:
    """The rule by which indexing skips slices, and a flat image (one value) refused too."""
    where = f"slice {query.slice}" if query.slice is not None else "the image"
    area = int(preprocess.brain_area(query.image))
    if area < preprocess.MIN_BRAIN_PIXELS:
        raise NotABrainSlice(
            f"not a brain slice: {where} has {area} pixel(s) above 0 after scaling, fewer than "
            f"the {preprocess.MIN_BRAIN_PIXELS} an indexed slice has at least")
    brain = query.image[query.image > 0]
    if brain.min() == brain.max():
        raise NotABrainSlice(f"not a brain slice: {where} is flat (every pixel above 0 has the "
                             f"same value), so there is no anatomy to search with")
