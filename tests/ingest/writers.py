"""Tiny volumes written in each layout ``ingest`` reads, for its tests."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (20, 20, 6)


def image_array(seed: int = 0) -> np.ndarray:
    """Positive values in a central cube, exact zeros elsewhere."""
    vol = np.zeros(SHAPE, dtype=np.float32)
    vol[5:15, 5:15, 1:5] = np.random.default_rng(seed).uniform(50.0, 500.0, size=(10, 10, 4))
    return vol


def seg_array() -> np.ndarray:
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[8:10, 8:10, 2] = 1
    seg[10:12, 8:10, 2] = 2
    seg[8:10, 10:12, 3] = 4
    return seg


def anatomy_array() -> np.ndarray:
    ana = np.zeros(SHAPE, dtype=np.uint8)
    ana[5:10, 5:15, 1:5] = 1
    ana[10:15, 5:15, 1:5] = 2
    ana[6, 6, 2] = 5
    ana[13, 6, 2] = 6
    return ana


def save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def patient(folder: Path, kinds=("t1ce", "seg"), suffix: str = ".nii.gz") -> Path:
    """A patient folder named ``folder.name`` holding the given files."""
    pid = folder.name
    data = {"t1ce": image_array(), "seg": seg_array(), "healthy": image_array() * 0.5,
            "anatomy": anatomy_array()}
    for kind in kinds:
        save(folder / f"{pid}_{kind}{suffix}", data[kind])
    return folder


def by_pid(scan) -> dict:
    return {c.pid: c for c in scan.cases}


# Source labels of each layout standing for ours in ``seg_array`` (1 TC, 2 ED, 4 ET).
BRATS2023_OF_OURS = {1: 1, 2: 2, 4: 3}  # 1 NCR, 2 ED, 3 ET
MSD_OF_OURS = {1: 2, 2: 1, 4: 3}  # 1 edema, 2 non-enhancing tumour, 3 enhancing


def in_source_labels(ours: np.ndarray, table: dict[int, int]) -> np.ndarray:
    out = np.zeros_like(ours)
    for mine, theirs in table.items():
        out[ours == mine] = theirs
    return out


def decoy(image: np.ndarray, i: int) -> np.ndarray:
    """Another modality of the same brain: mirrored and shifted, so reading it shows."""
    return np.ascontiguousarray(np.roll(image[::-1], i, axis=1) * (i + 2))


def brats2023_patient(root: Path, pid: str, image: np.ndarray | None = None,
                      labels: np.ndarray | None = None, with_seg: bool = True) -> Path:
    """``<pid>/<pid>-t1c.nii.gz`` and ``-seg`` (labels 1 NCR, 2 ED, 3 ET), with the other three
    modalities present, each a different image so that reading one by mistake shows."""
    folder = root / pid
    image = image_array() if image is None else image
    save(folder / f"{pid}-t1c.nii.gz", image)
    for i, other in enumerate(("t1n", "t2f", "t2w")):
        save(folder / f"{pid}-{other}.nii.gz", decoy(image, i))
    if with_seg:
        labels = seg_array() if labels is None else labels
        save(folder / f"{pid}-seg.nii.gz", in_source_labels(labels, BRATS2023_OF_OURS))
    return folder


def msd_case(root: Path, pid: str, image: np.ndarray | None = None,
             labels: np.ndarray | None = None, test: bool = False) -> Path:
    """``imagesTr/<pid>.nii.gz`` 4-D (FLAIR, T1w, T1gd, T2w) and ``labelsTr/<pid>.nii.gz`` (1
    edema, 2 non-enhancing, 3 enhancing); ``test``: in ``imagesTs``, without labels. Only the
    T1gd channel holds ``image``; the others are distinct decoys."""
    image = image_array() if image is None else image
    decoys = [decoy(image, i) for i in range(3)]
    channels = np.stack([decoys[0], decoys[1], image, decoys[2]], axis=-1).astype(np.float32)
    path = save(root / ("imagesTs" if test else "imagesTr") / f"{pid}.nii.gz", channels)
    if not test:
        labels = seg_array() if labels is None else labels
        save(root / "labelsTr" / f"{pid}.nii.gz", in_source_labels(labels, MSD_OF_OURS))
    return path
