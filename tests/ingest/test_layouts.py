"""ingest.layouts: finding the cases of every layout, and what a scan says it skipped."""

from __future__ import annotations

import pytest

from ingest.layouts import LOOKED_FOR, NoCasesError, find_cases, find_cases_in
from tests.ingest.writers import (
    brats2023_patient,
    by_pid,
    image_array,
    msd_case,
    patient,
    save,
)

# --- find_cases --------------------------------------------------------------------------------


def test_find_cases_2019_layout(tmp_path):
    patient(tmp_path / "HGG" / "BraTS19_X_1")
    patient(tmp_path / "HGG" / "BraTS19_X_2", kinds=("t1ce",))
    patient(tmp_path / "LGG" / "BraTS19_Y_1")
    patient(tmp_path / "HGG" / ".tmp-z")  # hidden, inside a group
    scan = find_cases(tmp_path)
    cases = by_pid(scan)
    assert sorted(cases) == ["BraTS19_X_1", "BraTS19_X_2", "BraTS19_Y_1"]
    assert scan.skipped == []
    assert cases["BraTS19_X_1"].cohort == f"{tmp_path.name}/HGG"
    assert cases["BraTS19_X_2"].cohort == f"{tmp_path.name}/HGG"
    assert cases["BraTS19_Y_1"].cohort == f"{tmp_path.name}/LGG"
    assert {c.layout for c in scan.cases} == {"brats2019"}
    x1 = cases["BraTS19_X_1"]
    assert x1.folder == tmp_path / "HGG" / "BraTS19_X_1"
    assert x1.t1ce == x1.folder / "BraTS19_X_1_t1ce.nii.gz"
    assert x1.seg == x1.folder / "BraTS19_X_1_seg.nii.gz"
    assert x1.healthy is None and x1.anatomy is None
    assert cases["BraTS19_X_2"].seg is None


def test_find_cases_2020_layout(tmp_path):
    patient(tmp_path / "BraTS20_Training_001")
    patient(tmp_path / "BraTS20_Training_002", kinds=("t1ce",))
    (tmp_path / "name_mapping.csv").write_text("a,b\n")  # the real 2020 release has these
    scan = find_cases(tmp_path)
    cases = by_pid(scan)
    assert sorted(cases) == ["BraTS20_Training_001", "BraTS20_Training_002"]
    assert scan.skipped == []
    c1 = cases["BraTS20_Training_001"]
    assert c1.layout == "brats2020" and c1.cohort == tmp_path.name and c1.channel is None
    assert c1.t1ce == tmp_path / "BraTS20_Training_001" / "BraTS20_Training_001_t1ce.nii.gz"
    assert c1.seg == tmp_path / "BraTS20_Training_001" / "BraTS20_Training_001_seg.nii.gz"
    assert cases["BraTS20_Training_002"].seg is None


def test_find_cases_2021_layout_uncompressed_and_hidden(tmp_path):
    patient(tmp_path / "BraTS2021_00000")
    patient(tmp_path / "BraTS2021_00002", suffix=".nii")
    patient(tmp_path / ".tmp-x")  # an unfinished synth folder
    patient(tmp_path / ".tmp-x" / "BraTS2021_00009")  # not reached through a hidden folder
    scan = find_cases(tmp_path)
    cases = by_pid(scan)
    assert sorted(cases) == ["BraTS2021_00000", "BraTS2021_00002"]
    assert all(c.layout == "brats2020" for c in scan.cases)
    plain = cases["BraTS2021_00002"]
    assert plain.t1ce.name == "BraTS2021_00002_t1ce.nii"
    assert plain.seg.name == "BraTS2021_00002_seg.nii"
    assert scan.skipped == []


def test_find_cases_synth_files(tmp_path):
    patient(tmp_path / "SYN3_0000", kinds=("t1ce", "seg", "healthy", "anatomy"))
    (case,) = find_cases(tmp_path).cases
    assert case.healthy.name == "SYN3_0000_healthy.nii.gz"
    assert case.anatomy.name == "SYN3_0000_anatomy.nii.gz"
    assert case.layout == "synthetic"


def test_find_cases_reports_folder_withoutt1ce(tmp_path):
    patient(tmp_path / "BraTS20_Training_001")
    bad = patient(tmp_path / "BraTS20_Training_002", kinds=("seg",))
    scan = find_cases(tmp_path)
    assert [c.pid for c in scan.cases] == ["BraTS20_Training_001"]
    assert len(scan.skipped) == 1
    folder, reason = scan.skipped[0]
    assert folder == bad
    assert "missing" in reason
    assert "BraTS20_Training_002_t1ce.nii.gz" in reason


def test_find_cases_reports_2019_folder_withoutt1ce(tmp_path):
    patient(tmp_path / "HGG" / "BraTS19_X_1")
    bad = tmp_path / "LGG" / "BraTS19_Y_1"
    bad.mkdir(parents=True)
    scan = find_cases(tmp_path)
    assert [c.pid for c in scan.cases] == ["BraTS19_X_1"]
    assert scan.skipped == [(bad, "missing BraTS19_Y_1_t1ce.nii.gz (or BraTS19_Y_1-t1c.nii.gz)")]


def test_find_cases_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data folder"):
        find_cases(tmp_path / "absent")


def test_empty_patient_folder_is_reported_not_dropped(tmp_path):
    (tmp_path / "BraTS20_Training_003").mkdir()
    scan = find_cases(tmp_path)
    assert scan.cases == []
    assert [(p.name, reason) for p, reason in scan.skipped] == [
        ("BraTS20_Training_003",
         "missing BraTS20_Training_003_t1ce.nii.gz (or BraTS20_Training_003-t1c.nii.gz)")
    ]


# --- BraTS 2023-2025 and the Decathlon -----------------------------------------------------------


def test_find_cases_2023_layout_reads_t1c_and_seg_only(tmp_path):
    brats2023_patient(tmp_path, "BraTS-GLI-00000-000")
    brats2023_patient(tmp_path, "BraTS-GLI-00002-000", with_seg=False)
    scan = find_cases(tmp_path)
    cases = by_pid(scan)
    assert sorted(cases) == ["BraTS-GLI-00000-000", "BraTS-GLI-00002-000"]
    assert scan.skipped == []
    case = cases["BraTS-GLI-00000-000"]
    assert case.layout == "brats2023" and case.cohort == tmp_path.name
    assert case.t1ce.name == "BraTS-GLI-00000-000-t1c.nii.gz"
    assert case.seg.name == "BraTS-GLI-00000-000-seg.nii.gz"
    assert case.channel is None and case.healthy is None
    assert cases["BraTS-GLI-00002-000"].seg is None


def test_find_cases_msd_layout(tmp_path):
    root = tmp_path / "Task01_BrainTumour"
    msd_case(root, "BRATS_001")
    msd_case(root, "BRATS_002")
    msd_case(root, "BRATS_485", test=True)
    (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\0" * 10)  # macOS metadata
    (root / "dataset.json").write_text("{}")
    (root / "labelsTr" / "BRATS_002.nii.gz").unlink()
    scan = find_cases(root)
    cases = by_pid(scan)
    assert sorted(cases) == ["BRATS_001", "BRATS_485"]
    assert scan.skipped == [(root / "imagesTr" / "BRATS_002.nii.gz",
                             "no label file labelsTr/BRATS_002.nii.gz")]
    train, test = cases["BRATS_001"], cases["BRATS_485"]
    assert train.layout == test.layout == "msd"
    assert train.channel == test.channel == 2  # T1gd
    assert train.t1ce == root / "imagesTr" / "BRATS_001.nii.gz"
    assert train.seg == root / "labelsTr" / "BRATS_001.nii.gz"
    assert test.seg is None
    assert train.cohort == "Task01_BrainTumour"
    assert test.cohort == "Task01_BrainTumour/imagesTs"


def test_find_cases_in_gathers_every_layout(tmp_path):
    patient(tmp_path / "a" / "HGG" / "BraTS19_X_1")
    patient(tmp_path / "b" / "BraTS20_Training_001")
    brats2023_patient(tmp_path / "c", "BraTS-GLI-00000-000")
    msd_case(tmp_path / "d", "BRATS_001")
    scan = find_cases_in([tmp_path / name for name in "abcd"])
    assert [c.layout for c in scan.cases] == ["brats2019", "brats2020", "brats2023", "msd"]


def test_no_usable_case_names_the_folders_and_the_patterns(tmp_path):
    empty, odd = tmp_path / "empty", tmp_path / "odd"
    empty.mkdir()
    save(odd / "P1" / "P1_flair.nii.gz", image_array())
    with pytest.raises(NoCasesError) as info:
        find_cases_in([empty, odd])
    msg = str(info.value)
    assert msg.startswith(f"no usable case under {empty}, {odd}: looked for ")
    for pattern in LOOKED_FOR:
        assert pattern in msg
    assert f"skipped {odd / 'P1'}: missing P1_t1ce.nii.gz (or P1-t1c.nii.gz)" in msg
    assert isinstance(info.value, FileNotFoundError)  # reported as a missing folder is
