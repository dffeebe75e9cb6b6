"""``cbir preprocess``: a clinical NIfTI volume -> the model's space (``ingest.preprocess``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _pair(text: str) -> tuple[Path, Path]:
    src, sep, dst = text.partition("=")
    if not sep or not src or not dst:
        raise typer.BadParameter(f"--with takes IN=OUT, got {text!r}")
    return Path(src), Path(dst)


def preprocess_command(
    src: Annotated[Path, typer.Argument(help="IN: the T1-Gd NIfTI (.nii or .nii.gz).")],
    dst: Annotated[Path, typer.Argument(help="OUT: the NIfTI to write (BraTS layout).")],
    others: Annotated[list[str] | None, typer.Option(
        "--with", help="IN=OUT: another modality of the same study (T1, T2, FLAIR), "
                       "co-registered to the T1-Gd and written to OUT (repeatable).")] = None,
) -> None:
    """Skull-strip IN and register it to the model's grid (240 x 240 x 155 at 1 mm, the
    BraTS/SRI24 layout), normalised as indexed volumes are. A volume already in that space is
    written unchanged but for the normalisation."""
    from ingest.preprocess import preprocess_file
    from model.data.nifti import VolumeError

    pairs = {f"with{i}": _pair(text) for i, text in enumerate(others or [])}
    try:
        out = preprocess_file(src, dst, pairs)
    except (VolumeError, ValueError, FileNotFoundError) as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    what = "already in the model's space" if out.transform is None else "registered"
    typer.echo(f"{dst}: {what}, {int(out.brain.sum())} brain voxels, {out.seconds:.1f} s")
    for _, path in pairs.values():
        typer.echo(f"{path}: co-registered to {src.name}")
