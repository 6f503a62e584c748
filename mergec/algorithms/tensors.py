"""Linear maps along one axis of a tensor, and grouped weights as block-diagonal ones."""
from __future__ import annotations

import torch


def apply_along(tensor: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    """``new[.., r, ..] = Σ_d matrix[r, d] · tensor[.., d, ..]``."""
    moved = tensor.movedim(axis, -1)
    return (moved @ matrix.T.to(moved)).movedim(-1, axis)


def block_diagonal(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(out, in/groups, ...) grouped weight -> (out, in, ...) block-diagonal weight."""
    out_channels, per_group = weight.shape[:2]
    dense = weight.new_zeros((out_channels, per_group * groups) + tuple(weight.shape[2:]))
    rows = out_channels // groups
    for g in range(groups):
        dense[g * rows:(g + 1) * rows, g * per_group:(g + 1) * per_group] = \
            weight[g * rows:(g + 1) * rows]
    return dense


def diagonal_blocks(dense: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of :func:`block_diagonal`."""
    out_channels, in_channels = dense.shape[:2]
    rows, per_group = out_channels // groups, in_channels // groups
    return torch.cat([dense[g * rows:(g + 1) * rows, g * per_group:(g + 1) * per_group]
                      for g in range(groups)])
