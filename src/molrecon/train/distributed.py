"""Data-parallel training under ``torchrun --nproc-per-node N``: the process group, and the one
all-reduce per step that averages the gradients and carries every process's fault flag.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) a run is rank 0 of 1 and nothing here talks
to another process. With it, every process joins the default group (NCCL on CUDA, gloo on the
CPU) and takes ``batch_size`` samples of each global batch of ``N · batch_size``. The gradients
are averaged explicitly rather than by DistributedDataParallel because a step may have to be
skipped on every process when one process's sample fails (DDP's reducer would wait for the
failed process's backward pass).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .step import _StepOutcome


@dataclass(frozen=True)
class Dist:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: Any) -> tuple[Dist, bool]:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1).

    Returns the rank/world and whether this call created the group (and so
    must destroy it).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), False
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    return Dist(rank=dist.get_rank(), world=dist.get_world_size()), created


def _finish_together(dist_info: Dist) -> None:
    """Wait until every process has finished training (rank 0 writes the outputs last), so
    that none tears the process group down while another still uses it: gloo aborts a
    process whose group is destroyed under it ("terminate called without an active
    exception")."""
    if dist_info.world > 1 and dist.is_initialized():
        dist.barrier()


def _leave(created: bool) -> None:
    """Destroy the process group if :func:`_init_distributed` created it."""
    if created:
        dist.destroy_process_group()


def _process_device(device: Any, dist_info: Dist) -> Any:
    """This process's device: with several processes on CUDA, the GPU of its local rank."""
    if device.type == "cuda" and dist_info.world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def _agree(flag: bool, dist_info: Dist, device: Any) -> bool:
    """True on every process if ``flag`` is true on any (one all-reduce)."""
    if dist_info.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _broadcast_parameters(module: Any, dist_info: Dist) -> None:
    """Give every process rank 0's parameters."""
    if dist_info.world == 1:
        return
    with torch.no_grad():
        for p in module.parameters():
            dist.broadcast(p.data, src=0)


def _reduce_gradients(params: list[Any], outcome: _StepOutcome, dist_info: Dist
                      ) -> tuple[bool, dict[str, float | None]]:
    """Average gradients over processes; return (any process failed, step statistics).

    One all-reduce carries every gradient (zeros where a parameter has none)
    and each process's failure flag and sums of losses and iteration counts,
    so the statistics are those of the global batch: ``loss``,
    ``fwd_iterations`` and ``bwd_iterations`` (means; None without samples).
    """
    sums = [1.0 if outcome.bad else 0.0, outcome.loss_sum, float(outcome.count),
            float(sum(outcome.fwd_iterations)), float(len(outcome.fwd_iterations)),
            float(sum(outcome.bwd_iterations)), float(len(outcome.bwd_iterations))]
    if dist_info.world > 1:
        device = params[0].device
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                 for p in params]
        extra = torch.tensor(sums, dtype=torch.float64).to(device=device, dtype=grads[0].dtype)
        flat = torch.cat([*grads, extra])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = (flat[offset:offset + n] / dist_info.world).reshape(p.shape).clone()
            offset += n
        sums = [float(v) for v in flat[offset:].tolist()]

    def mean(total: float, n: float) -> float | None:
        return total / n if n > 0 else None

    return sums[0] > 0, {"loss": mean(sums[1], sums[2]), "fwd_iterations": mean(sums[3], sums[4]),
                         "bwd_iterations": mean(sums[5], sums[6])}
