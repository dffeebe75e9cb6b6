"""model.data.preprocess: the one slice rule, the PNG/JPEG domain, 2-D queries (rule 6) and refused
uploads."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from model.data import preprocess as P

PAD = 8  # 240 -> 256


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture()
def unit_slice() -> np.ndarray:
    return np.random.default_rng(3).random((256, 256)).astype(np.float32)


# --- rule 2: intensity -----------------------------------------------------------------------


def _brain_volume(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = np.zeros((30, 30, 8), dtype=np.float32)
    vol[5:25, 5:25, 1:7] = rng.uniform(10.0, 1000.0, size=(20, 20, 6))
    vol[12, 12, 3] = 50_000.0  # one hot voxel: must not set the scale
    return vol


def test_normalize_intensity_range_and_background():
    vol = _brain_volume()
    out = P.normalize_intensity(vol)
    assert out.dtype == np.float32
    assert out.shape == vol.shape
    assert np.all(out[vol == 0] == 0)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.all(out[vol > 0] > 0)
    p995 = np.percentile(vol[vol > 0], 99.5)
    assert P.intensity_scale(vol) == pytest.approx(p995)
    # The 99.5th percentile maps to 1, the hot voxel is clipped, the median is well below 1.
    assert np.isclose(p995 / P.intensity_scale(vol), 1.0)
    assert out[12, 12, 3] == 1.0
    brain = out[vol > 0]
    assert np.isclose(np.percentile(brain, 99.5), 1.0, atol=1e-6)
    assert 0.3 < np.median(brain) < 0.7
    # Voxels below the percentile are scaled linearly.
    below = (vol > 0) & (vol < p995)
    assert np.allclose(out[below], vol[below] / p995, rtol=1e-6)


def test_normalize_intensity_with_given_scale():
    vol = _brain_volume()
    out = P.normalize_intensity(vol * 0.5, P.intensity_scale(vol))
    ref = P.normalize_intensity(vol)
    below = ref < 1
    assert np.allclose(out[below], ref[below] * 0.5, atol=1e-6)


def test_normalize_intensity_all_zero():
    with pytest.raises(ValueError, match="no voxel > 0"):
        P.normalize_intensity(np.zeros((10, 10, 4), dtype=np.float32))


# --- rules 3 and 4: axial slices in radiological view ----------------------------------------

MARKERS = [(0, 0, 0, 1), (239, 0, 1, 2), (0, 239, 2, 4), (30, 200, 3, 5), (120, 17, 4, 6)]


def _marker_volume(dtype) -> np.ndarray:
    vol = np.zeros((240, 240, 5), dtype=dtype)
    for x, y, z, v in MARKERS:
        vol[x, y, z] = v
    return vol


def test_axial_slices_shape_and_radiological_view():
    vol = _marker_volume(np.float32)
    out = P.axial_slices(vol)
    assert out.shape == (5, 256, 256)
    assert out.dtype == np.float32
    assert np.count_nonzero(out) == len(MARKERS)
    for x, y, z, v in MARKERS:
        row, col = PAD + (239 - y), PAD + (239 - x)
        assert out[z, row, col] == v, (x, y, z)
    # The patient's right (high x) is on the image's left, anterior (high y) on top.
    assert out[1, PAD + 239, PAD] == 2  # x=239, y=0: bottom-left
    assert out[2, PAD, PAD + 239] == 4  # x=0, y=239: top-right
    # The 8-pixel frame is zero padding.
    frame = np.ones((256, 256), bool)
    frame[PAD:-PAD, PAD:-PAD] = False
    assert not out[:, frame].any()


def test_axial_slices_label_map_is_voxel_exact():
    img = P.axial_slices(_marker_volume(np.float32))
    lab_vol = _marker_volume(np.uint8)
    lab = P.axial_slices(lab_vol)
    assert lab.dtype == np.uint8
    assert lab.shape == (5, 256, 256)
    assert set(np.unique(lab).tolist()) == set(np.unique(lab_vol).tolist())
    assert np.array_equal(np.argwhere(lab > 0), np.argwhere(img > 0))
    assert np.array_equal(lab.astype(np.float32), img)


def test_axial_slices_refuses_2d():
    with pytest.raises(ValueError, match=r"expected a 3-D volume, got shape \(240, 240\)"):
        P.axial_slices(np.zeros((240, 240)))


def test_center_fit_crops_centre():
    arr = np.arange(300 * 300, dtype=np.int64).reshape(300, 300)
    out = P.center_fit(arr)
    assert out.shape == (256, 256)
    start = (300 - 256) // 2  # 22
    assert np.array_equal(out, arr[start : start + 256, start : start + 256])
    assert out[0, 0] == arr[22, 22]
    assert out[-1, -1] == arr[277, 277]


def test_center_fit_mixed_pad_and_crop():
    arr = np.ones((3, 241, 300), dtype=np.float32)
    out = P.center_fit(arr)
    assert out.shape == (3, 256, 256)
    # 241 rows -> 7 before, 8 after.
    assert not out[:, :7].any() and not out[:, -8:].any()
    assert out[:, 7:-8].all()


def test_brain_area():
    stack = np.zeros((2, 256, 256))
    stack[1, :10, :10] = 0.3
    assert P.brain_area(stack).tolist() == [0, 100]
    assert P.MIN_BRAIN_PIXELS == 576


# --- rule 5: 2-D images ----------------------------------------------------------------------


@pytest.mark.parametrize("bits,step", [(8, 255), (16, 65535)])
def test_png_round_trip(unit_slice, bits, step):
    data = P.slice_to_png(unit_slice, bits=bits)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    back = P.image_to_slice(data)
    assert back.shape == (256, 256)
    assert back.dtype == np.float32
    err = np.abs(back.astype(np.float64) - unit_slice)
    assert err.max() <= 0.5 / step + 1e-6
    # Not a trivially lossless path: values really are quantised.
    assert err.max() > 0.1 / step


def test_png_bit_depth_is_as_requested(unit_slice):
    assert Image.open(io.BytesIO(P.slice_to_png(unit_slice, bits=8))).mode == "L"
    assert Image.open(io.BytesIO(P.slice_to_png(unit_slice, bits=16))).mode.startswith("I")


def test_png_out_of_range_values_are_clipped():
    arr = np.full((256, 256), 2.0, np.float32)
    arr[0, 0] = -1.0
    back = P.image_to_slice(P.slice_to_png(arr))
    assert back[0, 0] == 0.0 and back[1, 1] == 1.0


def test_rgb_rgba_16bit_and_jpeg_share_the_grey_domain(unit_slice):
    grey_png = P.slice_to_png(unit_slice, bits=8)
    grey = P.image_to_slice(grey_png)
    q = np.asarray(Image.open(io.BytesIO(grey_png)))
    assert q.dtype == np.uint8

    rgb = P.image_to_slice(_png(np.stack([q, q, q], axis=-1)))
    rgba = P.image_to_slice(_png(np.stack([q, q, q, np.full_like(q, 128)], axis=-1)))
    assert np.abs(rgb - grey).max() <= 1e-6
    assert np.abs(rgba - grey).max() <= 1e-6

    deep = P.image_to_slice(P.slice_to_png(unit_slice, bits=16))
    assert np.abs(deep - grey).max() <= 0.5 / 255 + 0.5 / 65535 + 1e-6

    # Measured with Pillow/libjpeg at quality 100 on uniform noise (the worst case for JPEG):
    # mean |error| ~0.09/255, max ~1/255. Bounds leave headroom for other libjpeg builds.
    jpeg = P.image_to_slice(_encode(Image.fromarray(q), "JPEG", quality=100))
    err = np.abs(jpeg.astype(np.float64) - grey)
    assert err.mean() <= 0.5 / 255
    assert err.max() <= 3 / 255


def test_rgb_uses_bt601_luma():
    rgb = np.zeros((256, 256, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    out = P.image_to_slice(_png(rgb))
    assert np.allclose(out, 0.299, atol=1e-6)


def test_small_image_is_centre_padded():
    arr = np.full((240, 240), 200, np.uint8)
    out = P.image_to_slice(_png(arr))
    assert out.shape == (256, 256)
    assert np.allclose(out[PAD:-PAD, PAD:-PAD], 200 / 255)
    assert not out[:PAD].any() and not out[-PAD:].any()
    assert not out[:, :PAD].any() and not out[:, -PAD:].any()


def test_large_image_is_shrunk_by_area_average():
    rng = np.random.default_rng(5)
    arr = rng.integers(0, 256, size=(512, 512), dtype=np.uint8)
    out = P.image_to_slice(_png(arr))
    assert out.shape == (256, 256)
    assert abs(out.mean() - arr.mean() / 255) <= 1e-3
    # Box average of 2x2 blocks exactly.
    blocks = arr.reshape(256, 2, 256, 2).mean(axis=(1, 3)) / 255
    assert np.abs(out - blocks).max() <= 1e-5


def test_wide_image_keeps_aspect_and_is_padded():
    arr = np.full((256, 512), 255, np.uint8)
    out = P.image_to_slice(_png(arr))
    # 512 x 256 -> 256 x 128, padded 64 rows above and below.
    assert np.allclose(out[64:192], 1.0)
    assert not out[:64].any() and not out[192:].any()


# --- rule 6: 2-D query images -----------------------------------------------------------------


def _brain_slice(seed: int = 4) -> np.ndarray:
    """A slice in the model's domain: zero background, a disc of tissue whose brightest 2 %
    saturate at 1 (its own 99.5th percentile is 1, as for a volume's brightest slices)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:256, :256]
    disc = (yy - 128) ** 2 + (xx - 128) ** 2 < 90 ** 2
    img = np.where(disc, rng.uniform(0.2, 1.02, (256, 256)), 0.0)
    return np.clip(img, 0, 1).astype(np.float32)


def _exports(unit: np.ndarray) -> dict[str, bytes]:
    """One slice as hospital systems export it."""
    q8 = np.rint(unit * 255).astype(np.uint8)
    return {
        "8-bit": _png(q8),
        "12-bit in 16-bit": _png(np.rint(unit * 4095).astype(np.uint16)),
        "16-bit": _png(np.rint(unit * 65535).astype(np.uint16)),
        "dark 8-bit": _png(np.rint(unit * 150).astype(np.uint8)),
        "RGB 8-bit": _png(np.stack([q8] * 3, axis=-1)),
        "JPEG": _encode(Image.fromarray(q8), "JPEG", quality=95),
    }


def _query(data: bytes) -> np.ndarray:
    return P.normalize_image(P.read_image(data)[0])


def test_every_export_of_a_slice_becomes_the_same_query():
    unit = _brain_slice()
    assert np.percentile(unit[unit > 0], P.INTENSITY_PERCENTILE) == 1.0
    steps = {"8-bit": 1 / 255, "12-bit in 16-bit": 1 / 4095, "16-bit": 1 / 65535,
             "dark 8-bit": 1 / 150, "RGB 8-bit": 1 / 255}
    for name, data in _exports(unit).items():
        back = _query(data)
        assert back.shape == (256, 256) and back.dtype == np.float32, name
        err = np.abs(back.astype(np.float64) - unit)
        if name == "JPEG":  # lossy: close on average, never far
            assert err.mean() <= 1 / 255 and err.max() <= 0.1, (name, err.mean(), err.max())
        else:  # half a step of the export, and the rounding of the scale itself
            assert err.max() <= steps[name], (name, err.max())


def test_a_slice_below_its_volumes_scale_comes_back_brighter():
    """What one image cannot carry (module docstring, rule 6): a slice whose own 99.5th
    percentile is s < 1 comes back as slice / s, from any export alike."""
    unit = _brain_slice() * 0.7
    for name in ("8-bit", "16-bit", "dark 8-bit"):
        back = _query(_exports(unit)[name])
        s = np.percentile(unit[unit > 0], P.INTENSITY_PERCENTILE)
        np.testing.assert_allclose(back, np.clip(unit / s, 0, 1), atol=1 / 150, err_msg=name)


def test_rule_6_is_rule_2_on_the_image_then_the_fit():
    rng = np.random.default_rng(7)
    grey = np.where(rng.random((300, 200)) < 0.8, rng.uniform(10, 4000, (300, 200)), 0)
    np.testing.assert_array_equal(
        P.normalize_image(grey),
        np.clip(P.fit_image(P.normalize_intensity(grey).astype(np.float64)), 0, 1)
        .astype(np.float32))
    with pytest.raises(ValueError, match="no voxel > 0"):
        P.normalize_image(np.zeros((64, 64)))
    with pytest.raises(ValueError, match="expected a 2-D image"):
        P.normalize_image(np.ones((2, 8, 8)))


def test_read_image_keeps_the_files_units():
    arr = np.array([[0, 4095], [100, 2000]], np.uint16)
    grey, top = P.read_image(_png(arr))
    assert top == 65535 and grey.tolist() == [[0, 4095], [100, 2000]]
    grey, top = P.read_image(_png(arr.astype(np.uint8)))
    assert top == 255


# --- refused uploads -------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b"")


def test_empty_upload():
    with pytest.raises(ValueError, match="^empty file$"):
        P.image_to_slice(b"")


def test_text_upload():
    with pytest.raises(ValueError, match="^not a readable PNG or JPEG image$"):
        P.image_to_slice(b"patient notes: nothing to see\n" * 10)


def test_truncated_png(unit_slice):
    data = P.slice_to_png(unit_slice)
    with pytest.raises(ValueError, match="^truncated or corrupt PNG image"):
        P.image_to_slice(data[: int(len(data) * 0.6)])


def test_truncated_jpeg(unit_slice):
    data = _encode(Image.fromarray(np.rint(unit_slice * 255).astype(np.uint8)), "JPEG")
    with pytest.raises(ValueError, match="^truncated or corrupt JPEG image"):
        P.image_to_slice(data[: int(len(data) * 0.6)])


def test_png_claiming_20000_square_is_refused_as_too_large():
    # Pillow's own bomb check (2 x 89.5 Mpx) fires before any pixel is decoded.
    with pytest.raises(ValueError, match="^image is too large to decode"):
        P.image_to_slice(_png_header_only(20000, 20000))


def test_png_over_our_pixel_limit():
    with pytest.raises(
        ValueError, match="^image is 5000x5000 pixels, more than the limit of 16777216 pixels$"
    ):
        P.image_to_slice(_png_header_only(5000, 5000))


def test_png_claiming_10000_square_is_refused_as_too_large():
    with pytest.raises(ValueError, match="too large|limit"):
        P.image_to_slice(_png_header_only(10000, 10000))


def test_gif_upload():
    gif = _encode(Image.fromarray(np.zeros((32, 32), np.uint8)), "GIF")
    with pytest.raises(ValueError, match="^unsupported image format GIF: send PNG or JPEG$"):
        P.image_to_slice(gif)


def test_slice_to_png_bad_bits(unit_slice):
    with pytest.raises(ValueError, match="^bits must be 8 or 16, got 12$"):
        P.slice_to_png(unit_slice, bits=12)


def test_slice_to_png_bad_rank():
    with pytest.raises(ValueError, match=r"^expected a 2-D slice, got shape \(2, 256, 256\)$"):
        P.slice_to_png(np.zeros((2, 256, 256)))
