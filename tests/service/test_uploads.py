"""service.uploads: sniffing and decoding query files in memory, each bad file named."""

from __future__ import annotations

import gzip
import io
import re
import struct
import threading
import time
import tracemalloc
import zlib

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from model.data import preprocess
from model.data.preprocess import slice_to_png
from service.uploads import (
    DecodeBudget,
    DecoderBusy,
    EmptyUpload,
    Limits,
    NotABrainSlice,
    UnsupportedUpload,
    UploadError,
    UploadTooLarge,
    decode_query,
    sniff,
)
from tests.service.conftest import nifti_bytes


def dicom_bytes(pixels: np.ndarray, photometric: str = "MONOCHROME2") -> bytes:
    """A minimal uncompressed DICOM file (one frame, or several for a (F, R, C) array)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Secret^Patient"  # must never come back anywhere
    ds.Modality = "MR"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _volume(shape=(40, 48, 12), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = rng.uniform(0, 100, shape).astype(np.float32)
    vol[:4] = 0  # some background
    return vol


def test_sniffing_reads_content_not_names():
    png = slice_to_png(np.zeros((8, 8)))
    assert sniff(png) == "png"
    assert sniff(b"\xff\xd8\xff\xe0rest") == "jpeg"
    assert sniff(nifti_bytes(_volume())) == "gzip"
    assert sniff(nifti_bytes(_volume(), gz=False)) == "nifti"
    assert sniff(dicom_bytes(np.ones((4, 4), np.uint16))) == "dicom"
    with pytest.raises(UnsupportedUpload, match="not a supported file"):
        sniff(b"hello, this is text")


def _jpeg(grey: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_png_and_jpeg_go_through_rule_6():
    """A 2-D upload is scaled by its own 99.5th percentile (preprocess.normalize_image), so any
    bit depth or window of one slice gives the same query, within quantisation."""
    img = np.linspace(0, 1, 256 * 256, dtype=np.float32).reshape(256, 256)
    q = decode_query(slice_to_png(img, bits=16))
    assert q.kind == "png" and q.slice is None
    grey, top = preprocess.read_image(slice_to_png(img, bits=16))
    np.testing.assert_array_equal(q.image, preprocess.normalize_image(grey))
    assert top == 65535 and q.image.max() == 1.0
    twelve = decode_query(_png(np.rint(img * 4095).astype(np.uint16))).image
    dark = decode_query(_png(np.rint(img * 150).astype(np.uint8))).image
    assert np.abs(twelve - q.image).max() <= 1 / 4095
    assert np.abs(dark - q.image).max() <= 1 / 150
    jpeg = decode_query(_jpeg(np.rint(img * 255).astype(np.uint8)))
    assert jpeg.kind == "jpeg" and np.abs(jpeg.image - q.image).mean() <= 1 / 255
    with pytest.raises(UploadError, match="has one slice"):
        decode_query(slice_to_png(img), slice_index=3)


@pytest.mark.parametrize(("what", "data", "words"), [
    ("all black", _png(np.zeros((256, 256), np.uint8)), "no pixel above 0 (all black)"),
    ("1x1", _png(np.full((1, 1), 200, np.uint8)), "has 1 pixel(s) above 0"),
    ("flat grey", _png(np.full((256, 256), 128, np.uint8)), "is flat"),
    ("flat grey JPEG", _jpeg(np.full((300, 300), 90, np.uint8)), "is flat"),
])
def test_what_holds_no_brain_is_refused(what, data, words):
    with pytest.raises(NotABrainSlice, match=re.escape(words)):
        decode_query(data)


def test_a_nifti_slice_outside_the_brain_is_refused():
    vol = _volume()
    vol[:, :, 0] = 0
    with pytest.raises(NotABrainSlice, match=r"slice 0 has 0 pixel\(s\) above 0"):
        decode_query(nifti_bytes(vol), slice_index=0)
    assert decode_query(nifti_bytes(vol), slice_index=1).slice == 1


def test_nifti_slice_equals_the_indexing_path():
    vol = _volume()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS storage: the reader must reorient
    for gz in (True, False):
        q = decode_query(nifti_bytes(vol, affine, gz=gz), slice_index=5)
        ras = nib.as_closest_canonical(nib.Nifti1Image(vol, affine)).get_fdata(dtype=np.float32)
        expected = preprocess.axial_slices(preprocess.normalize_intensity(ras))[5]
        assert (q.kind, q.slice, q.slice_count) == ("nifti", 5, 12)
        np.testing.assert_array_equal(q.image, expected)
    assert decode_query(nifti_bytes(vol)).slice == 6  # the middle by default


def test_nifti_errors_name_the_problem():
    vol = _volume()
    with pytest.raises(UploadError, match=r"slice 12 is out of range.*12 axial slices \(0..11\)"):
        decode_query(nifti_bytes(vol), slice_index=12)
    with pytest.raises(UploadError, match="4-D NIfTI"):
        decode_query(nifti_bytes(np.stack([vol, vol], axis=-1)))
    with pytest.raises(UploadError, match="no voxel > 0"):
        decode_query(nifti_bytes(np.zeros((8, 8, 3), np.float32)))
    raw = nifti_bytes(vol, gz=False)
    with pytest.raises(UploadError, match="truncated NIfTI"):
        decode_query(raw[: len(raw) // 2])
    with pytest.raises(UploadError, match="truncated gzip"):
        decode_query(gzip.compress(raw)[:-40])
    with pytest.raises(UploadTooLarge, match=r"voxels, more than CBIR_MAX_VOLUME_VOXELS \(1000\)"):
        decode_query(nifti_bytes(vol), limits=Limits(max_volume_voxels=1000))
    with pytest.raises(UnsupportedUpload, match="gzip file that does not hold a NIfTI"):
        decode_query(gzip.compress(b"just text" * 100))


def _gzip_stream(*parts: bytes, level: int = 9) -> bytes:
    comp = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return b"".join(comp.compress(p) for p in parts) + comp.flush()


def _bomb(inflated_mb: int = 200) -> bytes:
    """A .nii.gz whose header declares a 4x4x4 float32 volume (608 bytes in all) and whose
    stream goes on to inflate to ``inflated_mb`` MB more."""
    head = nifti_bytes(np.ones((4, 4, 4), np.float32), gz=False)
    return _gzip_stream(head, *([b"\0" * (1 << 20)] * inflated_mb))


def test_gzip_bomb_stops_at_the_declared_length():
    bomb = _bomb(200)
    assert len(bomb) < 1_000_000
    tracemalloc.start()
    try:
        with pytest.raises(UploadTooLarge, match="inflates past the 608 bytes its NIfTI header "
                                                 "declares"):
            decode_query(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak / 2**20:.1f} MB allocated while refusing a 200 MB bomb"


def test_gzip_stream_shorter_than_declared_or_with_trailing_data():
    raw = nifti_bytes(_volume(), gz=False)
    with pytest.raises(UploadError, match=r"inflates to \d+ bytes, fewer than the \d+ its NIfTI "
                                          r"header declares"):
        decode_query(gzip.compress(raw[: len(raw) - 100]))
    with pytest.raises(UploadError, match="data after the end of the gzip stream"):
        decode_query(gzip.compress(raw) + b"trailing junk")
    # Several gzip members (as `cat a.gz b.gz` makes) are one stream; zero padding is ignored.
    split = gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]) + b"\0" * 16
    np.testing.assert_array_equal(decode_query(split).image, decode_query(raw).image)


def test_header_limits_hold_before_inflating():
    # 600^3 voxels declared: refused from the header, the rest never inflated.
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    img.header.set_data_shape((600, 600, 600))
    head = img.header.binaryblock + b"\0" * 4
    with pytest.raises(UploadTooLarge, match=r"declares a \(600, 600, 600\) volume"):
        decode_query(_gzip_stream(head, b"\0" * (8 << 20)))


def test_decode_budget_bounds_concurrent_decodes():
    budget = DecodeBudget(100, wait_s=5)
    peak, active, lock = [0], [0], threading.Lock()

    def use(n):
        with budget.reserve(n, "x"):
            with lock:
                active[0] += n
                peak[0] = max(peak[0], active[0])
            time.sleep(0.02)
            with lock:
                active[0] -= n

    threads = [threading.Thread(target=use, args=(40,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] <= 100 and budget.in_use == 0
    with pytest.raises(UploadTooLarge, match="CBIR_DECODE_MEMORY_MB"), \
            budget.reserve(101, "a volume"):
        pass
    held = DecodeBudget(100, wait_s=0.05)
    with held.reserve(80, "x"), pytest.raises(DecoderBusy, match="stayed full"), \
            held.reserve(40, "y"):
        pass
    assert held.in_use == 0


def test_a_volume_reserves_its_memory_from_the_budget():
    data = nifti_bytes(_volume())
    declared = 352 + 40 * 48 * 12 * 4
    assert decode_query(data, budget=DecodeBudget(10 << 20)).kind == "nifti"
    with pytest.raises(UploadTooLarge, match=r"decoding the NIfTI volume needs about \d+ MB"):
        decode_query(data, budget=DecodeBudget(2 * declared))


def test_png_bombs_and_broken_images():
    # A valid PNG header claiming 20000 x 20000 pixels, with no image data behind it.
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    header = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
              + struct.pack(">I", zlib.crc32(chunk)))
    with pytest.raises(UploadTooLarge, match=r"claims 20000x20000 pixels, more than "
                                             r"CBIR_MAX_IMAGE_PIXELS \(16777216\)"):
        decode_query(header)
    jpeg = _jpeg(np.full((64, 64), 100, np.uint8))
    at = jpeg.index(b"\xff\xc0")  # start of frame: height, width at +5
    big = jpeg[:at + 5] + struct.pack(">HH", 30000, 30000) + jpeg[at + 9:]
    with pytest.raises(UploadTooLarge, match=r"JPEG header claims 30000x30000 pixels, more than "
                                             r"CBIR_MAX_IMAGE_PIXELS"):
        decode_query(big)
    with pytest.raises(UploadTooLarge, match=r"claims 64x64 pixels, more than "
                                             r"CBIR_MAX_IMAGE_PIXELS \(1000\)"):
        decode_query(jpeg, limits=Limits(max_image_pixels=1000))
    png = slice_to_png(np.random.default_rng(0).uniform(size=(64, 64)))
    with pytest.raises(UploadError, match="truncated or corrupt PNG"):
        decode_query(png[: len(png) // 2])
    with pytest.raises(EmptyUpload):
        decode_query(b"")


def test_dicom_pixel_data_frames_and_photometry():
    img = np.zeros((300, 300), np.uint16)
    img[100:200, 50:250] = np.linspace(200, 1000, 200, dtype=np.uint16)
    q = decode_query(dicom_bytes(img))
    assert q.kind == "dicom" and q.image.shape == (256, 256) and q.image.max() > 0.99
    inverted = decode_query(dicom_bytes(img.max() - img, photometric="MONOCHROME1"))
    np.testing.assert_allclose(inverted.image, q.image, atol=1e-6)
    frames = np.stack([img, img // 2, img * 0 + 5 + img // 100])
    q = decode_query(dicom_bytes(frames), slice_index=1)
    assert (q.slice, q.slice_count) == (1, 3)
    with pytest.raises(UploadError, match=r"slice 3 is out of range.*3 frame"):
        decode_query(dicom_bytes(frames), slice_index=3)
    with pytest.raises(UploadTooLarge, match=r"300 x 300, more than CBIR_MAX_IMAGE_PIXELS"):
        decode_query(dicom_bytes(img), limits=Limits(max_image_pixels=1000))
