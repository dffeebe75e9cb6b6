"""BraTS-style cohorts on disk: finding patients and loading one patient's volumes.

Layouts read (``<ID>`` is the folder name and the prefix of every file in it):

- BraTS 2019: ``<root>/HGG/<ID>/`` and ``<root>/LGG/<ID>/``;
- BraTS 2020 / 2021 and ``cbir synth``: ``<root>/<ID>/`` (``BraTS20_Training_001``,
  ``BraTS2021_00000``, ``SYN1_0000``).

Files: ``<ID>_t1ce.nii[.gz]`` (required), ``<ID>_seg.nii[.gz]`` (optional: validation and test sets
have none), and, from synthetic cohorts only, ``<ID>_healthy`` (the same brain without lesion),
``<ID>_anatomy`` (normal labels 1..6, see ``ANATOMY_LABELS``) and ``<ID>_tissue`` (the tissue map
the image was rendered from, ``model/data/synth/tissue.py``; training renders it afresh).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.data import preprocess
from model.data.nifti import Volume, VolumeError, check_same_grid, read_nifti
from model.data.synth.tissue import NUM_TISSUES

log = logging.getLogger(__name__)

# BraTS segmentation labels (BraTS 2019-2021 convention).
SEG_LABELS = {0: "background", 1: "TC: necrotic / non-enhancing core", 2: "ED: edema",
              4: "ET: enhancing tumour"}
# Model classes of the abnormal target, in order: index = class, value = BraTS label.
ABNORMAL_CLASSES = ("background", "TC", "ED", "ET")
SEG_LABEL_TO_CLASS = np.zeros(5, dtype=np.uint8)
SEG_LABEL_TO_CLASS[[0, 1, 2, 4]] = [0, 1, 2, 3]

# The six normal labels the paper evaluated with.
ANATOMY_LABELS = {0: "none", 1: "left cerebrum", 2: "right cerebrum", 3: "left cerebellum",
                  4: "right cerebellum", 5: "left lateral ventricle",
                  6: "right lateral ventricle"}

MODALITY = "t1ce"
OPTIONAL_FILES = ("seg", "healthy", "anatomy", "tissue")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Case:
    """One patient folder: its id, the group it sits in (``HGG``/``LGG`` or ``""``), its files."""

    pid: str
    folder: Path
    group: str
    t1ce: Path
    seg: Path | None = None
    healthy: Path | None = None
    anatomy: Path | None = None
    tissue: Path | None = None


@dataclass
class CohortScan:
    """What ``find_cases`` found: usable cases, and folders skipped with the reason."""

    cases: list[Case] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


@dataclass(frozen=True)
class CaseVolumes:
    """One patient loaded and checked: every array in RAS+ order on the image's grid."""

    case: Case
    image: np.ndarray  # (X, Y, Z) float32 in [0, 1], normalised (preprocess rule 2)
    scale: float  # the intensity scale used for ``image`` (and ``healthy``)
    affine: np.ndarray
    seg: np.ndarray | None = None  # (X, Y, Z) uint8, BraTS labels {0, 1, 2, 4}
    healthy: np.ndarray | None = None  # (X, Y, Z) float32, normalised with ``scale``
    anatomy: np.ndarray | None = None  # (X, Y, Z) uint8, labels 0..6
    tissue: np.ndarray | None = None  # (X, Y, Z) uint8, tissue ids (synthetic cohorts)


def _find_file(folder: Path, pid: str, kind: str) -> Path | None:
    for suffix in NIFTI_SUFFIXES:
        path = folder / f"{pid}_{kind}{suffix}"
        if path.is_file():
            return path
    return None


def _looks_like_case(folder: Path) -> bool:
    prefix = folder.name + "_"
    return any(p.name.startswith(prefix) and p.name.endswith(NIFTI_SUFFIXES)
               for p in folder.iterdir())


def _candidate_folders(root: Path) -> list[tuple[Path, str]]:
    """Patient folders under ``root`` (one or two levels deep), with their group name."""
    found: list[tuple[Path, str]] = []
    for child in sorted(root.iterdir()):
        if not child.is_dir() or child.name.startswith("."):
            continue  # hidden: e.g. a synth run's unfinished temporary folder
        subfolders = [g for g in sorted(child.iterdir())
                      if g.is_dir() and not g.name.startswith(".")]
        if _looks_like_case(child) or not subfolders:
            # A patient folder; one with no NIfTI at all is reported as missing its t1ce.
            found.append((child, ""))
            continue
        found += [(g, child.name) for g in subfolders]
    return found


def find_cases(root: Path | str) -> CohortScan:
    """Every patient folder under ``root``; folders with no ``t1ce`` are skipped and reported."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such data folder")
    scan = CohortScan()
    for folder, group in _candidate_folders(root):
        pid = folder.name
        t1ce = _find_file(folder, pid, MODALITY)
        if t1ce is None:
            scan.skipped.append((folder, f"missing {pid}_{MODALITY}.nii.gz"))
            continue
        extra = {kind: _find_file(folder, pid, kind) for kind in OPTIONAL_FILES}
        scan.cases.append(Case(pid=pid, folder=folder, group=group, t1ce=t1ce, **extra))
    return scan


def _check_labels(vol: Volume, allowed: set[int], what: str) -> np.ndarray:
    arr = vol.array
    if np.issubdtype(arr.dtype, np.floating) and not np.all(arr == np.round(arr)):
        raise VolumeError(vol.path, f"{what} has non-integer values")
    values = set(np.unique(arr).astype(np.int64).tolist())
    bad = sorted(values - allowed)
    if bad:
        raise VolumeError(vol.path, f"{what} values {bad} outside the allowed {sorted(allowed)}")
    return arr.astype(np.uint8)


def load_case(case: Case, with_healthy: bool = True, with_anatomy: bool = True,
              with_tissue: bool = False) -> CaseVolumes:
    """Read, reorient, check and normalise one patient. Raises ``VolumeError`` naming the file.

    ``with_healthy`` / ``with_anatomy`` False skip those optional files (the indexer needs
    neither); ``with_tissue`` reads the tissue map (training needs it, nothing else does)."""
    image = read_nifti(case.t1ce)
    try:
        scale = preprocess.intensity_scale(image.array)
    except ValueError as exc:
        raise VolumeError(case.t1ce, str(exc)) from exc
    seg = anatomy = healthy = tissue = None
    if case.seg is not None:
        vol = read_nifti(case.seg, dtype=None)
        check_same_grid(image, vol)
        seg = _check_labels(vol, set(SEG_LABELS), "segmentation")
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
