"""Single-file DICOM uploads: pixel data only; no tag but those pixel decoding needs is read."""

from __future__ import annotations

import io

import numpy as np

from ingest.dicom import quiet_pydicom
from model.data import preprocess
from service.uploads.base import (
    DecodeBudget,
    Limits,
    QuerySlice,
    UploadError,
    UploadTooLarge,
    reserve,
)

# Working memory per pixel, measured on the code below: pixel array, float64, frames normalised.
BYTES_PER_PIXEL = 32


def dicom_slice(data: bytes, slice_index: int | None, limits: Limits,
                 budget: DecodeBudget | None) -> QuerySlice:
    from pydicom.errors import InvalidDicomError

    pydicom = quiet_pydicom()

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    except (InvalidDicomError, AttributeError, ValueError, TypeError, EOFError) as exc:
        raise UploadError("not a readable DICOM image (no pixel data description)") from exc
    if "PixelData" not in ds:
        raise UploadError("the DICOM file holds no pixel data")
    if rows * cols > limits.max_image_pixels:
        raise UploadTooLarge(f"the DICOM frames are {rows} x {cols}, more than "
                             f"CBIR_MAX_IMAGE_PIXELS ({limits.max_image_pixels})")
    if rows * cols * frames > limits.max_volume_voxels:
        raise UploadTooLarge(f"the DICOM image is {frames} x {rows} x {cols}, more than "
                             f"CBIR_MAX_VOLUME_VOXELS ({limits.max_volume_voxels})")
    index = frames // 2 if slice_index is None else slice_index
    if not 0 <= index < frames:
        raise UploadError(f"slice {index} is out of range: the DICOM file has {frames} "
                          f"frame(s) (0..{frames - 1})")
    with reserve(budget, rows * cols * frames * samples * BYTES_PER_PIXEL,
                  "the DICOM image"):
        try:
            pixels = np.asarray(ds.pixel_array, dtype=np.float64)
        except Exception as exc:
            raise UploadError(f"cannot decode the DICOM pixel data ({type(exc).__name__}); "
                              f"uncompressed transfer syntaxes are supported") from exc
        if samples == 3:  # RGB: luma, as for a 2-D image
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
