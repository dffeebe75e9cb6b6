"""/search with a NIfTI volume outside the model's space: preprocessed unless preprocess=false."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def off_grid_t1ce(tmp_path_factory):
    from tests.ingest.test_preprocess import _head, _move, _save_las

    path = tmp_path_factory.mktemp("upload") / "head_t1ce.nii.gz"
    array, affine = _move(_head(), order=1)
    _save_las(np.rint(array * 4), affine, path, np.int16)
    return path


def test_search_preprocesses_an_off_grid_volume_unless_told_not_to(client, off_grid_t1ce):
    data = off_grid_t1ce.read_bytes()
    r = client.post("/search?slice=80", files={"file": ("head.nii.gz", data)})
    assert r.status_code == 200, r.text
    assert (r.json()["query"]["slice"], r.json()["query"]["slice_count"]) == (80, 155)
    r = client.post("/search?slice=20&preprocess=false", files={"file": ("head.nii.gz", data)})
    assert r.status_code == 200, r.text
    assert (r.json()["query"]["slice"], r.json()["query"]["slice_count"]) == (20, 40)


def test_a_volume_too_small_for_a_head_is_used_as_it_is(client):
    from tests.service.conftest import nifti_bytes

    vol = np.zeros((64, 64, 10), np.float32)
    vol[16:48, 16:48] = np.random.default_rng(0).uniform(0.2, 1.0, (32, 32, 10))
    r = client.post("/search?slice=4", files={"file": ("v.nii.gz", nifti_bytes(vol))})
    assert r.status_code == 200, r.text
    assert r.json()["query"]["slice_count"] == 10
