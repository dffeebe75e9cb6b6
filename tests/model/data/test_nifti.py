"""model.data.nifti: RAS+ reading, and errors that name the file and the problem."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from model.data.nifti import Volume, VolumeError, check_same_grid, read_nifti

SHAPE = (40, 48, 12)
# RAS+ affine with anisotropic voxels and a non-zero origin.
RAS_AFFINE = np.array(
    [
        [1.0, 0.0, 0.0, -20.0],
        [0.0, 1.2, 0.0, -30.0],
        [0.0, 0.0, 2.5, 10.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _save(path: Path, data: np.ndarray, affine: np.ndarray = RAS_AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _flip_axis(data: np.ndarray, affine: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Same world mapping, voxel axis ``axis`` stored reversed."""
    n = data.shape[axis]
    flipped = np.flip(data, axis=axis)
    new = affine.copy()
    new[:3, 3] = affine[:3, 3] + affine[:3, axis] * (n - 1)
    new[:3, axis] = -affine[:3, axis]
    return np.ascontiguousarray(flipped), new


def _permute(data: np.ndarray, affine: np.ndarray, order: tuple[int, int, int]):
    """Same world mapping, voxel axes stored in ``order``."""
    new = affine.copy()
    new[:3, :3] = affine[:3, list(order)]
    return np.ascontiguousarray(np.transpose(data, order)), new


@pytest.fixture()
def volume() -> np.ndarray:
    return np.random.default_rng(0).random(SHAPE).astype(np.float32)


def _orientations(data: np.ndarray):
    yield "ras", data, RAS_AFFINE
    yield "flip-x", *_flip_axis(data, RAS_AFFINE, 0)
    d, a = _flip_axis(data, RAS_AFFINE, 0)
    yield "lps", *_flip_axis(d, a, 1)
    yield "permute-yxz", *_permute(data, RAS_AFFINE, (1, 0, 2))
    d, a = _permute(data, RAS_AFFINE, (2, 0, 1))
    yield "permute-zxy-flip", *_flip_axis(d, a, 1)


def test_orientation_helpers_keep_world_mapping(volume):
    # Guard for the helpers themselves: a voxel's world position is unchanged by them.
    ijk = (7, 11, 3)
    world = RAS_AFFINE @ np.array([*ijk, 1.0])
    d, a = _flip_axis(volume, RAS_AFFINE, 0)
    new_ijk = (SHAPE[0] - 1 - ijk[0], ijk[1], ijk[2])
    assert d[new_ijk] == volume[ijk]
    assert np.allclose(a @ np.array([*new_ijk, 1.0]), world)
    d, a = _permute(volume, RAS_AFFINE, (1, 0, 2))
    new_ijk = (ijk[1], ijk[0], ijk[2])
    assert d[new_ijk] == volume[ijk]
    assert np.allclose(a @ np.array([*new_ijk, 1.0]), world)


def test_read_nifti_returns_ras_whatever_the_stored_orientation(tmp_path, volume):
    results = {}
    for name, data, affine in _orientations(volume):
        assert nib.aff2axcodes(affine) != ("R", "A", "S") or name == "ras"
        vol = read_nifti(_save(tmp_path / f"{name}.nii.gz", data, affine))
        assert isinstance(vol, Volume)
        assert vol.path == tmp_path / f"{name}.nii.gz"
        results[name] = vol
    ref = results["ras"]
    assert ref.array.shape == SHAPE
    assert ref.array.dtype == np.float32
    assert np.array_equal(ref.array, volume)
    assert np.allclose(ref.affine, RAS_AFFINE)
    assert ref.zooms == pytest.approx((1.0, 1.2, 2.5))
    for name, vol in results.items():
        assert nib.aff2axcodes(vol.affine) == ("R", "A", "S"), name
        assert vol.array.shape == SHAPE, name
        assert np.allclose(vol.array, ref.array), name
        assert np.allclose(vol.affine, ref.affine), name


def test_read_nifti_dtype_none_keeps_label_dtype(tmp_path):
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[5:9, 10:20, 2:4] = 4
    d, a = _flip_axis(labels, RAS_AFFINE, 1)
    vol = read_nifti(_save(tmp_path / "seg.nii.gz", d, a), dtype=None)
    assert vol.array.dtype == np.uint8
    assert np.array_equal(vol.array, labels)


def test_read_nifti_accepts_uncompressed(tmp_path, volume):
    vol = read_nifti(_save(tmp_path / "plain.nii", volume))
    assert np.array_equal(vol.array, volume)


def test_missing_file(tmp_path):
    path = tmp_path / "nope_t1ce.nii.gz"
    with pytest.raises(VolumeError, match="file not found") as info:
        read_nifti(path)
    assert str(path) in str(info.value)
    assert info.value.path == path


def test_truncated_gzip_names_file(tmp_path, volume):
    good = _save(tmp_path / "good.nii.gz", volume).read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(VolumeError) as info:
        read_nifti(path)
    msg = str(info.value)
    # The header survives the cut; the data read fails.
    assert msg.startswith(f"{path}: truncated or corrupt data")
    assert info.value.path == path


def test_truncated_gzip_non_ras_names_file(tmp_path, volume):
    d, a = _flip_axis(volume, RAS_AFFINE, 0)
    d, a = _flip_axis(d, a, 1)  # LPS, as BraTS and synth files are stored
    good = _save(tmp_path / "good.nii.gz", d, a).read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(VolumeError) as info:
        read_nifti(path)
    assert str(info.value).startswith(f"{path}: truncated or corrupt data")
    assert info.value.path == path


def test_text_file_named_nifti(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("this is not a NIfTI file\n" * 20)
    with pytest.raises(VolumeError) as info:
        read_nifti(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: not a readable NIfTI file")
    assert info.value.path == path


def test_four_d_volume_refused(tmp_path):
    data = np.ones((*SHAPE, 3), dtype=np.float32)
    path = _save(tmp_path / "fmri.nii.gz", data)
    expected = r"expected a 3-D volume, got shape \(40, 48, 12, 3\)"
    with pytest.raises(VolumeError, match=expected) as info:
        read_nifti(path)
    assert str(path) in str(info.value)


def test_four_d_singleton_read_as_3d(tmp_path, volume):
    d, a = _flip_axis(volume, RAS_AFFINE, 2)
    vol = read_nifti(_save(tmp_path / "single.nii.gz", d[..., None], a))
    assert vol.array.shape == SHAPE
    assert np.allclose(vol.array, volume)
    assert np.allclose(vol.affine, RAS_AFFINE)


def test_nan_refused(tmp_path, volume):
    volume[3, 4, 5] = np.nan
    path = _save(tmp_path / "nan.nii.gz", volume)
    with pytest.raises(VolumeError, match="NaN or infinite") as info:
        read_nifti(path)
    assert str(path) in str(info.value)


def _vol(array: np.ndarray, affine: np.ndarray, name: str) -> Volume:
    return Volume(array=array, affine=affine, path=Path("/data") / name)


def test_check_same_grid_accepts_same_grid():
    a = _vol(np.zeros(SHAPE), RAS_AFFINE, "img.nii.gz")
    b = _vol(np.zeros(SHAPE, np.uint8), RAS_AFFINE + 1e-5, "seg.nii.gz")
    check_same_grid(a, b)  # no exception


def test_check_same_grid_shape_mismatch():
    image = _vol(np.zeros(SHAPE), RAS_AFFINE, "P_t1ce.nii.gz")
    other = _vol(np.zeros((40, 48, 11)), RAS_AFFINE, "P_seg.nii.gz")
    with pytest.raises(VolumeError) as info:
        check_same_grid(image, other)
    msg = str(info.value)
    assert info.value.path == other.path
    assert msg.startswith("/data/P_seg.nii.gz: shape (40, 48, 11)")
    assert "P_t1ce.nii.gz shape (40, 48, 12)" in msg


def test_check_same_grid_affine_mismatch():
    image = _vol(np.zeros(SHAPE), RAS_AFFINE, "P_t1ce.nii.gz")
    shifted = RAS_AFFINE.copy()
    shifted[0, 3] += 0.5
    other = _vol(np.zeros(SHAPE), shifted, "P_seg.nii.gz")
    with pytest.raises(VolumeError) as info:
        check_same_grid(image, other)
    msg = str(info.value)
    assert info.value.path == other.path
    assert msg.startswith("/data/P_seg.nii.gz: affine does not match image P_t1ce.nii.gz")
    assert "max difference 0.5 mm" in msg
