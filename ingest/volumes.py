"""Loading one case: its T1-Gd image normalised, and its labels in ours, on one RAS+ grid."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ingest.labels import to_internal
from ingest.layouts import Case
from model.data import preprocess
from model.data.brats import ANATOMY_LABELS
from model.data.nifti import Volume, VolumeError, check_same_grid, read_nifti
from model.data.synth.tissue import NUM_TISSUES


@dataclass(frozen=True)
class CaseVolumes:
    """One patient loaded and checked: every array in RAS+ order on the image's grid."""

    case: Case
    image: np.ndarray  # (X, Y, Z) float32 in [0, 1], normalised (preprocess rule 2)
    scale: float  # the intensity scale used for ``image`` (and ``healthy``)
    affine: np.ndarray
    seg: np.ndarray | None = None  # (X, Y, Z) uint8, our labels {0, 1, 2, 4} (ingest/labels.py)
    healthy: np.ndarray | None = None  # (X, Y, Z) float32, normalised with ``scale``
    anatomy: np.ndarray | None = None  # (X, Y, Z) uint8, labels 0..6
    tissue: np.ndarray | None = None  # (X, Y, Z) uint8, tissue ids (synthetic cohorts)


def _check_labels(vol: Volume, allowed: set[int], what: str) -> np.ndarray:
    arr = vol.array
    if np.issubdtype(arr.dtype, np.floating) and not np.all(arr == np.round(arr)):
        raise VolumeError(vol.path, f"{what} has non-integer values")
    values = set(np.unique(arr).astype(np.int64).tolist())
    bad = sorted(values - allowed)
    if bad:
        raise VolumeError(vol.path, f"{what} values {bad} outside the allowed {sorted(allowed)}")
    return arr.astype(np.uint8)


def _segmentation(case: Case, image: Volume) -> np.ndarray:
    vol = read_nifti(case.seg, dtype=None)
    check_same_grid(image, vol)
    try:
        return to_internal(vol.array, case.layout)
    except ValueError as exc:
        raise VolumeError(case.seg, str(exc)) from exc


def load_case(case: Case, with_healthy: bool = True, with_anatomy: bool = True,
              with_tissue: bool = False) -> CaseVolumes:
    """Read, reorient, check and normalise one patient. Raises ``VolumeError`` naming the file.

    ``with_healthy`` / ``with_anatomy`` False skip those optional files (the indexer needs
    neither); ``with_tissue`` reads the tissue map (training needs it, nothing else does)."""
    image = read_nifti(case.t1ce, channel=case.channel)
    try:
        scale = preprocess.intensity_scale(image.array)
    except ValueError as exc:
        raise VolumeError(case.t1ce, str(exc)) from exc
    seg = anatomy = healthy = tissue = None
    if case.seg is not None:
        seg = _segmentation(case, image)
    if with_anatomy and case.anatomy is not None:
        vol = read_nifti(case.anatomy, dtype=None)
        check_same_grid(image, vol)
        anatomy = _check_labels(vol, set(ANATOMY_LABELS), "anatomy labels")
    if with_tissue and case.tissue is not None:
        vol = read_nifti(case.tissue, dtype=None)
        check_same_grid(image, vol)
        tissue = _check_labels(vol, set(range(NUM_TISSUES)), "tissue map")
    if with_healthy and case.healthy is not None:
        vol = read_nifti(case.healthy)
        check_same_grid(image, vol)
        healthy = preprocess.normalize_intensity(vol.array, scale)
    return CaseVolumes(
        case=case,
        image=preprocess.normalize_intensity(image.array, scale),
        scale=scale,
        affine=image.affine,
        seg=seg,
        healthy=healthy,
        anatomy=anatomy,
        tissue=tissue,
    )
