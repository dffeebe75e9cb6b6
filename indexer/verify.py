"""``cbir index verify`` and ``cbir index stats``: check an index against its catalogue."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sqlalchemy import func, inspect, select
from sqlalchemy.orm import Session

from indexer import store
from indexer.build import codebooks_of
from indexer.catalog import (
    IndexBuild,
    Patient,
    Slice,
    active_build,
    open_catalog,
    read_slice_arrays,
)
from indexer.faiss_lib import faiss
from indexer.layout import DIMS, LAYOUT_VERSION, SPACES, space_vectors
from model.checkpoint import CheckpointError, load_model

MAX_LISTED = 10
VECTOR_CHUNK = 4096  # slices whose stored and expected vectors are compared at once


def _ids(ids) -> str:
    ids = sorted(int(i) for i in ids)
    more = f" and {len(ids) - MAX_LISTED} more" if len(ids) > MAX_LISTED else ""
    return ", ".join(map(str, ids[:MAX_LISTED])) + more


def _engine(index_dir: Path, db_url: str | None):
    manifest = store.read_manifest(index_dir)
    url = db_url or manifest.get("db_url") or store.default_db_url(index_dir)
    return manifest, open_catalog(url, migrate=False)


NO_ACTIVE_BUILD = "the catalogue has no active index build"


def _has_tables(engine) -> bool:
    """False for a build killed before its catalogue was migrated: nothing was committed."""
    return inspect(engine).has_table("index_builds")


def verify(index_dir: Path | str, db_url: str | None = None,
           checkpoint: Path | str | None = None) -> list[str]:
    """Every inconsistency between catalogue, index files, thumbnails and checkpoint, named.

    An empty list means the index is consistent.
    """
    index_dir = Path(index_dir)
    problems: list[str] = []
    manifest, engine = _engine(index_dir, db_url)
    kind = store.manifest_kind(manifest)
    if not _has_tables(engine):
        engine.dispose()
        return [NO_ACTIVE_BUILD]
    with Session(engine) as session:
        current = active_build(session)
        if current is None:
            return [NO_ACTIVE_BUILD]
        slices = read_slice_arrays(session)
        if slices is None:  # a writer committed meanwhile: what is read would mix two states
            return ["the catalogue changed while it was read; verify again"]
        patients = session.execute(select(Patient.id, Patient.external_id,
                                          Patient.slice_count)).all()
        per_patient = dict(session.execute(
            select(Slice.patient_id, func.count()).group_by(Slice.patient_id)).all())
    engine.dispose()
    catalogue_ids = slices["slice_ids"]
    if current.slices != len(catalogue_ids):
        problems.append(f"build {current.generation} records {current.slices} slices, the "
                        f"catalogue holds {len(catalogue_ids)}")
    if current.patients != len(patients):
        problems.append(f"build {current.generation} records {current.patients} patients, the "
                        f"catalogue holds {len(patients)}")
    if current.layout_version != LAYOUT_VERSION:
        problems.append(f"vector layout {current.layout_version}, this code uses "
                        f"{LAYOUT_VERSION}")
    for pid, ext, count in patients:
        if per_patient.get(pid, 0) != count:
            problems.append(f"patient {ext} records {count} slices, the catalogue holds "
                            f"{per_patient.get(pid, 0)}")
        if not store.thumbnail_path(index_dir, pid).is_file():
            problems.append(f"patient {ext}: thumbnails file {pid}.npz is missing")

    try:
        indices = store.read_generation(index_dir, current.generation)
    except store.IndexStoreError as exc:
        return problems + [str(exc)]
    catalogue_set = set(catalogue_ids.tolist())
    present = set(catalogue_set)  # ids found in the catalogue and in every index
    for space in SPACES:
        index = indices[space]
        if (found := store.index_kind(index)) != kind:
            problems.append(f"{space} index is of kind {found}, index.json records {kind}")
            present = set()  # its ids and vectors are not those of a {kind} index
            continue
        if index.d != DIMS[space]:
            problems.append(f"{space} index has {index.d} dimensions, expected {DIMS[space]}")
        ids = store.index_ids(index)
        id_set = set(ids.tolist())
        present &= id_set
        if len(ids) != len(id_set):
            problems.append(f"{space} index holds duplicate ids")
        if missing := catalogue_set - id_set:
            problems.append(f"{space} index lacks {len(missing)} slice id(s) of the catalogue: "
                            f"{_ids(missing)}")
        if extra := id_set - catalogue_set:
            problems.append(f"{space} index holds {len(extra)} slice id(s) not in the "
                            f"catalogue: {_ids(extra)}")

    if checkpoint is not None and not Path(checkpoint).is_file():
        raise CheckpointError(checkpoint, "checkpoint file not found")  # bad input, not state
    ckpt_path = Path(checkpoint or manifest.get("checkpoint") or "")
    try:
        model, ckpt = load_model(ckpt_path)
    except CheckpointError as exc:
        return problems + [f"cannot check vectors: {exc}"]
    if ckpt["weights_sha256"] != current.checkpoint_sha256:
        problems.append(f"checkpoint {ckpt_path} has weights {ckpt['weights_sha256'][:12]}, the "
                        f"index was built with {current.checkpoint_sha256[:12]}")
        return problems
    books = codebooks_of(model)
    for space in SPACES:
        if store.index_kind(indices[space]) == kind == "codebook" and (
                problem := store.kind_problem(indices[space], space, kind, books)):
            problems.append(problem)
    # Every stored vector equals the codebook lookup of the catalogue's code indices.
    common = np.flatnonzero(np.isin(catalogue_ids, np.fromiter(present, np.int64)))
    for space in SPACES:
        bad = []  # a chunk of slices at a time: float vectors are 16 KiB a slice and space
        chunks = store.stored_vector_chunks(indices[space], catalogue_ids[common], VECTOR_CHUNK)
        for start, (_, stored) in zip(range(0, common.size, VECTOR_CHUNK), chunks, strict=True):
            rows = common[start:start + VECTOR_CHUNK]
            codes = slices["codes"][rows].astype(np.int64)
            expected = space_vectors(books, codes[:, 0], codes[:, 1], spaces=(space,))[space]
            bad += catalogue_ids[rows[~np.all(stored == expected, axis=1)]].tolist()
        if bad:
            problems.append(f"{space} index: {len(bad)} vector(s) differ from the codes in "
                            f"the catalogue: slice id(s) {_ids(bad)}")
    return problems


def stats(index_dir: Path | str, db_url: str | None = None) -> dict:
    """Patients, slices, abnormal fraction, index kind, sizes on disk."""
    index_dir = Path(index_dir)
    manifest, engine = _engine(index_dir, db_url)
    kind = store.manifest_kind(manifest)
    if not _has_tables(engine):
        engine.dispose()
        raise store.IndexStoreError(f"{index_dir}: {NO_ACTIVE_BUILD} (a build never "
                                    f"completed); run `cbir index build` again")
    with Session(engine) as session:
        current = active_build(session)
        patients = session.scalar(select(func.count()).select_from(Patient))
        slices = session.scalar(select(func.count()).select_from(Slice))
        abnormal = session.scalar(select(func.count()).select_from(Slice).where(
            Slice.has_abnormality.is_(True)))
        labelled = session.scalar(select(func.count()).select_from(Slice).where(
            Slice.has_abnormality.is_not(None)))
        builds = session.scalar(select(func.count()).select_from(IndexBuild))
    engine.dispose()
    sizes, per_slice = {}, {}
    if current is not None:
        for space in SPACES:
            sizes[space] = per_slice[space] = 0  # a codebook concat: read from the other two
            if space not in store.stored_spaces(kind):
                continue
            path = store.faiss_path(index_dir, space, current.generation)
            sizes[space] = path.stat().st_size
            # A flat file is not read for its figure (16 KiB a slice); a codebook file is small.
            per_slice[space] = (4 * DIMS[space] + 8 if kind == "flat" else
                                store.slice_bytes(faiss.read_index(str(path))))
    thumbs = sum(p.stat().st_size for p in (index_dir / store.SLICES_DIR).glob("*.npz"))
    db = index_dir / "catalog.sqlite"
    return {
        "generation": current.generation if current else None,
        "kind": kind,
        "checkpoint_sha256": current.checkpoint_sha256 if current else None,
        "preset": current.preset if current else None,
        "patients": patients,
        "slices": slices,
        "abnormal_fraction": abnormal / labelled if labelled else None,
        "index_bytes": sizes,
        "bytes_per_slice": per_slice,  # store.slice_bytes
        "fixed_bytes": {s: b - slices * per_slice[s] for s, b in sizes.items()},
        "thumbnail_bytes": thumbs,
        "catalog_bytes": db.stat().st_size if db.is_file() else None,
        "builds": builds,
    }
