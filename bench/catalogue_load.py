"""How long a server takes to read a large catalogue's view, and the memory it takes.

``python -m bench.catalogue_load --slices 1000000 [--db URL] [--work DIR] [--repeat 3]`` writes
a synthetic catalogue (patients of 150 slices, codes from ``indexer.bench_search``, one active
build; SQLite in ``--work`` unless ``--db``) once, then reads its view as a served generation
does (``service.catalogue_view.read_view``), each time in a fresh process, and prints the
seconds, the peak resident memory the read added (``VmHWM``) and what it kept. Figures are
measured, never asserted; they depend on the machine, the database and its cache.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from indexer.bench_search import SLICES_PER_PATIENT, synthetic_codes
from indexer.catalog import IndexBuild, Patient, Slice, open_catalog

WRITE_CHUNK = 1 << 16


def write_catalogue(url: str, slices: int) -> float:
    """Seconds taken to write ``slices`` synthetic slice rows, their patients and one active
    build into an empty catalogue at ``url``."""
    engine = open_catalog(url)
    started = time.perf_counter()
    patients = -(-slices // SLICES_PER_PATIENT)
    with engine.begin() as conn:
        conn.execute(insert(Patient), [
            {"id": p + 1, "external_id": f"BENCH_{p:07d}", "source_path": "synthetic",
             "cohort": "bench", "slice_count": min(SLICES_PER_PATIENT,
                                                   slices - p * SLICES_PER_PATIENT)}
            for p in range(patients)])
        for first in range(0, slices, WRITE_CHUNK):
            count = min(WRITE_CHUNK, slices - first)
            normal, abnormal, lesion = synthetic_codes(first, count, 512, 0, seed=0)
            conn.execute(insert(Slice), [
                {"id": first + i + 1, "patient_id": (first + i) // SLICES_PER_PATIENT + 1,
                 "slice_index": (first + i) % SLICES_PER_PATIENT,
                 "has_abnormality": bool(lesion[i]), "area_tc": 0, "area_ed": 0,
                 "area_et": 0, "brain_area": 20000,
                 "normal_codes": normal[i].astype("<u2").tobytes(),
                 "abnormal_codes": abnormal[i].astype("<u2").tobytes()}
                for i in range(count)])
        conn.execute(insert(IndexBuild), [{
            "generation": 1, "operation": "build", "checkpoint_sha256": "0" * 64,
            "preset": "bench", "layout_version": 1, "preprocessing_version": 1,
            "patients": patients, "slices": slices, "next_patient_id": patients + 1,
            "next_slice_id": slices + 1, "status": "active"}])
    seconds = time.perf_counter() - started
    engine.dispose()
    return seconds


def measure(url: str) -> dict[str, float]:
    """One read of the view, in this process: seconds, peak MiB added, MiB kept."""
    from indexer.bench_search import peak_bytes, reset_peak, rss_bytes
    from service.catalogue_view import read_view

    engine = open_catalog(url, migrate=False)
    base = rss_bytes()
    peak_known = reset_peak()
    started = time.perf_counter()
    view = read_view(engine)
    seconds = time.perf_counter() - started
    out = {"slices": len(view.slice_ids), "seconds": seconds,
           "peak_mib": (peak_bytes() - base) / 2**20 if peak_known else float("nan"),
           "kept_mib": (rss_bytes() - base) / 2**20}
    engine.dispose()
    return out


def main(
    slices: Annotated[int, typer.Option(help="Slice rows in the catalogue.")] = 1_000_000,
    db: Annotated[str | None, typer.Option(help="An empty catalogue database (default: "
                                                "SQLite in --work).")] = None,
    work: Annotated[Path, typer.Option(help="Folder for the SQLite catalogue.")] = Path(
        "/tmp/cbir-catalogue-load"),
    repeat: Annotated[int, typer.Option(help="Reads, each in a fresh process.")] = 3,
) -> None:
    if db is None:
        work.mkdir(parents=True, exist_ok=True)
    url = db or f"sqlite:///{(work / f'catalog-{slices}.sqlite').resolve()}"
    engine = open_catalog(url)
    with Session(engine) as session:
        held = session.scalar(select(func.count()).select_from(Slice))
    engine.dispose()
    if held == 0:
        typer.echo(f"writing {slices:,} slices ... ", nl=False)
        typer.echo(f"{write_catalogue(url, slices):.1f} s")
    elif held != slices:
        raise typer.BadParameter(f"{url} holds {held:,} slices, not {slices:,}: use an empty "
                                 f"database")
    runs = []
    for _ in range(repeat):
        got = subprocess.run([sys.executable, "-m", "bench.catalogue_load", "--measure", url],
                             check=True, capture_output=True, text=True)
        runs.append(json.loads(got.stdout))
        typer.echo(json.dumps(runs[-1]))
    med = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "peak_mib", "kept_mib")}
    typer.echo(f"read_view of {slices:,} slices, median of {repeat}: {med['seconds']:.1f} s, "
               f"peak +{med['peak_mib']:.0f} MiB, kept +{med['kept_mib']:.0f} MiB")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        print(json.dumps(measure(sys.argv[2])))
    else:
        typer.run(main)
