"""Every bad request gets a 4xx whose JSON `detail` says what was wrong; nothing is stored."""

from __future__ import annotations

import gzip
import struct
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient

from model.data.preprocess import slice_to_png
from service.api.app import create_app
from service.config import Settings
from tests.service.conftest import nifti_bytes


def _detail(r) -> str:
    assert r.headers["content-type"].startswith("application/json"), r.text
    detail = r.json()["detail"]
    if isinstance(detail, list):  # validation errors: where and what
        return " ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in detail)
    return detail


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = b"IDAT" + zlib.compress(b"\0" * 1000)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + struct.pack(">I", len(idat) - 4) + idat
            + struct.pack(">I", zlib.crc32(idat)))


def _volume() -> np.ndarray:
    vol = np.random.default_rng(0).uniform(0, 100, (32, 32, 10)).astype(np.float32)
    return vol


PNG = slice_to_png(np.random.default_rng(1).uniform(size=(64, 64)))
BAD_UPLOADS = [
    ("empty file", b"", 400, "empty file"),
    ("text file", b"patient notes, not an image\n" * 10, 415, "not a supported file"),
    ("truncated PNG", PNG[: len(PNG) // 2], 422, "truncated or corrupt PNG"),
    ("20000x20000 PNG header", _png_header(20000, 20000), 413,
     "claims 20000x20000 pixels, more than CBIR_MAX_IMAGE_PIXELS (16777216)"),
    ("all-black PNG", slice_to_png(np.zeros((256, 256))), 422, "no pixel above 0 (all black)"),
    ("1x1 PNG", slice_to_png(np.full((1, 1), 0.5)), 422, "has 1 pixel(s) above 0"),
    ("flat grey PNG", slice_to_png(np.full((256, 256), 0.5)), 422, "is flat"),
    ("4-D NIfTI", nifti_bytes(np.stack([_volume()] * 3, -1)), 422, "4-D NIfTI"),
    ("gzip of text", gzip.compress(b"x" * 5000), 415, "does not hold a NIfTI"),
    ("all-zero NIfTI", nifti_bytes(np.zeros((8, 8, 4), np.float32)), 422, "no voxel > 0"),
]


@pytest.mark.parametrize(("what", "data", "status", "words"), BAD_UPLOADS,
                         ids=[b[0] for b in BAD_UPLOADS])
def test_bad_upload_gets_its_4xx_and_message(client, what, data, status, words):
    r = client.post("/search?space=normal", files={"file": ("upload.png", data)})
    assert r.status_code == status, (what, r.status_code, r.text)
    assert words in _detail(r) and _detail(r).startswith("file: ")


def test_nifti_slice_out_of_range(client):
    r = client.post("/search?slice=10", files={"file": ("v.nii.gz", nifti_bytes(_volume()))})
    assert r.status_code == 422
    assert "slice 10 is out of range: the volume has 10 axial slices (0..9)" in _detail(r)


@pytest.mark.parametrize(("query", "words"), [
    ("space=lesion", "space"),
    ("k=0", "greater than or equal to 1"),
    ("k=101", "maximum of 100 (CBIR_MAX_K)"),
    ("k=1001", "less than or equal to 1000"),
    ("k=ten", "valid integer"),
    ("slice=-1", "greater than or equal to 0"),
    ("has_abnormality=maybe", "valid boolean"),
])
def test_bad_query_parameters(client, query, words):
    r = client.post(f"/search?{query}", files={"file": ("q.png", PNG)})
    assert r.status_code == 422, r.text
    assert words in _detail(r)


def test_missing_file_field_and_unknown_patient(client):
    r = client.post("/search", files={"other": ("q.png", PNG)})
    assert r.status_code == 422 and "file" in _detail(r) and "Field required" in _detail(r)
    r = client.post("/compose", files={"normal": ("q.png", PNG), "abnormal": ("t.txt", b"hi")})
    assert r.status_code == 415 and _detail(r).startswith("abnormal: ")


@pytest.mark.parametrize("path", ["/search", "/compose"])
def test_unknown_patient_is_refused_before_the_model_runs(client, path, indexed_png):
    data = indexed_png.read_bytes()
    files = ({"file": ("q.png", data)} if path == "/search"
             else {"normal": ("q.png", data), "abnormal": ("q.png", data)})
    r = client.post(f"{path}?exclude_patient=NOBODY", files=files)
    assert r.status_code == 404 and "exclude_patient: patient 'NOBODY' is not in the index" in \
        _detail(r)
    assert "encode" not in r.headers.get("server-timing", "")
    assert "decode" not in r.headers.get("server-timing", "")


def test_two_files_in_one_field_are_refused(client, indexed_png):
    data = indexed_png.read_bytes()
    r = client.post("/search", files=[("file", ("a.png", data)), ("file", ("b.png", data))])
    assert r.status_code == 422, r.text
    assert _detail(r) == "file: 2 files were sent in this field; send exactly one"
    r = client.post("/compose", files=[("normal", ("a.png", data)), ("abnormal", ("b.png", data)),
                                       ("abnormal", ("c.png", data))])
    assert r.status_code == 422 and _detail(r).startswith("abnormal: 2 files were sent")


@pytest.mark.parametrize(("body", "headers", "words"), [
    (b'{"file": "x"}', {"content-type": "application/json"},
     "not multipart form data (application/json)"),
    (b"\x89PNG raw bytes", {}, "not multipart form data (no Content-Type)"),
    (b"file=abc", {"content-type": "application/x-www-form-urlencoded"},
     "not multipart form data (application/x-www-form-urlencoded)"),
    (b"garbage", {"content-type": "multipart/form-data; boundary=xyz"},
     "not valid multipart form data"),
    (b"garbage", {"content-type": "multipart/form-data"}, "not valid multipart form data"),
])
def test_a_body_that_is_not_multipart_is_a_400(client, body, headers, words):
    r = client.post("/search", content=body, headers=headers)
    assert r.status_code == 400, r.text
    assert words in _detail(r) and "curl -F file=@slice.png" in _detail(r)


def test_validation_errors_do_not_echo_the_input(client):
    secret = "SECRET-PIXELS-" * 20
    # a text field where a file belongs (and a file part, so that the body is multipart)
    r = client.post("/search", data={"file": secret}, files={"other": ("x.png", PNG)})
    assert r.status_code == 422
    assert "SECRET" not in r.text


@pytest.mark.parametrize("path", ["/slices/999999", "/slices/999999/image.png",
                                  "/slices/999999/overlay.png", "/patients/NOBODY"])
def test_unknown_ids_get_404(client, path):
    r = client.get(path)
    assert r.status_code == 404 and "not in the index" in _detail(r)


def test_huge_slice_id_is_a_422_not_a_crash(client):
    r = client.get(f"/slices/{2**70}")
    assert r.status_code == 422 and "less than or equal to" in _detail(r)


@pytest.fixture(scope="module")
def small_limit_client(service_index):
    with TestClient(create_app(Settings(index_dir=service_index, max_upload_mb=0.05))) as c:
        yield c


def test_body_over_the_limit_is_refused(small_limit_client):
    big = b"\0" * 100_000
    r = small_limit_client.post("/search", files={"file": ("q.png", big)})
    assert r.status_code == 413 and "CBIR_MAX_UPLOAD_MB" in _detail(r)

    def chunks():  # no Content-Length: the limit holds while streaming
        for _ in range(10):
            yield b"\0" * 10_000

    r = small_limit_client.post("/search", content=chunks(),
                                headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413 and "CBIR_MAX_UPLOAD_MB" in _detail(r)


def test_uploads_never_spill_to_a_temporary_file(client, monkeypatch):
    from starlette import formparsers

    def refuse(*_a, **_k):
        raise AssertionError("an upload was written to a temporary file")

    monkeypatch.setattr(formparsers.SpooledTemporaryFile, "rollover", refuse)
    noise = np.random.default_rng(2).integers(0, 255, (1200, 1200), dtype=np.uint8)
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    assert len(buf.getvalue()) > 1_100_000  # above Starlette's default 1 MB spool threshold
    r = client.post("/search?k=1", files={"file": ("big.png", buf.getvalue())})
    assert r.status_code == 200, r.text


def test_dicom_tags_never_come_back(client):
    from tests.service.test_uploads import dicom_bytes

    img = np.zeros((64, 64), np.uint16)
    img[10:50, 10:50] = np.linspace(300, 900, 40, dtype=np.uint16)
    r = client.post("/search?k=2", files={"file": ("x.dcm", dicom_bytes(img))})
    assert r.status_code == 200
    assert "Secret" not in r.text and "Patient" not in r.text
