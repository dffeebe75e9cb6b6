"""`cbir synth`: the acceptance properties of a synthetic cohort, on real files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from ingest.layouts import find_cases
from ingest.volumes import load_case
from model.data import preprocess
from model.data.synth import cohort
from model.data.synth import tissue as T
from model.data.synth.phantom import GRID_SHAPE, INFLUENCE_MARGIN_MM
from tests.conftest import COHORT_PATIENTS, COHORT_SEED

KINDS = ("t1ce", "seg", "healthy", "anatomy", "tissue")


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    pid = folder.name
    return {k: np.asarray(nib.load(folder / f"{pid}_{k}.nii.gz").dataobj) for k in KINDS}


@pytest.fixture(scope="module")
def patients(synth_cohort) -> dict[str, dict[str, np.ndarray]]:
    return {p.name: _arrays(p) for p in sorted(synth_cohort.iterdir()) if p.is_dir()}


def test_folders_files_and_shapes(synth_cohort, patients):
    expected = [cohort.patient_id(COHORT_SEED, n) for n in range(COHORT_PATIENTS)]
    assert sorted(patients) == expected
    assert not list(synth_cohort.glob(f"{cohort.TMP_PREFIX}*"))
    for pid, arrs in patients.items():
        for kind, arr in arrs.items():
            assert arr.shape == GRID_SHAPE, (pid, kind)
        assert arrs["t1ce"].dtype == np.int16 and arrs["healthy"].dtype == np.int16
        assert arrs["seg"].dtype == np.uint8 and arrs["anatomy"].dtype == np.uint8
        assert arrs["tissue"].dtype == np.uint8
        img = nib.load(synth_cohort / pid / f"{pid}_t1ce.nii.gz")
        assert np.allclose(img.header.get_zooms(), 1.0)


def test_label_values(patients):
    with_all_six = 0
    for arrs in patients.values():
        assert set(np.unique(arrs["seg"])) <= {0, 1, 2, 4}
        assert set(np.unique(arrs["tissue"])) <= set(range(T.NUM_TISSUES))
        # The segmentation is what the tissue map says, voxel for voxel; the image is brain
        # exactly where the tissue map is.
        np.testing.assert_array_equal(arrs["seg"], T.seg_of(arrs["tissue"]))
        np.testing.assert_array_equal(arrs["t1ce"] > 0, arrs["tissue"] > 0)
        anatomy = set(np.unique(arrs["anatomy"]).tolist())
        assert anatomy <= set(range(7))
        with_all_six += anatomy >= {1, 2, 3, 4, 5, 6}
    assert with_all_six >= len(patients) - 1


def test_some_patients_have_lesions_and_some_labels_each(patients):
    lesion_voxels = [int((a["seg"] > 0).sum()) for a in patients.values()]
    assert sum(v > 0 for v in lesion_voxels) >= 2
    labels = set()
    for a in patients.values():
        labels |= set(np.unique(a["seg"]).tolist())
    assert labels >= {1, 2, 4}


def test_lesions_lie_inside_the_brain(patients):
    for pid, a in patients.items():
        lesion = a["seg"] > 0
        if not lesion.any():
            continue
        assert (a["t1ce"][lesion] > 0).all(), pid
        # And inside the healthy brain the lesion grew in (mass effect may move its edge a bit).
        inside = ndi.binary_dilation(a["healthy"] > 0, iterations=2)[lesion].mean()
        assert inside > 0.99, (pid, inside)


def test_healthy_equals_image_outside_the_region_of_influence(patients):
    for pid, a in patients.items():
        lesion = a["seg"] > 0
        differs = a["t1ce"] != a["healthy"]
        if not lesion.any():
            assert not differs.any(), pid
            continue
        dist = ndi.distance_transform_edt(~lesion)
        assert dist[differs].max() <= INFLUENCE_MARGIN_MM, (pid, dist[differs].max())
        # The lesion does change the image: the region of influence is not empty.
        assert differs.sum() > lesion.sum() // 2


def test_intensities_keep_the_t1_gd_order_of_their_tissues(patients):
    """Per patient: enhancing tumour above grey matter, white above grey matter above CSF,
    necrosis below white matter (``tissue.INTENSITY_PRIOR``). The venous sinuses are thin tubes
    on the brain's edge, which blur and thick slices mix with what lies outside: their bright
    core (90th percentile) stands above grey matter."""
    def median_of(img, tis, cls, q=50, least=200):
        sel = img[tis == cls]
        return float(np.percentile(sel, q)) if sel.size > least else None

    for pid, a in patients.items():
        img, tis = a["t1ce"].astype(float), a["tissue"]

        def level(cls, img=img, tis=tis):
            return median_of(img, tis, cls)

        wm, gm, csf = level(T.WM), level(T.GM), level(T.CSF)
        assert wm > gm > csf, (pid, wm, gm, csf)
        if level(T.ENHANCING) is not None:
            assert level(T.ENHANCING) > gm, pid
        sinus = median_of(img, tis, T.SINUS, q=90, least=2000)
        if sinus is not None:
            assert sinus > gm, (pid, sinus, gm)
        if level(T.NECROSIS) is not None:
            assert level(T.NECROSIS) < wm, pid


def test_normal_enhancing_structures_are_drawn_and_can_be_left_out(patients, tmp_path):
    found = set()
    for a in patients.values():
        found |= set(np.unique(a["tissue"]).tolist()) & set(T.NORMAL_ENHANCING)
    assert len(found) >= 3, found
    report = cohort.synthesize(tmp_path, patients=1, seed=COHORT_SEED, progress=False,
                               structures=False)
    plain = _arrays(tmp_path / report.written[0])
    assert not np.isin(plain["tissue"], T.NORMAL_ENHANCING).any()
    # Everything else is drawn the same: the tumours and their labels are unchanged, except
    # where a structure stood in front of the edema.
    drawn = patients[report.written[0]]
    free = ~np.isin(drawn["tissue"], T.NORMAL_ENHANCING)
    np.testing.assert_array_equal(plain["seg"][free], drawn["seg"][free])
    assert (plain["seg"] != drawn["seg"]).sum() < 0.01 * (drawn["seg"] > 0).sum()


def test_same_seed_same_arrays_other_seed_other_ids(synth_cohort, patients, tmp_path):
    again = cohort.synthesize(tmp_path / "again", patients=1, seed=COHORT_SEED, progress=False)
    pid = again.written[0]
    redo = _arrays(tmp_path / "again" / pid)
    for kind in KINDS:
        np.testing.assert_array_equal(redo[kind], patients[pid][kind], err_msg=kind)

    other = cohort.synthesize(tmp_path / "other", patients=1, seed=COHORT_SEED + 1,
                              progress=False)
    assert other.written[0] not in patients
    other_arrs = _arrays(tmp_path / "other" / other.written[0])
    assert not np.array_equal(other_arrs["t1ce"], patients[pid]["t1ce"])


def test_rerun_skips_finished_patients(synth_cohort, tmp_path):
    out = tmp_path / "c"
    first = cohort.synthesize(out, patients=1, seed=COHORT_SEED, progress=False)
    mtime = (out / first.written[0] / f"{first.written[0]}_t1ce.nii.gz").stat().st_mtime_ns
    second = cohort.synthesize(out, patients=2, seed=COHORT_SEED, progress=False)
    assert second.skipped_existing == first.written
    assert second.written == [cohort.patient_id(COHORT_SEED, 1)]
    assert (out / first.written[0] / f"{first.written[0]}_t1ce.nii.gz").stat().st_mtime_ns == mtime


def test_failed_write_leaves_no_patient(tmp_path, monkeypatch):
    calls = []

    def failing_save(img, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_save(img, path)

    real_save = nib.save
    monkeypatch.setattr(cohort.nib, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        cohort.synthesize(tmp_path, patients=1, seed=7, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_kill_9_mid_run_leaves_only_complete_patients(tmp_path):
    """A real interrupted run: every folder that looks like a patient is complete and readable."""
    out = tmp_path / "c"
    cmd = [sys.executable, "-m", "service.cli", "synth", "--out", str(out),
           "--patients", "3", "--seed", "5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        # Kill while a patient is being written: a temporary folder with at least one file.
        while time.monotonic() < deadline:
            tmps = list(out.glob(f"{cohort.TMP_PREFIX}*")) if out.exists() else []
            if any(any(t.iterdir()) for t in tmps if t.exists()):
                break
            time.sleep(0.02)
        else:
            pytest.fail("synth never started writing")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()  # a no-op after the SIGKILL; ends the run when the test failed before it
        proc.wait(timeout=30)
    scan = find_cases(out)
    for case in scan.cases:  # complete patients only
        vols = load_case(case)
        assert vols.seg is not None and vols.anatomy is not None and vols.healthy is not None
    assert scan.skipped == []
    done = {c.pid for c in scan.cases}
    assert len(done) < 3

    report = cohort.synthesize(out, patients=3, seed=5, progress=False)
    assert set(report.skipped_existing) == done
    assert not list(out.glob(f"{cohort.TMP_PREFIX}*"))
    assert len(find_cases(out).cases) == 3


def test_orientation_does_not_change_slices(synth_cohort, tmp_path):
    """The same patient stored with flipped and permuted voxel axes yields identical slices."""
    case = find_cases(synth_cohort).cases[0]
    ref = preprocess.axial_slices(load_case(case).image)
    img = nib.load(case.t1ce)
    data = np.asarray(img.dataobj)
    variants = {
        "flipped": (data[::-1], img.affine @ _flip_matrix(0, data.shape[0])),
        "permuted": (data.transpose(1, 0, 2), img.affine[:, [1, 0, 2, 3]]),
    }
    for name, (arr, affine) in variants.items():
        folder = tmp_path / name / case.pid
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(arr), affine), folder / case.t1ce.name)
        other = find_cases(tmp_path / name).cases[0]
        np.testing.assert_array_equal(preprocess.axial_slices(load_case(other).image), ref,
                                      err_msg=name)


def _flip_matrix(axis: int, n: int) -> np.ndarray:
    """Voxel map i -> n - 1 - i on ``axis``: data[::-1] with affine @ this is the same image."""
    m = np.eye(4)
    m[axis, axis] = -1
    m[axis, 3] = n - 1
    return m
