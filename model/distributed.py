"""Training on several processes: ``torchrun --nproc-per-node N -m service.cli train ...``.

Switched on by the launcher's environment (``WORLD_SIZE`` > 1), not by a fork of the training loop
(model/train.py). PyTorch's DistributedDataParallel with gloo on the CPU and NCCL on GPUs.

A step of N processes computes the step of one process on the same global batch:

- ``--batch-size`` is the global batch. Every rank draws the step's global batch exactly as one
  process does (same shuffle, augmentation and rendering draws) and keeps rows ``rank::N``, the
  share torch's ``DistributedSampler(seed=seed * 100_003, drop_last=True)`` hands that rank of
  each epoch's shuffle. So the learning rate needs no change with N; raising the global batch to
  keep more processes busy is a change of recipe (the linear scaling rule, Goyal et al. 2017:
  lr proportional to the batch, with the warm-up).
- The loss couples the batch (generalized Dice over the batch, means over the lesion slices, the
  retrieval margin's bank): each rank gathers the outputs of all ranks, with their gradients
  (``torch.distributed.nn``), and computes the loss of the whole batch. Every rank then holds the
  same loss, the gather's backward sums N equal gradients onto each rank's rows, and DDP's
  average over the ranks divides the N back out: the one-process gradient.
- BatchNorm normalises with the global batch's statistics (``GlobalBatchNorm``): torch's
  SyncBatchNorm has no CPU kernels, and converting modules would also break the decoders'
  SPADE-style BatchNorm signature.
- The vector quantizers' EMA codebooks gather the encoder outputs of the global batch
  (``VectorQuantizer.gather``) rather than all-reducing their counts and sums: the data init and
  the dead-code restarts draw rows of the batch, so every rank needs those rows to draw what one
  process draws. Every rank then runs the one-process update on the same rows with the same
  seed, and the buffers stay identical without broadcasting them (DDP's ``broadcast_buffers``
  is off: it would overwrite every rank's BatchNorm and EMA buffers with rank 0's, which are
  the same).

Checkpoints hold no trace of the process count: ``--resume`` continues on any N that divides
the batch.
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from model.network import DecompositionNet, DecompositionOutput
from model.quantizer import Quantized

log = logging.getLogger(__name__)


@dataclass
class Processes:
    """This process's place among the training processes."""

    rank: int
    world: int
    device: torch.device
    group: dist.ProcessGroup  # the batch gathers' own group, apart from DDP's gradient buckets

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of the global batch."""
        return slice(self.rank, batch_size, self.world)

    def gather(self, t: Tensor) -> Tensor:
        """(b, ...) rows of every rank -> (b * world, ...) in the global batch's order (rank r
        holds rows r, r + world, ...); differentiable."""
        parts = dist_nn.all_gather(t.contiguous(), group=self.group)  # world x (b, ...)
        return torch.stack(parts, 1).flatten(0, 1)

    def gather_output(self, out: DecompositionOutput) -> DecompositionOutput:
        def quantized(q: Quantized) -> Quantized:
            # commitment is a mean over the rank's rows; the ranks hold equal shares
            commitment = torch.stack(dist_nn.all_gather(q.commitment, group=self.group)).mean()
            return Quantized(quantized=self.gather(q.quantized), indices=self.gather(q.indices),
                             commitment=commitment, distance=self.gather(q.distance))

        values = {}
        for f in dataclasses.fields(out):
            value = getattr(out, f.name)
            if isinstance(value, Quantized):
                values[f.name] = quantized(value)
            elif isinstance(value, Tensor):
                values[f.name] = self.gather(value)
            else:
                values[f.name] = value
        return DecompositionOutput(**values)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (stop requests, time budgets)."""
        t = torch.tensor([float(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def barrier(self) -> None:
        dist.barrier(group=self.group)


def from_environment() -> Processes | None:
    """The process group torchrun's environment describes, or None for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # Long timeout: the other ranks wait at a barrier while rank 0 evaluates.
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    group = dist.new_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank()
    log.info("training process %d of %d on %s", rank, world, device)
    return Processes(rank=rank, world=world, device=device, group=group)


def wrap(model: DecompositionNet, processes: Processes) -> nn.Module:
    """DDP around ``model``; its quantizers gather the global batch for their EMA updates."""
    for quantizer in (model.normal_quantizer, model.abnormal_quantizer):
        quantizer.gather = processes.gather
    ids = [processes.device.index] if processes.device.type == "cuda" else None
    # Parameters a configuration leaves unused (a gate) get no gradient on any rank.
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False,
                                               find_unused_parameters=True)


def shutdown(processes: Processes | None) -> None:
    if processes is not None and dist.is_initialized():
        dist.destroy_process_group()


_BATCH_NORM = inspect.signature(F.batch_norm)


class GlobalBatchNorm(TorchFunctionMode):
    """Inside it, every training-mode ``F.batch_norm`` normalises with the mean and variance of the
    global batch (all ranks' rows), and moves the running statistics as one process would; the
    statistics are all-reduced with their gradients (``torch.distributed.nn``)."""

    def __init__(self, processes: Processes):
        super().__init__()
        self.processes = processes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.batch_norm:
            return func(*args, **kwargs)
        a = _BATCH_NORM.bind(*args, **kwargs)
        a.apply_defaults()
        if not a.arguments["training"]:
            return func(*args, **kwargs)
        return self._normalise(**a.arguments)

    def _normalise(self, input: Tensor, running_mean, running_var, weight, bias, training,
                   momentum, eps) -> Tensor:
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = input.numel() // input.shape[1] * self.processes.world
        group = self.processes.group
        # Two passes, as one process's batch_norm: the mean, then the mean squared deviation.
        mean = dist_nn.all_reduce(input.sum(dims), group=group) / count  # (C,)
        centred = input - mean.view(shape)
        var = dist_nn.all_reduce(centred.pow(2).sum(dims), group=group) / count  # (C,) biased
        out = centred * torch.rsqrt(var + eps).view(shape)
        if weight is not None:
            out = out * weight.view(shape)
        if bias is not None:
            out = out + bias.view(shape)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                unbiased = var.detach() * count / max(count - 1, 1)
                running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        return out
