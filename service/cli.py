"""``cbir``: the one console command. Subcommands arrive with the parts they drive."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Content-based retrieval of brain MRI slices by normal and abnormal anatomy codes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect BraTS-style cohorts.", no_args_is_help=True)
app.add_typer(data_app, name="data")


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
    preview: Annotated[
        Path | None, typer.Option(help="Also write a PNG grid of a few patients here.")
    ] = None,
) -> None:
    """Write a synthetic BraTS-like cohort built on the MNI152 template (no download)."""
    from model.data.brats import find_cases
    from model.data.synth.cohort import synthesize
    from model.data.synth.preview import write_preview

    try:
        report = synthesize(out, patients=patients, seed=seed, workers=workers)
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
        typer.echo(f"preview: {write_preview(cases, preview)}")


@data_app.command("check")
def data_check(
    folders: Annotated[list[Path], typer.Argument(help="Cohort folders (BraTS layout).")],
) -> None:
    """Read every patient as training and indexing will; name each unusable file.

    Exits 1 when any patient or folder was skipped.
    """
    from model.data.brats import find_cases, load_case
    from model.data.dataset import case_slices
    from model.data.nifti import VolumeError

    ok = slices = abnormal = 0
    problems: list[tuple[Path, str]] = []
    for folder in folders:
        try:
            scan = find_cases(folder)
        except FileNotFoundError as exc:
            _fail(str(exc))
        problems += scan.skipped
        for case in scan.cases:
            try:
                st = case_slices(load_case(case, with_healthy=False))
            except VolumeError as exc:
                problems.append((exc.path, exc.problem))
                continue
            ok += 1
            slices += len(st.slice_index)
            if st.abnormal is not None:
                abnormal += int((st.abnormal.reshape(len(st.abnormal), -1) > 0).any(1).sum())
    typer.echo(f"{ok} patients readable, {slices} brain slices, {abnormal} with abnormality")
    for path, problem in problems:
        typer.secho(f"skipped {path}: {problem}", fg=typer.colors.YELLOW)
    if problems:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
