"""``cbir``: the one console command. Subcommands arrive with the parts they drive."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from service import cli_train

# Plain click help: it wraps descriptions to the terminal and never cuts a flag's name (rich's
# tables cut `--gate-by-position` to `--gate-by-positi…` at 80 columns).
PLAIN_HELP = {"rich_markup_mode": None}

app = typer.Typer(
    help="Content-based retrieval of brain MRI slices by normal and abnormal anatomy codes.",
    no_args_is_help=True, **PLAIN_HELP,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect BraTS-style cohorts.", no_args_is_help=True, **PLAIN_HELP)
app.add_typer(data_app, name="data")
bench_app = typer.Typer(help="Benchmarks that print measured figures.", no_args_is_help=True,
                        **PLAIN_HELP)
app.add_typer(bench_app, name="bench")
index_app = typer.Typer(help="Build and maintain the FAISS indices and the catalogue.",
                        no_args_is_help=True, **PLAIN_HELP)
app.add_typer(index_app, name="index")

DataOpt = Annotated[list[Path], typer.Option("--data", help="Cohort folder (repeatable).")]
IndexOpt = Annotated[Path, typer.Option("--index", help="Index directory.")]
DbOpt = Annotated[
    str | None,
    typer.Option("--db", help="Catalogue URL (default: SQLite inside the index directory)."),
]
CheckpointOpt = Annotated[Path | None, typer.Option("--checkpoint", help="Model checkpoint.")]
RayOpt = Annotated[bool, typer.Option(
    "--ray", help="Read and encode on Ray (pip install '.[ray]'); the codes come back here, "
                  "where the generation is written. Alone: a local Ray started for the run.")]
RayAddressOpt = Annotated[str | None, typer.Option(
    "--ray-address", help="With --ray: 'auto' joins the cluster RAY_ADDRESS names (or the one "
                          "this node belongs to); else a cluster address, e.g. "
                          "ray://head:10001.")]
RayWorkersOpt = Annotated[int | None, typer.Option(
    "--ray-workers", help="With --ray: encoding actors (default: one per GPU of the cluster, "
                          "else half its CPUs).")]
KIND_HELP = ("flat: IndexFlatL2 of the float vectors; codebook: the code indices in an exact "
             "product quantizer of the codebooks (same results, 80 B per slice in normal and in "
             "abnormal, concat read from those two).")


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Cohort folder to write (BraTS layout).")],
    patients: Annotated[int, typer.Option(help="Number of patients.")] = 40,
    seed: Annotated[int, typer.Option(help="Cohort seed: patient ids are SYN<seed>_<n>.")] = 0,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 1,
    structures: Annotated[bool, typer.Option(
        "--structures/--no-structures",
        help="Draw the normal tissue that enhances on T1-Gd (vessels, dura, venous sinuses, "
             "choroid plexus); --no-structures is an ablation.")] = True,
    preview: Annotated[
        Path | None, typer.Option(help="Also write a PNG grid of a few patients here.")
    ] = None,
    compare: Annotated[list[Path] | None, typer.Option(
        help="With --preview: real cohort folders whose patients are shown beside synthetic "
             "ones, at the same levels (repeatable).")] = None,
) -> None:
    """Write a synthetic BraTS-like cohort built on the MNI152 template (no download)."""
    if compare and preview is None:
        _fail("--compare shows real patients beside synthetic ones in the --preview grid: "
              "give --preview PATH too")
    from ingest.layouts import find_cases, find_cases_in
    from model.data.synth.cohort import synthesize
    from model.data.synth.preview import write_comparison, write_preview

    try:
        report = synthesize(out, patients=patients, seed=seed, workers=workers,
                            structures=structures)
    except (ValueError, FileNotFoundError, OSError) as exc:
        _fail(str(exc))
    n = len(report.written)
    rate = n / report.seconds if report.seconds > 0 else float("nan")
    typer.echo(f"wrote {n} patients to {out} in {report.seconds:.1f} s ({rate:.2f} patients/s)")
    if report.skipped_existing:
        typer.echo(f"skipped {len(report.skipped_existing)} patients already present")
    if n:
        typer.echo(f"patients without lesion: {report.fraction_without_lesion:.0%} "
                   "of those written")
    if preview is not None:
        wanted = {f"SYN{seed}_{i:04d}" for i in range(patients)}
        cases = [c for c in find_cases(out).cases if c.pid in wanted]
        if compare:
            try:
                real = find_cases_in(compare).cases
            except FileNotFoundError as exc:
                _fail(f"--compare: {exc}")
            typer.echo(f"preview: {write_comparison(cases, real, preview)}")
        else:
            typer.echo(f"preview: {write_preview(cases, preview)}")


app.command()(cli_train.train)
bench_app.command("train")(cli_train.bench_train)


@bench_app.command("model")
def bench_model(
    presets: Annotated[list[str], typer.Option("--preset", help="Repeatable.")] = None,
    batch: Annotated[int, typer.Option(help="Slices per batch.")] = 32,
    repeats: Annotated[int, typer.Option(help="Timed repeats (median reported).")] = 5,
) -> None:
    """Encode throughput (codes + indices) beside the bare encoder stack, same run."""
    from model.bench import encode_throughput

    for name in presets or ["paper", "small"]:
        r = encode_throughput(name, batch=batch, repeats=repeats)
        typer.echo(f"{r['preset']:>6} on {r['device']}, batch {r['batch']}, median of "
                   f"{r['repeats']}: encode {r['encode_slices_per_s']:.1f} slices/s, bare stack "
                   f"{r['bare_slices_per_s']:.1f} slices/s, ratio {r['ratio']:.3f}")


@bench_app.command("index")
def bench_index(
    data: DataOpt,
    checkpoint: Annotated[Path, typer.Option(help="Model checkpoint.")],
    batch_size: Annotated[int, typer.Option(help="Slices per encode batch.")] = 32,
    workers: Annotated[int, typer.Option(help="NIfTI reader processes.")] = 2,
    repeats: Annotated[int, typer.Option(help="Timed bare batches before and after.")] = 5,
) -> None:
    """End-to-end indexing slices/s beside the bare encode throughput, same run and batch."""
    from indexer.bench import indexing_throughput

    for name, value, least in (("--batch-size", batch_size, 1), ("--workers", workers, 0),
                               ("--repeats", repeats, 1)):
        if value < least:
            _fail(f"{name} must be at least {least}, got {value}")
    try:
        r = indexing_throughput(data, checkpoint, batch_size=batch_size, workers=workers,
                                repeats=repeats)
    except _index_errors() as exc:
        _fail(str(exc))
    for path, problem in r["skipped"]:
        typer.secho(f"skipped {path}: {problem}", fg=typer.colors.YELLOW)
    if not r["slices"]:
        _fail("no brain slice was indexed: nothing to measure")
    typer.echo(f"bare encode: {r['encode_slices_per_s']:.1f} slices/s ({r['preset']} on "
               f"{r['device']}, batch {r['batch']}, median of {r['repeats']})")
    typer.echo(f"end-to-end indexing: {r['indexing_slices_per_s']:.1f} slices/s "
               f"({r['slices']} slices of {r['patients']} patients in {r['seconds']:.1f} s, "
               f"{r['workers']} workers)")
    typer.echo(f"ratio {r['ratio']:.3f} (goal >= {r['goal']:.2f})")


@bench_app.command("service")
def bench_service_cmd(
    index: IndexOpt,
    queries: Annotated[int, typer.Option(help="Queries per space (PNGs of indexed slices).")]
    = 100,
    concurrency: Annotated[int, typer.Option(help="Concurrent clients for throughput.")] = 8,
    k: Annotated[int, typer.Option(help="Neighbours per query.")] = 10,
) -> None:
    """/search latency per stage (p50/p95) in each space, and throughput under concurrency."""
    from service.bench import bench_service
    from service.retrieval import RetrievalError

    try:
        bench_service(index, queries=queries, concurrency=concurrency, k=k, log=typer.echo)
    except RetrievalError as exc:
        _fail(str(exc))


@bench_app.command("search")
def bench_search_cmd(
    size: Annotated[list[int] | None, typer.Option(
        "--size", help="Slices per index (repeatable; default 10^5, 10^6, 10^7).")] = None,
    space: Annotated[list[str] | None, typer.Option(
        "--space", help="normal, abnormal or concat (repeatable; default all three).")] = None,
    kind: Annotated[list[str] | None, typer.Option(
        "--kind", help="flat or codebook (repeatable; default both).")] = None,
    checkpoint: Annotated[Path | None, typer.Option(
        help="Checkpoint whose codebooks the codes are drawn from (default: the shipped one).")]
    = None,
    queries: Annotated[int, typer.Option(help="Single queries per measurement (at most).")] = 50,
    batch: Annotated[int, typer.Option(help="Queries per batched search.")] = 16,
    seconds: Annotated[float, typer.Option(
        help="Time per measurement beyond its first 5 queries and first batch.")] = 5.0,
    threads: Annotated[int, typer.Option(help="FAISS (OpenMP) threads.")] = 1,
    memory_gb: Annotated[float | None, typer.Option(
        help="Build a flat index only if it fits in this (default: 80% of available memory).")]
    = None,
) -> None:
    """Flat against codebook index on synthetic codes: build time, bytes per slice, resident
    memory, p50/p95 of one query at k=10 and batched throughput, filters off and on."""
    from indexer.bench_search import run, table
    from indexer.build import DEFAULT_CHECKPOINT
    from indexer.layout import SPACES
    from indexer.store import KINDS
    from model.checkpoint import CheckpointError

    sizes = size or [10**5, 10**6, 10**7]
    spaces, kinds = space or list(SPACES), kind or list(KINDS)
    if bad := [s for s in spaces if s not in SPACES] + [k for k in kinds if k not in KINDS]:
        _fail(f"unknown space or kind: {', '.join(bad)}")
    for name, value, least in (("--size", min(sizes), 150), ("--queries", queries, 5),
                               ("--batch", batch, 1), ("--threads", threads, 1)):
        if value < least:
            _fail(f"{name} must be at least {least}, got {value}")
    try:
        results = run(sizes, spaces, Path(checkpoint or DEFAULT_CHECKPOINT),
                      kinds=[k for k in KINDS if k in kinds], n_queries=queries, batch=batch,
                      budget_s=seconds, threads=threads,
                      memory_bytes=None if memory_gb is None else int(memory_gb * 2**30),
                      log=typer.echo)
    except (CheckpointError, FileNotFoundError) as exc:
        _fail(str(exc))
    typer.echo("")
    for line in table(results):
        typer.echo(line)


def _print_report(report) -> None:
    typer.echo(f"{report.operation}: generation {report.generation}; "
               f"{len(report.patients_added)} patients / {report.slices_added} slices added, "
               f"{len(report.patients_removed)} patients removed; index now "
               f"{report.total_patients} patients, {report.total_slices} slices")
    if report.slices_added:
        typer.echo(f"encoded {report.slices_added} slices in {report.encode_seconds:.1f} s "
                   f"({report.slices_per_s:.1f} slices/s)")
    per = ", ".join(f"{s} {b:,} B" if b or report.kind != "codebook" else
                    f"{s} read from normal and abnormal"
                    for s, b in report.bytes_per_slice.items())
    typer.echo(f"bytes per slice: {per}; index files {report.index_bytes / 2**20:.1f} MiB"
               f"{_fixed_note(report.kind, report.fixed_bytes)}")
    for path, problem in report.skipped:
        typer.secho(f"skipped {path}: {problem}", fg=typer.colors.YELLOW)


def _fixed_note(kind: str, fixed: dict[str, int]) -> str:
    """A codebook index file holds the codebooks beside the codes, whatever the index's size."""
    if kind != "codebook":
        return f" ({kind} index)"
    return f" (codebook index; {sum(fixed.values()) / 2**20:.1f} MiB of that the codebooks)"


def _index_errors():
    from indexer.store import IndexStoreError
    from model.checkpoint import CheckpointError

    return (IndexStoreError, CheckpointError, FileNotFoundError)


def _ray_options(ray: bool, address: str | None, workers: int | None):
    """``RayOptions`` for --ray, or None (this process encodes); checked before any work."""
    if not ray:
        for name, given in (("--ray-address", address), ("--ray-workers", workers)):
            if given is not None:
                _fail(f"{name} goes with --ray")
        return None
    from indexer.distributed import INSTALL_HINT, RayOptions

    try:
        import ray as _  # noqa: F401
    except ImportError:
        _fail(INSTALL_HINT)
    if workers is not None and workers < 1:
        _fail(f"--ray-workers must be at least 1, got {workers}")
    return RayOptions(address=address or "local", workers=workers)


@index_app.command("build")
def index_build(data: DataOpt, out: Annotated[Path, typer.Option(help="Index directory.")],
                checkpoint: CheckpointOpt = None, db: DbOpt = None,
                batch_size: Annotated[int, typer.Option(help="Slices per encode batch.")] = 32,
                workers: Annotated[int, typer.Option(help="NIfTI reader processes.")] = 2,
                kind: Annotated[str, typer.Option(help=KIND_HELP)] = "flat",
                ray: RayOpt = False, ray_address: RayAddressOpt = None,
                ray_workers: RayWorkersOpt = None) -> None:
    """Encode every brain slice of the cohorts into a new index directory."""
    from indexer.build import Indexer

    try:
        report = Indexer(out, db).build(data, checkpoint, kind=kind, batch_size=batch_size,
                                        workers=workers,
                                        ray=_ray_options(ray, ray_address, ray_workers))
    except _index_errors() as exc:
        _fail(str(exc))
    _print_report(report)


@index_app.command("add")
def index_add(index: IndexOpt,
              data: Annotated[list[Path] | None, typer.Option(
                  "--data", help="Cohort folder (repeatable).")] = None,
              dicom: Annotated[list[Path] | None, typer.Option(
                  "--dicom", help="Folder of DICOM files of one study (repeatable); its "
                                  "post-contrast T1 series is indexed (README: DICOM and "
                                  "PACS), keyed by its StudyInstanceUID.")] = None,
              dicomweb: Annotated[str | None, typer.Option(
                  "--dicomweb", help="DICOMweb root of a PACS, e.g. "
                                     "http://127.0.0.1:8042/dicom-web; every study there, or "
                                     "those of --study.")] = None,
              study: Annotated[list[str] | None, typer.Option(
                  "--study", help="StudyInstanceUID to pull (repeatable; with --dicomweb).")
              ] = None,
              series: Annotated[str | None, typer.Option(
                  "--series", help="SeriesInstanceUID to index instead of the one the "
                                   "T1-Gd rule picks (with --dicom or --dicomweb).")] = None,
              checkpoint: CheckpointOpt = None, db: DbOpt = None,
              replace: Annotated[bool, typer.Option(help="Re-encode patients already in.")] = False,
              batch_size: Annotated[int, typer.Option(help="Slices per encode batch.")] = 32,
              workers: Annotated[int, typer.Option(help="NIfTI reader processes.")] = 2,
              kind: Annotated[str | None, typer.Option(
                  help="The index's kind (default: the one index.json records; another is "
                       "refused).")] = None,
              ray: RayOpt = False, ray_address: RayAddressOpt = None,
              ray_workers: RayWorkersOpt = None) -> None:
    """Add patients without re-encoding those already indexed: from cohort folders, DICOM
    folders or a PACS over DICOMweb (one source per call)."""
    from indexer.build import Indexer, add_dicom

    sources = [name for name, given in (("--data", data), ("--dicom", dicom),
                                        ("--dicomweb", dicomweb)) if given]
    if len(sources) != 1:
        _fail("give one source: --data, --dicom or --dicomweb" if not sources else
              f"give one source per call, not {' and '.join(sources)}")
    if study and not dicomweb:
        _fail("--study goes with --dicomweb")
    if series and data:
        _fail("--series goes with --dicom or --dicomweb")
    indexer = Indexer(index, db)
    options = {"replace": replace, "batch_size": batch_size, "workers": workers,
               "ray": _ray_options(ray, ray_address, ray_workers)}
    try:
        if data:
            report = indexer.add(data, checkpoint, kind=kind, **options)
        else:
            report = add_dicom(indexer, _dicom_series(dicom, dicomweb, study, series),
                               "dicomweb" if dicomweb else "dicom", checkpoint, **options)
    except _index_errors() as exc:
        _fail(str(exc))
    _print_report(report)


def _dicom_series(folders: list[Path] | None, url: str | None, studies: list[str] | None,
                  series: str | None):
    """Volumes (or ``(where, problem)``) from DICOM folders or a DICOMweb server, one at a
    time."""
    import requests

    from ingest import dicom
    from ingest.pacs import DicomWebSource

    if url:
        try:
            source = DicomWebSource(url)
            yield from source.pull(studies, series)
        except requests.RequestException as exc:
            _fail(f"cannot reach the DICOMweb server at {url}: {exc}")
        except dicom.DicomError as exc:
            _fail(str(exc))
        return
    for folder in folders or []:
        try:
            yield dicom.read_folder(folder, series)
        except dicom.DicomError as exc:
            yield str(folder), str(exc)


@index_app.command("remove")
def index_remove(index: IndexOpt,
                 patient: Annotated[list[str], typer.Option(help="Patient id (repeatable).")],
                 db: DbOpt = None) -> None:
    """Remove patients from the catalogue and from the indices."""
    from indexer.build import Indexer

    try:
        report = Indexer(index, db).remove(patient)
    except _index_errors() as exc:
        _fail(str(exc))
    _print_report(report)


@index_app.command("verify")
def index_verify(index: IndexOpt, db: DbOpt = None, checkpoint: CheckpointOpt = None) -> None:
    """Check catalogue, index files, thumbnails and checkpoint agree; exit 1 naming each
    inconsistency."""
    from indexer.store import manifest_kind, read_manifest
    from indexer.verify import verify

    try:
        problems = verify(index, db, checkpoint)
        kind = manifest_kind(read_manifest(index))
    except _index_errors() as exc:
        _fail(str(exc))
    for problem in problems:
        typer.secho(f"inconsistent: {problem}", fg=typer.colors.RED)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{index}: consistent ({kind} index)")


@index_app.command("stats")
def index_stats(index: IndexOpt, db: DbOpt = None) -> None:
    """Patients, slices, abnormal fraction and sizes."""
    from indexer.verify import stats

    try:
        s = stats(index, db)
    except _index_errors() as exc:
        _fail(str(exc))
    frac = "n/a" if s["abnormal_fraction"] is None else f"{s['abnormal_fraction']:.1%}"
    typer.echo(f"generation {s['generation']} ({s['preset']}, checkpoint "
               f"{(s['checkpoint_sha256'] or '')[:12]}): {s['patients']} patients, "
               f"{s['slices']} slices, {frac} with abnormality; {s['kind']} index")
    for space, size in s["index_bytes"].items():
        if not s["bytes_per_slice"][space]:  # a codebook concat: no file of its own
            typer.echo(f"  {space:>8}: no file, read from the normal and abnormal indices")
            continue
        typer.echo(f"  {space:>8}: {size / 2**20:.1f} MiB, {s['bytes_per_slice'][space]:,} "
                   f"B per slice" + (f" + {s['fixed_bytes'][space] / 2**20:.1f} MiB of "
                                     f"codebooks" if s["kind"] == "codebook" else ""))
    typer.echo(f"  thumbnails {s['thumbnail_bytes'] / 2**20:.1f} MiB")


@data_app.command("check")
def data_check(
    folders: Annotated[list[Path], typer.Argument(help="Cohort folders (BraTS layout).")],
) -> None:
    """Read every patient as training and indexing will; name each unusable file.

    Exits 1 when any patient or folder was skipped.
    """
    from ingest.layouts import find_cases_in
    from ingest.volumes import load_case
    from model.data.dataset import case_slices
    from model.data.nifti import VolumeError

    ok = slices = abnormal = 0
    try:
        scan = find_cases_in(folders)
    except FileNotFoundError as exc:  # a missing folder, or none with a usable case
        _fail(str(exc))
    problems: list[tuple[Path, str]] = list(scan.skipped)
    layouts: dict[str, int] = {}
    for case in scan.cases:
        try:
            st = case_slices(load_case(case, with_healthy=False))
        except VolumeError as exc:
            problems.append((exc.path, exc.problem))
            continue
        ok += 1
        layouts[case.layout] = layouts.get(case.layout, 0) + 1
        slices += len(st.slice_index)
        if st.abnormal is not None:
            abnormal += int((st.abnormal.reshape(len(st.abnormal), -1) > 0).any(1).sum())
    found = ", ".join(f"{n} {name}" for name, n in sorted(layouts.items()))
    typer.echo(f"{ok} patients readable ({found or 'none'}), {slices} brain slices, "
               f"{abnormal} with abnormality")
    for path, problem in problems:
        typer.secho(f"skipped {path}: {problem}", fg=typer.colors.YELLOW)
    if problems:
        raise typer.Exit(1)


@app.command()
def gallery(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Model checkpoint.")],
    data: Annotated[Path, typer.Option("--data", help="Cohort folder.")],
    out: Annotated[Path, typer.Option(help="PNG to write.")],
    rows: Annotated[int, typer.Option(help="Slices (rows) to show.")] = 6,
) -> None:
    """A PNG grid of what a checkpoint draws: input, x_hat+, x_hat-, healthy truth, lesions."""
    from model.checkpoint import CheckpointError
    from model.gallery import write_gallery

    try:
        labels = write_gallery(checkpoint, data, out, max_rows=rows)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote {out}: {', '.join(labels)}")


@app.command("export-checkpoint")
def export_checkpoint_cmd(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Training checkpoint.")],
    out: Annotated[Path, typer.Option(help="Checkpoint to write, without optimizer state.")],
    note: Annotated[str | None, typer.Option(
        help="A line for users (training data, limits); the service shows it.")] = None,
    eval_report: Annotated[Path | None, typer.Option(
        help="eval.json of a `cbir eval` run of these weights: its headline figures travel "
             "with the checkpoint and GET /info shows them.")] = None,
) -> None:
    """Write a checkpoint for shipping: same weights (and sha256), no optimizer state."""
    import json

    from model.checkpoint import CheckpointError, export_checkpoint, read_checkpoint

    headline = None
    if eval_report is not None:
        try:
            report = json.loads(eval_report.read_text())
            headline = {**report["headline"], "command": report["command"],
                        "created": report.get("created")}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            _fail(f"{eval_report}: not a cbir eval report ({type(exc).__name__}: {exc})")
        try:
            sha = read_checkpoint(checkpoint)["weights_sha256"]
        except CheckpointError as exc:
            _fail(str(exc))
        if report.get("checkpoint", {}).get("weights_sha256") not in (None, sha):
            _fail(f"{eval_report} evaluated other weights than {checkpoint}")
    try:
        payload = export_checkpoint(checkpoint, out, note=note, eval_headline=headline)
    except CheckpointError as exc:
        _fail(str(exc))
    typer.echo(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB, preset {payload['preset']}, "
               f"weights {payload['weights_sha256'][:12]})")


@app.command("soup")
def soup_cmd(
    checkpoints: Annotated[list[Path], typer.Argument(
        help="Checkpoints fine-tuned from one start (two or more).")],
    out: Annotated[Path, typer.Option(help="Checkpoint to write: their averaged weights.")],
) -> None:
    """Average the weights of checkpoints of one lineage (a uniform model soup); score the soup
    on held-out patients before shipping it (python -m bench.selection_samples)."""
    from model.checkpoint import CheckpointError, average_checkpoints

    try:
        payload = average_checkpoints(checkpoints, out)
    except CheckpointError as exc:
        _fail(str(exc))
    typer.echo(f"wrote {out}: the mean of {len(checkpoints)} checkpoints (preset "
               f"{payload['preset']}, weights {payload['weights_sha256'][:12]})")


@app.command()
def serve(
    index: Annotated[Path | None, typer.Option(
        "--index", help="Index directory (default: CBIR_INDEX_DIR, else ./index).")] = None,
    host: Annotated[str | None, typer.Option(help="Address (default: CBIR_HOST, 127.0.0.1).")]
    = None,
    port: Annotated[int | None, typer.Option(help="Port (default: CBIR_PORT, 8000).")] = None,
) -> None:
    """Serve the search API and the web page; the index is loaded before the port opens.

    Other settings come from CBIR_* environment variables (CBIR_API_KEY, CBIR_MAX_UPLOAD_MB,
    CBIR_MAX_K, CBIR_DEVICE, ...; see service/config.py).
    """
    import uvicorn
    from pydantic import ValidationError

    from service.api.app import create_app
    from service.config import Settings
    from service.retrieval import Retrieval, RetrievalError

    overrides = {k: v for k, v in (("index_dir", index), ("host", host), ("port", port))
                 if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        _fail(f"bad setting: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}")
    try:
        retrieval = Retrieval.open(settings.index_dir, db_url=settings.db_url,
                                   checkpoint=settings.checkpoint, device=settings.device,
                                   inference_workers=settings.inference_workers)
    except RetrievalError as exc:
        _fail(str(exc))
    counts = retrieval.counts()
    typer.echo(f"serving {counts['slices']} slices of {counts['patients']} patients "
               f"(preset {retrieval.build.preset}) at http://{settings.host}:{settings.port}/ "
               f"(API docs: /docs){'; API key required' if settings.api_key else ''}")
    uvicorn.run(create_app(settings, retrieval), host=settings.host, port=settings.port,
                log_level="info")


from service.cli_eval import eval_command  # noqa: E402, I001
from service.cli_preprocess import preprocess_command  # noqa: E402, I001
app.command("eval")(eval_command)
app.command("preprocess")(preprocess_command)
if __name__ == "__main__":
    app()
