"""``cbir train`` and ``cbir bench train``: training the decomposition network from the shell."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def recorded_recipe(path: Path):
    """The training recipe a checkpoint records, as a new run's starting point, warm-started
    from that checkpoint's own weights (not from the run it continued); its cohort monitors are
    dropped (they name folders of the machine it was trained on)."""
    from model.checkpoint import CheckpointError, read_checkpoint
    from model.train import TrainConfig, TrainingError

    try:
        recorded = read_checkpoint(path).get("train_config")
    except CheckpointError as exc:
        raise TrainingError(f"--from-config: {exc}") from exc
    if not recorded:
        raise TrainingError(f"--from-config: {path} records no training recipe (a checkpoint "
                            f"exported before recipes were recorded?)")
    return dataclasses.replace(TrainConfig.from_dict(recorded), monitor=[], init_from=str(path))


def train(
    data: Annotated[list[Path], typer.Option(help="Cohort folder (repeatable).")],
    out: Annotated[Path, typer.Option(help="Training checkpoint (written atomically at every "
                                           "evaluation; <out stem>.best.pt keeps the best).")],
    resume: Annotated[bool, typer.Option(
        help="Continue the checkpoint at --out with its recorded recipe.")] = False,
    accept_new_data: Annotated[bool, typer.Option(
        help="With --resume: continue although the data's fingerprint differs from the one "
             "recorded (the same cases written again, e.g. re-synthesized on another machine; "
             "the error says what differs).")] = False,
    from_config: Annotated[Path | None, typer.Option(
        help="Start from the recipe this checkpoint records (checkpoints/cbir-cpu.pt: the "
             "shipped recipe, a warm start from its weights included); flags given override "
             "it. Its --monitor cohorts are not carried over.")] = None,
    minutes: Annotated[float | None, typer.Option(
        help="Wall-clock budget of this run: evaluate, checkpoint and stop when it is spent.")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: all).")] = None,
    preset: Annotated[str | None, typer.Option(help="Model preset (default cpu).")] = None,
    steps: Annotated[int | None, typer.Option(
        help="Planned optimizer steps; the schedule spans them (default 20000).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Slices per step (default 8).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak Adam learning rate (default 1e-3).")
                  ] = None,
    min_lr: Annotated[float | None, typer.Option(
        help="Learning rate at the end of the cosine decay (default 5e-5).")] = None,
    warmup_steps: Annotated[int | None, typer.Option(
        help="Linear warm-up steps (default 200).")] = None,
    eval_every: Annotated[int | None, typer.Option(
        help="Steps between held-out evaluations and checkpoints (default 500).")] = None,
    eval_slices: Annotated[int | None, typer.Option(
        help="Held-out slices per evaluation, evenly spaced (default: all; 0: all, over a "
             "recorded recipe's count).")] = None,
    rec_weight: Annotated[float | None, typer.Option(
        help="l3, weight of L_rec (default 5, the authors' code; the paper: 1e4).")] = None,
    seg_weight: Annotated[float | None, typer.Option(
        help="l2, weight of L_seg (default 1, the paper).")] = None,
    seed: Annotated[int | None, typer.Option(
        help="Seed of init, split, order, augmentation (default 0).")] = None,
    val_fraction: Annotated[float | None, typer.Option(
        help="Fraction of patients held out (default 0.1).")] = None,
    augment: Annotated[bool | None, typer.Option(
        "--augment/--no-augment", help="Flip, scale and rotate training slices.")] = None,
    lesion_codebook: Annotated[bool | None, typer.Option(
        "--lesion-codebook/--all-slices-codebook",
        help="Only lesion slices move the abnormal codebook (default) or every slice.")] = None,
    null_code: Annotated[bool | None, typer.Option(
        "--null-code/--no-null-code",
        help="Abnormal code by position with a fixed null code for lesion-free positions "
             "(default off: the paper's slice-level L_dis).")] = None,
    pi: Annotated[float | None, typer.Option(
        help="Threshold of the L_dis hinge, squared distance per code position (default 10, the "
             "paper's).")] = None,
    init_from: Annotated[Path | None, typer.Option(
        help="Warm start from this checkpoint's weights (fresh optimizer and schedule).")] = None,
    sep_weight: Annotated[float | None, typer.Option(
        help="Weight of the abnormal-space retrieval margin, our addition (default 0: off).")
    ] = None,
    sep_margin: Annotated[float | None, typer.Option(
        help="Its margin: a wrong-status neighbour must lie (1 + margin) x farther than the "
             "5th right one (default 0.5).")] = None,
    abnormal_gate: Annotated[bool | None, typer.Option(
        "--abnormal-gate/--no-abnormal-gate",
        help="A slice-level gate on the abnormal code, from globally pooled features "
             "(default off).")] = None,
    gate_by_position: Annotated[bool | None, typer.Option(
        "--gate-by-position/--gate-by-pooling",
        help="With --abnormal-gate: the gate opens when any code position sees lesion (the "
             "maximum of per-position logits from a small CNN of its own, trained by its "
             "--gate-weight term alone, which it needs) instead of reading the pooled trunk "
             "(default: pooled).")] = None,
    gate_weight: Annotated[float | None, typer.Option(
        help="With --abnormal-gate: weight of the gate's cross-entropy against whether the "
             "slice has a lesion, and by position whether each position's cell has one "
             "(default 0: off).")] = None,
    null_by_slice: Annotated[bool | None, typer.Option(
        "--null-by-slice/--null-by-position",
        help="With --null-code: lesion-free slices take the null code at every position, "
             "slices with a lesion nowhere (default: by position).")] = None,
    render: Annotated[float | None, typer.Option(
        help="Probability that a synthetic training slice is drawn afresh from its tissue map "
             "with a random appearance instead of its stored image (default 0).")] = None,
    thick_slices: Annotated[float | None, typer.Option(
        help="With --render: probability that a slice drawn afresh is drawn as a thick-sliced "
             "clinical scan (2-6 mm) resampled to 1 mm, with its through-plane partial volume "
             "(default 0).")] = None,
    residue: Annotated[float | None, typer.Option(
        help="With --render: probability that a slice drawn afresh gets a band of dura or "
             "venous sinus along parts of its brain's edge, as skull stripping leaves on real "
             "scans (default 0).")] = None,
    ema: Annotated[float | None, typer.Option(
        help="Decay of a moving average of the weights, updated every step; evaluations, "
             "the selection and <out stem>.best.pt read it (0.999: about the last 1,000 "
             "steps; default 0: off).")] = None,
    monitor: Annotated[list[Path] | None, typer.Option(
        help="Real cohort measured at every evaluation, never trained on and never used to "
             "select a checkpoint (repeatable).")] = None,
    bf16: Annotated[bool | None, typer.Option(
        "--bf16/--no-bf16", help="bf16 autocast where supported (default on).")] = None,
    channels_last: Annotated[bool | None, typer.Option(
        "--channels-last/--no-channels-last", help="NHWC memory format (default on).")] = None,
) -> None:
    """Train the decomposition network; held-out metrics go to <out>.metrics.jsonl."""
    import torch

    from model.checkpoint import CheckpointError, read_checkpoint
    from model.config import PRESETS
    from model.train import TrainConfig, TrainingError
    from model.train import train as run_training

    given = {k: v for k, v in {
        "preset": preset, "steps": steps, "batch_size": batch_size, "lr": lr,
        "min_lr": min_lr, "warmup_steps": warmup_steps, "eval_every": eval_every,
        "eval_slices": eval_slices, "seed": seed,
        "val_fraction": val_fraction, "augment": augment, "lesion_codebook": lesion_codebook,
        "null_code": null_code, "null_by_slice": null_by_slice,
        "abnormal_gate": abnormal_gate, "gate_by_position": gate_by_position,
        "init_from": None if init_from is None else str(init_from),
        "render": render, "thick_slices": thick_slices, "residue": residue, "ema": ema,
        "monitor": None if monitor is None else [str(m) for m in monitor],
        "bf16": bf16, "channels_last": channels_last}.items() if v is not None}
    weights = {k: v for k, v in {"rec": rec_weight, "seg": seg_weight, "sep": sep_weight, "pi": pi,
                                 "sep_margin": sep_margin, "gate": gate_weight}.items()
               if v is not None}
    if preset is not None and preset not in PRESETS:
        _fail(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
    for name, value in (("--steps", steps), ("--batch-size", batch_size),
                        ("--eval-every", eval_every), ("--threads", threads)):
        if value is not None and value < 1:
            _fail(f"{name} must be at least 1, got {value}")
    for name, value in (("--eval-slices", eval_slices), ("--sep-weight", sep_weight),
                        ("--sep-margin", sep_margin),
                        ("--pi", pi), ("--gate-weight", gate_weight)):
        if value is not None and value < 0:
            _fail(f"{name} must not be negative, got {value}")
    for name, value in (("--lr", lr), ("--min-lr", min_lr), ("--minutes", minutes)):
        if value is not None and not value > 0:
            _fail(f"{name} must be positive, got {value}")
    for name, value in (("--render", render), ("--thick-slices", thick_slices),
                        ("--residue", residue)):
        if value is not None and not 0 <= value <= 1:
            _fail(f"{name} must lie in [0, 1], got {value}")
    if ema is not None and not 0 <= ema < 1:
        _fail(f"--ema must lie in [0, 1), got {ema}")
    if val_fraction is not None and not 0 <= val_fraction < 1:
        _fail(f"--val-fraction must lie in [0, 1), got {val_fraction}")
    if accept_new_data and not resume:
        _fail("--accept-new-data applies to --resume only")
    try:
        base = TrainConfig()
        if resume and from_config is not None:
            raise TrainingError("--resume continues the recipe of --out; --from-config starts "
                                "a new run from another checkpoint's recipe: give one of them")
        if from_config is not None:
            base = recorded_recipe(from_config)
        if resume and out.exists():
            try:
                base = TrainConfig.from_dict(read_checkpoint(out).get("train_config", {}))
            except CheckpointError as exc:
                raise TrainingError(f"cannot resume: {exc}") from exc
        config = dataclasses.replace(base, **given, weights=dataclasses.replace(
            base.weights, **weights))
        if threads is not None:
            torch.set_num_threads(threads)
        result = run_training(data, out, config, resume=resume, minutes=minutes,
                              log_line=typer.echo, accept_new_data=accept_new_data)
    except (TrainingError, CheckpointError) as exc:
        _fail(str(exc))
    for path, problem in result["skipped"]:
        typer.secho(f"skipped {path}: {problem}", fg=typer.colors.YELLOW)
    state = "finished" if result["finished"] else "stopped (continue with --resume)"
    typer.echo(f"checkpoint: {out} at step {result['step']} of {config.steps}, {state}; "
               f"{result['train_slices']} training slices, {result['held_out_slices']} held out")
    if result["best_path"]:
        typer.echo(f"best held-out score: {result['best_path']}")


def bench_train(
    preset: Annotated[list[str] | None, typer.Option(
        help="Preset to measure (repeatable; default cpu and small).")] = None,
    batch: Annotated[int, typer.Option(help="Slices per step.")] = 8,
    repeats: Annotated[int, typer.Option(help="Timed steps per variant.")] = 5,
) -> None:
    """Training slices/s per preset and per speed-up switch, timed alternately in one run."""
    from model.bench import train_throughput

    presets = preset or ["cpu", "small"]
    for name in presets:
        report = train_throughput(name, batch=batch, repeats=repeats)
        typer.echo(f"preset {name} ({report['device']}, batch {batch}, median of {repeats} "
                   f"steps each, variants timed alternately):")
        base = report["variants"]["plain"]
        for variant, rate in report["variants"].items():
            typer.echo(f"  {variant:<28} {rate:7.2f} slices/s  {rate / base:5.2f}x")
