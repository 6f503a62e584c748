"""Summing accumulators across processes, shared by the streaming statistics."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def all_reduce_sum_(tensors: list[torch.Tensor]) -> bool:
    """Sum ``tensors`` in place over every process of the default group, in one collective.

    Why one collective: the accumulators are packed into a single flat buffer, so the
    statistics of a calibration run cost one round trip however many there are.
    Returns whether a reduction happened (False when torch.distributed is not initialised).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for tensor in tensors:
        size = tensor.numel()
        tensor.copy_(flat[offset : offset + size].view_as(tensor))
        offset += size
    logger.debug("all-reduced %d accumulators (%d values)", len(tensors), offset)
    return True
