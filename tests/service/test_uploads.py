"""service.uploads: sniffing and decoding query files in memory, each bad file named."""

from __future__ import annotations

import gzip
import io
import struct
import zlib

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from model.data import preprocess
from model.data.preprocess import slice_to_png
from service.uploads import (
    EmptyUpload,
    Limits,
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


def test_png_and_jpeg_go_through_rule_5():
    img = np.linspace(0, 1, 256 * 256, dtype=np.float32).reshape(256, 256)
    q = decode_query(slice_to_png(img, bits=16))
    assert q.kind == "png" and q.slice is None
    assert np.abs(q.image - img).max() <= 0.5 / 65535 + 1e-7
    buf = io.BytesIO()
    Image.fromarray(np.rint(img * 255).astype(np.uint8)).save(buf, format="JPEG", quality=95)
    q = decode_query(buf.getvalue())
    assert q.kind == "jpeg" and q.image.shape == (256, 256)
    with pytest.raises(UploadError, match="has one slice"):
        decode_query(slice_to_png(img), slice_index=3)


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
    with pytest.raises(UploadTooLarge, match="voxels, more than the limit"):
        decode_query(nifti_bytes(vol), limits=Limits(max_volume_voxels=1000))
    with pytest.raises(UnsupportedUpload, match="gzip file that does not hold a NIfTI"):
        decode_query(gzip.compress(b"just text" * 100))


def test_gzip_bomb_stops_at_the_limit():
    # A header claiming a small volume, followed by 200 MB of zeros: inflation must stop early.
    head = nifti_bytes(np.ones((4, 4, 4), np.float32), gz=False)
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = comp.compress(head)
    chunk = b"\0" * (1 << 20)
    for _ in range(200):
        bomb += comp.compress(chunk)
    bomb += comp.flush()
    assert len(bomb) < 1_000_000
    with pytest.raises(UploadTooLarge, match="inflates to more than"):
        decode_query(bomb, limits=Limits(max_volume_voxels=100_000))


def test_png_bombs_and_broken_images():
    # A valid PNG header claiming 20000 x 20000 pixels, with no image data behind it.
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    header = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
              + struct.pack(">I", zlib.crc32(chunk)))
    with pytest.raises(UploadTooLarge, match="claims 20000x20000 pixels"):
        decode_query(header)
    png = slice_to_png(np.random.default_rng(0).uniform(size=(64, 64)))
    with pytest.raises(UploadError, match="truncated or corrupt PNG"):
        decode_query(png[: len(png) // 2])
    with pytest.raises(EmptyUpload):
        decode_query(b"")


def test_dicom_pixel_data_frames_and_photometry():
    img = np.zeros((300, 300), np.uint16)
    img[100:200, 50:250] = 1000
    q = decode_query(dicom_bytes(img))
    assert q.kind == "dicom" and q.image.shape == (256, 256) and q.image.max() == 1.0
    inverted = decode_query(dicom_bytes(1000 - img, photometric="MONOCHROME1"))
    np.testing.assert_allclose(inverted.image, q.image, atol=1e-6)
    frames = np.stack([img, img // 2, img * 0 + 5])
    q = decode_query(dicom_bytes(frames), slice_index=1)
    assert (q.slice, q.slice_count) == (1, 3)
    with pytest.raises(UploadError, match=r"slice 3 is out of range.*3 frame"):
        decode_query(dicom_bytes(frames), slice_index=3)
    with pytest.raises(UploadTooLarge, match="over the pixel limits"):
        decode_query(dicom_bytes(img), limits=Limits(max_image_pixels=1000))
