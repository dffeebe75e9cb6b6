"""Load and faults campaign against a real ``cbir serve`` on 127.0.0.1 (issue 13, part 5).

    python -m bench.campaign --data COHORT --checkpoint CKPT --work DIR [--seconds 60]

Builds an index of the cohort's first ``--base`` patients in ``--work``, exports PNG slices from
it as queries, starts ``cbir serve`` on it and, at 1, 4 and 16 concurrent clients in turn, runs
a Locust load (``bench/locustfile.py``: up to 4 client processes, real uploads, retries through
faults) for ``--seconds`` or until that level's faults are done, whichever is later. While each
load runs, faults are injected from this process:

- ``add``: ``cbir index add`` of a patient; the server must serve the new generation;
- ``remove``: ``cbir index remove`` of a patient; likewise;
- ``kill -9 add``: ``cbir index add`` of two patients killed with SIGKILL once the first one's
  thumbnails are on disk; the active and the served generation must not change, and the next
  writer (the same add, run again) must leave no file of the killed one behind;
- ``kill -9 serve``: the server killed with SIGKILL and started again; it must come back ready on
  the catalogue's active generation, ``cbir index verify`` clean.

At the end the server must list exactly the patients the faults leave (data lost: any other
difference) and ``cbir index verify`` must pass. Prints the figures per load level, the faults,
and a summary table; exits 1 when a request or data was lost or a fault's check failed.
Everything runs against 127.0.0.1 and stops by itself: each load once its faults are done and
``--seconds`` passed (after the requests in flight then), each retried request after
``--retry-s``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import httpx
import numpy as np
import typer
from sqlalchemy import select
from sqlalchemy.orm import Session

from bench.serve_process import CBIR, ServeProcess
from indexer import store
from indexer.build import DEFAULT_CHECKPOINT
from indexer.catalog import Patient, active_build, open_catalog
from ingest.layouts import find_cases
from model.data.preprocess import slice_to_png

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
LOCUST = str(Path(sys.executable).parent / "locust")
LOAD_PROCESSES = 4  # client processes at most; 16 clients run 4 per process
LOAD_MARGIN_S = 3600  # Locust's own run-time bound past --seconds; the campaign stops it earlier
LOCK_WAIT_S = 60  # how long the next writer may find the killed writer's lock still held
FAULTS_PER_LEVEL = (("add", "remove"), ("kill -9 add",), ("kill -9 serve",))


@dataclass
class Fault:
    name: str
    target: str
    level: int  # concurrent clients while it ran
    started: float  # seconds into that load
    ended: float
    outcome: str = ""
    ok: bool = False


@dataclass
class Level:
    clients: int
    seconds: float
    requests: int = 0
    per_s: float = 0.0
    p50: float = float("nan")
    p95: float = float("nan")
    p99: float = float("nan")
    errors: int = 0  # failed attempts, retried
    lost: int = 0  # searches with no answer within the retry time
    held: bool = False  # every load process still running when the last fault ended
    faults: list[Fault] = field(default_factory=list)


class CheckFailed(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cbir(*args: str, log: Path) -> subprocess.CompletedProcess:
    with log.open("ab") as fh:
        return subprocess.run([CBIR, *args], stdout=fh, stderr=subprocess.STDOUT, check=False)


def _cohort_of(out: Path, folders: list[Path]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        (out / folder.name).symlink_to(folder.resolve(), target_is_directory=True)
    return out


class Campaign:
    def __init__(self, data: Path, checkpoint: Path | None, work: Path, base: int,
                 seconds: float, levels: list[int], retry_s: float, queries: int,
                 reload_interval_s: float, kind: str = store.DEFAULT_KIND):
        if kind not in store.KINDS:
            raise typer.BadParameter(f"--kind {kind!r}: use one of {', '.join(store.KINDS)}")
        self.kind = kind
        self.work = work
        self.index = work / "index"
        self.log = work / "campaign.log"
        self.seconds = seconds
        self.levels = levels
        self.retry_s = retry_s
        self.reload_interval_s = reload_interval_s
        cases = sorted(find_cases(data).cases, key=lambda c: c.pid)
        if len(cases) < base + 3:
            raise typer.BadParameter(f"{data} holds {len(cases)} patients; the campaign needs "
                                     f"--base ({base}) + 3")
        self.cohorts = work / "cohorts"
        self.base = [c.pid for c in cases[:base]]
        self.added, self.killed_pair = cases[base], cases[base + 1: base + 3]
        self.removed = self.base[-1]
        self.base_cohort = _cohort_of(self.cohorts / "base", [c.folder for c in cases[:base]])
        self.add_cohort = _cohort_of(self.cohorts / "add", [self.added.folder])
        self.pair_cohort = _cohort_of(self.cohorts / "pair", [c.folder for c in self.killed_pair])
        self.expected = set(self.base)
        # A copy: the index records its checkpoint's path, and a checkpoint replaced there
        # during the run (a new model shipped) would make every later writer and restart refuse.
        self.checkpoint = work / "checkpoint.pt"
        shutil.copyfile(checkpoint or DEFAULT_CHECKPOINT, self.checkpoint)
        self.queries = work / "queries"
        self.query_count = queries
        self.engine = None
        self.server: ServeProcess | None = None

    # -- setup ---------------------------------------------------------------------------------

    def prepare(self) -> None:
        args = ["index", "build", "--data", str(self.base_cohort), "--out", str(self.index),
                "--checkpoint", str(self.checkpoint), "--kind", self.kind]
        if _cbir(*args, log=self.log).returncode != 0:
            raise CheckFailed(f"cbir index build failed; see {self.log}")
        self.engine = open_catalog(store.default_db_url(self.index), migrate=False)
        self._export_queries()

    def _export_queries(self) -> None:
        """8-bit PNGs of indexed slices (the middle half of each patient's), as a reader exports
        them: the thumbnails the index stores are those slices in 8 bits."""
        self.queries.mkdir()
        with Session(self.engine) as session:
            pids = session.scalars(select(Patient.id).order_by(Patient.id)).all()
        per_patient = -(-self.query_count // len(pids))
        for pid in pids:
            images = store.read_thumbnails(self.index, pid)["image"]
            n = len(images)
            for i in np.linspace(n // 4, 3 * n // 4, per_patient).round().astype(int):
                png = slice_to_png(images[i].astype(np.float32) / 255.0, bits=8)
                (self.queries / f"p{pid}-s{i:03d}.png").write_bytes(png)

    def _active(self) -> int:
        with Session(self.engine) as session:
            return active_build(session).generation

    def _catalogue_patients(self) -> set[str]:
        with Session(self.engine) as session:
            return set(session.scalars(select(Patient.external_id)).all())

    # -- load ----------------------------------------------------------------------------------

    def _locusts(self, clients: int) -> list[tuple[subprocess.Popen, Path]]:
        """``clients`` users spread over up to LOAD_PROCESSES headless Locust processes, each
        writing its final stats to a JSON file."""
        env = {**os.environ, "CAMPAIGN_QUERIES": str(self.queries),
               "CAMPAIGN_RETRY_S": str(self.retry_s)}
        procs = min(clients, LOAD_PROCESSES)
        out = []
        for i in range(procs):
            users = clients // procs + (i < clients % procs)
            stats = self.work / f"load-{clients}-{i}.json"
            with stats.with_suffix(".log").open("wb") as log:
                out.append((subprocess.Popen(
                    [LOCUST, "-f", str(LOCUSTFILE), "--headless", "--only-summary",
                     "--users", str(users), "--spawn-rate", str(users),
                     "--run-time", f"{self.seconds + LOAD_MARGIN_S:g}s",
                     "--stop-timeout", f"{self.retry_s + 30:g}",
                     "--host", self.server.url, "--json-file", str(stats.with_suffix(""))],
                    stdout=log, stderr=subprocess.STDOUT, env=env), stats))
        return out

    @staticmethod
    def _read_stats(files: list[Path], level: Level) -> None:
        """Sums Locust's final stats over the load processes; percentiles from the merged
        histograms of whole-search times (Locust's buckets: 2 significant digits)."""
        times: dict[int, int] = {}
        for path in files:
            for entry in json.loads(path.read_text()):
                if entry["name"] == "/search":
                    level.requests += entry["num_requests"]
                    level.lost += entry["num_failures"]
                    for ms, n in entry["response_times"].items():
                        times[int(float(ms))] = times.get(int(float(ms)), 0) + n
                elif entry["name"] == "/search attempt":
                    level.errors += entry["num_requests"]
        level.per_s = level.requests / level.seconds
        if times:
            ms = np.array(sorted(times))
            cum = np.cumsum([times[m] for m in ms]) / sum(times.values())
            level.p50, level.p95, level.p99 = (
                float(ms[np.searchsorted(cum, q)]) for q in (0.50, 0.95, 0.99))

    def _searches_answered(self) -> int:
        """POST /search answers the server counted since it started (any status)."""
        text = httpx.get(self.server.url + "/metrics", timeout=30).text
        return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith('cbir_requests_total{method="POST",route="/search"')))

    def run_level(self, clients: int, faults: tuple[str, ...]) -> Level:
        """The load for ``--seconds`` or until the faults are done, whichever is later: Locust
        runs with a far run-time and is stopped by SIGTERM (its own shutdown path: in-flight
        searches finish, then the stats are written)."""
        level = Level(clients=clients, seconds=self.seconds)
        before = self._searches_answered()
        loads = self._locusts(clients)
        while self._searches_answered() <= before:  # the load is up before the first fault
            if any(proc.poll() is not None for proc, _ in loads):
                raise CheckFailed(f"a load process exited early; see {self.work}/load-*.log")
            time.sleep(0.2)
        start = time.monotonic()
        for name in faults:
            t0 = time.monotonic() - start
            fault = Fault(name=name, target="", level=clients, started=t0, ended=t0)
            try:
                FAULTS[name](self, fault)
                fault.ok = True
            except CheckFailed as exc:
                fault.outcome = f"FAILED: {exc}"
            fault.ended = time.monotonic() - start
            level.faults.append(fault)
            self._say(f"  {name} {fault.target}: {fault.outcome}")
        time.sleep(max(0.0, self.seconds - (time.monotonic() - start)))
        level.held = all(proc.poll() is None for proc, _ in loads)
        level.seconds = time.monotonic() - start
        for proc, _ in loads:
            proc.terminate()
        for proc, _ in loads:
            proc.wait(timeout=self.retry_s + 120)
        self._read_stats([stats for _, stats in loads], level)
        return level

    # -- faults --------------------------------------------------------------------------------

    def _served_within(self, generation: int, seconds: float = 60) -> float:
        started = time.monotonic()
        while True:
            info = self.server.info()
            if info["generation"] == generation:
                return time.monotonic() - started
            if time.monotonic() - started > seconds:
                raise CheckFailed(f"still serving generation {info['generation']} "
                                  f"{seconds:g} s after generation {generation} became active")
            time.sleep(0.1)

    def _writer(self, fault: Fault, args: list[str], change) -> None:
        before = self._active()
        if _cbir(*args, log=self.log).returncode != 0:
            raise CheckFailed(f"cbir {' '.join(args[:2])} failed; see {self.log}")
        change()
        after = self._active()
        took = self._served_within(after)
        fault.outcome = f"generation {before} -> {after}, served after {took:.1f} s"

    def fault_add(self, fault: Fault) -> None:
        fault.target = self.added.pid
        self._writer(fault, ["index", "add", "--index", str(self.index), "--data",
                             str(self.add_cohort)], lambda: self.expected.add(self.added.pid))

    def fault_remove(self, fault: Fault) -> None:
        fault.target = self.removed
        self._writer(fault, ["index", "remove", "--index", str(self.index), "--patient",
                             self.removed], lambda: self.expected.discard(self.removed))

    def _stray_files(self) -> list[str]:
        """Files no active generation or catalogued patient refers to."""
        with Session(self.engine) as session:
            pids = set(session.scalars(select(Patient.id)).all())
            gen = active_build(session).generation
        keep = {p.name for p in store.generation_paths(self.index, gen)}
        keep |= {store.thumbnail_path(self.index, p).name for p in pids}
        return sorted(p.name for d in (store.FAISS_DIR, store.SLICES_DIR)
                      for p in (self.index / d).iterdir() if p.name not in keep)

    def fault_kill_add(self, fault: Fault) -> None:
        fault.target = " + ".join(c.pid for c in self.killed_pair)
        before, served = self._active(), self.server.info()["generation"]
        slices = self.index / store.SLICES_DIR
        present = set(slices.iterdir())
        args = ["index", "add", "--index", str(self.index), "--data", str(self.pair_cohort)]
        with self.log.open("ab") as fh:
            proc = subprocess.Popen([CBIR, *args], stdout=fh, stderr=subprocess.STDOUT)
        while proc.poll() is None and not (set(slices.iterdir()) - present):
            time.sleep(0.01)
        if proc.poll() is not None:
            raise CheckFailed("the add ended before its first patient was written; nothing "
                              "was killed half-way")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stray = self._stray_files()
        time.sleep(3 * self.reload_interval_s + 0.5)  # a poll or more, were there anything
        if (self._active(), self.server.info()["generation"]) != (before, served):
            raise CheckFailed("the killed add changed the active or the served generation")
        waited = self._next_writer(args)
        self.expected |= {c.pid for c in self.killed_pair}
        left = self._stray_files()
        if left:
            raise CheckFailed(f"the next writer left {', '.join(left)}")
        after = self._active()
        took = self._served_within(after)
        fault.outcome = (f"killed with {len(stray)} stray file(s) on disk, generation "
                         f"{before} still active and served; the same add run again "
                         f"{waited}cleaned up, generation {after} served after {took:.1f} s")

    def _next_writer(self, args: list[str]) -> str:
        """Run the killed writer's command again. A writer refused with "another
        build/add/remove is running" (the killed add's reader processes still holding the lock
        they inherited, as they did for good before they died with it) waits and tries again,
        up to LOCK_WAIT_S. Says how long the lock kept it waiting, for the outcome."""
        started = time.monotonic()
        refused = 0
        while True:
            attempt = time.monotonic()
            mark = self.log.stat().st_size
            if _cbir(*args, log=self.log).returncode == 0:
                break
            with self.log.open("rb") as fh:
                fh.seek(mark)
                busy = b"another build/add/remove is running" in fh.read()
            if not busy or time.monotonic() - started > LOCK_WAIT_S:
                raise CheckFailed(f"the next writer (the same add) failed; see {self.log}")
            refused += 1
            time.sleep(1.0)
        if not refused:
            return ""
        return (f"(refused by the lock {refused} time(s) over {attempt - started:.0f} s "
                f"first) ")

    def fault_kill_serve(self, fault: Fault) -> None:
        fault.target = f"pid {self.server.proc.pid}"
        self.server.kill()
        took = self.server.start()
        ready, active = self.server.ready(), self._active()
        if ready["generation"] != active:
            raise CheckFailed(f"restarted on generation {ready['generation']}, the catalogue's "
                              f"active one is {active}")
        if _cbir("index", "verify", "--index", str(self.index), log=self.log).returncode != 0:
            raise CheckFailed(f"cbir index verify found problems; see {self.log}")
        fault.outcome = (f"back ready after {took:.1f} s on generation {active}, the active "
                         f"one; verify clean")

    # -- the run -------------------------------------------------------------------------------

    def _say(self, line: str) -> None:
        typer.echo(line)

    def run(self) -> list[Level]:
        self._say(f"building {self.index} of {len(self.base)} patients ...")
        self.prepare()
        env = {"CBIR_RELOAD_INTERVAL_S": str(self.reload_interval_s)}
        self.server = ServeProcess(self.index, _free_port(), self.work / "server.log", env=env)
        self._say(f"serving at {self.server.url} (ready after {self.server.start():.1f} s)")
        schedule = _schedule(len(self.levels))
        levels = []
        try:
            for clients, faults in zip(self.levels, schedule, strict=True):
                self._say(f"load: {clients} client(s) for {self.seconds:g} s; faults: "
                          f"{', '.join(faults) or 'none'}")
                levels.append(self.run_level(clients, faults))
            self.data_problems = self._final_check()
        finally:
            self.server.stop()
            self.engine.dispose()
        return levels

    def _final_check(self) -> list[str]:
        problems = []
        served, catalogued = self.server.patients(), self._catalogue_patients()
        for where, have in (("served", served), ("catalogue", catalogued)):
            problems += [f"{pid} missing from the {where}" for pid in self.expected - have]
            problems += [f"{pid} unexpected in the {where}" for pid in have - self.expected]
        if _cbir("index", "verify", "--index", str(self.index), log=self.log).returncode != 0:
            problems.append(f"cbir index verify found problems; see {self.log}")
        return problems


FAULTS = {"add": Campaign.fault_add, "remove": Campaign.fault_remove,
          "kill -9 add": Campaign.fault_kill_add, "kill -9 serve": Campaign.fault_kill_serve}


def _schedule(levels: int) -> list[tuple[str, ...]]:
    """FAULTS_PER_LEVEL over the levels run; with fewer levels the rest go to the last one."""
    out = [tuple(f) for f in FAULTS_PER_LEVEL[:levels]]
    out += [()] * (levels - len(out))
    out[-1] += tuple(f for group in FAULTS_PER_LEVEL[levels:] for f in group)
    return out


def _ms(x: float) -> str:
    return "-" if x != x else f"{x:.0f}"


def report(levels: list[Level], data_problems: list[str]) -> tuple[str, bool]:
    """The printed tables, and whether the campaign passed."""
    lines = ["", "clients  seconds  requests  req/s  p50 ms  p95 ms  p99 ms  errors seen  "
                 "requests lost"]
    for lv in levels:
        lines.append(f"{lv.clients:>7}  {lv.seconds:>7.0f}  {lv.requests:>8}  {lv.per_s:>5.2f}  "
                     f"{_ms(lv.p50):>6}  {_ms(lv.p95):>6}  {_ms(lv.p99):>6}  {lv.errors:>11}  "
                     f"{lv.lost:>13}")
    faults = [f for lv in levels for f in lv.faults]
    lines += ["", "fault          target                      clients  at s    outcome"]
    for f in faults:
        lines.append(f"{f.name:<14} {f.target:<27} {f.level:>7}  {f.started:>4.0f}-"
                     f"{f.ended:<4.0f} {f.outcome}")
    held = all(lv.held for lv in levels)
    lost = sum(lv.lost for lv in levels)
    errors = sum(lv.errors for lv in levels)
    failed = [f for f in faults if not f.ok]
    lines += ["", "load held  faults injected  errors seen  requests lost  data lost",
              f"{'yes' if held else 'no':<9}  {len(faults) - len(failed):>6} of {len(faults):<6}  "
              f"{errors:>11}  {lost:>13}  {len(data_problems):>9}"]
    lines += [f"data lost: {p}" for p in data_problems]
    if not held:
        lines.append("load held: no - a load process stopped before the faults were done; see "
                     "load-*.log")
    return "\n".join(lines), lost == 0 and not data_problems and not failed and held


def main(
    data: Annotated[Path, typer.Option(help="Cohort folder: --base patients are indexed, 3 "
                                            "more are added during the load.")],
    work: Annotated[Path, typer.Option(help="Folder for the index, queries and logs (emptied "
                                            "first).")],
    checkpoint: Annotated[Path | None, typer.Option(help="Model checkpoint (default: the "
                                                         "shipped one).")] = None,
    base: Annotated[int, typer.Option(help="Patients indexed before the load.")] = 4,
    seconds: Annotated[float, typer.Option(help="Load duration per level.")] = 60,
    levels: Annotated[str, typer.Option(help="Concurrent clients per level.")] = "1,4,16",
    retry_s: Annotated[float, typer.Option(help="A search unanswered for this long is lost."
                                           )] = 60,
    queries: Annotated[int, typer.Option(help="PNG slices exported as uploads.")] = 32,
    reload_interval_s: Annotated[float, typer.Option(help="The server's "
                                                     "CBIR_RELOAD_INTERVAL_S.")] = 1.0,
    kind: Annotated[str, typer.Option(help="The index's kind: flat or codebook.")] = "flat",
) -> None:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    campaign = Campaign(data, checkpoint, work, base, seconds,
                        [int(x) for x in levels.split(",")], retry_s, queries, reload_interval_s,
                        kind)
    started = time.monotonic()
    result = campaign.run()
    text, passed = report(result, campaign.data_problems)
    typer.echo(text)
    typer.echo(f"\n{'passed' if passed else 'FAILED'} in {time.monotonic() - started:.0f} s; "
               f"logs in {work}")
    raise typer.Exit(0 if passed else 1)


if __name__ == "__main__":
    typer.run(main)
