"""``cbir eval``: measure what the retrieval returns against labels and baselines (issue 11)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer


def _ks(text: str) -> list[int]:
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"--k takes comma-separated integers, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise typer.BadParameter(f"--k values must be at least 1, got {text!r}")
    return ks


def eval_command(
    index: Annotated[Path, typer.Option("--index", help="Index directory: the references.")],
    queries: Annotated[list[Path], typer.Option(
        "--queries", help="Cohort folder of query patients, not in the index (repeatable).")],
    out: Annotated[Path, typer.Option(help="Report folder: eval.json and index.html.")],
    k: Annotated[str, typer.Option("--k", help="Neighbour counts, comma-separated.")] = "1,5,10",
    max_queries: Annotated[int, typer.Option(
        help="Query slices drawn, evenly per patient, half with a lesion where it has them "
             "(0: every brain slice).")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the query draw, pairs and bootstrap.")] = 0,
    references: Annotated[list[Path] | None, typer.Option(
        "--references", help="Reference cohort folder, when it is no longer where the index "
                             "read it (repeatable).")] = None,
    db: Annotated[str | None, typer.Option(
        "--db", help="Catalogue URL (default: the one the index records).")] = None,
    checkpoint: Annotated[Path | None, typer.Option(
        "--checkpoint", help="Model checkpoint (default: the one the index was built with).")]
    = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap draws per interval.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Slices per model batch.")] = 16,
    compose_weighting: Annotated[str, typer.Option(
        help="How composed queries weigh their halves: overlap (as /compose by default), "
             "balanced or plain (the paper's concat L2); see /compose.")] = "overlap",
) -> None:
    """Score each search space, the composed query and the model's images on query patients of
    another cohort, beside raw-pixel, random and oracle baselines; write a JSON and HTML report."""
    from service.evaluation.cohorts import EvaluationError
    from service.evaluation.protocol import evaluate
    from service.evaluation.report import write_report

    ks = _ks(k)
    from service.retrieval import COMPOSE_WEIGHTINGS

    if compose_weighting not in COMPOSE_WEIGHTINGS:
        raise typer.BadParameter(f"--compose-weighting is one of "
                                 f"{', '.join(COMPOSE_WEIGHTINGS)}, got {compose_weighting!r}")
    for name, value, least in (("--max-queries", max_queries, 0), ("--bootstrap", bootstrap, 1),
                               ("--batch-size", batch_size, 1)):
        if value < least:
            raise typer.BadParameter(f"{name} must be at least {least}, got {value}")
    # The command as it would be typed, rebuilt from the parsed options (sys.argv is not the
    # command when cbir runs inside another program, e.g. a test runner).
    argv = ["cbir", "eval", "--index", str(index)]
    for q in queries:
        argv += ["--queries", str(q)]
    argv += ["--out", str(out), "--k", k, "--max-queries", str(max_queries), "--seed", str(seed),
             "--compose-weighting", compose_weighting]
    for r in references or []:
        argv += ["--references", str(r)]
    if db:
        argv += ["--db", db]
    if checkpoint:
        argv += ["--checkpoint", str(checkpoint)]
    command = shlex.join(argv)
    try:
        evaluation = evaluate(index, queries, ks=ks, max_queries=max_queries or None, seed=seed,
                              reference_dirs=references, db_url=db, checkpoint=checkpoint,
                              batch_size=batch_size, draws=bootstrap, command=command,
                              compose_weighting=compose_weighting)
    except (EvaluationError, FileNotFoundError) as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    json_path, html_path = write_report(evaluation, out)
    result = evaluation.result
    for patient in result["references"]["patients_without_anatomy"][:5]:
        typer.secho(f"no anatomy labels for reference patient {patient}: normal-label figures "
                    f"left out", fg=typer.colors.YELLOW)
    head = result["headline"]
    typer.echo(f"{result['queries']['slices']} query slices of "
               f"{len(result['queries']['patients'])} patients against "
               f"{result['index']['slices']} reference slices, in "
               f"{result['seconds']['total']:.0f} s")
    typer.echo(f"at k = {head['k']}: model | pixels | random | oracle")
    for row in head["figures"]:
        values = " | ".join(f"{row[m]:.3f}" if m in row else "-"
                            for m in ("model", "pixels", "random", "oracle"))
        typer.echo(f"  {row['space']:>8} {row['figure']:<18} {values}")
    typer.echo("the model on the query slices (mean per slice, slices):")
    for name in head["model"]:
        fig = result["model"][name]
        typer.echo(f"  {name:<26} {_value(fig)} ({fig['slices']})")
    typer.echo(_summary_line(result, head))
    typer.echo(f"wrote {json_path} and {html_path}")


def _value(fig: dict | None) -> str:
    return "-" if fig is None or fig["value"] is None else f"{fig['value']:.3f}"


def _summary_line(result: dict, head: dict) -> str:
    """What matters on real scans, in one line: are lesion-free and lesion slices told apart,
    does the model find the lesion, does it draw the brain. Values as eval.json holds them (the
    headline's are rounded)."""
    abnormal = result["figures"]["abnormal"]

    def at_k(name: str) -> str:
        fig = abnormal.get(name, {})
        return f"{fig['at_k'][str(head['k'])]['model']['value']:.3f}" if "at_k" in fig else "-"

    model = result["model"]
    dice = " / ".join(_value(model.get(f"segmentation_dice_{c}"))
                      for c in ("tc", "ed", "et", "whole"))
    return (f"headline (abnormal space, top-{head['k']}): lesion-free precision "
            f"{at_k('healthy_precision')}, lesion precision {at_k('lesion_precision')}; "
            f"segmentation Dice TC / ED / ET / whole {dice}; reconstruction SSIM in the brain "
            f"{_value(model.get('reconstruction_ssim_brain'))}")
