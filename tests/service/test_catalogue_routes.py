"""GET /slices/{id}, its image and overlay, GET /patients/{id}: what the catalogue holds."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def test_slice_row_matches_the_catalogue(client, retrieval, indexed_slices):
    s = indexed_slices[0]
    body = client.get(f"/slices/{s.slice_id}").json()
    row, patient = retrieval.slice_row(s.slice_id)
    codes, _ = retrieval.slice_codes(s.slice_id)
    assert body["patient_id"] == patient == s.patient_id
    assert body["slice_index"] == row.slice_index == s.slice_index
    assert body["has_abnormality"] is True and body["area_tc"] == row.area_tc
    assert body["brain_area"] == row.brain_area
    assert body["normal_codes"] == codes.normal.tolist()
    assert body["abnormal_codes"] == codes.abnormal.tolist()
    assert body["overlay_url"] == f"/slices/{s.slice_id}/overlay.png"


def test_slice_images_are_the_indexed_pixels(client, indexed_slices):
    s = indexed_slices[0]
    r = client.get(f"/slices/{s.slice_id}/image.png")
    assert r.headers["content-type"] == "image/png"
    grey = np.asarray(Image.open(io.BytesIO(r.content)))
    assert grey.shape == (256, 256)
    assert np.abs(grey / 255.0 - s.image).max() <= 0.5 / 255 + 1e-6  # stored as 8-bit
    overlay = np.asarray(Image.open(io.BytesIO(
        client.get(f"/slices/{s.slice_id}/overlay.png").content)))
    assert overlay.shape == (256, 256, 3)
    coloured = (overlay[..., 0] != overlay[..., 1]) | (overlay[..., 1] != overlay[..., 2])
    assert coloured.any(), "a lesion slice's overlay shows its labels in colour"


def test_patient_lists_its_slices(client, retrieval, indexed_slices):
    s = indexed_slices[1]
    body = client.get(f"/patients/{s.patient_id}").json()
    pid = retrieval.patient_by_external[s.patient_id]
    assert body["patient_id"] == s.patient_id and body["has_labels"] is True
    ids = [x["slice_id"] for x in body["slices"]]
    assert sorted(ids) == sorted(retrieval.slice_ids[retrieval.slice_patient == pid].tolist())
    assert body["slice_count"] == len(ids)
    assert [x["slice_index"] for x in body["slices"]] == sorted(x["slice_index"]
                                                               for x in body["slices"])
