"""Git Re-Basin weight matching over a permutation spec that is plain data.

The spec says, for every parameter, which permutation space each of its axes belongs to:
``axes["fc1.weight"] = ("hidden", None)`` means rows of ``fc1.weight`` are the units of space
``hidden`` and its columns are not permuted. ``annotate-units`` derives this spec from the graph;
here it is just dictionaries, so the algorithm can be tested on its own.

For a space p, unit i of A and unit j of B are compared by the inner product of everything
that touches them: every parameter slice along an axis bound to p, with B's *other* axes
gathered by the current permutations of their spaces. Coordinate descent visits the spaces in
random order, solving one linear assignment each, until a full sweep improves nothing
(Ainsworth et al., "Git Re-Basin", ICLR 2023, Algorithm 1).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from mergec.errors import MergeError

logger = logging.getLogger(__name__)

Axes = Mapping[str, tuple[str | None, ...]]


def _bindings(axes: Axes) -> dict[str, list[tuple[str, int]]]:
    """For every space, the (parameter, axis) pairs bound to it."""
    bindings: dict[str, list[tuple[str, int]]] = {}
    for key, spaces in axes.items():
        for axis, space in enumerate(spaces):
            if space is not None:
                bindings.setdefault(space, []).append((key, axis))
    return bindings


def _check_spec(
    params_a: Mapping[str, Tensor],
    params_b: Mapping[str, Tensor],
    axes: Axes,
    sizes: Mapping[str, int],
) -> None:
    for key, spaces in axes.items():
        if key not in params_a or key not in params_b:
            raise MergeError(
                f"weight matching: parameter {key!r} of the spec is missing from model "
                f"{'A' if key not in params_a else 'B'}"
            )
        shape_a, shape_b = tuple(params_a[key].shape), tuple(params_b[key].shape)
        if shape_a != shape_b:
            raise MergeError(
                f"weight matching: {key!r} has shape {shape_a} in A but {shape_b} in B"
            )
        if len(spaces) != len(shape_a):
            raise MergeError(
                f"weight matching: the spec names {len(spaces)} axes for {key!r} of shape {shape_a}"
            )
        for axis, space in enumerate(spaces):
            if space is None:
                continue
            if space not in sizes:
                raise MergeError(
                    f"weight matching: space {space!r} (axis {axis} of {key!r}) "
                    "has no size in `sizes`"
                )
            if shape_a[axis] != sizes[space]:
                raise MergeError(
                    f"weight matching: axis {axis} of {key!r} has size {shape_a[axis]}, "
                    f"but space {space!r} has size {sizes[space]}"
                )


def _gather_other_axes(
    weight: Tensor, spaces: tuple[str | None, ...], perms: Mapping[str, Tensor], skip_axis: int
) -> Tensor:
    """``weight`` gathered by the current permutation of every axis's space except ``skip_axis``."""
    for axis, space in enumerate(spaces):
        if space is not None and axis != skip_axis:
            weight = weight.index_select(axis, perms[space].to(weight.device))
    return weight


def _space_similarity(
    params_a: Mapping[str, Tensor],
    params_b: Mapping[str, Tensor],
    axes: Axes,
    bindings: list[tuple[str, int]],
    size: int,
    perms: Mapping[str, Tensor],
) -> Tensor:
    similarity = torch.zeros(size, size, dtype=torch.float64)
    for key, axis in bindings:
        weight_a = params_a[key].detach().movedim(axis, 0).reshape(size, -1).double()
        weight_b = _gather_other_axes(params_b[key].detach(), axes[key], perms, axis)
        weight_b = weight_b.movedim(axis, 0).reshape(size, -1).double().to(weight_a.device)
        similarity += (weight_a @ weight_b.T).cpu()
    return similarity


def weight_similarity(
    params_a: Mapping[str, Tensor],
    params_b: Mapping[str, Tensor],
    axes: Axes,
    sizes: Mapping[str, int],
    space: str,
    perms: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Similarity ``[size, size]`` of A's and B's units in ``space``, others permuted by ``perms``.

    Entry ``[i, j]`` is the inner product of every parameter slice of unit i of A with that of
    unit j of B (float64, on CPU). Spaces missing from ``perms`` count as unpermuted. This is the
    ``S_weight`` of MuDSC's dual space ``S = β·S_weight + (1−β)·S_act`` (rescale it first).

    >>> params = {"fc.weight": torch.eye(2), "fc.bias": torch.zeros(2)}
    >>> axes = {"fc.weight": ("h", None), "fc.bias": ("h",)}
    >>> weight_similarity(params, params, axes, {"h": 2}, "h")
    tensor([[1., 0.],
            [0., 1.]], dtype=torch.float64)
    """
    _check_spec(params_a, params_b, axes, sizes)
    bindings = _bindings(axes)
    if space not in bindings:
        raise MergeError(f"weight_similarity: no parameter axis is bound to space {space!r}")
    current = {name: torch.arange(size) for name, size in sizes.items()}
    current.update(perms or {})
    return _space_similarity(params_a, params_b, axes, bindings[space], sizes[space], current)


def weight_matching(
    params_a: Mapping[str, Tensor],
    params_b: Mapping[str, Tensor],
    axes: Axes,
    sizes: Mapping[str, int],
    max_iter: int = 100,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Permutation of B's units in every space that best aligns B's weights with A's.

    Returns ``perm[space]``, a long tensor, such that gathering B's parameters with
    ``b.index_select(axis, perm[space])`` along every axis bound to ``space`` maximises the sum of
    inner products with A's parameters (coordinate descent; a local optimum). A permutation is
    only replaced when it strictly improves its space's objective, so the search terminates.

    >>> a = {"fc.weight": torch.tensor([[1.0, 0.0], [0.0, 2.0]])}
    >>> b = {"fc.weight": a["fc.weight"][[1, 0]]}
    >>> weight_matching(a, b, {"fc.weight": ("h", None)}, {"h": 2})
    {'h': tensor([1, 0])}
    """
    if max_iter < 1:
        raise MergeError(f"weight_matching: max_iter must be at least 1, got {max_iter}")
    _check_spec(params_a, params_b, axes, sizes)
    bindings = _bindings(axes)
    perms = {space: torch.arange(size) for space, size in sizes.items()}
    spaces = sorted(bindings)
    generator = torch.Generator().manual_seed(seed)
    for iteration in range(max_iter):
        improved = False
        for index in torch.randperm(len(spaces), generator=generator).tolist():
            space = spaces[index]
            improved |= _improve_space(
                params_a, params_b, axes, bindings[space], sizes[space], perms, space
            )
        if not improved:
            logger.debug("weight_matching: converged after %d sweeps", iteration + 1)
            break
    else:
        logger.info("weight_matching: stopped at max_iter=%d before convergence", max_iter)
    return perms


def _improve_space(
    params_a: Mapping[str, Tensor],
    params_b: Mapping[str, Tensor],
    axes: Axes,
    bindings: list[tuple[str, int]],
    size: int,
    perms: dict[str, Tensor],
    space: str,
) -> bool:
    """Re-solve one space's assignment with the others fixed; True when it improved."""
    similarity = _space_similarity(params_a, params_b, axes, bindings, size, perms)
    rows, columns = linear_sum_assignment(similarity.numpy(), maximize=True)
    candidate = torch.as_tensor(columns, dtype=torch.long)[torch.as_tensor(rows).argsort()]
    units = torch.arange(size)
    old = similarity[units, perms[space]].sum().item()
    new = similarity[units, candidate].sum().item()
    if new <= old + 1e-12 * max(1.0, abs(old)):
        return False
    logger.debug("weight_matching: space %r improved %.6g -> %.6g", space, old, new)
    perms[space] = candidate
    return True
