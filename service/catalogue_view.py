"""The catalogue as one generation sees it, read once into memory.

A served generation answers every request from memory: its FAISS indices and this view of the
catalogue rows they hold. A request therefore never reads the catalogue, whose rows a newer
generation may have deleted or added meanwhile (``cbir index add/remove`` while serving), so an
answer is consistent with the one generation it started on.

The view is read as the snapshot of one commit: the active build, then the rows, then the active
build again. Every writer commits its rows together with a new active generation
(``indexer.store``), so when the two reads of the active build agree no commit fell between them,
whatever isolation the database gives single statements (SQLite's driver starts no transaction
for a SELECT; PostgreSQL's default READ COMMITTED gives each statement its own snapshot).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from indexer.catalog import (
    NO_AREA,
    IndexBuild,
    Patient,
    Slice,
    active_build,
    read_slice_arrays,
)

READ_TRIES = 5  # commits landing between the two reads of the active build, in a row


class CatalogueChanged(RuntimeError):
    """Writers kept committing while the view was read."""


@dataclass(frozen=True)
class SliceRecord:
    """A slice's catalogue row (the ``slices`` columns but its codes)."""

    id: int
    patient_id: int
    slice_index: int
    has_abnormality: bool | None
    area_tc: int | None
    area_ed: int | None
    area_et: int | None
    brain_area: int


@dataclass(frozen=True)
class PatientRecord:
    """A patient's catalogue row, and whether its slices carry labels."""

    id: int
    external_id: str
    cohort: str
    slice_count: int
    added_at: datetime
    has_labels: bool
    study_uid: str | None = None  # DICOM-sourced patients: what a viewer opens
    series_uid: str | None = None


@dataclass(frozen=True)
class CatalogueView:
    """Every slice row of one generation by ascending id, as arrays, and its patients."""

    build: IndexBuild  # detached from its session
    slice_ids: np.ndarray  # (N,) int64, sorted
    slice_patient: np.ndarray  # (N,) internal patient id
    slice_index: np.ndarray  # (N,) axial index
    slice_abnormal: np.ndarray  # (N,) int8: 1, 0, or -1 without labels
    areas: np.ndarray  # (N, 4) int32: TC, ED, ET (NO_AREA without labels), brain
    codes: np.ndarray  # (N, 2, 8, 8) uint16: normal, abnormal
    patients: dict[int, PatientRecord]

    def record(self, row: int) -> SliceRecord:
        tc, ed, et, brain = (int(a) for a in self.areas[row])
        flag = int(self.slice_abnormal[row])
        return SliceRecord(
            id=int(self.slice_ids[row]), patient_id=int(self.slice_patient[row]),
            slice_index=int(self.slice_index[row]),
            has_abnormality=None if flag < 0 else bool(flag),
            area_tc=None if tc == NO_AREA else tc, area_ed=None if ed == NO_AREA else ed,
            area_et=None if et == NO_AREA else et, brain_area=brain)


def read_view(engine: Engine) -> CatalogueView | None:
    """The active generation's rows as of one commit; None when nothing was ever built.

    Raises ``CatalogueChanged`` when writers committed between the reads ``READ_TRIES`` times in
    a row, and lets the database's own errors (no tables) through."""
    for _ in range(READ_TRIES):
        with Session(engine) as session:
            build = active_build(session)
            if build is None:
                return None
            session.expunge(build)
            arrays = read_slice_arrays(session)
            patients = session.execute(
                select(Patient, func.count(Slice.has_abnormality)).outerjoin(Slice)
                .group_by(Patient.id)).all()
            again = active_build(session)
            if arrays is None or again is None or again.generation != build.generation:
                continue
            return _view(build, arrays, patients)
    raise CatalogueChanged(f"the catalogue's active generation changed {READ_TRIES} times "
                           f"while it was read")


def _view(build: IndexBuild, arrays: dict[str, np.ndarray], patients) -> CatalogueView:
    return CatalogueView(
        build=build, **arrays,
        patients={p.id: PatientRecord(id=p.id, external_id=p.external_id, cohort=p.cohort,
                                      slice_count=p.slice_count, added_at=p.added_at,
                                      has_labels=bool(labelled), study_uid=p.study_uid,
                                      series_uid=p.series_uid)
                  for p, labelled in patients})
