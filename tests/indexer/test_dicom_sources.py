"""`cbir index add --dicom`: a DICOM study folder indexed through the NIfTI path, keyed by its
StudyInstanceUID, its UIDs in the catalogue, no patient name or id anywhere."""

from __future__ import annotations

import logging
import shutil

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from indexer.catalog import Patient, open_catalog
from indexer.store import default_db_url
from ingest import dicom
from service.cli import app
from service.retrieval import Retrieval, Timings
from tests.ingest.series import (
    MODEL_AFFINE,
    PATIENT_ID,
    PATIENT_NAME,
    phantom,
    series_datasets,
    write_folder,
)


def test_index_add_dicom_folder(phantom_index, tmp_path, caplog):
    index = shutil.copytree(phantom_index, tmp_path / "index")
    volume = phantom(1)
    study = "1.2.826.0.1.3680043.8.498.77"
    t1gd = series_datasets(volume, MODEL_AFFINE, study_uid=study, description="T1 AX POST")
    flair = series_datasets(volume[:, :, :3], MODEL_AFFINE, study_uid=study,
                            description="FLAIR AX", agent="GADOBUTROL")
    folder = write_folder(t1gd + flair, tmp_path / "study")
    caplog.set_level(logging.DEBUG)
    result = CliRunner().invoke(app, ["-v", "index", "add", "--index", str(index), "--dicom",
                                      str(folder), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "1 patients / " in result.output and "index now 2 patients" in result.output
    engine = open_catalog(default_db_url(index))
    with Session(engine) as session:
        row = session.scalars(select(Patient).where(Patient.external_id == study)).one()
        assert (row.study_uid, row.series_uid, row.cohort) == (
            study, t1gd[0].SeriesInstanceUID, "dicom")
    engine.dispose()
    stored = b"".join(p.read_bytes() for p in index.rglob("*") if p.is_file())
    for secret in (PATIENT_NAME, PATIENT_ID, PATIENT_NAME.split("^")[0]):
        assert secret.encode() not in stored
        assert secret not in caplog.text and secret not in result.output
    # The study's own slice finds it at distance 0.
    retrieval = Retrieval.open(index)
    try:
        from model.data import preprocess

        ras = dicom.read_folder(folder).volume.array  # the phantom is stored L-P-S
        image = preprocess.axial_slices(preprocess.normalize_intensity(ras))[77]
        drawn = retrieval.draw(image, Timings())
        hits = retrieval.search("concat", drawn.codes, 1, Timings())
        assert hits[0].patient_id == study and hits[0].distance == 0
        assert np.isfinite(hits[0].distance)
    finally:
        retrieval.close()
