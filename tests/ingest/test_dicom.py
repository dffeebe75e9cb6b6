"""DICOM series -> Volume: the same array and affine as the NIfTI of that volume, whatever the
file order, single- or multi-frame; tilt refused, missing slices reported, series picked by the
documented rule."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from ingest import dicom
from ingest.cases import NotInModelSpace, to_model_space
from model.data.nifti import read_nifti
from tests.ingest.series import series_datasets, write_folder

# A sagittal acquisition, 0.9 x 0.8 mm in plane, 3 mm slices, off-centre: every axis of the
# voxel grid maps to another patient axis, so reorientation is exercised.
SAGITTAL = np.array([[0.0, 0.0, 3.0, -20.0],
                     [-0.9, 0.0, 0.0, 40.0],
                     [0.0, -0.8, 0.0, 60.0],
                     [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(3)
    return rng.integers(0, 3000, (20, 24, 10)).astype(np.uint16)


def _nifti(volume, affine, tmp_path):
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), path)
    return read_nifti(path)


@pytest.mark.parametrize("multiframe", [False, True], ids=["single-frame", "multi-frame"])
def test_series_reads_as_its_nifti_whatever_the_file_order(small, tmp_path, multiframe):
    expected = _nifti(small, SAGITTAL, tmp_path)
    for seed in (0, 1):  # two different shuffles of the files (or frames)
        folder = write_folder(series_datasets(small, SAGITTAL, multiframe=multiframe, seed=seed),
                              tmp_path / f"series{seed}")
        got = dicom.read_folder(folder)
        np.testing.assert_array_equal(got.volume.array, expected.array)
        np.testing.assert_allclose(got.volume.affine, expected.affine, atol=1e-4)
        assert got.volume.zooms == pytest.approx((3.0, 0.9, 0.8), abs=1e-4)


def test_rescale_slope_is_applied(small, tmp_path):
    got = dicom.read_series(series_datasets(small, SAGITTAL, slope=2.0))
    np.testing.assert_array_equal(got.volume.array,
                                  _nifti(2 * np.rint(small / 2.0), SAGITTAL, tmp_path).array)


def test_gantry_tilt_is_refused(small):
    with pytest.raises(dicom.GantryTilt, match=r"gantry tilt: the slices step 1[0-9.]* degrees"):
        dicom.read_series(series_datasets(small, SAGITTAL, tilt_degrees=15))
    untilted = series_datasets(small, SAGITTAL)
    for ds in untilted:
        ds.GantryDetectorTilt = 12.0
    with pytest.raises(dicom.GantryTilt, match="GantryDetectorTilt is 12 degrees"):
        dicom.read_series(untilted)


def test_missing_slices_are_reported(small):
    with pytest.raises(dicom.MissingSlices,
                       match=r"step is 3.00 mm but 1 step\(s\) differ: .*9.00 mm, about 2 "
                             r"slice\(s\) missing"):
        dicom.read_series(series_datasets(small, SAGITTAL, drop=(4, 5)))


def test_a_series_of_one_plane_or_with_duplicates_is_refused(small):
    one = series_datasets(small[:, :, :1], SAGITTAL)
    with pytest.raises(dicom.DicomError, match="at least 2"):
        dicom.read_series(one)
    twice = series_datasets(small, SAGITTAL)
    with pytest.raises(dicom.DicomError, match="same position"):
        dicom.read_series(twice + twice[:1])


def test_the_t1_gd_series_is_picked_by_the_rule(small, tmp_path):
    study = "1.2.826.0.1.3680043.8.498.1"
    t1gd = series_datasets(small, SAGITTAL, study_uid=study, description="AX T1 MPRAGE +C",
                           agent=None)
    flair = series_datasets(small[:, :, :4], SAGITTAL, study_uid=study,
                            description="AX FLAIR", agent="GADOBUTROL")  # after injection
    pre = series_datasets(small[:, :, :3], SAGITTAL, study_uid=study, description="T1 PRE",
                          agent=None)
    folder = write_folder(flair + t1gd + pre, tmp_path / "study")
    got = dicom.read_folder(folder)
    assert got.series_uid == t1gd[0].SeriesInstanceUID and got.study_uid == study
    assert got.volume.array.shape == (10, 20, 24)  # sagittal slices: X is the slice axis
    named = dicom.read_folder(folder, series_uid=flair[0].SeriesInstanceUID)
    assert named.series_uid == flair[0].SeriesInstanceUID
    with pytest.raises(dicom.SeriesChoice, match="series 9.9 is not there; .*AX FLAIR"):
        dicom.read_folder(folder, series_uid="9.9")
    # Two post-contrast T1s: the rule cannot choose, and says how to.
    again = series_datasets(small, SAGITTAL, study_uid=study, description="T1 GD COR")
    with pytest.raises(dicom.SeriesChoice, match=r"2 look like a post-contrast T1; name one "
                                                 r"by its SeriesInstanceUID \(--series UID"):
        dicom.read_series(t1gd + again + flair)


def test_words_of_descriptions():
    info = lambda d, agent=False: dicom.SeriesInfo("1", "2", d, "MR", agent, 1)  # noqa: E731
    assert dicom._post_contrast(info("t1_mprage_sag_p2_iso GD"))
    assert dicom._post_contrast(info("T1+C AXIAL"))
    assert dicom._post_contrast(info("AX T1", agent=True))
    assert not dicom._post_contrast(info("AX T1 PRE"))
    assert not dicom._post_contrast(info("T2 FLAIR POST", agent=True))


def test_to_model_space_refuses_another_grid_naming_it(small, tmp_path):
    volume = _nifti(small, SAGITTAL, tmp_path)
    with pytest.raises(NotInModelSpace, match=r"a 10x20x24 volume at 3 x 0.9 x 0.8 mm is not on "
                                              r"the model's grid \(240x240x155 voxels at 1 mm"):
        to_model_space(volume)
    grid = _nifti(np.zeros((240, 240, 155), np.uint8), np.diag([-1.0, -1.0, 1.0, 1.0]),
                  tmp_path)
    assert to_model_space(grid) is grid


def test_only_mr_series_are_candidates_and_t1_narrows_only_when_it_can():
    info = lambda uid, d, modality="MR", agent=False: dicom.SeriesInfo(  # noqa: E731
        uid, "2", d, modality, agent, 10)
    ct = info("1", "CT HEAD +C", "CT", True)
    mr = info("2", "AX POST GD")
    assert dicom.pick_series([ct, mr]).series_uid == "2"
    # Two post-contrast series, neither naming T1: refused as two candidates, not as none.
    with pytest.raises(dicom.SeriesChoice, match="2 look like a post-contrast T1"):
        dicom.pick_series([mr, info("3", "COR POST GD")])
    with pytest.raises(dicom.SeriesChoice, match="none is a post-contrast T1 MR"):
        dicom.pick_series([info("4", "AX T2"), info("5", "T1 PRE")])
