"""The one preprocessing path: training, indexing and querying all turn a slice into a tensor here.

The rule, exactly:

1. Volumes are read in RAS+ voxel order (``nifti.read_nifti``).
2. Intensity, per volume: brain voxels are those > 0 (BraTS volumes are skull-stripped with a
   background of exactly 0). ``scale`` is the 99.5th percentile of brain voxels; every voxel
   becomes ``clip(v / scale, 0, 1)`` as float32. The percentile, not the maximum, so that a few
   hot voxels (vessels, enhancing rim) do not darken the whole volume.
3. Axial slice ``k`` is ``vol[:, :, k]`` shown in radiological view: rows run anterior (top) to
   posterior, columns run from the patient's right (left of the image) to the patient's left.
4. Each slice is centre-padded with zeros, or centre-cropped, to 256 x 256 (240 -> 256 pads 8 on
   each side). No interpolation, so a label map goes through steps 1, 3 and 4 voxel-exactly.
5. A 2-D image already in this domain (``slice_to_png`` writes one) is read back by
   ``image_to_slice``: 8-bit values are divided by 255, 16-bit by 65535; RGB becomes grey by
   ITU-R BT.601 luma (equal channels map to that same grey). Images up to 256 pixels on each side
   are centre-padded like step 4; larger ones are first shrunk (area average) so the longer side
   is 256 (``fit_image``).
6. A 2-D query image from anywhere else (an uploaded PNG or JPEG: a PACS export, a screenshot)
   carries no volume and no agreed value range (12-bit values in a 16-bit PNG, a dark 8-bit
   export), so ``normalize_image`` treats it as a volume of one slice: its grey values (luma for
   RGB, in the file's own units) go through rule 2 with the image's own 99.5th percentile of
   pixels > 0, then the fit of rule 5. Any export of one slice that is a positive multiple of
   another (any bit depth, any window that starts at 0) maps to the same slice, up to the
   quantisation of the darker one. An image holding no pixel > 0 is refused, as a volume is.

   What a single image cannot carry is its volume's scale: a slice exported from a normalised
   volume comes back unchanged only where at least 0.5 % of its brain pixels reached the
   volume's scale (saturated at 1); otherwise it comes back brighter by 1 / (its own 99.5th
   percentile). In a synthetic cohort of three patients, 25 to 51 % of the slices of each
   patient's middle half were unchanged; the others came back up to 1.7 times brighter.
   Rule 6 serves uploads only: training and indexing read volumes (rules 1 to 4), so it is no
   part of ``PREPROCESSING_VERSION``.

A slice exported to PNG by ``slice_to_png`` and read back by ``image_to_slice`` differs from the
original by at most half a quantisation step: 0.5/255 (8-bit) or 0.5/65535 (16-bit).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

# Bump when any rule above changes: checkpoints and indices record it.
PREPROCESSING_VERSION = 1

SLICE_SIZE = 256
INTENSITY_PERCENTILE = 99.5
# A slice "contains brain" when at least this fraction of its 240 x 240 BraTS grid is brain.
MIN_BRAIN_FRACTION = 0.01
MIN_BRAIN_PIXELS = int(MIN_BRAIN_FRACTION * 240 * 240)  # 576
# Refuse to decode 2-D images larger than this many pixels (decompression bombs).
MAX_IMAGE_PIXELS = 4096 * 4096

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


def intensity_scale(volume: np.ndarray) -> float:
    """Rule 2's ``scale``: the 99.5th percentile of the brain (> 0) voxels."""
    vol = np.asarray(volume)
    brain = vol[vol > 0]
    if brain.size == 0:
        raise ValueError("volume has no voxel > 0: no brain to normalise")
    return float(np.percentile(brain, INTENSITY_PERCENTILE))


def normalize_intensity(volume: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Rule 2: ``clip(v / scale, 0, 1)`` as float32; ``scale`` defaults to the volume's own.

    Pass another volume's scale to compare the two in one domain (a synthetic patient's healthy
    ground truth is normalised with its lesioned image's scale).
    """
    vol = np.asarray(volume, dtype=np.float32)
    if scale is None:
        scale = intensity_scale(vol)
    return np.clip(vol / np.float32(scale), 0.0, 1.0).astype(np.float32, copy=False)


def center_fit(arr: np.ndarray, size: int = SLICE_SIZE) -> np.ndarray:
    """Rule 4: centre-pad with zeros or centre-crop the last two axes to ``size`` x ``size``."""
    out = arr
    for axis in (-2, -1):
        n = out.shape[axis]
        if n < size:
            before = (size - n) // 2
            pad = [(0, 0)] * out.ndim
            pad[axis] = (before, size - n - before)
            out = np.pad(out, pad)
        elif n > size:
            start = (n - size) // 2
            out = np.take(out, np.arange(start, start + size), axis=axis)
    return np.ascontiguousarray(out)


def axial_slices(volume: np.ndarray) -> np.ndarray:
    """Rules 3 and 4: a RAS+ volume (X, Y, Z) -> a stack of axial slices (Z, 256, 256).

    Works for images and label maps alike (pure indexing, dtype kept).
    """
    if volume.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {volume.shape}")
    # (X, Y, Z) -> (Z, Y, X), then flip Y (anterior on top) and X (patient's right on the left).
    stack = np.transpose(volume, (2, 1, 0))[:, ::-1, ::-1]
    return center_fit(stack)


def brain_area(slice_or_stack: np.ndarray) -> np.ndarray | int:
    """Number of brain (> 0) pixels per slice."""
    return (np.asarray(slice_or_stack) > 0).sum(axis=(-2, -1))


def slice_to_png(slice2d: np.ndarray, bits: int = 8) -> bytes:
    """Export a [0, 1] slice as an 8- or 16-bit grey PNG (values rounded to the nearest step)."""
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    arr = np.clip(np.asarray(slice2d, dtype=np.float64), 0.0, 1.0)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {arr.shape}")
    top = 255 if bits == 8 else 65535
    q = np.rint(arr * top).astype(np.uint8 if bits == 8 else np.uint16)
    buf = io.BytesIO()
    Image.fromarray(q, mode=None).save(buf, format="PNG")
    return buf.getvalue()


def _open_image(data: bytes, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"image is too large to decode ({exc})") from exc
    except Exception as exc:
        raise ValueError("not a readable PNG or JPEG image") from exc
    w, h = img.size
    if w * h > max_pixels:
        raise ValueError(f"image is {w}x{h} pixels, more than the limit of {max_pixels} pixels")
    if img.format not in ("PNG", "JPEG"):
        raise ValueError(f"unsupported image format {img.format}: send PNG or JPEG")
    try:
        img.load()
    except Exception as exc:
        raise ValueError(f"truncated or corrupt {img.format} image ({exc})") from exc
    return img


def _grey(img: Image.Image) -> tuple[np.ndarray, float]:
    """PIL image of any common mode -> float64 grey in the file's own units, and the top of its
    range (255 or 65535). RGB becomes BT.601 luma, alpha is dropped."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(img, dtype=np.float64), 65535.0
    if mode == "I":  # 16-bit grey PNGs may open as 32-bit ints
        arr = np.asarray(img, dtype=np.float64)
        if arr.min() < 0 or arr.max() > 65535:
            raise ValueError("image has integer values outside the 16-bit range")
        return arr, 65535.0
    if mode == "F":
        raise ValueError("floating-point images are not supported: send 8- or 16-bit PNG")
    if mode in ("1", "L", "P", "LA", "PA", "RGBA", "RGB", "CMYK", "YCbCr", "La", "RGBa"):
        if mode in ("1", "P", "PA", "CMYK", "YCbCr", "La", "RGBa"):
            img = img.convert("RGBA" if "A" in mode or "a" in mode else "RGB")
        arr = np.asarray(img, dtype=np.float64)
        if arr.ndim == 3:
            if arr.shape[2] in (2, 4):  # drop alpha
                arr = arr[..., :-1]
            arr = arr @ _LUMA if arr.shape[2] == 3 else arr[..., 0]
        return arr, 255.0
    raise ValueError(f"unsupported image mode {mode}")


def read_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[np.ndarray, float]:
    """PNG or JPEG bytes (8/16-bit, grey or RGB) -> (grey float64 (H, W) in the file's own
    units, the top of its range: 255 or 65535).

    Raises ``ValueError`` naming the problem: empty, not an image, truncated, too many pixels.
    """
    if not data:
        raise ValueError("empty file")
    return _grey(_open_image(data, max_pixels))


def fit_image(arr: np.ndarray, size: int = SLICE_SIZE) -> np.ndarray:
    h, w = arr.shape
    if max(h, w) > size:
        scale = size / max(h, w)
        new = (max(1, round(w * scale)), max(1, round(h * scale)))
        arr = np.asarray(
            Image.fromarray(arr.astype(np.float32), mode="F").resize(new, Image.Resampling.BOX),
            dtype=np.float64,
        )
    return center_fit(arr, size)


def image_to_slice(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Rule 5: PNG or JPEG bytes of a slice in this domain -> a (256, 256) float32 slice in
    [0, 1], values divided by the top of the file's range (the inverse of ``slice_to_png``)."""
    grey, top = read_image(data, max_pixels)
    return np.clip(fit_image(grey / top), 0.0, 1.0).astype(np.float32)


def normalize_image(grey: np.ndarray) -> np.ndarray:
    """Rule 6: a 2-D query image's grey values (any units) -> a (256, 256) float32 slice in
    [0, 1]: rule 2 with the image as its own volume, then the fit of rule 5.

    Raises ``ValueError`` when no pixel is > 0.
    """
    grey = np.asarray(grey)
    if grey.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {grey.shape}")
    unit = normalize_intensity(grey)  # float32, rule 2
    return np.clip(fit_image(unit.astype(np.float64)), 0.0, 1.0).astype(np.float32)
