"""Finding cases: every BraTS layout, the Medical Segmentation Decathlon's, and ``cbir synth``'s.

Layouts read (``<ID>`` is the folder name and the prefix of every file in it; ``.nii.gz`` or
``.nii``):

- ``brats2019``: ``<root>/HGG/<ID>/<ID>_t1ce``, ``<root>/LGG/<ID>/...`` (``_seg`` optional);
- ``brats2020`` (2020 and 2021): ``<root>/<ID>/<ID>_t1ce``, ``<ID>_seg`` optional (validation and
  test sets have none);
- ``synthetic`` (``cbir synth``): as brats2020, plus ``<ID>_healthy`` (the same brain without
  lesion), ``<ID>_anatomy`` (normal labels 1..6, ``ANATOMY_LABELS``) and ``<ID>_tissue`` (the
  tissue map the image was rendered from; training renders it afresh);
- ``brats2023`` (2023-2025): ``<root>/<ID>/<ID>-t1c``, ``<ID>-seg`` optional; ``-t1n``, ``-t2f``,
  ``-t2w`` are ignored (the model reads T1-Gd only);
- ``msd`` (Decathlon Task01_BrainTumour): ``<root>/imagesTr/<ID>.nii.gz`` 4-D (FLAIR, T1w, T1gd,
  T2w: T1-Gd is channel 2) with ``<root>/labelsTr/<ID>.nii.gz``, and ``<root>/imagesTs`` without
  labels.

Labels of each layout are mapped to ours by ``ingest/labels.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

NIFTI_SUFFIXES = (".nii.gz", ".nii")
BRATS2019_GROUPS = ("HGG", "LGG")
SYNTH_FILES = ("healthy", "anatomy", "tissue")
MSD_T1GD_CHANNEL = 2  # Task01 dataset.json: 0 FLAIR, 1 T1w, 2 T1gd, 3 T2w
MSD_FOLDERS = (("imagesTr", "labelsTr"), ("imagesTs", None))

# What a scan looks for, as told to a user whose folder held no usable case.
LOOKED_FOR = (
    "<ID>/<ID>_t1ce.nii[.gz] (BraTS 2020/2021, cbir synth)",
    "HGG|LGG/<ID>/<ID>_t1ce.nii[.gz] (BraTS 2019)",
    "<ID>/<ID>-t1c.nii[.gz] (BraTS 2023-2025)",
    "imagesTr|imagesTs/<ID>.nii[.gz], 4-D (Decathlon Task01)",
)


class NoCasesError(FileNotFoundError):
    """Folders that hold no usable case. A ``FileNotFoundError``, as a missing folder is, so
    every caller that reports a missing data folder reports this one the same way."""


@dataclass(frozen=True)
class Case:
    """One patient's files and how to read them."""

    pid: str
    folder: Path  # the patient folder (the images folder for msd)
    layout: str  # a key of ``ingest.labels.LABEL_TABLE``
    cohort: str  # the cohort's name, as the catalogue records it: ``MICCAI_BraTS_2019/HGG``
    t1ce: Path
    channel: int | None = None  # the T1-Gd channel of a 4-D ``t1ce`` file (msd)
    seg: Path | None = None
    healthy: Path | None = None
    anatomy: Path | None = None
    tissue: Path | None = None


@dataclass
class CohortScan:
    """What a scan found: usable cases, and folders skipped with the reason."""

    cases: list[Case] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _nifti(folder: Path, stem: str) -> Path | None:
    for suffix in NIFTI_SUFFIXES:
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def _visible_dirs(folder: Path) -> list[Path]:
    # Hidden: e.g. a synth run's unfinished temporary folder.
    return [p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def _looks_like_case(folder: Path) -> bool:
    prefixes = (folder.name + "_", folder.name + "-")
    return any(p.name.startswith(prefixes) and p.name.endswith(NIFTI_SUFFIXES)
               for p in folder.iterdir())


def _patient_folders(root: Path) -> list[tuple[Path, str]]:
    """Patient folders under ``root`` (one or two levels deep), with their group name."""
    found: list[tuple[Path, str]] = []
    for child in _visible_dirs(root):
        subfolders = _visible_dirs(child)
        if _looks_like_case(child) or not subfolders:
            # A patient folder; one with no NIfTI at all is reported as missing its image.
            found.append((child, ""))
            continue
        found += [(g, child.name) for g in subfolders]
    return found


def _patient_case(root: Path, folder: Path, group: str) -> Case | str:
    """The case in a BraTS patient folder, or why there is none."""
    pid = folder.name
    cohort = f"{root.name}/{group}" if group else root.name
    if (t1ce := _nifti(folder, f"{pid}_t1ce")) is not None:
        extra = {kind: _nifti(folder, f"{pid}_{kind}") for kind in SYNTH_FILES}
        if any(extra.values()):
            layout = "synthetic"
        else:
            layout = "brats2019" if group in BRATS2019_GROUPS else "brats2020"
        return Case(pid=pid, folder=folder, layout=layout, cohort=cohort, t1ce=t1ce,
                    seg=_nifti(folder, f"{pid}_seg"), **extra)
    if (t1c := _nifti(folder, f"{pid}-t1c")) is not None:
        return Case(pid=pid, folder=folder, layout="brats2023", cohort=cohort, t1ce=t1c,
                    seg=_nifti(folder, f"{pid}-seg"))
    return f"missing {pid}_t1ce.nii.gz (or {pid}-t1c.nii.gz)"


def _msd_cases(root: Path, scan: CohortScan) -> None:
    for images, labels in MSD_FOLDERS:
        folder = root / images
        if not folder.is_dir():
            continue
        cohort = root.name if images == "imagesTr" else f"{root.name}/{images}"
        for path in sorted(folder.iterdir()):
            # ``._BRATS_001.nii.gz``: macOS metadata the Decathlon archive ships beside each file.
            if path.name.startswith(".") or not path.name.endswith(NIFTI_SUFFIXES):
                continue
            pid = path.name.removesuffix(".gz").removesuffix(".nii")
            seg = None
            if labels is not None:
                seg = root / labels / path.name
                if not seg.is_file():
                    scan.skipped.append((path, f"no label file {labels}/{path.name}"))
                    continue
            scan.cases.append(Case(pid=pid, folder=folder, layout="msd", cohort=cohort,
                                   t1ce=path, channel=MSD_T1GD_CHANNEL, seg=seg))


def find_cases(root: Path | str) -> CohortScan:
    """Every case under ``root``, whatever its layout; folders without a T1-Gd image are skipped
    and reported. Raises ``FileNotFoundError`` when ``root`` is not a folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such data folder")
    scan = CohortScan()
    if any((root / images).is_dir() for images, _ in MSD_FOLDERS):
        _msd_cases(root, scan)
        return scan
    for folder, group in _patient_folders(root):
        found = _patient_case(root, folder, group)
        if isinstance(found, str):
            scan.skipped.append((folder, found))
        else:
            scan.cases.append(found)
    return scan


def find_cases_in(roots: Iterable[Path | str]) -> CohortScan:
    """Every case under every folder. Raises ``NoCasesError`` naming the folders and the file
    patterns looked for when none holds a usable case, ``FileNotFoundError`` for a missing one."""
    roots = [Path(r) for r in roots]
    scan = CohortScan()
    for root in roots:
        part = find_cases(root)
        scan.cases += part.cases
        scan.skipped += part.skipped
    if not scan.cases:
        skipped = "".join(f"; skipped {p}: {why}" for p, why in scan.skipped[:3])
        raise NoCasesError(f"no usable case under {', '.join(map(str, roots)) or '(no folder)'}: "
                           f"looked for {'; '.join(LOOKED_FOR)}{skipped}")
    return scan
