"""PNG grids of synthetic patients, read back from disk, for a person to look at.

``write_preview``: one row per patient (image, tumour labels, lesion-free twin, anatomy labels).
``write_comparison``: synthetic and real patients side by side, one row each, at the same five
levels through the brain, with their tumour labels outlined: does the synthesis look like the
scans the model will read?
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ingest.layouts import Case
from ingest.volumes import load_case
from model.data import preprocess, render

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


LEVELS = (0.2, 0.35, 0.5, 0.65, 0.8)  # fractions of the way up through the brain's slices


def level_tiles(case: Case) -> list[np.ndarray]:
    """The slices at ``LEVELS`` of one patient, grey with the tumour labels in colour."""
    vols = load_case(case, with_healthy=False, with_anatomy=False)
    image = preprocess.axial_slices(vols.image)
    seg = None if vols.seg is None else preprocess.axial_slices(vols.seg)
    brain = np.flatnonzero(preprocess.brain_area(image) >= preprocess.MIN_BRAIN_PIXELS)
    tiles = []
    for f in LEVELS:
        k = int(brain[int(round(f * (len(brain) - 1)))]) if brain.size else image.shape[0] // 2
        labels = seg[k] if seg is not None else np.zeros(image.shape[1:], np.uint8)
        tiles.append(render.overlay(image[k], labels, render.SEG_PALETTE))
    return tiles


def write_comparison(synthetic: list[Case], real: list[Case], out: Path,
                     max_patients: int = 4) -> Path:
    """Rows of synthetic patients, then rows of real ones, at the same levels (``LEVELS``)."""
    chosen = synthetic[:max_patients] + real[:max_patients]
    labels = [f"synthetic {c.pid}" for c in synthetic[:max_patients]]
    labels += [f"real {c.pid}" for c in real[:max_patients]]
    img = render.grid([level_tiles(c) for c in chosen],
                      titles=[f"{round(100 * f)}% up" for f in LEVELS], row_labels=labels)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out
