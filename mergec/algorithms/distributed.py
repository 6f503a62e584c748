"""Statistics across processes: under ``torch.distributed`` (``torchrun``) every process observes
its shard of the calibration data and the accumulators are summed over all of them, so every
process ends with the statistics of the whole data and computes the same merge. Without an
initialised process group every function here is the single-process identity."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def active() -> bool:
    """Whether a torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of processes (1 without torch.distributed)."""
    return dist.get_world_size() if active() else 1


def all_reduce_sum_(tensors: list[torch.Tensor]) -> bool:
    """Sum ``tensors`` in place over every process of the default group, in one collective.

    Why one collective: the accumulators are packed into a single flat buffer, so the
    statistics of a calibration run cost one round trip however many there are. The buffer is
    float64 whatever the tensors' dtypes, so counts and float32 sums travel together exactly.
    Returns whether a reduction happened (False when torch.distributed is not initialised).
    """
    if not active() or not tensors:
        return False
    flat = torch.cat([tensor.reshape(-1).to(torch.float64) for tensor in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for tensor in tensors:
        size = tensor.numel()
        tensor.copy_(flat[offset : offset + size].view_as(tensor))
        offset += size
    logger.debug("all-reduced %d accumulators (%d values)", len(tensors), offset)
    return True


def total_batches(batches: int, device: torch.device | str | None = None) -> int:
    """The number of calibration batches all processes saw together."""
    count = torch.tensor([float(batches)], dtype=torch.float64, device=device)
    all_reduce_sum_([count])
    return int(count.item())
