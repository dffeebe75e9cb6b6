"""`cbir index add --dicomweb` against a real Orthanc (Debian packages `orthanc` and
`orthanc-dicomweb`) on 127.0.0.1: series uploaded to it, pulled, indexed, then found by a search;
no DICOM patient name or id in the catalogue, the index files, the log or the output.

Skips when Orthanc or its DICOMweb plugin is missing, unless CBIR_REQUIRE_ORTHANC=1 (CI)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from indexer.catalog import Patient, open_catalog
from indexer.store import default_db_url
from ingest.dicom import SeriesChoice
from ingest.pacs import DicomWebSource, public_url
from service.api.app import create_app
from service.cli import app
from service.config import Settings
from tests.ingest.series import (
    MODEL_AFFINE,
    PATIENT_ID,
    PATIENT_NAME,
    phantom,
    series_datasets,
    to_bytes,
    zip_of,
)

ORTHANC = Path("/usr/sbin/Orthanc")
PLUGIN_DIRS = sorted(Path("/usr/share/orthanc").glob("plugins*"))
SECRETS = (PATIENT_NAME, PATIENT_ID, PATIENT_NAME.split("^")[0], PATIENT_NAME.split("^")[1])


def _plugin() -> Path | None:
    return next((d / "libOrthancDicomWeb.so" for d in PLUGIN_DIRS
                 if (d / "libOrthancDicomWeb.so").is_file()), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory) -> str:
    """A fresh Orthanc with the DICOMweb plugin on free ports; its DICOMweb root URL."""
    plugin = _plugin()
    if not ORTHANC.is_file() or plugin is None:
        reason = ("needs Orthanc with its DICOMweb plugin (/usr/sbin/Orthanc, "
                  "libOrthancDicomWeb.so)")
        if os.environ.get("CBIR_REQUIRE_ORTHANC") == "1":
            pytest.fail(f"{reason}, and CBIR_REQUIRE_ORTHANC=1")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("orthanc")
    (root / "config").mkdir()
    port = _free_port()
    (root / "config" / "orthanc.json").write_text(json.dumps({
        "Name": "cbir-test", "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"), "HttpPort": port, "DicomPort": _free_port(),
        "DicomServerEnabled": False, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}))
    with open(root / "orthanc.log", "wb") as log:
        proc = subprocess.Popen([str(ORTHANC), str(root / "config")], stdout=log,
                                stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{base}/system", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not start:\n{(root / 'orthanc.log').read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _upload(base: str, datasets) -> None:
    with requests.Session() as http:
        for ds in datasets:
            response = http.post(f"{base}/instances", data=to_bytes(ds), timeout=30)
            assert response.ok, response.text


STUDY = "1.2.826.0.1.3680043.8.498.4242"
OFF_GRID = "1.2.826.0.1.3680043.8.498.4343"


@pytest.fixture(scope="module")
def uploaded(orthanc) -> dict:
    """On the server: a study with a T1-Gd series on the model's grid and a FLAIR acquired
    after injection, and a study whose only series is off the grid."""
    volume = phantom(2)
    t1gd = series_datasets(volume, MODEL_AFFINE, study_uid=STUDY,
                           description="AX T1 MPRAGE POST GD", seed=7)
    flair = series_datasets(volume[:, :, 70:73], MODEL_AFFINE, study_uid=STUDY,
                            description="AX FLAIR", agent="GADOBUTROL")
    coarse = MODEL_AFFINE @ np.diag([4.0, 4.0, 6.0, 1.0])
    small = series_datasets(volume[::4, ::4, 60:90:6], coarse, study_uid=OFF_GRID,
                            description="T1 POST")
    _upload(orthanc, t1gd + flair + small)
    return {"t1gd": t1gd, "flair": flair, "small": small}


def test_series_are_picked_from_the_servers_headers(orthanc, uploaded):
    source = DicomWebSource(f"{orthanc}/dicom-web")
    assert sorted(source.studies()) == sorted([STUDY, OFF_GRID])
    flair = str(uploaded["flair"][0].SeriesInstanceUID)
    assert source.pick(STUDY).series_uid == uploaded["t1gd"][0].SeriesInstanceUID
    assert source.study_of(flair) == STUDY
    assert source.pick(STUDY, flair).description == "AX FLAIR"
    with pytest.raises(SeriesChoice, match="series 1.2.3 is not on"):
        source.study_of("1.2.3")
    assert public_url("http://user:secret@pacs.example:8042/dicom-web/") == \
        "http://pacs.example:8042/dicom-web"


def test_index_add_dicomweb_then_search_finds_the_study(orthanc, uploaded, phantom_index,
                                                        tmp_path, caplog):
    study, off_grid, t1gd = STUDY, OFF_GRID, uploaded["t1gd"]
    index = shutil.copytree(phantom_index, tmp_path / "index")
    url = f"{orthanc}/dicom-web"

    caplog.set_level(logging.DEBUG)
    result = CliRunner().invoke(app, ["-v", "index", "add", "--index", str(index),
                                      "--dicomweb", url, "--study", study, "--study", off_grid,
                                      "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "1 patients / " in result.output and "index now 2 patients" in result.output
    assert f"skipped {url}/studies/{off_grid}" in result.output.replace("\n", "")
    assert "not on the model's grid" in result.output

    engine = open_catalog(default_db_url(index))
    with Session(engine) as session:
        row = session.scalars(select(Patient).where(Patient.external_id == study)).one()
        assert (row.study_uid, row.series_uid, row.cohort) == (
            study, t1gd[0].SeriesInstanceUID, "dicomweb")
        assert row.source_path == f"{public_url(url)}/studies/{study}/series/{row.series_uid}"
    engine.dispose()

    with TestClient(create_app(Settings(index_dir=index))) as client:
        response = client.post("/search", params={"space": "concat", "k": 2,
                                                  "series": t1gd[0].SeriesInstanceUID},
                               files={"file": ("series.zip", zip_of(t1gd), "application/zip")})
    assert response.status_code == 200, response.text
    body = response.json()
    top = body["neighbors"][0]
    assert body["query"]["kind"] == "dicom" and body["query"]["slice"] == 77
    assert (top["patient_id"], top["study_uid"], top["series_uid"]) == (
        study, study, t1gd[0].SeriesInstanceUID)
    assert top["distance"] == 0  # the study's own slice
    other = body["neighbors"][1]
    assert other["patient_id"] == "PHANTOM0" and other["study_uid"] is None

    stored = b"".join(p.read_bytes() for p in index.rglob("*") if p.is_file())
    for secret in SECRETS:
        assert secret.encode() not in stored, f"{secret} stored in the index"
        assert secret not in caplog.text, f"{secret} logged"
        assert secret not in result.output, f"{secret} printed"
