"""Alembic migrations: empty -> head -> base -> head on SQLite and PostgreSQL, through
``indexer.catalog`` and through the real ``alembic`` command line."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import delete, func, inspect, select, text
from sqlalchemy.orm import Session

from indexer.catalog import (
    Base,
    IndexBuild,
    Patient,
    Slice,
    downgrade,
    encode_codes,
    make_engine,
    open_catalog,
    upgrade,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
ALEMBIC = Path(sys.executable).parent / "alembic"
HEAD = "0002"

COLUMNS = {
    "patients": {"id", "external_id", "source_path", "cohort", "slice_count", "added_at",
                 "study_uid", "series_uid"},
    "slices": {"id", "patient_id", "slice_index", "has_abnormality", "area_tc", "area_ed",
               "area_et", "brain_area", "normal_codes", "abnormal_codes"},
    "index_builds": {"id", "generation", "operation", "checkpoint_sha256", "preset",
                     "layout_version", "preprocessing_version", "patients", "slices",
                     "next_patient_id", "next_slice_id", "created_at", "status"},
}
NULLABLE = {"slices": {"has_abnormality", "area_tc", "area_ed", "area_et"},
            "patients": {"study_uid", "series_uid"}}


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _version(url: str) -> list[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return [r[0] for r in conn.execute(text("SELECT version_num FROM alembic_version"))]
    finally:
        engine.dispose()


def _check_schema(url: str) -> None:
    engine = make_engine(url)
    try:
        insp = inspect(engine)
        assert set(COLUMNS) <= set(insp.get_table_names()), insp.get_table_names()
        for table, expected in COLUMNS.items():
            cols = {c["name"]: c for c in insp.get_columns(table)}
            assert set(cols) == expected, f"{table}: columns {sorted(cols)}"
            nullable = {name for name, c in cols.items() if c["nullable"]}
            assert nullable == NULLABLE.get(table, set()), f"{table}: nullable {nullable}"
            assert insp.get_pk_constraint(table)["constrained_columns"] == ["id"], table
        uniques = {tuple(u["column_names"]) for u in insp.get_unique_constraints("patients")}
        assert ("external_id",) in uniques, uniques
        uniques = {tuple(u["column_names"]) for u in insp.get_unique_constraints("slices")}
        assert ("patient_id", "slice_index") in uniques, uniques
        uniques = {tuple(u["column_names"]) for u in insp.get_unique_constraints("index_builds")}
        assert ("generation",) in uniques, uniques
        (fk,) = insp.get_foreign_keys("slices")
        assert (fk["constrained_columns"], fk["referred_table"], fk["referred_columns"]) == (
            ["patient_id"], "patients", ["id"]), fk
        assert fk["options"].get("ondelete", "").upper() == "CASCADE", fk
        assert any(ix["column_names"] == ["patient_id"] for ix in insp.get_indexes("slices"))
        # The migrations and the ORM models describe the same schema.
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], f"migrations and models differ: {diff}"
    finally:
        engine.dispose()


def _use_catalogue(url: str) -> None:
    """Write one patient with a slice and a build row; deleting the patient cascades."""
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            session.add(Patient(id=1, external_id="P1", source_path="/x/P1_t1ce.nii.gz",
                                cohort="c", slice_count=1))
            session.flush()
            session.add(Slice(id=2**40, patient_id=1, slice_index=70, has_abnormality=None,
                              brain_area=1000, normal_codes=encode_codes([[1] * 8] * 8),
                              abnormal_codes=encode_codes([[2] * 8] * 8)))
            session.add(IndexBuild(generation=1, operation="build", checkpoint_sha256="0" * 64,
                                   preset="tiny", layout_version=1, preprocessing_version=1,
                                   patients=1, slices=1, next_patient_id=2,
                                   next_slice_id=2**40 + 1, status="active"))
            session.commit()
        with Session(engine) as session:
            row = session.get(Slice, 2**40)
            assert row is not None and row.patient.external_id == "P1"
            assert isinstance(session.get(Patient, 1).added_at, datetime)
            session.execute(delete(Patient).where(Patient.id == 1))
            session.commit()
            n = session.scalar(select(func.count()).select_from(Slice))
            assert n == 0, "ON DELETE CASCADE did not remove the patient's slices"
    finally:
        engine.dispose()


def test_upgrade_creates_the_documented_schema(db_url):
    assert _tables(db_url) == set()
    upgrade(db_url)
    assert _tables(db_url) == set(COLUMNS) | {"alembic_version"}
    assert _version(db_url) == [HEAD]
    _check_schema(db_url)
    _use_catalogue(db_url)


def test_downgrade_to_base_and_upgrade_again(db_url):
    upgrade(db_url)
    downgrade(db_url, "base")
    left = _tables(db_url)
    assert left <= {"alembic_version"}, f"tables left after downgrade: {left}"
    if left:
        assert _version(db_url) == []
    upgrade(db_url)  # round trip
    assert _tables(db_url) == set(COLUMNS) | {"alembic_version"}
    assert _version(db_url) == [HEAD]
    _check_schema(db_url)
    _use_catalogue(db_url)
    # open_catalog upgrades to head, and is idempotent on a database at head
    open_catalog(db_url).dispose()
    assert _version(db_url) == [HEAD]
    downgrade(db_url, "base")
    assert _tables(db_url) <= {"alembic_version"}


def _alembic(*args: str, url: str, via_x: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CBIR_DB_URL"}
    cmd = [str(ALEMBIC)]
    if via_x:
        cmd += ["-x", f"url={url}"]
    else:
        env["CBIR_DB_URL"] = url
    proc = subprocess.run(cmd + list(args), cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"alembic {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}"
    return proc


def test_alembic_command_line_upgrade_and_downgrade(db_url):
    assert ALEMBIC.is_file(), ALEMBIC
    proc = _alembic("upgrade", "head", url=db_url)
    assert "Running upgrade  -> 0001" in proc.stderr, proc.stderr
    assert "Running upgrade 0001 -> 0002" in proc.stderr, proc.stderr
    assert _tables(db_url) == set(COLUMNS) | {"alembic_version"}
    _check_schema(db_url)
    proc = _alembic("current", url=db_url)
    assert f"{HEAD} (head)" in proc.stdout, proc.stdout
    proc = _alembic("downgrade", "base", url=db_url)
    assert "Running downgrade 0002 -> 0001" in proc.stderr, proc.stderr
    assert "Running downgrade 0001 -> " in proc.stderr, proc.stderr
    assert _tables(db_url) <= {"alembic_version"}


def test_alembic_x_url_argument(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.sqlite'}"
    _alembic("upgrade", "head", url=url, via_x=True)
    assert _version(url) == [HEAD]
    _alembic("downgrade", "base", url=url, via_x=True)
    assert _tables(url) <= {"alembic_version"}


def test_alembic_history_has_a_downgrade_for_every_revision():
    from alembic.script import ScriptDirectory

    from indexer.catalog import alembic_config

    scripts = ScriptDirectory.from_config(alembic_config("sqlite://"))
    revisions = list(scripts.walk_revisions())
    assert [r.revision for r in revisions][0] == HEAD == scripts.get_current_head()
    for rev in revisions:
        assert callable(getattr(rev.module, "downgrade", None)), rev.revision


def test_0002_adds_the_dicom_uids_and_keeps_the_rows(db_url):
    """A catalogue written at 0001 upgrades in place: its patients stay, with null UIDs; a
    DICOM-sourced patient's UIDs round-trip; the downgrade drops only the two columns."""
    upgrade(db_url, "0001")
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO patients (id, external_id, source_path, cohort, "
                              "slice_count, added_at) VALUES (1, 'P1', '/x', 'c', 3, "
                              "'2026-01-01 00:00:00')"))
        upgrade(db_url)
        study, series = "1.2.826.0.1.3680043.8.498." + "1" * 38, "1.2.3.4"
        with Session(engine) as session:
            old = session.get(Patient, 1)
            assert (old.external_id, old.study_uid, old.series_uid) == ("P1", None, None)
            session.add(Patient(id=2, external_id=study, source_path="dicomweb:x",
                                cohort="dicomweb", slice_count=1, study_uid=study,
                                series_uid=series))
            session.commit()
        with Session(engine) as session:
            assert session.get(Patient, 2).study_uid == study and len(study) == 64
        engine.dispose()
        downgrade(db_url, "0001")
        cols = {c["name"] for c in inspect(engine).get_columns("patients")}
        assert cols == COLUMNS["patients"] - {"study_uid", "series_uid"}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM patients")).scalar() == 2
    finally:
        engine.dispose()


def test_a_reader_brings_an_earlier_catalogue_up_to_date(db_url):
    """An index written before 0002 opens in a newer service: ``bring_up_to_date`` upgrades a
    catalogue behind head and leaves an empty or a current one alone."""
    from indexer.catalog import bring_up_to_date

    bring_up_to_date(db_url)  # empty: nothing to bring up to date, nothing created
    engine = make_engine(db_url)
    try:
        assert "patients" not in inspect(engine).get_table_names()
        upgrade(db_url, "0001")
        bring_up_to_date(db_url)
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == HEAD
        assert {"study_uid", "series_uid"} <= {
            c["name"] for c in inspect(engine).get_columns("patients")}
        bring_up_to_date(db_url)  # current: a no-op
    finally:
        engine.dispose()
