"""A PNG grid of a few synthetic patients, read back from disk, for a person to look at."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model.data import preprocess, render
from model.data.brats import Case, load_case

COLUMNS = ["t1ce", "t1ce + tumour labels", "healthy (ground truth)", "t1ce + anatomy labels"]


def _pick_slice(seg: np.ndarray | None, anatomy: np.ndarray | None, image: np.ndarray) -> int:
    """The slice with the most tumour; with none, the one with the most ventricle, else brain."""
    if seg is not None and (seg > 0).any():
        return int((seg > 0).sum(axis=(1, 2)).argmax())
    if anatomy is not None and (anatomy >= 5).any():
        return int((anatomy >= 5).sum(axis=(1, 2)).argmax())
    return int(preprocess.brain_area(image).argmax())


def patient_tiles(case: Case) -> list[np.ndarray]:
    vols = load_case(case)
    image = preprocess.axial_slices(vols.image)
    seg = None if vols.seg is None else preprocess.axial_slices(vols.seg)
    anatomy = None if vols.anatomy is None else preprocess.axial_slices(vols.anatomy)
    k = _pick_slice(seg, anatomy, image)
    blank = np.zeros_like(image[k], dtype=np.uint8)
    healthy = preprocess.axial_slices(vols.healthy)[k] if vols.healthy is not None else None
    return [
        render.grey_rgb(image[k]),
        render.overlay(image[k], seg[k] if seg is not None else blank, render.SEG_PALETTE),
        render.grey_rgb(healthy) if healthy is not None else render.grey_rgb(blank),
        render.overlay(image[k], anatomy[k] if anatomy is not None else blank,
                       render.ANATOMY_PALETTE),
    ]


def write_preview(cases: list[Case], out: Path, max_patients: int = 6) -> Path:
    """Write the grid for the first ``max_patients`` cases to ``out``."""
    chosen = cases[:max_patients]
    rows = [patient_tiles(c) for c in chosen]
    img = render.grid(rows, titles=COLUMNS, row_labels=[c.pid for c in chosen])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out
