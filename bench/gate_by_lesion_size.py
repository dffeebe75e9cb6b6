"""The abnormal gate and the abnormal top-5 by lesion size, on a checkpoint's held-out patients.

    python -m bench.gate_by_lesion_size checkpoints/cbir-cpu.pt data/cohort56

For each band of lesion area (pixels at 256 x 256): how many held-out slices, their median gate,
the share whose gate is under 0.1, and their abnormal top-5 lesion share (own patient excluded,
as ``model.held_out`` computes it); then the same for lesion-free slices. Needs a checkpoint
trained with ``--abnormal-gate``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from model.checkpoint import load_model
from model.data.dataset import SliceDataset
from model.held_out import TOP_K, _top_k_excluding_own

BANDS = ((1, 50), (50, 200), (200, 1000), (1000, 256 * 256 + 1))


@torch.no_grad()
def measure(checkpoint: Path, data: Path, batch: int = 64) -> list[str]:
    model, payload = load_model(checkpoint)
    if not model.config.abnormal_gate:
        raise SystemExit(f"{checkpoint}: trained without --abnormal-gate")
    dataset = SliceDataset.from_folders([data])
    rows = dataset.indices_of(set(payload["held_out_patients"]))
    gates, codes, areas, pids = [], [], [], []
    for start in range(0, len(rows), batch):
        items = [dataset[i] for i in rows[start:start + batch]]
        x = torch.stack([it["image"] for it in items])
        small = model.to_model_size(x)
        _, _, logit, _ = model.encoder.split(model.encoder.trunk(small), small)
        gates.append(torch.sigmoid(logit))
        codes.append(model.encode(x).abnormal.flatten(1))
        areas += [int((it["abnormal"] > 0).sum()) for it in items]
        pids += [it["pid"] for it in items]
    gate, area = torch.cat(gates), torch.tensor(areas)
    lesion = area > 0
    flat = torch.cat(codes)
    top = _top_k_excluding_own(flat, pids, flat, pids, TOP_K)
    agree = torch.tensor([sum(bool(lesion[j]) == bool(lesion[i]) for j in row) / len(row)
                          for i, row in enumerate(top)])
    lines = [f"{int(lesion.sum())} lesion slices, {int((~lesion).sum())} lesion-free, "
             f"{len(set(pids))} held-out patients"]
    for low, high in BANDS:
        m = lesion & (area >= low) & (area < high)
        if m.any():
            lines.append(f"lesion area [{low}, {high}) px: {int(m.sum())} slices, gate median "
                         f"{float(gate[m].median()):.3f}, gate < 0.1: "
                         f"{float((gate[m] < 0.1).float().mean()):.2f}, abnormal top-5 with "
                         f"a lesion {float(agree[m].mean()):.3f}")
    m = ~lesion
    lines.append(f"lesion-free: {int(m.sum())} slices, gate median {float(gate[m].median()):.3f}"
                 f", gate > 0.1: {float((gate[m] > 0.1).float().mean()):.2f}, abnormal top-5 "
                 f"lesion-free {float(agree[m].mean()):.3f}")
    return lines


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    torch.set_num_threads(2)
    print("\n".join(measure(Path(sys.argv[1]), Path(sys.argv[2]))))
