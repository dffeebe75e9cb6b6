"""ingest.volumes: loading one case checked, its labels in ours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ingest.layouts import Case, find_cases
from ingest.volumes import load_case
from model.data import preprocess
from model.data.nifti import VolumeError, read_nifti
from tests.ingest.writers import (
    SHAPE,
    anatomy_array,
    brats2023_patient,
    image_array,
    msd_case,
    patient,
    save,
    seg_array,
)


def _case(tmp_path: Path, kinds=("t1ce", "seg", "healthy", "anatomy")) -> Case:
    patient(tmp_path / "P1", kinds=kinds)
    (case,) = find_cases(tmp_path).cases
    return case


def test_load_case_good(tmp_path):
    case = _case(tmp_path)
    vols = load_case(case)
    raw = image_array()
    assert vols.case == case
    assert vols.scale == pytest.approx(np.percentile(raw[raw > 0], 99.5))
    assert np.allclose(vols.affine, np.eye(4))
    assert vols.image.dtype == np.float32
    assert vols.image.shape == SHAPE
    assert vols.image.min() >= 0.0 and vols.image.max() <= 1.0
    assert np.all(vols.image[raw == 0] == 0)
    assert vols.image.max() == 1.0
    assert vols.seg.dtype == np.uint8
    assert np.array_equal(vols.seg, seg_array())
    assert vols.anatomy.dtype == np.uint8
    assert np.array_equal(vols.anatomy, anatomy_array())
    # healthy = t1ce * 0.5 on disk, normalised with the image's scale (not its own): it is half
    # the image wherever the image is not clipped at 1 ...
    assert vols.healthy.dtype == np.float32
    unclipped = vols.image < 1.0
    assert unclipped.sum() > 0.9 * unclipped.size
    assert np.abs(vols.healthy[unclipped] - vols.image[unclipped] * 0.5).max() <= 1e-6
    # ... and exactly rule 2 with that scale everywhere.
    expected = np.clip(raw * 0.5 / np.float32(vols.scale), 0, 1)
    assert np.abs(vols.healthy - expected).max() <= 1e-6
    assert vols.healthy.max() < 0.75  # its own scale would have stretched it to 1


def test_load_case_without_healthy(tmp_path):
    vols = load_case(_case(tmp_path), with_healthy=False)
    assert vols.healthy is None
    assert vols.seg is not None


def test_load_case_withoutanatomy(tmp_path):
    case = _case(tmp_path)
    assert case.anatomy is not None
    vols = load_case(case, with_healthy=False, with_anatomy=False)
    assert vols.anatomy is None and vols.healthy is None
    assert vols.seg is not None


def test_load_case_image_only(tmp_path):
    vols = load_case(_case(tmp_path, kinds=("t1ce",)))
    assert vols.seg is None and vols.anatomy is None and vols.healthy is None
    assert vols.image.shape == SHAPE


def test_load_case_seg_wrong_shape(tmp_path):
    case = _case(tmp_path)
    save(case.seg, np.zeros((20, 20, 5), np.uint8))
    with pytest.raises(VolumeError) as info:
        load_case(case)
    assert info.value.path == case.seg
    assert str(info.value).startswith(f"{case.seg}: shape (20, 20, 5) does not match image")
    assert "P1_t1ce.nii.gz" in str(info.value)


def test_load_case_seg_wrong_affine(tmp_path):
    case = _case(tmp_path)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    save(case.seg, seg_array(), affine)
    with pytest.raises(VolumeError) as info:
        load_case(case)
    assert info.value.path == case.seg
    assert str(info.value).startswith(f"{case.seg}: affine does not match image P1_t1ce.nii.gz")


def test_load_case_seg_label_3(tmp_path):
    case = _case(tmp_path)
    seg = seg_array()
    seg[0, 0, 0] = 3
    save(case.seg, seg)
    with pytest.raises(VolumeError) as info:
        load_case(case)
    assert info.value.path == case.seg
    msg = str(info.value)
    assert msg.startswith(str(case.seg))
    assert "segmentation values [3] are not synthetic labels (expected [0, 1, 2, 4])" in msg


def test_load_case_seg_non_integer(tmp_path):
    case = _case(tmp_path)
    seg = seg_array().astype(np.float32)
    seg[0, 0, 0] = 1.5
    save(case.seg, seg)
    with pytest.raises(VolumeError, match="segmentation has non-integer values") as info:
        load_case(case)
    assert info.value.path == case.seg


def test_load_case_anatomy_label_9(tmp_path):
    case = _case(tmp_path)
    ana = anatomy_array()
    ana[1, 1, 1] = 9
    save(case.anatomy, ana)
    with pytest.raises(VolumeError) as info:
        load_case(case)
    assert info.value.path == case.anatomy
    msg = str(info.value)
    assert msg.startswith(str(case.anatomy))
    assert "[9] outside the allowed [0, 1, 2, 3, 4, 5, 6]" in msg


def test_load_case_truncatedt1ce(tmp_path):
    case = _case(tmp_path)
    data = case.t1ce.read_bytes()
    case.t1ce.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError) as info:
        load_case(case)
    assert info.value.path == case.t1ce
    assert str(info.value).startswith(f"{case.t1ce}: truncated or corrupt data")


def test_load_case_emptyt1ce(tmp_path):
    case = _case(tmp_path, kinds=("t1ce",))
    save(case.t1ce, np.zeros(SHAPE, np.float32))
    with pytest.raises(VolumeError) as info:
        load_case(case)
    assert info.value.path == case.t1ce
    assert "no voxel > 0" in str(info.value)


def test_loaded_image_slices_are_voxel_exact(tmp_path):
    # The loaded image passes through axial_slices voxel-exactly (no interpolation).
    vols = load_case(_case(tmp_path))
    slices = preprocess.axial_slices(vols.image)
    assert slices.shape == (SHAPE[2], 256, 256)
    assert np.count_nonzero(slices) == np.count_nonzero(vols.image)


# --- every layout's labels in ours ---------------------------------------------------------------


def test_brats2023_labels_map_to_ours_and_other_modalities_are_ignored(tmp_path):
    brats2023_patient(tmp_path, "BraTS-GLI-00000-000")
    (case,) = find_cases(tmp_path).cases
    vols = load_case(case)
    assert np.array_equal(vols.seg, seg_array())  # 3 ET read as our 4
    raw = image_array()
    assert np.allclose(vols.image, np.clip(raw / np.percentile(raw[raw > 0], 99.5), 0, 1))


def test_brats2023_label_4_is_refused(tmp_path):
    folder = brats2023_patient(tmp_path, "BraTS-GLI-00000-000")
    save(folder / "BraTS-GLI-00000-000-seg.nii.gz", seg_array())  # a 2020-style label map
    (case,) = find_cases(tmp_path).cases
    with pytest.raises(VolumeError, match=r"values \[4\] are not brats2023 labels") as info:
        load_case(case)
    assert info.value.path == case.seg


def test_msd_reads_the_t1gd_channel_and_maps_its_labels(tmp_path):
    msd_case(tmp_path, "BRATS_001")
    (case,) = find_cases(tmp_path).cases
    vols = load_case(case)
    assert vols.image.shape == SHAPE
    raw = image_array()  # channel 2; the other three are decoys
    assert np.allclose(vols.image, np.clip(raw / np.percentile(raw[raw > 0], 99.5), 0, 1))
    assert np.array_equal(vols.seg, seg_array())  # 1 edema -> 2, 2 non-enhancing -> 1, 3 -> 4


def test_msd_test_image_loads_without_labels(tmp_path):
    msd_case(tmp_path, "BRATS_485", test=True)
    (case,) = find_cases(tmp_path).cases
    vols = load_case(case)
    assert vols.seg is None and vols.image.shape == SHAPE


def test_a_4d_image_without_a_channel_is_refused_and_a_missing_channel_named(tmp_path):
    path = msd_case(tmp_path, "BRATS_001")
    with pytest.raises(VolumeError, match=r"expected a 3-D volume, got shape \(20, 20, 6, 4\)"):
        read_nifti(path)
    with pytest.raises(VolumeError, match=r"a channel 4, got shape \(20, 20, 6, 4\)"):
        read_nifti(path, channel=4)
    assert np.array_equal(read_nifti(path, channel=2).array, image_array())
