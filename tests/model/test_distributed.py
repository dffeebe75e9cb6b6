"""Training on several processes (model/distributed.py): two gloo processes launched by torchrun
train the weights one process trains on the same global batches, and a run resumes on another
number of processes.

One torchrun launch: one process trains step 1 and stops, two processes resume it to step 3;
the result equals an uninterrupted one-process run of 3 steps. No held-out patient: the
evaluations would cost more than the steps (rank 0 alone evaluating is checked by its log).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from torch.utils.data.distributed import DistributedSampler

from model.checkpoint import read_checkpoint
from model.losses import LossWeights
from model.train import TrainConfig, _order, train
from tests.indexer.test_build import make_mini_patient

STEPS, BATCH = 3, 4
RECIPE = {"preset": "tiny", "steps": STEPS, "batch_size": BATCH, "lr": 2e-3, "min_lr": 1e-4,
          "warmup_steps": 2, "eval_every": 2, "seed": 0, "val_fraction": 0.0,
          "bf16": False}


def _config() -> TrainConfig:
    return TrainConfig(**RECIPE, weights=LossWeights(rec=5.0))


def _flags() -> list[str]:
    flags = []
    for key, value in RECIPE.items():
        name = "--" + key.replace("_", "-")
        flags += [f"--{'' if value else 'no-'}{key}"] if isinstance(value, bool) else [
            name, str(value)]
    return flags + ["--rec-weight", "5.0"]


@pytest.fixture(scope="module")
def cohort(synth_cohort, tmp_path_factory):
    """Two mini patients (10 slices each)."""
    root = tmp_path_factory.mktemp("ddp-cohort")
    for i, src in enumerate(sorted(p for p in synth_cohort.iterdir() if p.is_dir())[:2]):
        make_mini_patient(src, root, f"DDP_{i:04d}")
    return root


def torchrun(processes: int, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={processes}", "-m", "service.cli", "train", *map(str, args)],
        env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.xfail(strict=True, reason=(
    "open (issue 23): the two-process run resumes, logs on rank 0 alone and its step-3 loss is "
    "within 1.2e-4 of one process's, but about 25% of weight and buffer elements differ by more "
    "than 1e-4 after two steps; not yet known whether Adam's magnification of float noise or a "
    "real gap (the EMA codebooks differ by up to 0.037)"))
def test_two_gloo_processes_resume_a_one_process_run_and_train_what_one_process_trains(
        cohort, tmp_path):
    reference = tmp_path / "one.pt"
    train([cohort], reference, _config(), progress=False)

    split = tmp_path / "split.pt"
    first = train([cohort], split, _config(), progress=False, minutes=1e-9)
    assert first["step"] == 1 and not first["finished"]
    result = torchrun(2, "--data", cohort, "--out", split, "--resume", "--threads", "1",
                      *_flags())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    again, ref = read_checkpoint(split), read_checkpoint(reference)
    assert again["step"] == STEPS and "2 processes x CPU" in again["hardware"]
    # The losses of the global batches, as rank 0 logs them: the forward pass (BatchNorm on the
    # global batch, the gathered outputs, the EMA codebooks) is the one-process one. Measured:
    # total within 1.2e-4, the commitment term within 3.4e-3 (relative), after two steps on
    # weights that differ in their last bits; BatchNorm on each rank's half-batch alone would
    # be off by far more.
    ours, theirs = _losses(split), _losses(reference)
    assert [step for step, _ in ours] == [1, 2, 3]  # rank 0 alone logs: one line per step
    assert [step for step, _ in theirs] == [2, 3]
    (_, a), (_, b) = ours[-1], theirs[-1]  # both: step 3 alone, since the record of step 2
    assert a.keys() == b.keys()
    for term in a:
        assert a[term] == pytest.approx(b[term], rel=1e-2, abs=1e-5), term
    # Weights and buffers (BatchNorm statistics, the EMA codebooks): the reductions run in
    # another order over two processes, and Adam's first steps (g / sqrt(v)) turn the last bits
    # of a near-zero gradient into up to a whole step (lr) of difference. So: 99.5% of all
    # elements within 1e-4, none farther than the two resumed steps of lr could move it.
    assert ref["model"].keys() == again["model"].keys()
    far = total = 0
    for name, tensor in ref["model"].items():
        diff = (again["model"][name].double() - tensor.double()).abs()
        buffer = "quantizer." in name or "running_" in name or "num_batches" in name
        if not buffer:  # a weight: Adam moves it at most lr per step
            assert (float(diff.max()) if diff.numel() else 0.0) <= 2 * RECIPE["lr"] + 1e-6, name
        far += int((diff > 1e-4).sum())
        total += diff.numel()
    assert far <= 0.005 * total, f"{far} of {total} elements differ by more than 1e-4"


def _losses(out) -> list[tuple[int, dict]]:
    with open(f"{out}.metrics.jsonl") as fh:
        return [(r["step"], r["train_loss"]) for r in map(json.loads, fh)]


def test_each_rank_keeps_the_rows_a_distributed_sampler_hands_it():
    """The rows rank r keeps of each step's global batch (``Processes.rows``) are those torch's
    DistributedSampler gives rank r from the same epoch shuffle, so the shard is the standard
    one; the global batch stays the one-process batch whatever the number of processes."""
    n, seed, world, b = 23, 5, 2, BATCH // 2
    per_epoch = n // BATCH
    for epoch in range(3):
        order = _order(n, seed, epoch)
        for rank in range(world):
            sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                         seed=seed * 100_003, drop_last=True)
            sampler.set_epoch(epoch)
            theirs = list(sampler)
            for position in range(per_epoch):
                batch = order[position * BATCH:(position + 1) * BATCH]
                assert batch[rank::world] == theirs[position * b:(position + 1) * b]
