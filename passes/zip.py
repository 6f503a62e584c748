"""zip: emits the merged model.

Every parameter becomes Σ_m (M_m on its produced and elementwise axes) · W_m · (U_m on its
consumed axes). An entry with no produced or elementwise axis bound (a scalar parameter, a table
indexed only by non-features) averages the two models. The merged weights go into a copy of
model A's graph module, which keeps A's graph: same widths, same code.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import fx

from mergec.algorithms.solvers import MergePlan
from mergec.errors import MergeError
from mergec.permute import block_diagonal, diagonal_blocks
from mergec.spec import Binding, UnitSpec

log = logging.getLogger(__name__)


def _along(tensor: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    """``new[.., r, ..] = Σ_d matrix[r, d] · tensor[.., d, ..]``."""
    moved = tensor.movedim(axis, -1)
    return (moved @ matrix.T.to(moved)).movedim(-1, axis)


def merge_entry(tensors: tuple[torch.Tensor, torch.Tensor], bindings: list[Binding],
                plans: Mapping[str, MergePlan]) -> torch.Tensor:
    """One merged state-dict entry from both models' tensors."""
    reference = tensors[0]
    if not reference.is_floating_point():
        return reference.clone()
    groups = max((b.groups for b in bindings), default=1)
    merged = None
    for model, tensor in enumerate(tensors):
        work = tensor.to(torch.float64)
        if groups > 1:
            work = block_diagonal(work, groups)
        for binding in bindings:
            plan = plans[binding.space]
            if binding.role == "consumes":
                unmerge = plan.unmerge_a if model == 0 else plan.unmerge_b
                work = _along(work, binding.axis, unmerge.T)
            else:
                work = _along(work, binding.axis, plan.merge_a if model == 0 else plan.merge_b)
        if groups > 1:
            work = diagonal_blocks(work, groups)
        merged = work if merged is None else merged + work
    if not any(b.role != "consumes" for b in bindings):
        merged = merged / 2
    return merged.to(reference.dtype)


def merged_state(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                 spec: UnitSpec, plans: Mapping[str, MergePlan]) -> dict[str, torch.Tensor]:
    by_key: dict[str, list[Binding]] = {}
    for binding in spec.bindings:
        by_key.setdefault(binding.key, []).append(binding)
    merged = {}
    for key, tensor_a in state_a.items():
        if key not in state_b:
            raise MergeError(f"zip: model B has no state-dict entry {key!r}")
        tensor_b = state_b[key]
        if tensor_a.shape != tensor_b.shape:
            raise MergeError(f"zip: {key!r} has shape {tuple(tensor_a.shape)} in A and "
                             f"{tuple(tensor_b.shape)} in B")
        merged[key] = merge_entry((tensor_a, tensor_b.to(tensor_a.device)),
                                  by_key.get(key, []), plans)
    return merged


@dataclass(frozen=True)
class Zip:
    """The zip pass: a new graph module with the merged weights."""

    name: str = "zip"

    def __call__(self, module_a: fx.GraphModule, module_b: fx.GraphModule, spec: UnitSpec,
                 plans: Mapping[str, MergePlan]) -> fx.GraphModule:
        for space_id, plan in plans.items():
            if plan.width != spec.spaces[space_id].size:
                raise MergeError(f"zip: space {space_id} merges to width {plan.width}, but "
                                 f"emitting a different width than the models' is not supported")
        state = merged_state(module_a.state_dict(), module_b.state_dict(), spec, plans)
        merged = copy.deepcopy(module_a)
        merged.load_state_dict(state)
        return merged
