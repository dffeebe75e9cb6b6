"""Checkpoints' held-out scores on all of a run's held-out slices and on disjoint samples of them.

    python -m bench.selection_samples DATA CHECKPOINT [CHECKPOINT ...] [--samples 4]

How sure a selection is: ``cbir train`` selects by ``model.held_out``'s score on the held-out
slices; this scores each checkpoint on all of them and on ``--samples`` disjoint samples (every
n-th slice, offsets 0 to n-1), so that two checkpoints can be compared sample by sample (the
model card's tables of 2026-12-07). The held-out patients are the run's own split of DATA
(``--val-fraction`` and ``--seed`` of the first checkpoint's recipe), rendered as that run
evaluates them (thick-slice twins when its recipe has ``--thick-slices``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from model.checkpoint import load_model, read_checkpoint
from model.data.dataset import SliceDataset
from model.held_out import evaluate
from model.train import TrainConfig, _load_cases, slice_dataset, split_patients


def held_out_slices(data: Path, recipe: dict) -> tuple[SliceDataset, list[int]]:
    """The dataset of the run's held-out patients and the indices of their slices."""
    config = TrainConfig.from_dict(recipe)
    cases, _ = _load_cases([data])
    held = split_patients([c.pid for c in cases], config.val_fraction, config.seed)
    dataset = slice_dataset([c for c in cases if c.pid in held], config, held)
    return dataset, dataset.indices_of(held)


def samples_of(indices: list[int], n: int) -> list[list[int]]:
    """``n`` disjoint samples covering ``indices``: every n-th slice, offsets 0 to n-1."""
    return [indices[offset::n] for offset in range(n)]


def score(checkpoint: Path, dataset: SliceDataset, indices: list[int], n: int) -> dict:
    """The score on all ``indices`` and on each of their ``n`` samples."""
    model, _ = load_model(checkpoint)
    model = model.to(memory_format=torch.channels_last)
    device = torch.device("cpu")
    return {"all": evaluate(model, dataset, indices, device)["score"],
            "samples": [evaluate(model, dataset, sample, device)["score"]
                        for sample in samples_of(indices, n)]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="the run's --data folder")
    ap.add_argument("checkpoints", type=Path, nargs="+")
    ap.add_argument("--samples", type=int, default=4, help="disjoint samples (default 4)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.samples < 1:
        ap.error("--samples must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = read_checkpoint(args.checkpoints[0]).get("train_config") or {}
    dataset, indices = held_out_slices(args.data, recipe)
    print(f"{len(indices)} held-out slices; {args.samples} samples of every "
          f"{args.samples}th slice", flush=True)
    for checkpoint in args.checkpoints:
        result = score(checkpoint, dataset, indices, args.samples)
        samples = " / ".join(f"{s:.3f}" for s in result["samples"])
        print(f"{checkpoint}: all {result['all']:.3f}; samples {samples}", flush=True)


if __name__ == "__main__":
    main()
