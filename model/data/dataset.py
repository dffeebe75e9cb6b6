"""A PyTorch ``Dataset`` of axial slices for training and evaluation.

Each item is a dict:

- ``image``: (1, 256, 256) float32 in [0, 1] (the shared preprocessing path);
- ``abnormal``: (256, 256) int64 classes 0 background, 1 TC (label 1), 2 ED (label 2),
  3 ET (label 4); all background when the patient has no segmentation;
- ``has_seg``: bool, whether ``abnormal`` is ground truth;
- ``anatomy``: (256, 256) int64 normal labels 0..6, or -1 everywhere when absent;
- ``healthy``: (1, 256, 256) float32 lesion-free ground truth, or -1 everywhere when absent;
- ``tissue``: (256, 256) uint8 tissue ids the image was rendered from (synthetic cohorts, when
  loaded with ``tissue=True``), 0 everywhere when absent; ``has_tissue`` says which;
- ``tissue_slab`` (only with ``slab_half`` > 0): (2 x slab_half + 1, 256, 256) uint8, the tissue
  levels around the slice, centre = ``tissue``, 0 (background) beyond the stored slices;
- ``pid``, ``slice_index``.

Slices whose brain area is below ``preprocess.MIN_BRAIN_PIXELS`` are skipped. Patients that fail
to load are skipped, and listed in ``dataset.skipped`` with the reason; nothing fails half-way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from ingest.layouts import Case, find_cases
from ingest.volumes import CaseVolumes, load_case
from model.data import preprocess
from model.data.brats import SEG_LABEL_TO_CLASS
from model.data.nifti import VolumeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SliceStacks:
    """One patient's brain-containing axial slices, already in the model's 256 x 256 frame."""

    pid: str
    slice_index: np.ndarray  # (S,) axial index in the RAS+ volume
    image: np.ndarray  # (S, 256, 256) float32
    abnormal: np.ndarray | None  # (S, 256, 256) uint8 classes 0..3
    anatomy: np.ndarray | None  # (S, 256, 256) uint8 labels 0..6
    healthy: np.ndarray | None  # (S, 256, 256) float32
    tissue: np.ndarray | None = None  # (S, 256, 256) uint8 tissue ids


def case_slices(vols: CaseVolumes) -> SliceStacks:
    """All brain-containing axial slices of a loaded patient (preprocess rules 3 and 4)."""
    image = preprocess.axial_slices(vols.image)
    keep = np.flatnonzero(preprocess.brain_area(image) >= preprocess.MIN_BRAIN_PIXELS)

    def stack(arr: np.ndarray | None) -> np.ndarray | None:
        return None if arr is None else preprocess.axial_slices(arr)[keep]

    seg = stack(vols.seg)
    return SliceStacks(
        pid=vols.case.pid,
        slice_index=keep,
        image=image[keep],
        abnormal=None if seg is None else SEG_LABEL_TO_CLASS[seg],
        anatomy=stack(vols.anatomy),
        healthy=stack(vols.healthy),
        tissue=stack(vols.tissue),
    )


class SliceDataset(Dataset):
    """Brain-containing axial slices of a set of patients, held in memory after one scan."""

    def __init__(self, cases: Iterable[Case], progress: bool = False,
                 twins: set[str] | None = None, tissue: bool = False, slab_half: int = 0):
        """``twins``: the patients whose lesion-free twin and anatomy labels are loaded (None:
        all; training needs them for its held-out patients only, and they are half the memory).
        ``tissue``: load the tissue maps of synthetic patients (training renders them);
        ``slab_half``: with them, each item's ``tissue_slab`` reaches this many levels each way
        (thick-slice rendering, ``appearance.render_thick``)."""
        cases = list(cases)
        self.slab_half = slab_half if tissue else 0
        self.patients: list[SliceStacks] = []
        self.skipped: list[tuple[Path, str]] = []
        for case in tqdm(cases, desc="loading patients", unit="patient", disable=not progress):
            extras = twins is None or case.pid in twins
            try:
                self.patients.append(case_slices(load_case(
                    case, with_healthy=extras, with_anatomy=extras, with_tissue=tissue)))
            except VolumeError as exc:
                log.warning("skipping patient %s: %s", case.pid, exc)
                self.skipped.append((exc.path, exc.problem))
        # Flat index: item i -> (patient, row within that patient's stacks).
        self._items = [(p, r) for p, st in enumerate(self.patients)
                       for r in range(len(st.slice_index))]

    @classmethod
    def from_folders(cls, roots: Iterable[Path | str], progress: bool = False) -> SliceDataset:
        """Scan every folder for patients; folders skipped by the scan are reported too."""
        cases, skipped = [], []
        for root in roots:
            scan = find_cases(root)
            cases += scan.cases
            skipped += scan.skipped
        ds = cls(cases, progress=progress)
        ds.skipped = skipped + ds.skipped
        return ds

    def indices_of(self, pids: set[str]) -> list[int]:
        """Item indices of the slices of the given patients (for a patient-level split)."""
        return [i for i, (p, _) in enumerate(self._items) if self.patients[p].pid in pids]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> dict:
        p, r = self._items[i]
        st = self.patients[p]
        shape = st.image.shape[1:]
        abnormal = st.abnormal[r] if st.abnormal is not None else np.zeros(shape, np.uint8)
        anatomy = st.anatomy[r].astype(np.int64) if st.anatomy is not None else np.full(shape, -1)
        healthy = st.healthy[r] if st.healthy is not None else np.full(shape, -1, np.float32)
        tissue = st.tissue[r] if st.tissue is not None else np.zeros(shape, np.uint8)
        extra = {} if not self.slab_half else {"tissue_slab": torch.from_numpy(
            self._slab(st, r) if st.tissue is not None
            else np.zeros((2 * self.slab_half + 1, *shape), np.uint8))}
        return extra | {
            "image": torch.from_numpy(st.image[r][None].copy()),
            "abnormal": torch.from_numpy(abnormal.astype(np.int64)),
            "has_seg": st.abnormal is not None,
            "anatomy": torch.from_numpy(anatomy.astype(np.int64)),
            "healthy": torch.from_numpy(healthy[None].copy()),
            "tissue": torch.from_numpy(tissue.copy()),
            "has_tissue": st.tissue is not None,
            "pid": st.pid,
            "slice_index": int(st.slice_index[r]),
        }

    def _slab(self, st: SliceStacks, r: int) -> np.ndarray:
        """The tissue levels slice_index - slab_half .. + slab_half of row ``r``; a level not
        stored (too little brain to keep) is background."""
        wanted = st.slice_index[r] + np.arange(-self.slab_half, self.slab_half + 1)
        rows = np.searchsorted(st.slice_index, wanted).clip(0, len(st.slice_index) - 1)
        present = st.slice_index[rows] == wanted
        slab = st.tissue[rows]
        slab[~present] = 0
        return slab
