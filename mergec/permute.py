"""Applying permutations of spaces to a state dict (invariant 1 of the design), and random
elements of the larger groups some spaces admit (rotations of a folded residual stream).

A permutation is an index tensor ``perm`` with ``new = old.index_select(axis, perm)``. Structured
spaces compose the permutations of their parts: blocks move as wholes and are permuted inside,
composite spaces concatenate their parts, tiled spaces act on their factors row-major.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from mergec.algorithms.solvers import complement_of_ones, keeping_ones
from mergec.algorithms.tensors import apply_along, block_diagonal, diagonal_blocks
from mergec.checkpoints import with_metadata
from mergec.errors import SpecError
from mergec.ir.spec import Binding, Space, UnitSpec


def _identity(size: int) -> torch.Tensor:
    return torch.arange(size)


def full_permutations(spec: UnitSpec, leaf: Callable[[str, int], torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
    """The permutation of every space, built from ``leaf(space_id, size)`` for the spaces (or
    inner blocks) that choose freely. Fixed spaces get the identity."""
    result: dict[str, torch.Tensor] = {}

    def of(space_id: str) -> torch.Tensor:
        if space_id in result:
            return result[space_id]
        space = spec.spaces[space_id]
        if space.fixed is not None:
            perm = _identity(space.size)
        elif space.kind == "composite":
            offsets, pieces = 0, []
            for part in space.parts:
                pieces.append(of(part) + offsets)
                offsets += spec.spaces[part].size
            perm = torch.cat(pieces)
        elif space.kind == "tiled":
            perm = _tiled([(_identity(n) if f is None else of(f)) for f, n in space.factors])
        elif space.kind == "blocks":
            perm = _blocks(spec, space_id, of, leaf)
        else:
            perm = leaf(space_id, space.size)
        result[space_id] = perm
        return perm

    for space_id in spec.spaces:
        of(space_id)
    return result


def _tiled(factors: list[torch.Tensor]) -> torch.Tensor:
    perm = torch.zeros(1, dtype=torch.long)
    for factor in factors:
        perm = (perm[:, None] * len(factor) + factor[None, :]).reshape(-1)
    return perm


def _blocks(spec: UnitSpec, space_id: str, of: Callable, leaf: Callable) -> torch.Tensor:
    space = spec.spaces[space_id]
    count, size = space.block_count, space.block_size
    order = of(space.block_space) if space.block_space else _identity(count)
    inner = []
    for block in range(count):
        if space.parts:
            inner.append(of(space.parts[block]))
        elif space.within_fixed is not None:
            inner.append(_identity(size))
        else:
            inner.append(leaf(f"{space_id}/{block}", size))
    return torch.cat([order[h] * size + inner[int(order[h])] for h in range(count)])


def random_permutations(spec: UnitSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random allowed permutation of every space."""
    generator = torch.Generator().manual_seed(seed)
    return full_permutations(spec, lambda _, size: torch.randperm(size, generator=generator))


def _bound_entries(state: Mapping[str, torch.Tensor], spec: UnitSpec, verb: str
                   ) -> Iterator[tuple[str, list[Binding], torch.Tensor]]:
    """Every state-dict entry the spec binds, with its bindings; an error naming ``verb``
    where the spec binds an entry the state does not have."""
    by_key: dict[str, list[Binding]] = {}
    for binding in spec.bindings:
        by_key.setdefault(binding.key, []).append(binding)
    for key, bindings in by_key.items():
        if key not in state:
            raise SpecError(f"{verb}: the spec binds {key!r}, which the model does not have")
        yield key, bindings, state[key]


def _transformed_copy(model: nn.Module, transform: Callable[[dict], dict]) -> nn.Module:
    """A deep copy of ``model`` whose state dict is ``transform`` of its own."""
    clone = copy.deepcopy(model)
    clone.load_state_dict(with_metadata(transform(clone.state_dict()), clone))
    return clone


def permute_state_dict(state: Mapping[str, torch.Tensor], spec: UnitSpec,
                       perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Applies the permutation of each space to every axis bound to it."""
    out = dict(state)
    for key, bindings, tensor in _bound_entries(state, spec, "permute"):
        grouped = [b for b in bindings if b.groups > 1]
        if grouped:
            tensor = _permute_grouped(tensor, bindings, perms)
        else:
            for binding in bindings:
                perm = perms[binding.space].to(tensor.device)
                if tensor.shape[binding.axis] != len(perm):
                    raise SpecError(
                        f"permute: axis {binding.axis} of {key!r} has size "
                        f"{tensor.shape[binding.axis]}, space {binding.space} has {len(perm)}")
                tensor = tensor.index_select(binding.axis, perm)
        out[key] = tensor
    return out


def _permute_grouped(weight: torch.Tensor, bindings: list[Binding],
                     perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A grouped conv weight holds the diagonal blocks of a block-diagonal matrix: expand it,
    permute both axes, take the diagonal blocks back."""
    groups = next(b.groups for b in bindings if b.groups > 1)
    dense = block_diagonal(weight, groups)
    for binding in bindings:
        dense = dense.index_select(binding.axis, perms[binding.space].to(weight.device))
    return diagonal_blocks(dense, groups)


def permute_model(model: nn.Module, spec: UnitSpec, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` with every free space randomly permuted."""
    perms = random_permutations(spec, seed)
    return _transformed_copy(model, lambda state: permute_state_dict(state, spec, perms))


# ---------------------------------------------------------------------------------------------
# Random elements of the spaces' groups: rotations where a space admits them
# ---------------------------------------------------------------------------------------------
def random_orthogonal(size: int, generator: torch.Generator, ones_fixed: bool = False
                      ) -> torch.Tensor:
    """A Haar-random orthogonal matrix (float64); with ``ones_fixed`` one that keeps the
    all-ones direction (a random rotation of the vectors whose entries sum to zero)."""
    if ones_fixed and size > 1:
        inner = random_orthogonal(size - 1, generator)
        return keeping_ones(inner, complement_of_ones(size))
    gaussian = torch.randn(size, size, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r))[None, :]


def random_group_elements(spec: UnitSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random element of every space's group, as a matrix ``T`` (a unit's new coordinates
    are ``T x``): a random orthogonal matrix on each rotation space (inside each head, for heads,
    whose order is permuted), a random allowed
    permutation elsewhere (structured spaces composed as :func:`full_permutations` does)."""
    generator = torch.Generator().manual_seed(seed)
    perms = full_permutations(spec, lambda _, size: torch.randperm(size, generator=generator))
    matrices: dict[str, torch.Tensor] = {}

    def of(space_id: str) -> torch.Tensor:
        if space_id in matrices:
            return matrices[space_id]
        space = spec.spaces[space_id]
        if space.group == "orthogonal" and space.kind == "blocks":
            matrix = _rotated_blocks(space, perms, generator)
        elif space.group == "orthogonal" and spec.is_free(space_id):
            matrix = random_orthogonal(space.size, generator, space.ones_fixed)
        elif space.kind == "composite" and space.fixed is None:
            matrix = torch.block_diag(*(of(part) for part in space.parts))
        elif space.kind == "tiled" and space.fixed is None:
            matrix = torch.ones(1, 1, dtype=torch.float64)
            for factor, size in space.factors:
                inner = torch.eye(size, dtype=torch.float64) if factor is None else of(factor)
                matrix = torch.kron(matrix, inner)
        else:
            matrix = torch.eye(space.size, dtype=torch.float64)[perms[space_id]]
        matrices[space_id] = matrix
        return matrix

    for space_id in spec.spaces:
        of(space_id)
    return matrices


def _rotated_blocks(space: Space, perms: Mapping[str, torch.Tensor],
                    generator: torch.Generator) -> torch.Tensor:
    """Heads rotated inside: new block h is a random rotation of old block ``order[h]``, the
    block order being that of ``perms`` (shared by every space of the attention)."""
    count, size = space.block_count, space.block_size
    order = perms[space.block_space] if space.block_space else torch.arange(count)
    matrix = torch.zeros(space.size, space.size, dtype=torch.float64)
    for block in range(count):
        source = int(order[block])
        matrix[block * size:(block + 1) * size, source * size:(source + 1) * size] = \
            random_orthogonal(size, generator)
    return matrix


def transform_state_dict(state: Mapping[str, torch.Tensor], spec: UnitSpec,
                         matrices: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Applies each space's orthogonal matrix ``T`` to every axis bound to it: an axis that
    produces or scales units becomes ``T x``, one that consumes them ``W Tᵀ`` (for an
    orthogonal ``T`` both are ``T`` applied along the axis)."""
    out = dict(state)
    for key, bindings, tensor in _bound_entries(state, spec, "transform"):
        if not tensor.is_floating_point():
            continue
        groups = next((b.groups for b in bindings if b.groups > 1), 1)
        work = tensor.to(torch.float64)
        work = block_diagonal(work, groups) if groups > 1 else work
        for binding in bindings:
            work = apply_along(work, binding.axis, matrices[binding.space].to(work.device))
        work = diagonal_blocks(work, groups) if groups > 1 else work
        out[key] = work.to(tensor.dtype)
    return out


def transform_model(model: nn.Module, spec: UnitSpec, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` with a random element of every free space's group applied
    (:func:`random_group_elements`): the sibling of :func:`permute_model` for spaces that
    admit rotations. It computes the same function (invariant 1 of the design)."""
    matrices = random_group_elements(spec, seed)
    return _transformed_copy(model, lambda state: transform_state_dict(state, spec, matrices))
