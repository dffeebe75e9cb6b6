"""PNG and JPEG uploads: size from the header, then preprocessing rule 6 (``normalize_image``)."""

from __future__ import annotations

import struct

from model.data import preprocess
from service.uploads.base import (
    DecodeBudget,
    Limits,
    NotABrainSlice,
    QuerySlice,
    UploadError,
    UploadTooLarge,
    reserve,
)

# Working memory per pixel, measured on the code below: PIL's buffer, float64 grey, RGB luma and
# the normalised copies.
BYTES_PER_PIXEL = 48


def _image_size(data: bytes, kind: str) -> tuple[int, int] | None:
    """(width, height) from a PNG IHDR or the first JPEG start-of-frame marker, before decoding."""
    if kind == "png":
        if len(data) >= 24 and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        return None
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            at += 2
            continue
        (length,) = struct.unpack(">H", data[at + 2:at + 4])
        # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC)
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if at + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[at + 5:at + 9])
            return width, height
        at += 2 + length
    return None


def image_slice(data: bytes, kind: str, slice_index: int | None, limits: Limits,
                 budget: DecodeBudget | None) -> QuerySlice:
    name = kind.upper()
    if slice_index not in (None, 0):
        raise UploadError(f"slice {slice_index} asked of a 2-D {name} image, which has one "
                          f"slice (0)")
    size = _image_size(data, kind)
    if size is not None:
        width, height = size
        if width * height > limits.max_image_pixels:
            raise UploadTooLarge(f"the {name} header claims {width}x{height} pixels, more than "
                                 f"CBIR_MAX_IMAGE_PIXELS ({limits.max_image_pixels})")
        pixels = width * height
    else:  # no readable header: Pillow reads it, and refuses the file, within the limit below
        pixels = limits.max_image_pixels
    with reserve(budget, pixels * BYTES_PER_PIXEL, f"a {name} image"):
        try:
            grey, _top = preprocess.read_image(data, max_pixels=limits.max_image_pixels)
        except ValueError as exc:
            message = str(exc)
            if "too large" in message or "pixels" in message:
                raise UploadTooLarge(f"the {name} image is over CBIR_MAX_IMAGE_PIXELS "
                                     f"({limits.max_image_pixels} pixels)") from exc
            raise UploadError(message) from exc
        if not (grey > 0).any():
            raise NotABrainSlice("not a brain slice: the image has no pixel above 0 (all black)")
        return QuerySlice(image=preprocess.normalize_image(grey), kind=kind)
