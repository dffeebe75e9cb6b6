"""kill -9 at chosen moments of a real `cbir index build|add|remove` run (a subprocess), then
check that the index directory is readable and consistent, holds the previous or the new state
(never a mix), can be searched, and that the next writer succeeds and clears what the killed one
left behind (temporary files, generations nobody refers to, thumbnails of uncommitted patients).

Moments, found by polling the index directory every few milliseconds:
  encoding     -- shortly after the progress bar appears (reading or encoding the patient)
  first-file   -- as soon as the new generation's first FAISS file (or its temporary) appears
  last-file    -- as soon as the new generation's last FAISS file is in place: the catalogue
                  commit (the switch) is in flight or about to start
  gc           -- as soon as a file of the previous generation is deleted: the commit is done
                  and the run is collecting garbage (it may finish before the kill lands)
A run killed before it created any file of its new generation must have left the previous
state exactly (the commit comes after those files); later kills may leave either state.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from indexer import store
from indexer.build import Indexer
from indexer.catalog import Patient, Slice, active_build, make_engine
from indexer.layout import SPACES
from indexer.verify import verify

A, B = "SYN3_0000", "SYN3_0001"
POLL_S = 0.005
RUN_LIMIT_S = 300
NO_ACTIVE = ["the catalogue has no active index build"]


# -- helpers -----------------------------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    """The real command line, run as a separate process."""
    quick = ["--workers", "0"] if args[0] in ("build", "add") else []
    return [sys.executable, "-m", "service.cli", "index", *args, *quick]


def _faiss_names(index_dir: Path) -> list[str]:
    try:
        return os.listdir(index_dir / store.FAISS_DIR)
    except FileNotFoundError:
        return []


def _encoding(log: Path, delay: float = 0.2):
    """True ``delay`` seconds after the progress bar first shows in the run's log."""
    seen: list[float] = []

    def moment() -> bool:
        if not seen and "indexing" in log.read_text(errors="replace"):
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] >= delay

    return moment


def _first_file(index_dir: Path, generation: int):
    """True once the generation's first index file exists, final or temporary."""
    name = store.faiss_path(index_dir, SPACES[0], generation).name
    return lambda: any(n == name or (n.startswith(f".{name}.") and n.endswith(".tmp"))
                       for n in _faiss_names(index_dir))


def _generation_started(index_dir: Path, generation: int) -> bool:
    """Whether any index file of the generation exists, final or temporary (checked once the
    killed run is dead: a temporary is only ever renamed, so none means none was written)."""
    names = {store.faiss_path(index_dir, s, generation).name for s in SPACES}
    return any(n in names or (n.endswith(".tmp") and n.split(".faiss.")[0][1:] + ".faiss" in names)
               for n in _faiss_names(index_dir))


def _last_file(index_dir: Path, generation: int):
    """True once every index file of the generation is in place under its final name."""
    return lambda: store.faiss_path(index_dir, SPACES[-1], generation).is_file()


def _gc(index_dir: Path, generation: int):
    """True once a file of the generation before ``generation`` has been deleted."""
    old = [store.faiss_path(index_dir, s, generation - 1) for s in SPACES]
    return lambda: not all(p.is_file() for p in old)


MOMENTS = {"encoding": lambda d, gen, log: _encoding(log),
           "first-file": lambda d, gen, log: _first_file(d, gen),
           "last-file": lambda d, gen, log: _last_file(d, gen),
           "gc": lambda d, gen, log: _gc(d, gen)}


def _run_and_kill(cmd: list[str], moment, log: Path, may_finish: bool = False) -> bool:
    """Start ``cmd``, SIGKILL its whole process group when ``moment()`` turns true. The run must
    really have been interrupted, or, where ``may_finish``, have succeeded first. Returns
    whether it was killed."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + RUN_LIMIT_S
    try:
        while proc.poll() is None:
            if moment():
                os.killpg(proc.pid, signal.SIGKILL)
                break
            if time.monotonic() > deadline:
                pytest.fail(f"{cmd} still running after {RUN_LIMIT_S} s")
            time.sleep(POLL_S)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    killed = proc.returncode == -signal.SIGKILL
    assert killed or (may_finish and proc.returncode == 0), (
        f"the run was not interrupted (exit {proc.returncode}):\n{log.read_text()}")
    return killed


def _patients(index_dir: Path) -> set[str]:
    engine = make_engine(store.default_db_url(index_dir))
    try:
        with Session(engine) as session:
            return set(session.scalars(select(Patient.external_id)).all())
    finally:
        engine.dispose()


def _check_readable(index_dir: Path, allowed: list[set[str]]) -> set[str]:
    """Consistent, holding exactly one of ``allowed`` patient sets, and searchable: every
    catalogued slice's stored vector finds a catalogued slice at distance 0 in each space."""
    assert verify(index_dir) == []
    patients = _patients(index_dir)
    assert patients in allowed, f"patients {sorted(patients)}: neither state of {allowed}"
    engine = make_engine(store.default_db_url(index_dir))
    with Session(engine) as session:
        generation = active_build(session).generation
        ids = np.array(session.scalars(select(Slice.id)).all(), dtype=np.int64)
    engine.dispose()
    indices = store.read_generation(index_dir, generation)
    probe = ids[:: max(1, len(ids) // 8)]
    for space in SPACES:
        index = store.search_index(indices[space])
        assert index.ntotal == len(ids)
        if not len(ids):
            continue
        queries = np.stack([indices[space].reconstruct(int(i)) for i in probe])
        distances, found = index.search(queries, 1)
        assert np.all(distances[:, 0] == 0)
        assert set(found[:, 0].tolist()) <= set(ids.tolist())
    return patients


def _check_no_leftovers(index_dir: Path) -> None:
    """Only the active generation's files (three indices, its reference distances when it has
    any) and the catalogued patients' thumbnails."""
    engine = make_engine(store.default_db_url(index_dir))
    with Session(engine) as session:
        generation = active_build(session).generation
        pids = set(session.scalars(select(Patient.id)).all())
    engine.dispose()
    assert sorted(_faiss_names(index_dir)) == sorted(
        p.name for p in store.generation_paths(index_dir, generation)
        if p.suffix == ".faiss" or p.exists())
    assert sorted(os.listdir(index_dir / store.SLICES_DIR)) == sorted(f"{p}.npz" for p in pids)


def _index(index_dir: Path) -> Indexer:
    return Indexer(index_dir)


QUICK = {"workers": 0, "progress": False}


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cohorts(synth_cohort, tmp_path_factory) -> dict[str, Path]:
    """One single-patient cohort folder per patient id."""
    root = tmp_path_factory.mktemp("one_patient")
    out = {}
    for pid in (A, B):
        shutil.copytree(synth_cohort / pid, root / pid / pid)
        out[pid] = root / pid
    return out


@pytest.fixture(scope="module")
def index_a(cohorts, tiny_checkpoint, tmp_path_factory) -> Path:
    """Generation 1: patient A. Read-only: tests copy it."""
    d = tmp_path_factory.mktemp("index_a") / "index"
    _index(d).build([cohorts[A]], tiny_checkpoint, **QUICK)
    return d


@pytest.fixture(scope="module")
def index_ab(index_a, cohorts, tmp_path_factory) -> Path:
    """Generation 2: patients A and B. Read-only: tests copy it."""
    d = tmp_path_factory.mktemp("index_ab") / "index"
    shutil.copytree(index_a, d)
    _index(d).add([cohorts[B]], **QUICK)
    return d


@pytest.fixture(scope="module")
def killed_build(cohorts, tiny_checkpoint, tmp_path_factory) -> Path:
    """A `cbir index build` of patient A killed as its progress bar shows (reading or encoding
    the patient, before any index file). Read-only: tests copy it."""
    root = tmp_path_factory.mktemp("killed_build")
    d = root / "index"
    log = root / "build.log"
    _run_and_kill(_cli("build", "--data", str(cohorts[A]), "--out", str(d), "--checkpoint",
                       str(tiny_checkpoint)), _encoding(log, delay=0.05), log)
    assert not _generation_started(d, 1), "killed too late: the build wrote its index files"
    return d


# -- add / remove --------------------------------------------------------------------------------


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_kill_during_add(moment, index_a, cohorts, tmp_path):
    d = tmp_path / "index"
    shutil.copytree(index_a, d)
    log = tmp_path / "add.log"
    killed = _run_and_kill(_cli("add", "--index", str(d), "--data", str(cohorts[B])),
                           MOMENTS[moment](d, 2, log), log, may_finish=moment == "gc")

    before, after = {A}, {A, B}
    started = _generation_started(d, 2)
    assert started or moment == "encoding"
    allowed = [after] if moment == "gc" else [before, after] if started else [before]
    state = _check_readable(d, allowed)
    print(f"add killed ({killed}) at {moment} (generation 2 files: {started}): "
          f"patients {sorted(state)}")

    # The next writer succeeds and removes what the killed one left.
    if moment == "first-file" and state == before:
        # Re-run the interrupted add: it reuses generation 2 and patient id 2, whose files the
        # killed run may have left half-written.
        _index(d).add([cohorts[B]], **QUICK)
        assert _check_readable(d, [after]) == after
    else:
        _index(d).remove([A])
        assert _check_readable(d, [before - {A}, after - {A}]) == state - {A}
    _check_no_leftovers(d)


def test_a_killed_add_leaves_no_reader_holding_the_lock(index_a, cohorts, tmp_path):
    """kill -9 of the add's own process only (as the OOM killer or an operator does), with its
    NIfTI reader processes running: they hold the writer lock they inherited, and must end with
    it so that the next writer gets the lock."""
    d = tmp_path / "index"
    shutil.copytree(index_a, d)
    log = tmp_path / "add.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "index", "add", "--index",
                                 str(d), "--data", str(cohorts[B]), "--workers", "2"],
                                stdout=out, stderr=subprocess.STDOUT)
    moment, deadline = _encoding(log, delay=0.05), time.monotonic() + RUN_LIMIT_S
    while proc.poll() is None and not moment():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(POLL_S)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, log.read_text()
    deadline = time.monotonic() + 15
    while True:
        try:
            with store.writer_lock(d):
                break
        except store.IndexStoreError:
            assert time.monotonic() < deadline, "the killed add's readers still hold the lock"
            time.sleep(0.1)
    _index(d).add([cohorts[B]], **QUICK)
    assert _check_readable(d, [{A, B}]) == {A, B}
    _check_no_leftovers(d)


@pytest.mark.parametrize("moment", ["first-file", "last-file", "gc"])
def test_kill_during_remove(moment, index_ab, tmp_path):
    d = tmp_path / "index"
    shutil.copytree(index_ab, d)
    log = tmp_path / "remove.log"
    killed = _run_and_kill(_cli("remove", "--index", str(d), "--patient", B),
                           MOMENTS[moment](d, 3, log), log, may_finish=moment == "gc")
    state = _check_readable(d, [{A}] if moment == "gc" else [{A, B}, {A}])
    print(f"remove killed ({killed}) at {moment}: patients {sorted(state)}")

    _index(d).remove([A])
    assert _check_readable(d, [{B}, set()]) == state - {A}
    _check_no_leftovers(d)


# -- build ---------------------------------------------------------------------------------------


def test_kill_early_in_build_then_add_recovers(killed_build, cohorts, tmp_path):
    d = tmp_path / "index"
    shutil.copytree(killed_build, d)
    # No usable index, said plainly; nothing was catalogued.
    assert verify(d) == NO_ACTIVE
    assert _patients(d) == set()
    # `index add` (what `build` tells the user to run) completes the interrupted build.
    _index(d).add([cohorts[A]], **QUICK)
    assert _check_readable(d, [{A}]) == {A}
    _check_no_leftovers(d)


def test_kill_during_build_at_last_file(cohorts, tiny_checkpoint, tmp_path):
    d = tmp_path / "index"
    log = tmp_path / "build.log"
    _run_and_kill(_cli("build", "--data", str(cohorts[A]), "--out", str(d), "--checkpoint",
                       str(tiny_checkpoint)), _last_file(d, 1), log)
    committed = verify(d) != NO_ACTIVE
    print(f"build killed at last-file: {'after' if committed else 'before'} the commit")
    if not committed:  # killed before the commit: nothing catalogued
        assert _patients(d) == set()
        # Any writer finishes the job and must clear the killed build's files (an empty
        # cohort is refused before writing anything, so the add brings a real one).
        _index(d).add([cohorts[A]], **QUICK)
        assert _check_readable(d, [{A}]) == {A}
    else:  # killed after it: the build is complete
        assert _check_readable(d, [{A}]) == {A}
        _index(d).remove([A])
        assert _check_readable(d, [set()]) == set()
    _check_no_leftovers(d)


def test_rerunning_a_killed_build_succeeds(killed_build, cohorts, tiny_checkpoint, tmp_path):
    d = tmp_path / "index"
    shutil.copytree(killed_build, d)
    _index(d).build([cohorts[A]], tiny_checkpoint, **QUICK)
    assert _check_readable(d, [{A}]) == {A}
    _check_no_leftovers(d)


def test_verify_after_build_killed_before_the_catalogue_exists(tiny_checkpoint, tmp_path):
    d = tmp_path / "index"
    # Exactly what Indexer.build has written when it reaches open_catalog.
    store.write_manifest(d, {"db_url": None, "checkpoint": str(tiny_checkpoint)})
    assert verify(d) == NO_ACTIVE
