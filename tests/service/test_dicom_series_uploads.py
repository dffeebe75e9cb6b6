"""A .zip of a DICOM series uploaded as a query: the same slices as the NIfTI of the volume;
zip bombs, traversal, too many members, other grids refused with the status that names them."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from ingest import dicom
from model.data import preprocess
from model.data.nifti import read_nifti
from service.api.routes.search import _upload_error
from service.uploads import Limits, UploadError, decode_query
from tests.ingest.series import (
    MODEL_AFFINE,
    phantom,
    series_datasets,
    to_bytes,
    write_folder,
    zip_of,
)
from tests.service.conftest import nifti_bytes

SLICES = (68, 88)


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return phantom(seed=5)


@pytest.fixture(scope="module")
def datasets(volume):
    return series_datasets(volume, MODEL_AFFINE, seed=2)


def _status(exc: UploadError) -> int:
    return _upload_error(exc, "file").status_code


def test_folder_zip_and_nifti_give_the_same_slices(volume, datasets, tmp_path):
    nifti = nifti_bytes(volume.astype(np.float32), MODEL_AFFINE)
    (tmp_path / "v.nii.gz").write_bytes(nifti)
    expected = read_nifti(tmp_path / "v.nii.gz")
    folder = dicom.read_folder(write_folder(datasets, tmp_path / "series"))
    np.testing.assert_array_equal(folder.volume.array, expected.array)
    np.testing.assert_allclose(folder.volume.affine, expected.affine, atol=1e-4)
    stack = preprocess.axial_slices(preprocess.normalize_intensity(folder.volume.array))
    data = zip_of(datasets, extra={"README.txt": b"exported by a viewer"})
    for k in SLICES:
        from_zip = decode_query(data, k)
        from_nifti = decode_query(nifti, k)
        assert (from_zip.kind, from_zip.slice, from_zip.slice_count) == ("dicom", k, 155)
        np.testing.assert_array_equal(from_zip.image, from_nifti.image)
        np.testing.assert_array_equal(from_zip.image, stack[k])
    middle = decode_query(data)  # the middle one by default, as for NIfTI
    assert middle.slice == 77
    np.testing.assert_array_equal(middle.image, decode_query(nifti).image)


def test_a_multi_frame_zip_gives_the_same_slices(volume):
    data = zip_of(series_datasets(volume, MODEL_AFFINE, multiframe=True, seed=4))
    nifti = nifti_bytes(volume.astype(np.float32), MODEL_AFFINE)
    np.testing.assert_array_equal(decode_query(data, 77).image, decode_query(nifti, 77).image)


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize("name", ["../../etc/cron.d/x", "/etc/passwd", "C:/Windows/x",
                                  "a\\..\\..\\b"])
def test_path_traversal_is_refused(name):
    with pytest.raises(UploadError, match="named with an? ") as info:
        decode_query(_zip({"ok/IM1": b"x", name: b"y"}))
    assert _status(info.value) == 422 and repr(name) in str(info.value)


def test_too_many_members_and_a_zip_bomb_are_refused_before_inflating():
    with pytest.raises(UploadError, match=r"holds 5 files, more than CBIR_MAX_ZIP_MEMBERS \(4\)") \
            as info:
        decode_query(_zip({f"IM{i}": b"x" for i in range(5)}), limits=Limits(max_zip_members=4))
    assert _status(info.value) == 413
    bomb = _zip({"IM1": bytes(64 * 2**20)})  # 64 MiB of zeros in about 64 KB
    assert len(bomb) < 2**20
    with pytest.raises(UploadError, match=r"inflate to 67108864 bytes, more than "
                                          r"CBIR_MAX_ZIP_MB \(16 MB\)") as info:
        decode_query(bomb, limits=Limits(max_zip_bytes=16 * 2**20))
    assert _status(info.value) == 413


def test_a_member_that_inflates_past_its_declared_size_is_refused():
    data = bytearray(_zip({"IM1": bytes(2**20)}))
    # Lower the declared size in the local header and the central directory: a lying archive.
    declared = (2**20).to_bytes(4, "little")
    assert data.count(declared) == 2
    data = data.replace(declared, (1000).to_bytes(4, "little"))
    with pytest.raises(UploadError) as info:
        decode_query(bytes(data))
    assert _status(info.value) in (413, 422), info.value
    assert "IM1" in str(info.value)


def test_a_zip_without_dicom_and_a_series_off_the_grid_are_refused(volume):
    with pytest.raises(UploadError, match="the zip holds no DICOM file") as info:
        decode_query(_zip({"notes.txt": b"hello"}))
    assert _status(info.value) == 415
    # Off the grid and too small to hold a head to register there (a head is registered:
    # tests/ingest/test_preprocess.py).
    small = series_datasets(volume[60:100:2, 60:100:2, 40:80:5], np.diag([-2.0, -2.0, 5.0, 1.0]))
    with pytest.raises(UploadError, match=r"DICOM series: a 20x20x8 volume at 2 x 2 x 5 mm "
                                          r"is not on the model's grid") as info:
        decode_query(zip_of(small))
    assert _status(info.value) == 422
    tilted = series_datasets(volume[:, :, :20], MODEL_AFFINE, tilt_degrees=20)
    with pytest.raises(UploadError, match="DICOM series: gantry tilt") as info:
        decode_query(zip_of(tilted))
    assert _status(info.value) == 422


def test_a_zip_of_several_series_takes_the_rule_or_the_series_named(volume, datasets):
    study = str(datasets[0].StudyInstanceUID)
    other = series_datasets(volume[:, :, 70:73], MODEL_AFFINE, study_uid=study,
                            description="T1 COR GD")
    data = zip_of(datasets + other)
    with pytest.raises(UploadError, match=r"2 series and 2 look like a post-contrast T1; name "
                                          r"one by its SeriesInstanceUID") as info:
        decode_query(data)
    assert _status(info.value) == 422
    assert str(datasets[0].SeriesInstanceUID) in str(info.value)
    named = decode_query(data, 77, series_uid=str(datasets[0].SeriesInstanceUID))
    nifti = nifti_bytes(volume.astype(np.float32), MODEL_AFFINE)
    np.testing.assert_array_equal(named.image, decode_query(nifti, 77).image)


@pytest.mark.filterwarnings("ignore")  # pydicom warns of each damaged value it reads
def test_damaged_zips_and_headers_get_a_4xx_not_a_crash():
    """Bytes flipped in the archive or in the DICOM headers (pydicom raises many exception
    types, lazily): every one is refused as an UploadError, never a 500."""
    import random

    small = np.random.default_rng(0).integers(0, 1000, (16, 16, 6)).astype(np.uint16)
    members = [to_bytes(ds) for ds in series_datasets(small, np.diag([-1.0, -1, 1, 1]))]
    archive = zip_of(series_datasets(small, np.diag([-1.0, -1, 1, 1])))
    rng = random.Random(0)
    for _ in range(150):
        damaged = []
        for member in members:
            b = bytearray(member)
            for _ in range(rng.randint(0, 3)):
                b[rng.randrange(132, 900)] = rng.randrange(256)  # meta and main headers
            damaged.append(bytes(b))
        b = bytearray(_zip({f"IM{i}": m for i, m in enumerate(damaged)}) if rng.random() < 0.7
                      else archive)
        if rng.random() < 0.3:
            b[rng.randrange(len(b))] = rng.randrange(256)
        with pytest.raises(UploadError) as info:
            decode_query(bytes(b))
        assert 400 <= _status(info.value) < 500
