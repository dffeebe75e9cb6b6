"""`cbir index add --dicom`: a DICOM study folder indexed through the NIfTI path, keyed by its
StudyInstanceUID, its UIDs in the catalogue, no patient name or id anywhere."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from indexer.catalog import Patient, open_catalog
from indexer.store import default_db_url
from model.data import preprocess
from service.cli import app
from service.retrieval import Retrieval, Timings
from tests.ingest.series import MODEL_AFFINE, PATIENT_ID, PATIENT_NAME


def test_index_add_dicom_folder(dicom_index):
    assert "1 patients / " in dicom_index.output
    assert "index now 2 patients" in dicom_index.output
    assert "picked series" in dicom_index.log  # the T1-Gd rule chose between two series
    engine = open_catalog(default_db_url(dicom_index.index))
    with Session(engine) as session:
        row = session.scalars(select(Patient).where(
            Patient.external_id == dicom_index.study_uid)).one()
        assert (row.study_uid, row.series_uid, row.cohort) == (
            dicom_index.study_uid, dicom_index.series_uid, "dicom")
    engine.dispose()
    stored = b"".join(p.read_bytes() for p in dicom_index.index.rglob("*") if p.is_file())
    for secret in (PATIENT_NAME, PATIENT_ID, *PATIENT_NAME.split("^")):
        assert secret.encode() not in stored
        assert secret not in dicom_index.log and secret not in dicom_index.output
    # The study's own slice finds it at distance 0.
    ras = np.asanyarray(nib.as_closest_canonical(
        nib.Nifti1Image(dicom_index.volume, MODEL_AFFINE)).dataobj)
    image = preprocess.axial_slices(preprocess.normalize_intensity(ras))[77]
    retrieval = Retrieval.open(dicom_index.index)
    try:
        hits = retrieval.search("concat", retrieval.draw(image, Timings()).codes, 1, Timings())
        assert hits[0].patient_id == dicom_index.study_uid and hits[0].distance == 0
        assert (hits[0].study_uid, hits[0].series_uid) == (dicom_index.study_uid,
                                                           dicom_index.series_uid)
    finally:
        retrieval.close()


def test_index_add_refuses_mixed_or_missing_sources(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["index", "add", "--index", str(tmp_path)])
    assert result.exit_code == 2 and "give one source: --data, --dicom or --dicomweb" in \
        result.output
    result = runner.invoke(app, ["index", "add", "--index", str(tmp_path), "--data", "x",
                                 "--dicom", "y"])
    assert result.exit_code == 2 and "not --data and --dicom" in result.output
    result = runner.invoke(app, ["index", "add", "--index", str(tmp_path), "--dicom", "y",
                                 "--study", "1.2"])
    assert result.exit_code == 2 and "--study goes with --dicomweb" in result.output
