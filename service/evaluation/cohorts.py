"""The two sides of an evaluation: the index's reference slices and the query slices.

References are what the index holds, in the order of ``Retrieval.slice_ids``: images and lesion
labels from the index's own thumbnails (what was encoded), normal anatomy labels from the
reference cohort's files (the catalogue records each patient's source file; ``--references``
points elsewhere when the cohort has moved). Queries are patients of other cohorts, read through
the one preprocessing path (``load_case`` and ``case_slices``, as indexing and volume uploads).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session
from tqdm import tqdm

from indexer import store
from indexer.catalog import Patient
from ingest.layouts import Case, find_cases, find_cases_in
from ingest.volumes import load_case
from model.data import preprocess
from model.data.brats import SEG_LABEL_TO_CLASS
from model.data.dataset import case_slices
from model.data.nifti import VolumeError
from model.train import data_fingerprint

log = logging.getLogger(__name__)


class EvaluationError(ValueError):
    """Inputs an evaluation cannot use; the message names the patient, file or option."""


@dataclass
class References:
    """The index's slices, row i = ``Retrieval.slice_ids[i]``."""

    image: np.ndarray  # (N, 256, 256) uint8, the stored thumbnails
    lesion: np.ndarray  # (N, 256, 256) uint8 classes 0 background, 1 TC, 2 ED, 3 ET
    anatomy: np.ndarray | None  # (N, 256, 256) uint8 labels 0..6; None if a patient lacks them
    patient: list[str]  # external id per row
    slice_index: np.ndarray  # (N,) axial index per row
    without_anatomy: list[str] = field(default_factory=list)  # patients whose labels are missing
    fingerprint: str | None = None  # of the cohort files read (model.train.data_fingerprint)

    @property
    def has_lesion(self) -> np.ndarray:
        return self.lesion.reshape(len(self.lesion), -1).any(axis=1)


@dataclass
class Queries:
    """The query slices drawn for an evaluation, one row each."""

    patient: np.ndarray  # (Q,) external id
    slice_index: np.ndarray  # (Q,) axial index in the RAS+ volume
    image: np.ndarray  # (Q, 256, 256) float32 in [0, 1]
    lesion: np.ndarray  # (Q, 256, 256) uint8 classes 0..3
    anatomy: np.ndarray | None  # (Q, 256, 256) uint8 labels 0..6
    healthy: np.ndarray | None  # (Q, 256, 256) float32: the lesion-free twin
    available: dict[str, int]  # brain slices each query patient has (before drawing)
    fingerprint: str = ""

    @property
    def has_lesion(self) -> np.ndarray:
        return self.lesion.reshape(len(self.lesion), -1).any(axis=1)


def _cases_under(dirs: list[Path], required: bool = True) -> dict[str, Case]:
    """``required``: none found is an error (queries); references read from their folders only
    their anatomy labels, and go without when there are none."""
    try:
        cases = (find_cases_in(dirs).cases if required
                 else [c for root in dirs for c in find_cases(root).cases])
    except FileNotFoundError as exc:  # a missing folder, or none with a usable case
        raise EvaluationError(str(exc)) from exc
    found: dict[str, Case] = {}
    for case in cases:
        if case.pid in found:
            raise EvaluationError(f"patient id {case.pid} appears twice: "
                                  f"{found[case.pid].t1ce} and {case.t1ce}")
        found[case.pid] = case
    return found


def _reference_cases(patients: list, dirs: list[Path]) -> dict[str, Case]:
    """Each indexed patient's files: under ``dirs`` when given, else where the index read them."""
    if dirs:
        return _cases_under(dirs, required=False)
    found: dict[str, Case] = {}
    for root in sorted({Path(p.source_path).parent.parent for p in patients}):
        if root.is_dir():
            found.update({c.pid: c for c in find_cases(root).cases})
    return found


def _files(case: Case) -> list[Path]:
    return [f for f in (case.t1ce, case.seg, case.anatomy, case.healthy) if f is not None]


def load_references(retrieval, reference_dirs: list[Path] | None = None,
                    progress: bool = True) -> References:
    with Session(retrieval.engine) as session:
        patients = session.execute(
            select(Patient.id, Patient.external_id, Patient.source_path).order_by(Patient.id)
        ).all()
    cases = _reference_cases(patients, [Path(d) for d in reference_dirs or []])
    n = len(retrieval.slice_ids)
    image = np.zeros((n, preprocess.SLICE_SIZE, preprocess.SLICE_SIZE), np.uint8)
    lesion = np.zeros_like(image)
    anatomy = np.zeros_like(image)
    names: list[str] = [""] * n
    without_anatomy, read = [], []
    for p in tqdm(patients, desc="references", unit="patient", disable=not progress):
        rows = np.flatnonzero(retrieval.slice_patient == p.id)
        wanted = retrieval.slice_index[rows]
        thumbs = store.read_thumbnails(retrieval.index_dir, p.id)
        if "labels" not in thumbs:
            raise EvaluationError(f"reference patient {p.external_id} was indexed without a "
                                  f"segmentation: every reference needs lesion labels")
        at = np.minimum(np.searchsorted(thumbs["slice_index"], wanted),
                        len(thumbs["slice_index"]) - 1)
        if not np.array_equal(thumbs["slice_index"][at], wanted):
            raise EvaluationError(f"reference patient {p.external_id}: stored thumbnails lack "
                                  f"indexed slices (run `cbir index verify`)")
        image[rows] = thumbs["image"][at]
        lesion[rows] = SEG_LABEL_TO_CLASS[thumbs["labels"][at]]
        for r in rows:
            names[r] = p.external_id
        case = cases.get(p.external_id)
        if case is None or case.anatomy is None:
            without_anatomy.append(p.external_id)
            continue
        try:
            vols = load_case(case, with_healthy=False)
        except VolumeError as exc:
            raise EvaluationError(f"reference patient {p.external_id}: {exc}") from exc
        slices = preprocess.axial_slices(vols.image)[wanted]
        if np.abs(np.rint(slices * 255) - thumbs["image"][at]).max() > 1:
            raise EvaluationError(f"reference patient {p.external_id}: the files under "
                                  f"{case.folder} are not the ones indexed (images differ)")
        anatomy[rows] = preprocess.axial_slices(vols.anatomy)[wanted]
        read.append((p.external_id, _files(case)))
    if without_anatomy:
        log.warning("no anatomy labels for %d reference patients (%s): normal-label figures "
                    "are left out", len(without_anatomy), ", ".join(without_anatomy[:5]))
    return References(image=image, lesion=lesion,
                      anatomy=None if without_anatomy else anatomy, patient=names,
                      slice_index=retrieval.slice_index.copy(),
                      without_anatomy=without_anatomy,
                      fingerprint=data_fingerprint(read) if read else None)


def _quotas(total: int | None, patients: int) -> list[int | None]:
    if total is None:
        return [None] * patients
    if total < patients:
        raise EvaluationError(f"--max-queries {total} is less than one slice per query patient "
                              f"({patients} patients)")
    return [total // patients + (i < total % patients) for i in range(patients)]


def _draw(has_lesion: np.ndarray, quota: int | None, rng: np.random.Generator) -> np.ndarray:
    """Rows to query: up to half the quota from slices with a lesion, the rest without (either
    side fills in when the other runs short), so both kinds of query are well represented."""
    rows = np.arange(len(has_lesion))
    if quota is None or quota >= len(rows):
        return rows
    with_, without = rows[has_lesion], rows[~has_lesion]
    take_with = min(len(with_), max(quota - len(without), (quota + 1) // 2))
    picked = np.concatenate([rng.choice(with_, take_with, replace=False),
                             rng.choice(without, quota - take_with, replace=False)])
    return np.sort(picked)


def load_queries(query_dirs: list[Path], indexed: set[str], max_queries: int | None, seed: int,
                 progress: bool = True) -> Queries:
    """Draw query slices from the query cohorts; refuse patients the index holds."""
    cases = _cases_under([Path(d) for d in query_dirs])
    overlap = sorted(set(cases) & indexed)
    if overlap:
        raise EvaluationError(f"query patients are in the index: {', '.join(overlap)}; queries "
                              f"must come from another cohort")
    unlabelled = sorted(pid for pid, c in cases.items() if c.seg is None)
    if unlabelled:
        raise EvaluationError(f"query patients without a segmentation: "
                              f"{', '.join(unlabelled)}")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in
                                          ("pid", "index", "image", "lesion", "anatomy", "healthy")}
    available: dict[str, int] = {}
    ordered = [cases[pid] for pid in sorted(cases)]
    for case, quota in tqdm(list(zip(ordered, _quotas(max_queries, len(ordered)), strict=True)),
                            desc="queries", unit="patient", disable=not progress):
        try:
            st = case_slices(load_case(case))
        except VolumeError as exc:
            raise EvaluationError(f"query patient {case.pid}: {exc}") from exc
        available[case.pid] = len(st.slice_index)
        rows = _draw(st.abnormal.reshape(len(st.abnormal), -1).any(axis=1), quota, rng)
        parts["pid"].append(np.full(len(rows), case.pid, dtype=object))
        parts["index"].append(st.slice_index[rows])
        parts["image"].append(st.image[rows])
        parts["lesion"].append(st.abnormal[rows])
        parts["anatomy"].append(None if st.anatomy is None else st.anatomy[rows])
        parts["healthy"].append(None if st.healthy is None else st.healthy[rows])

    def joined(key):
        if any(p is None for p in parts[key]):
            return None
        return np.concatenate(parts[key])

    return Queries(patient=joined("pid"), slice_index=joined("index"), image=joined("image"),
                   lesion=joined("lesion"), anatomy=joined("anatomy"),
                   healthy=joined("healthy"), available=available,
                   fingerprint=data_fingerprint([(c.pid, _files(c)) for c in ordered]))
