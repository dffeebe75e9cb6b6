"""The training-curve plot written beside a run's metrics log (``<out>.curves.png``)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt  # noqa: E402

from model.atomic import atomic_write  # noqa: E402

# Panels: title, then (record key path, label) per line. Paths index nested dicts.
PANELS = (
    ("training loss (mean since the last evaluation)",
     [(("train_loss", "total"), "total"), (("train_loss", "seg"), "L_seg"),
      (("train_loss", "rec"), "L_rec"), (("train_loss", "lat"), "L_lat"),
      (("train_loss", "dis"), "L_dis")]),
    ("held-out Dice",
     [(("held_out", "dice_whole"), "whole lesion"), (("held_out", "dice_TC"), "TC"),
      (("held_out", "dice_ED"), "ED"), (("held_out", "dice_ET"), "ET")]),
    ("held-out images (SSIM in brain; pseudo-normal vs twin)",
     [(("held_out", "rec_ssim_brain"), "x_hat+ SSIM"),
      (("held_out", "pn_ssim_out"), "x_hat- SSIM outside lesion"),
      (("held_out", "pn_mae_in"), "x_hat- MAE in lesion"),
      (("held_out", "input_mae_in"), "input MAE in lesion")]),
    ("held-out retrieval (top-5, own patient excluded)",
     [(("held_out", "abn_lesion_at5"), "abnormal: lesion -> lesion"),
      (("held_out", "abn_clean_at5"), "abnormal: clean -> clean"),
      (("held_out", "normal_twin_at5"), "normal: shared with twin")]),
    ("held-out score (sum of 7 figures)", [(("held_out", "score"), "score")]),
    ("learning rate", [(("lr",), "lr")]),
    ("real scans (monitor, not for selection): abnormal top-5 vs held-out",
     [(("held_out", "monitor", "abn_lesion_at5"), "lesion -> lesion"),
      (("held_out", "monitor", "abn_clean_at5"), "clean -> clean")]),
    ("real scans (monitor): Dice per slice, SSIM",
     [(("held_out", "monitor", "dice_whole"), "Dice whole lesion"),
      (("held_out", "monitor", "dice_TC"), "Dice TC"),
      (("held_out", "monitor", "dice_ED"), "Dice ED"),
      (("held_out", "monitor", "dice_ET"), "Dice ET"),
      (("held_out", "monitor", "rec_ssim_brain"), "x_hat+ SSIM in brain")]),
)


# The model issue's acceptance floors (issue 20), drawn as dashed lines on their panels.
FLOORS = {
    "held-out Dice": [(0.65, "floor: whole lesion 0.65")],
    "held-out retrieval (top-5, own patient excluded)": [(0.85, "floor: abnormal clean 0.85"),
                                                          (0.75, "floor: lesion, twin 0.75")],
    "real scans (monitor, not for selection): abnormal top-5 vs held-out": [
        (0.85, "floor: both 0.85")],
    "real scans (monitor): Dice per slice, SSIM": [(0.50, "floor: whole, SSIM 0.50"),
                                                    (0.20, "floor: each class 0.20")],
}


def _get(record: dict, path: tuple[str, ...]):
    value = record
    for key in path:
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return value


def read_log(path: Path | str) -> list[dict]:
    """The records of a metrics log, one JSON object a line."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_curves(records: list[dict], out: Path | str, title: str = "") -> Path:
    """Write the panels against training steps to ``out`` (PNG, atomically)."""
    fig, axes = plt.subplots(2, 4, figsize=(20, 8), constrained_layout=True)
    for ax, (panel_title, lines) in zip(axes.flat, PANELS, strict=True):
        for path, label in lines:
            points = [(r["step"], _get(r, path)) for r in records]
            points = [(s, v) for s, v in points if v is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", label=label)
        for value, label in FLOORS.get(panel_title, []):
            ax.axhline(value, color="grey", linestyle="--", linewidth=0.8, label=label)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if panel_title.startswith("training loss") or panel_title == "learning rate":
            ax.set_yscale("log")
        if ax.has_data() and len(lines) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    atomic_write(out, lambda fh: fig.savefig(fh, format="png", dpi=80))
    plt.close(fig)
    return Path(out)
