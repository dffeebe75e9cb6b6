"""The slice/patient catalogue (SQLAlchemy 2.0). Its schema is created and changed only by the
Alembic migrations in ``migrations/``; ``open_catalog`` upgrades a database to head.

The catalogue is the source of truth of an index: every slice's code indices are stored here, so
the FAISS files can always be checked against (and rebuilt from) it. ``index_builds`` records one
row per generation of the index files; exactly one is ``active`` once anything was built, and
flipping it is the commit point of every change (see ``indexer.store``).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
CODE_SHAPE = (8, 8)  # code positions per slice and per code


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    external_id: Mapped[str] = mapped_column(String(255), unique=True)  # e.g. BraTS20_Training_001
    source_path: Mapped[str] = mapped_column(String(4096))  # the t1ce file indexed
    cohort: Mapped[str] = mapped_column(String(255))  # cohort folder name (and HGG/LGG group)
    slice_count: Mapped[int] = mapped_column(Integer)
    # A DICOM-sourced case's UIDs (external_id is then the StudyInstanceUID); None for NIfTI.
    # Never a patient's name or id from the tags.
    study_uid: Mapped[str | None] = mapped_column(String(64))
    series_uid: Mapped[str | None] = mapped_column(String(64))
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)

    slices: Mapped[list[Slice]] = relationship(back_populates="patient",
                                               cascade="all, delete-orphan",
                                               passive_deletes=True)


class Slice(Base):
    __tablename__ = "slices"
    __table_args__ = (UniqueConstraint("patient_id", "slice_index"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)  # FAISS id
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"),
                                            index=True)
    slice_index: Mapped[int] = mapped_column(Integer)  # axial index in the RAS+ volume
    has_abnormality: Mapped[bool | None] = mapped_column(Boolean)  # None: no segmentation
    area_tc: Mapped[int | None] = mapped_column(Integer)  # pixels of label 1
    area_ed: Mapped[int | None] = mapped_column(Integer)  # pixels of label 2
    area_et: Mapped[int | None] = mapped_column(Integer)  # pixels of label 4
    brain_area: Mapped[int] = mapped_column(Integer)  # pixels > 0
    normal_codes: Mapped[bytes] = mapped_column(LargeBinary)  # 8x8 uint16 little-endian
    abnormal_codes: Mapped[bytes] = mapped_column(LargeBinary)  # 8x8 uint16 little-endian

    patient: Mapped[Patient] = relationship(back_populates="slices")


class IndexBuild(Base):
    __tablename__ = "index_builds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    generation: Mapped[int] = mapped_column(Integer, unique=True)  # names the FAISS files
    operation: Mapped[str] = mapped_column(String(32))  # build, add, remove, replace
    checkpoint_sha256: Mapped[str] = mapped_column(String(64))
    preset: Mapped[str] = mapped_column(String(32))
    layout_version: Mapped[int] = mapped_column(Integer)
    preprocessing_version: Mapped[int] = mapped_column(Integer)
    patients: Mapped[int] = mapped_column(Integer)
    slices: Mapped[int] = mapped_column(Integer)
    # Ids are never reused: a removed slice's id never names another slice.
    next_patient_id: Mapped[int] = mapped_column(Integer)
    next_slice_id: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    status: Mapped[str] = mapped_column(String(16))  # active, superseded


def encode_codes(indices: np.ndarray) -> bytes:
    arr = np.asarray(indices)
    if arr.shape != CODE_SHAPE or arr.min() < 0 or arr.max() > 65535:
        raise ValueError(f"code indices must be {CODE_SHAPE} in 0..65535, got {arr.shape}")
    return arr.astype("<u2").tobytes()


def decode_codes(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<u2").reshape(CODE_SHAPE).astype(np.int64)


def decode_codes_columns(normal, abnormal) -> np.ndarray:
    """The ``normal_codes`` and ``abnormal_codes`` blobs of N slices -> their indices
    (N, 2, 8, 8) uint16, decoded in one pass over the joined blobs (ValueError: a blob of
    another size)."""
    size = 2 * CODE_SHAPE[0] * CODE_SHAPE[1]
    blobs = [bytes(b) for pair in zip(normal, abnormal, strict=True) for b in pair]
    if any(len(b) != size for b in blobs):
        raise ValueError(f"a stored code is not {CODE_SHAPE} uint16 ({size} bytes)")
    joined = np.frombuffer(b"".join(blobs), dtype="<u2")
    return joined.astype(np.uint16).reshape(len(blobs) // 2, 2, *CODE_SHAPE)


READ_CHUNK = 16384  # slice rows fetched and turned into arrays at a time
NO_AREA = -1  # area_* of a slice without segmentation, in ``read_slice_arrays``


def read_slice_arrays(session: Session) -> dict[str, np.ndarray] | None:
    """Every slice row, by ascending id, as arrays: ``slice_ids``, ``slice_patient``,
    ``slice_index`` (N,) int64, ``slice_abnormal`` (N,) int8 (1, 0, or -1 without labels),
    ``areas`` (N, 4) int32 (TC, ED, ET, or ``NO_AREA``; brain) and ``codes`` (N, 2, 8, 8) uint16.

    Core rows, not ORM ones (half the time), ``READ_CHUNK`` at a time, into arrays of the final
    size: at 10^6 slices, reading every row first took twice the time and 921 MiB at its peak,
    against 326 MiB. None when the rows changed while they were read (a writer committed on
    another connection since they were counted): read again."""
    table = Slice.__table__.c
    n = session.scalar(select(func.count()).select_from(Slice))
    out = {"slice_ids": np.zeros(n, np.int64), "slice_patient": np.zeros(n, np.int64),
           "slice_index": np.zeros(n, np.int64), "slice_abnormal": np.zeros(n, np.int8),
           "areas": np.zeros((n, 4), np.int32), "codes": np.zeros((n, 2, *CODE_SHAPE), np.uint16)}
    # On the statement: options set on the session's connection would stay on it (a server-side
    # cursor for every later statement of a writer's transaction, which PostgreSQL refuses).
    result = session.connection().execute(
        select(table.id, table.patient_id, table.slice_index, table.has_abnormality,
               table.area_tc, table.area_ed, table.area_et, table.brain_area,
               table.normal_codes, table.abnormal_codes).order_by(table.id)
        .execution_options(yield_per=READ_CHUNK))
    at = 0
    try:
        for rows in result.partitions():
            if at + len(rows) > n:
                return None
            for name, part in _slice_arrays(rows).items():
                out[name][at:at + len(rows)] = part
            at += len(rows)
    finally:
        result.close()
    return out if at == n else None


def _slice_arrays(rows) -> dict[str, np.ndarray]:
    """Rows of ``read_slice_arrays``'s select as its arrays, converted column by column."""
    n = len(rows)
    ids, patient, index, flag, tc, ed, et, brain, normal, abnormal = zip(*rows, strict=True)
    areas = np.array([[NO_AREA if a is None else a for a in col] for col in (tc, ed, et)]
                     + [brain], np.int32).reshape(4, n).T
    return {"slice_ids": np.array(ids, np.int64), "slice_patient": np.array(patient, np.int64),
            "slice_index": np.array(index, np.int64),
            "slice_abnormal": np.array([-1 if f is None else int(f) for f in flag], np.int8),
            "areas": areas, "codes": decode_codes_columns(normal, abnormal)}


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA foreign_keys=ON")  # ON DELETE CASCADE
    cur.execute("PRAGMA journal_mode=WAL")  # readers keep reading while a writer commits
    cur.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
    cur.close()


def make_engine(url: str) -> Engine:
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def bring_up_to_date(url: str) -> None:
    """Upgrade a catalogue written by an earlier version (its Alembic revision behind head) to
    head; an empty database (no build yet) and a current one are left alone. Every migration
    only adds, so a reader of an older catalogue may do this before it reads."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
    if current is not None and current != head:
        log.info("catalogue at revision %s, upgrading it to %s", current, head)
        upgrade(url)


def open_catalog(url: str, migrate: bool = True) -> Engine:
    """An engine on ``url``, upgraded to the head migration first when ``migrate``."""
    if migrate:
        upgrade(url)
    return make_engine(url)


def active_build(session: Session) -> IndexBuild | None:
    return session.scalars(select(IndexBuild).where(IndexBuild.status == "active")).one_or_none()
