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
                      among: Tensor | None = None, cross_only: bool = False) -> Tensor:
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
    at a fraction of the cost when they are few; the other entries are 0. ``cross_only``
    computes the similarities between A's and B's units alone, the within-model ones left 0
    (the diagonal 1): a quarter of the products, for the solvers that read the cross-model
    block only (the Hungarian, Procrustes, tie-breaks between models).

    >>> params = {"fc.weight": torch.tensor([[1.0, 0.0], [1.0, 1.0]])}
    >>> weight_similarity(params, params, {"fc.weight": [(0, "h")]},
    ...                   {"h": [torch.arange(2)]}, {}, 2)[:2, 2:]
    tensor([[1.0000, 0.7071],
            [0.7071, 1.0000]], dtype=torch.float64)
    """
    chosen = torch.arange(2 * size) if among is None else among.cpu().sort().values
    chosen_a, chosen_b = chosen[chosen < size], chosen[chosen >= size] - size
    similarity = _cosine(_gram((params_a, params_b), axes, units, (None, align_b),
                               (chosen_a, chosen_b), cross_only))
    if among is None:
        return similarity
    full = torch.zeros(2 * size, 2 * size, dtype=torch.float64)
    full[chosen[:, None], chosen[None, :]] = similarity
    return full


def weight_similarity_many(params: Sequence[Mapping[str, Tensor]], axes: Axes,
                           units: Mapping[str, Sequence[Tensor]],
                           aligns: Sequence[Mapping[str, Tensor | None] | None], size: int
                           ) -> Tensor:
    """:func:`weight_similarity` of N models: the joint ``(N size × N size)`` cosine
    similarity of ``size`` units in each, model m's other axes mapped by ``aligns[m]`` (None:
    that model's order is the common one, as A's is for two models).

    >>> params = {"fc.weight": torch.tensor([[1.0, 0.0], [1.0, 1.0]])}
    >>> weight_similarity_many([params] * 3, {"fc.weight": [(0, "h")]},
    ...                        {"h": [torch.arange(2)]}, [None, {}, {}], 2).shape
    torch.Size([6, 6])
    """
    everything = torch.arange(size)
    return _cosine(_gram(params, axes, units, aligns, [everything] * len(params)))


def _gram(params: Sequence[Mapping[str, Tensor]], axes: Axes,
          units: Mapping[str, Sequence[Tensor]],
          aligns: Sequence[Mapping[str, Tensor | None] | None], chosen: Sequence[Tensor],
          cross_only: bool = False) -> Tensor:
    """The Gram matrix of the chosen units' weight vectors, model after model (see
    :func:`weight_similarity`); a slice along an axis whose alignment is not known yet (None)
    is left out for every model. ``cross_only`` (two models): the products between the two
    models' vectors and each vector's squared norm, nothing else."""
    gram = torch.zeros(sum(len(c) for c in chosen), sum(len(c) for c in chosen),
                       dtype=torch.float64)
    first = len(chosen[0])
    for key, bound in axes.items():
        for index, (axis, space) in enumerate(bound):
            if space not in units:
                continue
            others = [(other_axis, other_space)
                      for other, (other_axis, other_space) in enumerate(bound) if other != index]
            if any(align is not None and align[other_space] is None
                   for align in aligns for _, other_space in others):
                continue
            tensors = [p[key].detach().to(torch.float64).cpu() for p in params]
            for positions in units[space]:
                rows = []
                for tensor, align, picked in zip(tensors, aligns, chosen):
                    vectors = _select(tensor, axis, positions[picked])
                    for other_axis, other_space in others if align is not None else ():
                        vectors = _align(vectors, other_axis, align[other_space])
                    rows.append(_unit_rows(vectors, axis))
                if cross_only:
                    gram[:first, first:] += rows[0] @ rows[1].T
                    gram.diagonal().add_(torch.cat([torch.einsum("ij,ij->i", r, r)
                                                    for r in rows]))
                    continue
                stacked = torch.cat(rows)
                gram += stacked @ stacked.T
    if cross_only:
        gram[first:, :first] = gram[:first, first:].T
    return gram


def _select(tensor: Tensor, axis: int, index: Tensor) -> Tensor:
    """``tensor.index_select(axis, index)``; a view where ``index`` is a run of consecutive
    positions (a leaf that fills its space: no copy of a wide weight)."""
    if len(index) and int(index[-1]) - int(index[0]) == len(index) - 1 \
            and bool((index.diff() == 1).all()):
        return tensor.narrow(axis, int(index[0]), len(index))
    return tensor.index_select(axis, index)


def _cosine(gram: Tensor) -> Tensor:
    """Cosine similarities from a Gram matrix; a unit without weights is similar to nothing."""
    norms = gram.diagonal().clamp_min(1e-12).sqrt()
    return gram / norms[:, None] / norms[None, :]


def _unit_rows(vectors: Tensor, axis: int) -> Tensor:
    """One row per unit of ``axis`` holding its slice (no units: no rows)."""
    moved = vectors.movedim(axis, 0)
    return moved.reshape(moved.shape[0], math.prod(moved.shape[1:]))


def _align(tensor: Tensor, axis: int, alignment: Tensor) -> Tensor:
    """``tensor`` mapped along ``axis`` by a matrix, or by a permutation given as its index."""
    if alignment.dim() == 1:
        return tensor.index_select(axis, alignment.to(tensor.device))
    return apply_along(tensor, axis, alignment)
