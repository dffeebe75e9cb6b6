"""Training on several processes (model/distributed.py): two gloo processes launched by torchrun
compute the step one process computes on the same global batch, and a run resumes on another
number of processes (1 -> 2 -> 1).

What is compared, and why with these tolerances (measured on this machine, fp32):

- The learning rate is 1e-9, so the weights stay where they are and what is compared is what
  the steps compute: the losses of the global batches, the gradients (Adam's moments, which
  accumulate them whatever the learning rate), BatchNorm's running statistics and the EMA
  codebooks (data init, EMA, dead-code restarts). With a real learning rate the comparison
  measures Adam's first steps instead: they move every weight by about lr whatever the size of
  its gradient, so float noise in a near-zero gradient becomes a whole step. After 3 steps at
  lr 2e-3 the update of two ONE-process runs that differ only in their thread count (1 vs 2)
  already differs by 22% of its norm.
- bf16 and channels_last are off: torch's CPU batch norm in NHWC is 20x less accurate than in
  NCHW (7.5e-5 against 3e-6 from float64 on the encoder's output) and put a 1.4e-3 relative
  difference into the one-process reference's encoder output.
- In float64 the same comparison (one step, two processes against one) agrees to 2.5e-10
  (gradients) and 1e-12 (buffers): the distributed step is exact, fp32 rounding is all that
  is left. Measured here in fp32 (relative norms):
  - BatchNorm running statistics of the encoder, before the quantizers: 1.1e-7. This is the
    check that tells a wrong BatchNorm apart: normalising each rank's half batch on its own
    gives 4.9e-2 there (measured with the global statistics switched off).
  - Those of the decoders, after the quantizers: up to 2.5e-3 (the segmentation decoder, which
    reads the quantized abnormal code). The EMA codebooks differ by about 1e-2 (they average
    rounding over their updates), and a code position that lies within that of two codebook rows
    snaps to either: whether one does depends on the cohort (1.3e-4 on one test cohort, 2.5e-3
    on the same cohort with sigmoid sinuses drawn). Half batches give 2.7e-2.
  - Losses: up to 6.4e-4 on the terms that read the abnormal codebook (``commit_abn_lesion``,
    ``dis``), up to 1.5e-4 on the others. Half batches moved them by no more (the segmentation
    term by 7.3e-4): the loss check catches a loss computed on one rank's rows, not this.
  - Codebooks 9.5e-3; Adam's first and second moments 3.2e-2 and 4.3e-3 (half batches: 0.19
    and 5.8e-2; gradients summed rather than averaged over the ranks: first moments 1.0).
  Each tolerance lies between what rounding gives and what a known error gives, where the two
  lie apart. The codebooks do not tell half batches apart (9.8e-3): their check guards the
  gathered update only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from model.checkpoint import read_checkpoint
from model.losses import LossWeights
from model.train import TrainConfig, _order, train
from tests.indexer.test_build import make_mini_patient

STEPS, BATCH, LR = 3, 4, 1e-9
RECIPE = {"preset": "tiny", "steps": STEPS, "batch_size": BATCH, "lr": LR, "min_lr": LR,
          "warmup_steps": 0, "eval_every": 2, "seed": 0, "val_fraction": 0.0,
          "bf16": False, "channels_last": False}
# Relative errors ||a - b|| / ||b|| allowed (see the module docstring): BatchNorm statistics before
# and after the quantizers apart.
LOSS_TOL, CODEBOOK_TOL, MOMENT_TOL = 1.5e-3, 3e-2, 1e-1
BN_TOL = {"encoder": 1e-4, "decoders": 1e-2}


def _config() -> TrainConfig:
    return TrainConfig(**RECIPE, weights=LossWeights(rec=5.0))


def _flags() -> list[str]:
    flags = []
    for key, value in RECIPE.items():
        name = "--" + key.replace("_", "-")
        flags += [f"--{'' if value else 'no-'}{key.replace('_', '-')}"] if isinstance(
            value, bool) else [name, str(value)]
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


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


def test_one_then_two_then_one_process_compute_the_steps_of_one_process(cohort, tmp_path):
    torch.set_num_threads(1)  # as the torchrun processes (OMP_NUM_THREADS=1)
    reference = tmp_path / "one.pt"
    train([cohort], reference, _config(), progress=False)

    split = tmp_path / "split.pt"
    first = train([cohort], split, _config(), progress=False, minutes=1e-9)
    assert first["step"] == 1 and not first["finished"]
    result = torchrun(2, "--data", cohort, "--out", split, "--resume", "--minutes", "1e-9",
                      "--threads", "1", *_flags())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    middle = read_checkpoint(split)
    assert middle["step"] == 2 and "2 processes x CPU" in middle["hardware"]
    last = train([cohort], split, _config(), resume=True, progress=False)
    assert last["start_step"] == 2 and last["finished"]

    again, ref = read_checkpoint(split), read_checkpoint(reference)
    ours, theirs = _losses(split), _losses(reference)
    assert [step for step, _ in ours] == [1, 2, 3]  # rank 0 alone logs: one line per step
    assert [step for step, _ in theirs] == [2, 3]
    (_, a), (_, b) = ours[-1], theirs[-1]  # both: step 3 alone, since the record of step 2
    assert a.keys() == b.keys()
    for term in a:
        assert a[term] == pytest.approx(b[term], rel=LOSS_TOL, abs=1e-5), term

    assert ref["model"].keys() == again["model"].keys()
    worst = {"encoder": 0.0, "decoders": 0.0, "codebook": 0.0, "weights": 0.0}
    for name, tensor in ref["model"].items():
        mine = again["model"][name]
        if not tensor.is_floating_point():  # num_batches_tracked, initialized
            assert torch.equal(mine, tensor), name
        elif "running_" in name:
            part = "encoder" if name.startswith("encoder.") else "decoders"
            worst[part] = max(worst[part], _rel(mine, tensor))
        elif "quantizer." in name:
            worst["codebook"] = max(worst["codebook"], _rel(mine, tensor))
        else:  # lr 1e-9: Adam moves a weight by at most 3e-9 in 3 steps, one way or the other
            worst["weights"] = max(worst["weights"], float((mine - tensor).abs().max()))
    moments = {}
    for key in ("exp_avg", "exp_avg_sq"):
        mine = [s[key] for s in again["optimizer"]["state"].values()]
        theirs_ = [s[key] for s in ref["optimizer"]["state"].values()]
        assert len(mine) == len(theirs_)
        moments[key] = _rel(torch.cat([m.flatten() for m in mine]),
                            torch.cat([t.flatten() for t in theirs_]))
    assert worst["weights"] <= 1e-7  # 2 x 3 steps of lr, plus the rounding of |w| < 1 in fp32
    assert all(worst[part] <= tol for part, tol in BN_TOL.items()), worst
    assert worst["codebook"] <= CODEBOOK_TOL, worst
    assert moments["exp_avg"] <= MOMENT_TOL and moments["exp_avg_sq"] <= MOMENT_TOL, moments


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
