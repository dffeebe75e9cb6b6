"""``cbir model gallery``: what a checkpoint draws, for a person to judge.

One row per slice: the input, x_hat+ (both codes), x_hat- (normal code alone: the pseudo-normal),
the true healthy slice (synthetic cohorts carry it), the predicted and the true lesion labels.
Slices come from the checkpoint's held-out patients when the data holds them, the slice with the
largest lesion of each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ingest.layouts import find_cases
from ingest.volumes import load_case
from model.checkpoint import load_model
from model.data import render
from model.data.dataset import case_slices

COLUMNS = ["input", "x_hat+ (reconstruction)", "x_hat- (pseudo-normal)", "healthy (truth)",
           "predicted lesion", "true lesion"]
CLASS_TO_BRATS = np.array([0, 1, 2, 4], np.uint8)


@torch.inference_mode()
def write_gallery(checkpoint: Path, data: Path, out: Path, max_rows: int = 6) -> list[str]:
    """Write the grid to ``out``; returns the row labels (patient:slice)."""
    model, ckpt = load_model(checkpoint)
    held = set(ckpt.get("held_out_patients") or [])
    cases = find_cases(data).cases
    chosen = [c for c in cases if c.pid in held] or cases
    rows, labels = [], []
    for case in chosen:
        stacks = case_slices(load_case(case))
        if stacks.abnormal is None or not (stacks.abnormal > 0).any():
            continue
        i = int((stacks.abnormal > 0).sum(axis=(1, 2)).argmax())
        x = torch.from_numpy(stacks.image[i][None, None].copy())
        out_ = model.draw(x)  # at slice size, whatever the preset's own resolution
        pred = CLASS_TO_BRATS[out_.logits[0].argmax(0).numpy()]
        truth = CLASS_TO_BRATS[stacks.abnormal[i]]
        healthy = stacks.healthy[i] if stacks.healthy is not None else np.zeros_like(x[0, 0])
        image = stacks.image[i]
        rows.append([
            render.grey_rgb(image),
            render.grey_rgb(out_.reconstruction[0, 0].clamp(0, 1).numpy()),
            render.grey_rgb(out_.pseudo_normal[0, 0].clamp(0, 1).numpy()),
            render.grey_rgb(np.asarray(healthy)),
            render.overlay(image, pred, render.SEG_PALETTE),
            render.overlay(image, truth, render.SEG_PALETTE),
        ])
        labels.append(f"{case.pid}:{int(stacks.slice_index[i])}")
        if len(rows) == max_rows:
            break
    if not rows:
        raise ValueError(f"no patient with a lesion under {data}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    render.grid(rows, titles=COLUMNS, row_labels=labels).save(out)
    return labels
