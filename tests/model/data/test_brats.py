"""model.data.brats: finding patients in the BraTS layouts, and loading one patient checked."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from model.data import preprocess
from model.data.brats import Case, find_cases, load_case
from model.data.nifti import VolumeError

SHAPE = (20, 20, 6)


def _t1ce(seed: int = 0) -> np.ndarray:
    """Positive values in a central cube, exact zeros elsewhere."""
    vol = np.zeros(SHAPE, dtype=np.float32)
    vol[5:15, 5:15, 1:5] = np.random.default_rng(seed).uniform(50.0, 500.0, size=(10, 10, 4))
    return vol


def _seg() -> np.ndarray:
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[8:10, 8:10, 2] = 1
    seg[10:12, 8:10, 2] = 2
    seg[8:10, 10:12, 3] = 4
    return seg


def _anatomy() -> np.ndarray:
    ana = np.zeros(SHAPE, dtype=np.uint8)
    ana[5:10, 5:15, 1:5] = 1
    ana[10:15, 5:15, 1:5] = 2
    ana[6, 6, 2] = 5
    ana[13, 6, 2] = 6
    return ana


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def _patient(folder: Path, kinds=("t1ce", "seg"), suffix: str = ".nii.gz") -> Path:
    """A patient folder named ``folder.name`` holding the given files."""
    pid = folder.name
    data = {"t1ce": _t1ce(), "seg": _seg(), "healthy": _t1ce() * 0.5, "anatomy": _anatomy()}
    for kind in kinds:
        _save(folder / f"{pid}_{kind}{suffix}", data[kind])
    return folder


def _by_pid(scan) -> dict[str, Case]:
    return {c.pid: c for c in scan.cases}


# --- find_cases --------------------------------------------------------------------------------


def test_find_cases_2019_layout(tmp_path):
    _patient(tmp_path / "HGG" / "BraTS19_X_1")
    _patient(tmp_path / "HGG" / "BraTS19_X_2", kinds=("t1ce",))
    _patient(tmp_path / "LGG" / "BraTS19_Y_1")
    _patient(tmp_path / "HGG" / ".tmp-z")  # hidden, inside a group
    scan = find_cases(tmp_path)
    cases = _by_pid(scan)
    assert sorted(cases) == ["BraTS19_X_1", "BraTS19_X_2", "BraTS19_Y_1"]
    assert scan.skipped == []
    assert cases["BraTS19_X_1"].group == "HGG"
    assert cases["BraTS19_X_2"].group == "HGG"
    assert cases["BraTS19_Y_1"].group == "LGG"
    x1 = cases["BraTS19_X_1"]
    assert x1.folder == tmp_path / "HGG" / "BraTS19_X_1"
    assert x1.t1ce == x1.folder / "BraTS19_X_1_t1ce.nii.gz"
    assert x1.seg == x1.folder / "BraTS19_X_1_seg.nii.gz"
    assert x1.healthy is None and x1.anatomy is None
    assert cases["BraTS19_X_2"].seg is None


def test_find_cases_2020_layout(tmp_path):
    _patient(tmp_path / "BraTS20_Training_001")
    _patient(tmp_path / "BraTS20_Training_002", kinds=("t1ce",))
    (tmp_path / "name_mapping.csv").write_text("a,b\n")  # the real 2020 release has these
    scan = find_cases(tmp_path)
    cases = _by_pid(scan)
    assert sorted(cases) == ["BraTS20_Training_001", "BraTS20_Training_002"]
    assert scan.skipped == []
    c1 = cases["BraTS20_Training_001"]
    assert c1.group == ""
    assert c1.t1ce == tmp_path / "BraTS20_Training_001" / "BraTS20_Training_001_t1ce.nii.gz"
    assert c1.seg == tmp_path / "BraTS20_Training_001" / "BraTS20_Training_001_seg.nii.gz"
    assert cases["BraTS20_Training_002"].seg is None


def test_find_cases_2021_layout_uncompressed_and_hidden(tmp_path):
    _patient(tmp_path / "BraTS2021_00000")
    _patient(tmp_path / "BraTS2021_00002", suffix=".nii")
    _patient(tmp_path / ".tmp-x")  # an unfinished synth folder
    _patient(tmp_path / ".tmp-x" / "BraTS2021_00009")  # not reached through a hidden folder
    scan = find_cases(tmp_path)
    cases = _by_pid(scan)
    assert sorted(cases) == ["BraTS2021_00000", "BraTS2021_00002"]
    assert all(c.group == "" for c in scan.cases)
    plain = cases["BraTS2021_00002"]
    assert plain.t1ce.name == "BraTS2021_00002_t1ce.nii"
    assert plain.seg.name == "BraTS2021_00002_seg.nii"
    assert scan.skipped == []


def test_find_cases_synth_files(tmp_path):
    _patient(tmp_path / "SYN1_0000", kinds=("t1ce", "seg", "healthy", "anatomy"))
    (case,) = find_cases(tmp_path).cases
    assert case.healthy.name == "SYN1_0000_healthy.nii.gz"
    assert case.anatomy.name == "SYN1_0000_anatomy.nii.gz"


def test_find_cases_reports_folder_without_t1ce(tmp_path):
    _patient(tmp_path / "BraTS20_Training_001")
    bad = _patient(tmp_path / "BraTS20_Training_002", kinds=("seg",))
    scan = find_cases(tmp_path)
    assert [c.pid for c in scan.cases] == ["BraTS20_Training_001"]
    assert len(scan.skipped) == 1
    folder, reason = scan.skipped[0]
    assert folder == bad
    assert "missing" in reason
    assert "BraTS20_Training_002_t1ce.nii.gz" in reason


def test_find_cases_reports_2019_folder_without_t1ce(tmp_path):
    _patient(tmp_path / "HGG" / "BraTS19_X_1")
    bad = tmp_path / "LGG" / "BraTS19_Y_1"
    bad.mkdir(parents=True)
    scan = find_cases(tmp_path)
    assert [c.pid for c in scan.cases] == ["BraTS19_X_1"]
    assert scan.skipped == [(bad, "missing BraTS19_Y_1_t1ce.nii.gz")]


def test_find_cases_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data folder"):
        find_cases(tmp_path / "absent")


# --- load_case ---------------------------------------------------------------------------------


def _case(tmp_path: Path, kinds=("t1ce", "seg", "healthy", "anatomy")) -> Case:
    _patient(tmp_path / "P1", kinds=kinds)
    (case,) = find_cases(tmp_path).cases
    return case


def test_load_case_good(tmp_path):
    case = _case(tmp_path)
    vols = load_case(case)
    raw = _t1ce()
    assert vols.case == case
    assert vols.scale == pytest.approx(np.percentile(raw[raw > 0], 99.5))
    assert np.allclose(vols.affine, np.eye(4))
    assert vols.image.dtype == np.float32
    assert vols.image.shape == SHAPE
    assert vols.image.min() >= 0.0 and vols.image.max() <= 1.0
    assert np.all(vols.image[raw == 0] == 0)
    assert vols.image.max() == 1.0
    assert vols.seg.dtype == np.uint8
    assert np.array_equal(vols.seg, _seg())
    assert vols.anatomy.dtype == np.uint8
    assert np.array_equal(vols.anatomy, _anatomy())
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


def test_load_case_without_anatomy(tmp_path):
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
    _save(case.seg, np.zeros((20, 20, 5), np.uint8))
    with pytest.raises(VolumeError) as info:
        load_case(case)
    assert info.value.path == case.seg
    assert str(info.value).startswith(f"{case.seg}: shape (20, 20, 5) does not match image")
    assert "P1_t1ce.nii.gz" in str(info.value)


def test_load_case_seg_wrong_affine(tmp_path):
    case = _case(tmp_path)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    _save(case.seg, _seg(), affine)
    with pytest.raises(VolumeError) as info:
        load_case(case)
    assert info.value.path == case.seg
    assert str(info.value).startswith(f"{case.seg}: affine does not match image P1_t1ce.nii.gz")


def test_load_case_seg_label_3(tmp_path):
    case = _case(tmp_path)
    seg = _seg()
    seg[0, 0, 0] = 3
    _save(case.seg, seg)
    with pytest.raises(VolumeError) as info:
        load_case(case)
    assert info.value.path == case.seg
    msg = str(info.value)
    assert msg.startswith(str(case.seg))
    assert "segmentation values [3] outside the allowed [0, 1, 2, 4]" in msg


def test_load_case_seg_non_integer(tmp_path):
    case = _case(tmp_path)
    seg = _seg().astype(np.float32)
    seg[0, 0, 0] = 1.5
    _save(case.seg, seg)
    with pytest.raises(VolumeError, match="segmentation has non-integer values") as info:
        load_case(case)
    assert info.value.path == case.seg


def test_load_case_anatomy_label_9(tmp_path):
    case = _case(tmp_path)
    ana = _anatomy()
    ana[1, 1, 1] = 9
    _save(case.anatomy, ana)
    with pytest.raises(VolumeError) as info:
        load_case(case)
    assert info.value.path == case.anatomy
    msg = str(info.value)
    assert msg.startswith(str(case.anatomy))
    assert "[9] outside the allowed [0, 1, 2, 3, 4, 5, 6]" in msg


def test_load_case_truncated_t1ce(tmp_path):
    case = _case(tmp_path)
    data = case.t1ce.read_bytes()
    case.t1ce.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError) as info:
        load_case(case)
    assert info.value.path == case.t1ce
    assert str(info.value).startswith(f"{case.t1ce}: truncated or corrupt data")


def test_load_case_empty_t1ce(tmp_path):
    case = _case(tmp_path, kinds=("t1ce",))
    _save(case.t1ce, np.zeros(SHAPE, np.float32))
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


def test_empty_patient_folder_is_reported_not_dropped(tmp_path):
    (tmp_path / "BraTS20_Training_003").mkdir()
    scan = find_cases(tmp_path)
    assert scan.cases == []
    assert [(p.name, reason) for p, reason in scan.skipped] == [
        ("BraTS20_Training_003", "missing BraTS20_Training_003_t1ce.nii.gz")
    ]
