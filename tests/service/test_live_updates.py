"""Live updates: a running server follows `cbir index add/remove` without a restart.

In process (the reloader polled by hand): a generation that fails to load is refused once and
the served one stays; a request keeps the generation it started on. Against a real `cbir serve`
process: searches in a loop from another process during repeated add/remove never fail, and
each answer is the answer of exactly one generation."""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from bench.serve_process import ServeProcess
from indexer import store
from indexer.build import Indexer
from indexer.catalog import IndexBuild, Patient, active_build, open_catalog
from model.data.preprocess import slice_to_png
from service.api.app import create_app
from service.config import Settings
from service.retrieval import NotFound, Timings
from tests.service.conftest import _free_port
from tests.service.search_loop import search_loop

HOURLY = 3600.0  # a reload interval that never fires within a test: the tests poll by hand


def _cohort_of(synth_cohort: Path, out: Path, pids: list[str]) -> Path:
    out.mkdir(parents=True)
    for pid in pids:
        (out / pid).symlink_to(synth_cohort / pid, target_is_directory=True)
    return out


@pytest.fixture(scope="module")
def patients(synth_cohort) -> list[str]:
    return sorted(p.name for p in synth_cohort.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def cohorts(synth_cohort, patients, tmp_path_factory) -> dict[str, Path]:
    """'base': the first three patients; one folder per patient as well."""
    root = tmp_path_factory.mktemp("live-cohorts")
    out = {"base": _cohort_of(synth_cohort, root / "base", patients[:3])}
    for pid in patients:
        out[pid] = _cohort_of(synth_cohort, root / pid, [pid])
    return out


@pytest.fixture(scope="module")
def base_index(cohorts, tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("live") / "index"
    Indexer(out).build([cohorts["base"]], checkpoint=tiny_checkpoint, progress=False, workers=0)
    return out


@pytest.fixture
def index(base_index, tmp_path) -> Path:
    """A copy of the base index each test may change."""
    return Path(shutil.copytree(base_index, tmp_path / "index"))


def _flip_to(index: Path, write_files, **changes) -> int:
    """Commit a new active generation the way a writer does, with files from ``write_files``
    and the active build's row otherwise copied (``changes`` override columns)."""
    engine = open_catalog(store.default_db_url(index), migrate=False)
    with store.writer_lock(index), Session(engine) as session:
        current = active_build(session)
        gen = current.generation + 1
        write_files(gen, current.generation)
        columns = {c.name: getattr(current, c.name) for c in IndexBuild.__table__.columns
                   if c.name not in ("id", "created_at")}
        current.status = "superseded"
        session.flush()
        session.add(IndexBuild(**{**columns, "generation": gen, "status": "active", **changes}))
        session.commit()
    engine.dispose()
    return gen


def _copy_of(index: Path, source: int | None = None):
    """Files of generation ``source`` (default: the active one) under the new number."""
    def write(gen: int, current: int) -> None:
        store.write_generation(index, gen, store.read_generation(index, source or current))
    return write


def _garbage(index: Path):
    def write(gen: int, _current: int) -> None:
        for space in ("normal", "abnormal", "concat"):
            store.faiss_path(index, space, gen).write_bytes(b"not a FAISS index")
    return write


def _app(index: Path, interval: float = HOURLY) -> TestClient:
    return TestClient(create_app(Settings(index_dir=index, reload_interval_s=interval)))


def test_a_corrupt_generation_is_refused_once_and_the_served_one_stays(index, caplog):
    with _app(index) as c:
        reloader = c.app.state.reloader
        served = c.get("/readyz").json()["generation"]
        sid = int(c.app.state.retrieval.slice_ids[0])
        bad = _flip_to(index, _garbage(index))
        with caplog.at_level(logging.ERROR, logger="service.live"):
            assert reloader.check() is False
            assert reloader.check() is False  # not tried again while it stays active
        assert reloader.loads == 1
        refusals = [r for r in caplog.records if r.name == "service.live"]
        assert len(refusals) == 1 and f"refused generation {bad}" in refusals[0].getMessage()
        ready = c.get("/readyz")
        assert ready.status_code == 200
        body = ready.json()
        assert (body["generation"], body["active_generation"]) == (served, bad)
        assert "unreadable FAISS index" in body["refused"]
        assert c.get("/info").json()["generation"] == served
        r = c.post(f"/slices/{sid}/similar?k=3")
        assert r.status_code == 200 and r.headers["X-Index-Generation"] == str(served)

        good = _flip_to(index, _copy_of(index, served))  # the next change is tried again
        assert reloader.check() is True and reloader.loads == 2
        body = c.get("/readyz").json()
        assert (body["generation"], body["active_generation"], body["refused"]) == (
            good, good, None)


def test_a_generation_of_other_weights_is_refused(index):
    with _app(index) as c:
        served = c.app.state.retrieval.build.generation
        other = _flip_to(index, _copy_of(index), checkpoint_sha256="0" * 64)
        assert c.app.state.reloader.check() is False
        body = c.get("/readyz").json()
        assert body["generation"] == served and body["active_generation"] == other
        assert "no checkpoint matching the index" in body["refused"]


def test_a_request_keeps_the_generation_it_started_on(index, patients):
    """What a request holds answers from its generation, catalogue rows included, after a newer
    generation removed the patient and its writer deleted the patient's rows and thumbnails."""
    victim = patients[1]
    with _app(index) as c:
        old = c.app.state.retrieval
        rows = np.flatnonzero(old.slice_patient == old.patient_id(victim))
        sid = int(old.slice_ids[rows[len(rows) // 2]])
        codes, _ = old.slice_codes(sid)
        Indexer(index).remove([victim])
        assert c.app.state.reloader.check() is True
        new = c.app.state.retrieval
        assert new.build.generation == old.build.generation + 1
        assert victim not in new.patient_by_external
        hits = old.search("normal", codes, 1, Timings())
        assert (hits[0].slice_id, hits[0].distance) == (sid, 0.0)
        row, patient = old.slice_row(sid)  # its catalogue rows are deleted by now
        assert (row.id, patient) == (sid, victim)
        assert old.patient(victim)[0].external_id == victim
        with pytest.raises(NotFound, match="removed from the index after this request started"):
            old.slice_pixels(sid)  # its thumbnails file was collected (and was never cached)
        with pytest.raises(NotFound):
            new.slice_row(sid)
        assert c.get(f"/slices/{sid}").status_code == 404
        assert c.get(f"/patients/{victim}").status_code == 404


def test_without_reloading_readiness_asks_for_a_restart(index, patients):
    with _app(index, interval=0) as c:
        Indexer(index).remove([patients[0]])
        time.sleep(0.2)
        r = c.get("/readyz")
        assert r.status_code == 503 and "restart to load it" in r.json()["detail"]


# -- against a real server process -------------------------------------------------------------

def _answers(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def test_searches_from_another_process_survive_repeated_add_and_remove(
        index, cohorts, patients, tmp_path, capsys):
    """group=patient with k above the patient count returns every patient of the generation
    served once: exactly the generation's patients, each at the same distance in every
    generation that holds it. The query is a stored slice of a patient never removed."""
    with Session(engine := open_catalog(store.default_db_url(index), migrate=False)) as session:
        first = session.scalar(select(Patient.id).where(Patient.external_id == patients[0]))
    engine.dispose()
    thumbs = store.read_thumbnails(index, first)["image"]
    query = slice_to_png(thumbs[len(thumbs) // 2].astype(np.float32) / 255.0, bits=8)
    answers_path, stop = tmp_path / "answers.jsonl", tmp_path / "stop"
    served_patients, delays = {}, []
    with ServeProcess(index, _free_port(), tmp_path / "server.log",
                      env={"CBIR_RELOAD_INTERVAL_S": "0.5"}) as server:
        served_patients[server.info()["generation"]] = set(patients[:3])
        client = multiprocessing.get_context("spawn").Process(
            target=search_loop, args=(server.url, query, str(answers_path), str(stop)))
        client.start()
        try:
            present = set(patients[:3])
            ops = [("add", patients[3]), ("remove", patients[1]), ("add", patients[1]),
                   ("remove", patients[3])]
            for op, pid in ops:
                if op == "add":
                    report = Indexer(index).add([cohorts[pid]], progress=False, workers=0)
                    present.add(pid)
                else:
                    report = Indexer(index).remove([pid])
                    present.discard(pid)
                served_patients[report.generation] = set(present)
                started = time.monotonic()
                while server.info()["generation"] != report.generation:
                    assert server.ready()["status"] == "ready"
                    assert time.monotonic() - started < 60, f"{op} {pid} not served in 60 s"
                    time.sleep(0.1)
                delays.append(time.monotonic() - started)
                while not any(a.get("generation") == str(report.generation)
                              for a in _answers(answers_path)):
                    assert client.is_alive() and time.monotonic() - started < 300
                    time.sleep(0.1)
        finally:
            stop.touch()
            client.join(timeout=60)

    answers = _answers(answers_path)
    with capsys.disabled():
        print(f"\n{len(answers)} searches; each change served "
              f"{', '.join(f'{d:.1f}' for d in delays)} s after its writer returned")
    failed = [a for a in answers if a["status"] != 200]
    assert not failed, failed[:3]
    generations = [int(a["generation"]) for a in answers]
    assert generations == sorted(generations), "a request was answered by an older generation"
    assert set(generations) == set(served_patients), "every generation answered searches"
    distance: dict[str, float] = {}
    for a, gen in zip(answers, generations, strict=True):
        assert set(a["nearest"]) == served_patients[gen], (gen, sorted(a["nearest"]))
        for pid, d in a["nearest"].items():
            assert d == pytest.approx(distance.setdefault(pid, d), rel=1e-5, abs=1e-6), pid
