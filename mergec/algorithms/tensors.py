"""Linear maps along one axis of a tensor (permutations read as indices), and grouped weights as
block-diagonal ones."""
from __future__ import annotations

import torch

#: A merge or unmerge matrix with at most this share of nonzeros is applied as a sparse one.
SPARSE_SHARE = 0.05


def as_permutation(matrix: torch.Tensor) -> torch.Tensor | None:
    """The index ``perm`` of a permutation matrix (``matrix == eye[perm]``: row r holds its one
    1 at column ``perm[r]``), dense or sparse COO, or None where ``matrix`` is anything else.
    Mapping an axis by ``matrix`` and selecting ``perm`` along it give the same numbers: each
    sum has one product by 1 and the rest by 0.

    >>> as_permutation(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    tensor([1, 0])
    """
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        return None
    size = matrix.shape[0]
    if matrix.is_sparse:
        matrix = matrix.coalesce()  # indices sorted by row: one entry a row is rows 0 .. n-1
        (rows, perm), values = matrix.indices(), matrix.values()
        if not torch.equal(rows, torch.arange(size, device=rows.device)) \
                or not bool((values == 1).all()):
            return None
    else:
        perm = matrix.argmax(dim=1)
        if not torch.equal(torch.eye(size, dtype=matrix.dtype, device=matrix.device)[perm],
                           matrix):
            return None
    if not torch.equal(perm.sort().values, torch.arange(size, device=perm.device)):
        return None
    return perm


def apply_along(tensor: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    """``new[.., r, ..] = Σ_d matrix[r, d] · tensor[.., d, ..]``.

    Merge and unmerge matrices are mostly permutations and averages of a few units: with few
    nonzeros the product is gathered row by row (index_add_), which costs the nonzeros rather
    than r × d (a 512-channel conv of resnet18 in float64, one thread: 35 ms against 180 ms).
    The terms are the dense product's nonzero ones (the same merged weights on resnet18).
    """
    matrix = matrix.to(dtype=tensor.dtype, device=tensor.device)
    if matrix.is_sparse:  # a plan too large to be dense (see blocks.place)
        matrix = matrix.coalesce()
        (out_rows, in_rows), values = matrix.indices(), matrix.values()
    elif matrix.shape[0] * matrix.shape[1] >= 1024 \
            and torch.count_nonzero(matrix) <= SPARSE_SHARE * matrix.numel():
        out_rows, in_rows = matrix.nonzero(as_tuple=True)
        values = matrix[out_rows, in_rows]
    else:
        moved = tensor.movedim(axis, -1)
        return (moved @ matrix.T).movedim(-1, axis)
    moved = tensor.movedim(axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    terms = flat.index_select(0, in_rows) * values[:, None]
    rows = flat.new_zeros(matrix.shape[0], flat.shape[1]).index_add_(0, out_rows, terms)
    return rows.reshape(matrix.shape[0], *moved.shape[1:]).movedim(0, axis)


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
