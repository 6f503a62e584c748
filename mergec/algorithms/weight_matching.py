"""Git Re-Basin's weight similarity over a spec that is plain data.

Unit i of A and unit j of B are alike when everything that touches them is: every parameter
slice along an axis where the units sit, with B's *other* axes first put in A's order by the
current plans of their spaces (Ainsworth et al., "Git Re-Basin", ICLR 2023). ``match`` derives
the plain data from a :class:`~mergec.ir.spec.UnitSpec` and runs the coordinate descent over
spaces that re-solves one space at a time with this similarity (``weight-match``), or mixes it
with the activation correlation (``mudsc``: MuDSC's ``β·S_weight + (1−β)·S_act``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mergec.algorithms.tensors import apply_along

#: Per parameter, the ``(axis, space)`` pairs of its axes that belong to a space, in order.
Axes = Mapping[str, Sequence[tuple[int, str]]]


def weight_similarity(params_a: Mapping[str, Tensor], params_b: Mapping[str, Tensor],
                      axes: Axes, units: Mapping[str, Sequence[Tensor]],
                      align_b: Mapping[str, Tensor | None], size: int,
                      among: Tensor | None = None) -> Tensor:
    """Joint ``(2 size × 2 size)`` cosine similarity of ``size`` units in A and in B.

    ``units[space]`` says where the units sit along the axes of ``space``: one tensor of
    ``size`` positions per place (a space that holds the units several times, side by side or
    once per pixel, has several); spaces without the units are not compared along. Each unit's
    vector is every slice of every parameter of ``axes`` along such an axis, B's parameters
    first mapped along each other bound axis by ``align_b[space]``: a ``d × d`` matrix that puts
    B's units of that space in A's order, or, for a permutation matrix ``P``, its index ``perm``
    (``P[r, perm[r]] = 1``; see :func:`~mergec.algorithms.tensors.as_permutation`), which
    gives the same result without the product. ``align_b[space]`` None says that B's order of
    ``space`` is not known yet: a parameter slice that runs along such an axis says nothing of
    the units and is left out (weight matching's first sweep, :mod:`mergec.passes.match`).
    Float64, on the CPU; a unit without weights is similar to nothing (0). ``among`` (indices
    into the ``2 size`` units, A's first) asks only for the similarities between those units,
    at a fraction of the cost when they are few; the other entries are 0.

    >>> params = {"fc.weight": torch.tensor([[1.0, 0.0], [1.0, 1.0]])}
    >>> weight_similarity(params, params, {"fc.weight": [(0, "h")]},
    ...                   {"h": [torch.arange(2)]}, {}, 2)[:2, 2:]
    tensor([[1.0000, 0.7071],
            [0.7071, 1.0000]], dtype=torch.float64)
    """
    chosen = torch.arange(2 * size) if among is None else among.cpu().sort().values
    chosen_a, chosen_b = chosen[chosen < size], chosen[chosen >= size] - size
    gram = torch.zeros(len(chosen), len(chosen), dtype=torch.float64)
    for key, bound in axes.items():
        for index, (axis, space) in enumerate(bound):
            if space not in units:
                continue
            others = [(other_axis, align_b[other_space])
                      for other, (other_axis, other_space) in enumerate(bound) if other != index]
            if any(alignment is None for _, alignment in others):
                continue
            a = params_a[key].detach().to(torch.float64).cpu()
            b = params_b[key].detach().to(torch.float64).cpu()
            for positions in units[space]:
                vectors_a = a.index_select(axis, positions[chosen_a])
                vectors_b = b.index_select(axis, positions[chosen_b])
                for other_axis, alignment in others:
                    vectors_b = _align(vectors_b, other_axis, alignment)
                stacked = torch.cat([_unit_rows(vectors_a, axis), _unit_rows(vectors_b, axis)])
                gram += stacked @ stacked.T
    norms = gram.diagonal().clamp_min(1e-12).sqrt()
    similarity = gram / norms[:, None] / norms[None, :]
    if among is None:
        return similarity
    full = torch.zeros(2 * size, 2 * size, dtype=torch.float64)
    full[chosen[:, None], chosen[None, :]] = similarity
    return full


def _unit_rows(vectors: Tensor, axis: int) -> Tensor:
    """One row per unit of ``axis`` holding its slice (no units: no rows)."""
    moved = vectors.movedim(axis, 0)
    return moved.reshape(moved.shape[0], math.prod(moved.shape[1:]))


def _align(tensor: Tensor, axis: int, alignment: Tensor) -> Tensor:
    """``tensor`` mapped along ``axis`` by a matrix, or by a permutation given as its index."""
    if alignment.dim() == 1:
        return tensor.index_select(axis, alignment.to(tensor.device))
    return apply_along(tensor, axis, alignment)
