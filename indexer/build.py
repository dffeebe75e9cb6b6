"""``cbir index build|add|remove``: encode cohorts into the three indices and the catalogue.

Encoding overlaps I/O: a DataLoader's worker processes read, reorient and normalise each
patient's NIfTI files (the shared preprocessing path) while the main process encodes the
previous patient's slices in batches on the GPU when there is one. See ``indexer.store`` for the
crash-safe write protocol.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from indexer import store
from indexer.catalog import (
    IndexBuild,
    Patient,
    Slice,
    active_build,
    encode_codes,
    open_catalog,
    read_slice_arrays,
)
from indexer.distributed import RayOptions, encode_cases_on_ray
from indexer.encoding import (
    CaseSlices,
    EncodedPatient,
    default_device,
    encode_case,
    read_case,
)
from indexer.layout import LAYOUT_VERSION, SPACES
from indexer.lesion_maps import LesionMaps
from indexer.reference import Reference
from ingest.cases import NotInModelSpace, Origin, stage_case, to_model_space
from ingest.dicom import DicomVolume
from ingest.layouts import Case, find_cases_in
from model.checkpoint import load_model
from model.data.preprocess import PREPROCESSING_VERSION

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = REPO_ROOT / "checkpoints" / "cbir-cpu.pt"


@dataclass
class IndexReport:
    """What a build/add/remove did; printed by the CLI."""

    operation: str
    generation: int
    kind: str = store.DEFAULT_KIND
    patients_added: list[str] = field(default_factory=list)
    patients_removed: list[str] = field(default_factory=list)
    slices_added: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, problem)
    encode_seconds: float = 0.0
    total_slices: int = 0
    total_patients: int = 0
    bytes_per_slice: dict[str, int] = field(default_factory=dict)  # store.slice_bytes
    fixed_bytes: dict[str, int] = field(default_factory=dict)  # the rest of each file
    index_bytes: int = 0

    @property
    def slices_per_s(self) -> float:
        return self.slices_added / self.encode_seconds if self.encode_seconds > 0 else 0.0


def _identity(item):
    """DataLoader collate that keeps numpy arrays as they are (module level: picklable)."""
    return item


class _PatientSlices(Dataset):
    """Item i: ``(case, read_case(case))`` of patient i, read in the loader's worker processes
    (reading, preprocessing, label areas, thumbnail compression), off the encoding process."""

    def __init__(self, cases: list[Case]):
        self.cases = cases

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int):
        read = read_case(self.cases[i])
        if isinstance(read, CaseSlices):
            # A tensor, not an array: the loader hands tensors over in shared memory, where a
            # (S, 256, 256) float32 array would be pickled through a pipe into the encoding
            # process.
            read.images = torch.from_numpy(read.images)
        return self.cases[i], read


def _die_with(parent: int, _worker_id: int) -> None:
    """A reader process ends when the indexer does. One killed with SIGKILL would otherwise
    leave its readers blocked for good on a full result pipe nobody reads, holding the writer
    lock they inherited: every later `cbir index add/remove` was refused ("another
    build/add/remove is running") until someone killed them."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the indexer died before the line above
        os._exit(1)


def encode_cases(model, cases: list[Case], batch_size: int = 32, workers: int = 2,
                 device: torch.device | None = None, progress: bool = True):
    """Yield ``EncodedPatient`` or ``(case, problem)`` per case, in order."""
    device = device or default_device()
    loader = DataLoader(_PatientSlices(cases), batch_size=None, num_workers=workers,
                        collate_fn=_identity, prefetch_factor=2 if workers else None,
                        worker_init_fn=functools.partial(_die_with, os.getpid()))
    bar = tqdm(total=len(cases), desc="indexing", unit="patient", disable=not progress)
    slices = 0
    started = time.perf_counter()
    try:
        for case, read in loader:
            bar.update()
            if isinstance(read, str):
                yield case, read
                continue
            read.images = read.images.numpy()
            encoded = encode_case(model, case, read, batch_size, device)
            slices += len(encoded.slice_index)
            bar.set_postfix(slices_per_s=f"{slices / (time.perf_counter() - started):.1f}")
            yield encoded
    finally:
        bar.close()


def codebooks_of(model) -> dict[str, np.ndarray]:
    return {"normal": model.normal_quantizer.codebook.detach().cpu().numpy(),
            "abnormal": model.abnormal_quantizer.codebook.detach().cpu().numpy()}


def _slice_rows(patient_id: int, first_id: int, enc: EncodedPatient) -> list[Slice]:
    rows = []
    for r, k in enumerate(enc.slice_index):
        areas = {}
        if enc.areas is not None:
            tc, ed, et = (int(a) for a in enc.areas[r])
            areas = {"area_tc": tc, "area_ed": ed, "area_et": et}
        rows.append(Slice(
            id=first_id + r,
            patient_id=patient_id,
            slice_index=int(k),
            has_abnormality=None if enc.areas is None else bool(enc.areas[r].sum() > 0),
            brain_area=int(enc.brain_area[r]),
            normal_codes=encode_codes(enc.normal_idx[r]),
            abnormal_codes=encode_codes(enc.abnormal_idx[r]),
            **areas,
        ))
    return rows


def _scan(data: list[Path]) -> tuple[list[Case], list[tuple[str, str]]]:
    scan = find_cases_in(data)  # NoCasesError (a FileNotFoundError) when there is none
    seen: dict[str, Case] = {}
    for case in scan.cases:
        if case.pid in seen:
            raise store.IndexStoreError(
                f"patient id {case.pid} appears twice: {seen[case.pid].t1ce} and {case.t1ce}")
        seen[case.pid] = case
    return scan.cases, [(str(p), why) for p, why in scan.skipped]


class Indexer:
    """Writes to one index directory. Use ``build``, ``add`` and ``remove``."""

    def __init__(self, index_dir: Path | str, db_url: str | None = None):
        self.index_dir = Path(index_dir)
        self.db_url = db_url

    # -- opening -------------------------------------------------------------------------------

    def _manifest(self, create: bool, checkpoint: Path | None,
                  kind: str = store.DEFAULT_KIND) -> dict:
        if create:
            manifest = {"db_url": self.db_url, "checkpoint": str(Path(checkpoint).resolve()),
                        "kind": kind}
            store.write_manifest(self.index_dir, manifest)
            return manifest
        manifest = store.read_manifest(self.index_dir)
        if self.db_url is None:
            self.db_url = manifest.get("db_url")
        return manifest

    def _engine(self):
        return open_catalog(self.db_url or store.default_db_url(self.index_dir))

    # -- operations ----------------------------------------------------------------------------

    def build(self, data: list[Path], checkpoint: Path | None = None,
              kind: str = store.DEFAULT_KIND, **kw) -> IndexReport:
        """A new index of ``kind`` (``store.KINDS``) from cohort folders; refuses a directory
        that already holds one.

        A directory left by a build that never committed (killed, or failed) is built afresh.
        Nothing is written before the data folders and the checkpoint have been checked.
        """
        if kind not in store.KINDS:
            raise store.IndexStoreError(f"unknown index kind {kind!r}: use one of "
                                        f"{', '.join(store.KINDS)}")
        checkpoint = Path(checkpoint or DEFAULT_CHECKPOINT)
        cases, skipped = _scan([Path(d) for d in data])
        model, ckpt = self._load_model(checkpoint)
        if (self.index_dir / "index.json").exists() and self._has_active_build():
            raise store.IndexStoreError(
                f"{self.index_dir} already holds an index: use `cbir index add` to extend it")
        with store.writer_lock(self.index_dir):
            self._manifest(create=True, checkpoint=checkpoint, kind=kind)
            return self._change(model, ckpt, cases, skipped, replace=False, operation="build",
                                kind=kind, checkpoint=checkpoint, **kw)

    def add(self, data: list[Path], checkpoint: Path | None = None, replace: bool = False,
            kind: str | None = None, origins: dict[str, Origin] | None = None,
            **kw) -> IndexReport:
        """Add patients to the index, of the kind its manifest records; ``kind``, when given,
        must be that one. ``origins`` (patient id -> ``ingest.cases.Origin``) says where a
        staged case really came from (a DICOM folder, a PACS), for the catalogue to keep in
        place of the staged file's path."""
        manifest = self._manifest(create=False, checkpoint=None)  # before creating anything
        recorded = store.manifest_kind(manifest)
        if kind is not None and kind != recorded:
            raise store.IndexStoreError(
                f"{self.index_dir} holds a {recorded} index (index.json); --kind {kind} "
                f"conflicts with it: leave --kind out, or build a new index of kind {kind}")
        cases, skipped = _scan([Path(d) for d in data])
        checkpoint = Path(checkpoint or manifest["checkpoint"])
        model, ckpt = self._load_model(checkpoint)
        with store.writer_lock(self.index_dir):
            return self._change(model, ckpt, cases, skipped, replace=replace,
                                operation="replace" if replace else "add", kind=recorded,
                                checkpoint=checkpoint, origins=origins or {}, **kw)

    def remove(self, pids: list[str]) -> IndexReport:
        kind = store.manifest_kind(self._manifest(create=False, checkpoint=None))
        with store.writer_lock(self.index_dir):
            engine = self._engine()
            with Session(engine) as session:
                current = self._require_active(session)
                patients = session.scalars(
                    select(Patient).where(Patient.external_id.in_(pids))).all()
                missing = sorted(set(pids) - {p.external_id for p in patients})
                if missing:
                    raise store.IndexStoreError(f"not in the index: {', '.join(missing)}")
                ids = np.array(session.scalars(select(Slice.id).where(
                    Slice.patient_id.in_([p.id for p in patients]))).all(), dtype=np.int64)
                indices = store.read_generation(self.index_dir, current.generation)
                store.remove_slices(indices, ids)
                gen = current.generation + 1
                store.write_generation(self.index_dir, gen, indices)
                removed_ids = [p.id for p in patients]
                session.execute(delete(Slice).where(Slice.patient_id.in_(removed_ids)))
                session.execute(delete(Patient).where(Patient.id.in_(removed_ids)))
                # No model here: the next reference is measured with the codebooks the
                # current one was (none for an index written before references were stored).
                books = Reference.stored_codebooks(
                    store.reference_path(self.index_dir, current.generation))
                report = self._commit(session, current, gen, "remove", current.checkpoint_sha256,
                                      current.preset, current.next_patient_id,
                                      current.next_slice_id, books)
                report.patients_removed = sorted(pids)
                report.kind = kind
            self._collect_garbage(engine)
            engine.dispose()
            return self._sizes(report, indices)

    # -- internals -----------------------------------------------------------------------------

    def _load_model(self, checkpoint: Path):
        if not checkpoint.is_file():
            raise store.IndexStoreError(
                f"{checkpoint}: no checkpoint there; pass --checkpoint (train one with "
                f"`cbir train`)")
        model, ckpt = load_model(checkpoint, default_device())
        return model, ckpt

    @staticmethod
    def _require_active(session: Session) -> IndexBuild:
        current = active_build(session)
        if current is None:
            raise store.IndexStoreError("the catalogue has no active index build")
        return current

    def _has_active_build(self) -> bool:
        manifest = store.read_manifest(self.index_dir)
        engine = open_catalog(manifest.get("db_url") or store.default_db_url(self.index_dir))
        try:
            with Session(engine) as session:
                return active_build(session) is not None
        finally:
            engine.dispose()

    def _change(self, model, ckpt: dict, cases: list[Case], skipped: list[tuple[str, str]],
                replace: bool, operation: str, kind: str, checkpoint: Path,
                batch_size: int = 32, workers: int = 2, progress: bool = True,
                origins: dict[str, Origin] | None = None,
                ray: RayOptions | None = None) -> IndexReport:
        """Encode ``cases`` (in this process, or on Ray with ``ray``) and write them as the next
        generation; both encoders yield the same items in case order to this one writer."""
        origins = origins or {}
        engine = self._engine()
        with Session(engine) as session:
            current = active_build(session)
            if current is not None and current.checkpoint_sha256 != ckpt["weights_sha256"]:
                raise store.IndexStoreError(
                    f"this index was built with checkpoint {current.checkpoint_sha256[:12]} "
                    f"({current.preset}); the checkpoint given is "
                    f"{ckpt['weights_sha256'][:12]} ({ckpt['preset']}): codes of different "
                    f"models cannot be mixed")
            existing = {p.external_id: p for p in session.scalars(
                select(Patient).where(Patient.external_id.in_([c.pid for c in cases])))}
            if existing and not replace:
                raise store.IndexStoreError(
                    f"already indexed: {', '.join(sorted(existing))}; pass --replace to "
                    f"re-encode them")
            next_patient = current.next_patient_id if current else 1
            next_slice = current.next_slice_id if current else 1
            books = codebooks_of(model)
            indices = (store.read_generation(self.index_dir, current.generation) if current
                       else store.empty_indices(kind, books))
            for space in SPACES:
                if problem := store.kind_problem(indices[space], space, kind, books):
                    raise store.IndexStoreError(f"cannot add to this index: {problem}")
            report = IndexReport(operation=operation, generation=0, kind=kind,
                                 skipped=list(skipped))
            new_patients: list[Patient] = []
            new_rows: list[Slice] = []
            new_abnormal: list[np.ndarray] = []  # the new slices' abnormal codes
            started = time.perf_counter()
            if ray is None:
                items = encode_cases(model, cases, batch_size, workers, progress=progress)
            else:
                items = encode_cases_on_ray(ray, checkpoint, ckpt["weights_sha256"], cases,
                                            batch_size, progress=progress)
            for item in items:
                if isinstance(item, tuple):
                    report.skipped.append((str(item[0].folder), item[1]))
                    continue
                pid = next_patient
                next_patient += 1
                rows = _slice_rows(pid, next_slice, item)
                next_slice += len(rows)
                ids = np.array([r.id for r in rows], dtype=np.int64)
                store.add_slices(indices, books, item.normal_idx, item.abnormal_idx, ids)
                new_abnormal.append(item.abnormal_idx)
                store.write_thumbnails(self.index_dir, pid, item.thumbnails)
                origin = origins.get(item.case.pid)
                new_patients.append(Patient(
                    id=pid, external_id=item.case.pid,
                    source_path=origin.source if origin else str(item.case.t1ce),
                    cohort=origin.cohort if origin else item.case.cohort,
                    study_uid=origin.study_uid if origin else None,
                    series_uid=origin.series_uid if origin else None,
                    slice_count=len(rows)))
                new_rows += rows
                report.patients_added.append(item.case.pid)
                report.slices_added += len(rows)
            report.encode_seconds = time.perf_counter() - started
            if not report.patients_added:  # nothing written yet: the index stays as it was
                reasons = "; ".join(f"{where}: {why}" for where, why in report.skipped[:3])
                raise store.IndexStoreError(f"no usable case: every patient found was skipped "
                                            f"({reasons})")
            replaced = [p for pid_, p in existing.items() if pid_ in report.patients_added]
            if replaced:
                old_ids = np.array(session.scalars(select(Slice.id).where(
                    Slice.patient_id.in_([p.id for p in replaced]))).all(), dtype=np.int64)
                store.remove_slices(indices, old_ids)
                report.patients_removed = sorted(p.external_id for p in replaced)
            gen = (current.generation if current else 0) + 1
            store.write_generation(self.index_dir, gen, indices)  # before the commit
            if replaced:
                replaced_ids = [p.id for p in replaced]
                session.execute(delete(Slice).where(Slice.patient_id.in_(replaced_ids)))
                session.execute(delete(Patient).where(Patient.id.in_(replaced_ids)))
            session.add_all(new_patients)
            session.flush()
            session.add_all(new_rows)
            committed = self._commit(session, current, gen, operation, ckpt["weights_sha256"],
                                     ckpt["preset"], next_patient, next_slice, books)
            report.generation = committed.generation
            report.total_patients = committed.total_patients
            report.total_slices = committed.total_slices
        # The lesion maps of the codes just written (indexer.lesion_maps), so that the service
        # starts without decoding them; after the commit, as a cache may be filled at any time.
        LesionMaps.for_index(self.index_dir, ckpt["weights_sha256"],
                             np.concatenate(new_abnormal), model,
                             next(model.parameters()).device)
        self._collect_garbage(engine)
        engine.dispose()
        return self._sizes(report, indices)

    def _commit(self, session: Session, current: IndexBuild | None, gen: int, operation: str,
                sha: str, preset: str, next_patient: int, next_slice: int,
                codebooks: dict[str, np.ndarray] | None) -> IndexReport:
        """The switch: rows and the new active generation in one transaction. The generation's
        reference distances are written just before it, like its FAISS files."""
        session.flush()
        if codebooks is not None:
            self._write_reference(session, gen, codebooks)
        patients = session.scalar(select(func.count()).select_from(Patient))
        slices = session.scalar(select(func.count()).select_from(Slice))
        if current is not None:
            current.status = "superseded"
            session.flush()  # one active row at any moment, even inside the transaction
        session.add(IndexBuild(generation=gen, operation=operation, checkpoint_sha256=sha,
                               preset=preset, layout_version=LAYOUT_VERSION,
                               preprocessing_version=PREPROCESSING_VERSION, patients=patients,
                               slices=slices, next_patient_id=next_patient,
                               next_slice_id=next_slice, status="active"))
        session.commit()
        return IndexReport(operation=operation, generation=gen, total_patients=patients,
                           total_slices=slices)

    def _write_reference(self, session: Session, gen: int,
                         codebooks: dict[str, np.ndarray]) -> None:
        """The between-patient nearest-neighbour distances of every slice the new generation
        holds (indexer/reference.py); none with fewer than two patients."""
        slices = read_slice_arrays(session)  # this transaction's rows, under the writer lock
        if slices is None:
            raise store.IndexStoreError("the catalogue's slices changed while the new generation "
                                        "was written: another writer ignored the lock")
        reference = Reference.measure(codebooks, slices["codes"], slices["slice_patient"],
                                      slices["slice_abnormal"])
        if reference is not None:
            reference.save(store.reference_path(self.index_dir, gen), codebooks)

    def _collect_garbage(self, engine) -> None:
        with Session(engine) as session:
            current = active_build(session)
            ids = set(session.scalars(select(Patient.id)).all())
        store.collect_garbage(self.index_dir, current.generation if current else None, ids)

    def _sizes(self, report: IndexReport, indices: dict) -> IndexReport:
        """Bytes per slice and the files' sizes; a codebook concat has no file (0 bytes)."""
        total = 0
        for space in SPACES:
            report.bytes_per_slice[space] = store.slice_bytes(indices[space])
            report.fixed_bytes[space] = 0
            if space in store.stored_spaces(report.kind):
                size = store.faiss_path(self.index_dir, space, report.generation).stat().st_size
                total += size
                report.fixed_bytes[space] = (size - indices[space].ntotal
                                             * report.bytes_per_slice[space])
        report.index_bytes = total
        return report


def add_dicom(indexer: Indexer, series: Iterable[DicomVolume | tuple[str, str]], cohort: str,
              checkpoint: Path | None = None, replace: bool = False,
              **kw) -> IndexReport:
    """Add DICOM-sourced cases through the same path as NIfTI cohorts: each series is brought to
    the model's space (``ingest.cases.to_model_space``), staged as a one-patient cohort keyed by
    its StudyInstanceUID, and added with ``Indexer.add``. ``series`` yields volumes, or
    ``(where, problem)`` for a source that gave none (reported as skipped)."""
    skipped: list[tuple[str, str]] = []
    origins: dict[str, Origin] = {}
    with tempfile.TemporaryDirectory(prefix="cbir-dicom-") as tmp:
        for item in series:
            if isinstance(item, tuple):
                skipped.append(item)
                continue
            where = item.source or str(item.volume.path)
            if item.study_uid in origins:
                skipped.append((where, f"study {item.study_uid} already gave series "
                                       f"{origins[item.study_uid].series_uid}: one per study"))
                continue
            try:
                volume = to_model_space(item.volume)
            except NotInModelSpace as exc:
                skipped.append((where, str(exc)))
                continue
            stage_case(Path(tmp), item.study_uid, volume)
            origins[item.study_uid] = Origin(source=where, cohort=cohort,
                                             study_uid=item.study_uid,
                                             series_uid=item.series_uid)
            log.info("staged series %s of study %s", item.series_uid, item.study_uid)
        if not origins:
            reasons = "; ".join(f"{w}: {p}" for w, p in skipped) or "nothing found"
            raise store.IndexStoreError(f"no DICOM series to add ({reasons})")
        report = indexer.add([Path(tmp)], checkpoint, replace=replace, origins=origins, **kw)
    report.skipped = skipped + [(origins[Path(p).name].source if Path(p).name in origins
                                 else p, why) for p, why in report.skipped]
    return report
