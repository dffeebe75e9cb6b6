"""ingest.preprocess: an off-grid head comes back onto the grid; a grid volume is left alone.

The volume moved off the grid is the SRI24 brain the grid is defined by, not a synthetic
phantom: phantoms are random deformations of the MNI template drawn around a placement fitted
to the SRI24 brain (mask Dice 0.927, ``python -m bench.preprocess_real --placement``), not onto
it, so registering one to SRI24 rightly moves it, and its own placement could not be the answer.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from ingest import preprocess as P
from ingest import registration as R
from ingest.layouts import Case
from model.data import preprocess
from model.data.nifti import read_nifti
from service.uploads import decode_query

NATIVE_SPACING = (0.9, 0.9, 5.0)
NATIVE_SIZE = (256, 256, 40)  # 230 x 230 x 200 mm


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def _head() -> np.ndarray:
    """The atlas brain inside a fake skull on the grid (RAS+): dark CSF 0 to 4 mm beyond the
    brain, a bright 5 mm bone and scalp shell beyond that, faint noise everywhere else."""
    atlas = R.load_atlas()
    rng = np.random.default_rng(0)
    top = float(atlas.t1.max())
    near = ndi.distance_transform_edt(~atlas.brain)
    head = np.where(atlas.brain, atlas.t1, 0.03 * top).astype(np.float32)
    head[(near > 4) & (near <= 9)] = 0.8 * top
    head[near > 9] = 0.0
    return head + rng.uniform(0, 0.02 * top, head.shape).astype(np.float32)


def _blob() -> np.ndarray:
    """A label map on the grid: a 12 mm ball of edema (2) around a 6 mm enhancing core (4)."""
    r = np.linalg.norm(np.indices((240, 240, 155)) - np.array([150, 130, 80])[:, None, None, None],
                       axis=0)
    return np.where(r <= 6, 4, np.where(r <= 12, 2, 0)).astype(np.uint8)


def _move(volume: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` on the grid turned 10, -6 and 12 degrees, moved (6, -9, 4) mm and resampled
    to 0.9 x 0.9 x 5 mm voxels on axes tilted 5 degrees: (array, affine)."""
    image = R.to_sitk(volume, R.GRID_AFFINE)
    move = sitk.Euler3DTransform()
    move.SetCenter(image.TransformContinuousIndexToPhysicalPoint(
        [s / 2 for s in image.GetSize()]))
    move.SetRotation(*np.deg2rad([10.0, -6.0, 12.0]))
    move.SetTranslation((6.0, -9.0, 4.0))
    tilt = sitk.Euler3DTransform()
    tilt.SetRotation(0.0, 0.0, np.deg2rad(5.0))
    direction = np.array(tilt.GetMatrix()).reshape(3, 3)
    extent = np.array(NATIVE_SPACING) * (np.array(NATIVE_SIZE) - 1)
    origin = np.array(move.GetCenter()) - direction @ (extent / 2)
    native = sitk.Resample(image, NATIVE_SIZE, move,
                           sitk.sitkNearestNeighbor if order == 0 else sitk.sitkLinear,
                           origin.tolist(), NATIVE_SPACING, direction.ravel().tolist(), 0.0,
                           image.GetPixelID())
    return R.from_sitk(native)


def _save_las(array: np.ndarray, affine: np.ndarray, path, dtype) -> None:
    """Stored as a scanner might: LAS voxel order, integers."""
    flip = np.array([[-1, 0, 0, array.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(array[::-1].astype(dtype), affine @ flip), path)


@pytest.fixture(scope="module")
def off_grid(tmp_path_factory) -> Case:
    """A patient folder whose T1-Gd is the head moved off the grid (``_move``), and its label
    map moved the same way."""
    folder = tmp_path_factory.mktemp("off-grid") / "HEAD_0"
    folder.mkdir()
    array, affine = _move(_head(), order=1)
    _save_las(np.rint(array * 4), affine, folder / "HEAD_0_t1ce.nii.gz", np.int16)
    labels, affine = _move(_blob(), order=0)
    _save_las(labels, affine, folder / "HEAD_0_seg.nii.gz", np.uint8)
    return Case(pid="HEAD_0", folder=folder, layout="brats2020", cohort="off-grid",
                t1ce=folder / "HEAD_0_t1ce.nii.gz", seg=folder / "HEAD_0_seg.nii.gz")


def test_an_off_grid_head_comes_back_onto_the_grid(off_grid):
    src = read_nifti(off_grid.t1ce)
    assert not P.in_model_space(src.array, src.affine)
    vols = P.load_case_in_model_space(off_grid)  # what indexing does
    assert vols.image.shape == (240, 240, 155)
    np.testing.assert_allclose(vols.affine, R.GRID_AFFINE)
    atlas = R.load_atlas()
    assert dice(vols.image > 0, atlas.brain) > 0.9
    both = (vols.image > 0) & atlas.brain
    assert np.corrcoef(vols.image[both], atlas.t1[both])[0, 1] > 0.8
    assert vols.image.max() == 1.0 and vols.image.min() == 0.0
    assert P.in_model_space(vols.image, vols.affine)  # preprocessing twice changes nothing
    blob = _blob()
    assert set(np.unique(vols.seg)) == {0, 2, 4}
    assert dice(vols.seg > 0, blob > 0) > 0.8


def test_a_volume_in_brats_space_is_left_untouched(tmp_path):
    atlas = R.load_atlas()
    out = P.to_model_space(atlas.t1, R.GRID_AFFINE)
    assert out.transform is None
    np.testing.assert_array_equal(out.image, np.clip(atlas.t1 / out.scale, 0, 1))
    # The same volume as BraTS stores it (LPS voxel order, another origin): `cbir preprocess`
    # writes it back unchanged but for rule 2.
    src = tmp_path / "x_t1ce.nii.gz"
    nib.save(P.to_brats_storage(atlas.t1), src)
    assert P.on_grid(nib.load(src).shape, nib.load(src).affine)
    assert P.preprocess_file(src, tmp_path / "out.nii.gz").transform is None
    written = nib.load(tmp_path / "out.nii.gz")
    np.testing.assert_array_equal(written.affine, nib.load(src).affine)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), P.to_brats_storage(
        out.image).get_fdata(dtype=np.float32))


@pytest.mark.parametrize("change", ["skull background", "1.2 mm voxels", "oblique", "shape"])
def test_the_rule_refuses_what_is_not_brats_space(change):
    vol, affine = R.load_atlas().t1.copy(), R.GRID_AFFINE.copy()
    if change == "skull background":
        vol[vol == 0] = 1.0  # a head: non-zero almost everywhere
    elif change == "1.2 mm voxels":
        affine[:3, :3] *= 1.2
    elif change == "oblique":
        c, s = np.cos(0.1), np.sin(0.1)
        affine[:2, :2] = [[c, -s], [s, c]]
    else:
        vol = vol[:, :, :150]
    assert not P.in_model_space(vol, affine)
    assert P.needs_preprocessing(vol, affine)


def test_a_volume_too_small_to_hold_a_head_is_used_as_it_is():
    slab = R.load_atlas().t1[60:180, 60:180, 70:80]  # 120 x 120 x 10 mm
    assert not P.holds_a_head(slab.shape, R.GRID_AFFINE)
    assert not P.needs_preprocessing(slab, R.GRID_AFFINE)
    with pytest.raises(ValueError, match="120 x 120 x 10 mm, less than the 100 mm"):
        P.to_model_space(slab, R.GRID_AFFINE)


def test_an_upload_is_preprocessed_unless_asked_not_to(off_grid):
    data = off_grid.t1ce.read_bytes()
    as_is = decode_query(data, preprocess=False)
    assert (as_is.slice, as_is.slice_count) == (20, 40)
    on_grid = decode_query(data, slice_index=80, preprocess=True)
    assert (on_grid.slice, on_grid.slice_count) == (80, 155)
    # The slice is the grid's slice 80: its brain is the atlas brain's at that level.
    atlas_slice = preprocess.axial_slices(R.load_atlas().brain)[80]
    assert dice(on_grid.image > 0, atlas_slice) > 0.9


def test_faiss_works_after_preprocessing_in_one_process():
    """``indexer.faiss_lib`` loads SimpleITK before faiss (its docstring says why): then a
    volume's registration, and after it an index serialised and its id map read, work in one
    fresh interpreter; faiss imported first on its own is refused with a message that says so."""
    import subprocess
    import sys

    code = ("import numpy as np; from indexer.faiss_lib import faiss; "
            "from ingest import registration as R; import SimpleITK as sitk; "
            "i = sitk.Shrink(R.load_atlas().image(), [8, 8, 8]); R.register(i, i); "
            "ix = faiss.IndexIDMap2(faiss.IndexFlatL2(8)); "
            "ix.add_with_ids(np.eye(8, dtype='float32'), np.arange(8) + 10); "
            "back = faiss.deserialize_index(faiss.serialize_index(ix)); "
            "assert faiss.vector_to_array(back.id_map).tolist() == list(range(10, 18))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    done = subprocess.run([sys.executable, "-c", "import faiss; import indexer.faiss_lib"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "import SimpleITK first" in done.stderr


def test_step_five_interpolation_is_named_and_only_changes_the_image(off_grid):
    """``interpolation`` resamples the images only: the brain mask and the grid stay; an
    unknown name is refused with the known ones."""
    src = read_nifti(off_grid.t1ce)
    linear = P.to_model_space(src.array, src.affine)
    spline = P.to_model_space(src.array, src.affine, interpolation="bspline")
    np.testing.assert_array_equal(spline.brain, linear.brain)
    assert not np.array_equal(spline.image, linear.image)
    both = linear.brain
    assert np.corrcoef(spline.image[both], linear.image[both])[0, 1] > 0.95
    with pytest.raises(ValueError, match="unknown interpolation 'cubic': use one of linear, "
                                         "bspline, lanczos"):
        P.to_model_space(src.array, src.affine, interpolation="cubic")
