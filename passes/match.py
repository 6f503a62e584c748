"""match: a merge plan for every space, from activation and/or weight similarity.

Spaces are structured (see :mod:`mergec.ir.spec`); decisions are made on *leaves*: flat spaces and
blocks spaces without separated parts. Every space is laid out as *occurrences* of leaves
(:func:`occurrences`): a composite space is its parts side by side, a tiled space repeats its
channel space once per pixel. A leaf's plan is placed at each of its occurrences to give the
full ``d × d`` merge and unmerge matrices of every space (merged width = width: same-width
merging).

Methods:

* ``average`` — unit i of A with unit i of B;
* ``permute`` — Hungarian on activation correlation;
* ``zip`` — ZipIt! greedy on the joint correlation (α, β);
* ``weight-match`` — Git Re-Basin: Hungarian on weight similarity, coordinate descent over leaves
  in random order until no plan changes;
* ``mudsc`` — zip on MuDSC's dual similarity β·S_weight + (1−β)·S_act, each leaf's weight
  similarity taken with the other leaves' current plans.

Heads and groups (blocks spaces) are matched in two levels: every block pair is scored by its
best within-block match, blocks sharing one block order (q, k and v of one attention) add their
scores, the Hungarian pairs blocks, then each space's within-block plans are taken for the pairs.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import fx
from scipy.optimize import linear_sum_assignment

from mergec.algorithms import solvers
from mergec.algorithms.covariance import JointMoments
from mergec.algorithms.solvers import MergePlan
from mergec.algorithms.tensors import apply_along
from mergec.errors import MergeError
from mergec.ir.fx import aten_name
from mergec.ir.spec import Binding, UnitSpec
from mergec.ir.state import METHODS, PipelineState

log = logging.getLogger(__name__)

Occurrence = tuple[str, torch.Tensor]  # (leaf space id, positions of its units in the space)


def is_leaf(spec: UnitSpec, space_id: str) -> bool:
    space = spec.spaces[space_id]
    return space.kind == "flat" or (space.kind == "blocks" and not space.parts) \
        or space.fixed is not None


def occurrences(spec: UnitSpec, space_id: str) -> list[Occurrence]:
    """Where the units of each leaf sit inside ``space_id``."""
    space = spec.spaces[space_id]
    if is_leaf(spec, space_id):
        return [(space_id, torch.arange(space.size))]
    if space.kind in ("composite", "blocks"):
        result, offset = [], 0
        for part in space.parts:
            result += [(leaf, positions + offset) for leaf, positions in occurrences(spec, part)]
            offset += spec.spaces[part].size
        return result
    # tiled: row-major factors; non-space factors repeat the space factors' occurrences
    result = [("", torch.zeros(1, dtype=torch.long))]
    for factor, size in space.factors:
        inner = occurrences(spec, factor) if factor else [("", torch.arange(size))]
        combined = []
        for leaf, positions in result:
            for inner_leaf, inner_positions in inner:
                if leaf and inner_leaf:
                    raise MergeError(f"match: tiled space {space_id} has two merged factors")
                if inner_leaf:
                    for p in positions:
                        combined.append((inner_leaf, p * size + inner_positions))
                else:
                    combined += [(leaf, positions * size + i) for i in inner_positions]
        result = combined
    return result


def full_plan(spec: UnitSpec, space_id: str, leaf_plans: Mapping[str, MergePlan],
              spec_b: UnitSpec | None = None, merged: UnitSpec | None = None) -> MergePlan:
    """The plan of a space (r × d_a, r × d_b, d_a × r, d_b × r), assembled from its leaves'
    plans. ``spec_b`` and ``merged`` give B's and the merged model's sizes where they differ
    from ``spec``'s (models of different width)."""
    spec_b, merged = spec_b or spec, merged or spec
    size_a, size_b = spec.spaces[space_id].size, spec_b.spaces[space_id].size
    width = merged.spaces[space_id].size
    merge_a = torch.zeros(width, size_a, dtype=torch.float64)
    merge_b = torch.zeros(width, size_b, dtype=torch.float64)
    unmerge_a = torch.zeros(size_a, width, dtype=torch.float64)
    unmerge_b = torch.zeros(size_b, width, dtype=torch.float64)
    layouts = zip(occurrences(spec, space_id), occurrences(spec_b, space_id),
                  occurrences(merged, space_id))
    for (leaf, in_a), (_, in_b), (_, out) in layouts:
        plan = leaf_plans[leaf]
        merge_a[out[:, None], in_a[None, :]] = plan.merge_a.to(torch.float64).cpu()
        merge_b[out[:, None], in_b[None, :]] = plan.merge_b.to(torch.float64).cpu()
        unmerge_a[in_a[:, None], out[None, :]] = plan.unmerge_a.to(torch.float64).cpu()
        unmerge_b[in_b[:, None], out[None, :]] = plan.unmerge_b.to(torch.float64).cpu()
    return MergePlan(merge_a, merge_b, unmerge_a, unmerge_b)


def resized(spec: UnitSpec, widths: Mapping[str, int]) -> UnitSpec:
    """``spec`` with its leaves resized to ``widths``; structured spaces follow their parts."""
    sizes: dict[str, int] = {}

    def size_of(space_id: str) -> int:
        if space_id in sizes:
            return sizes[space_id]
        space = spec.spaces[space_id]
        if is_leaf(spec, space_id):
            size = widths.get(space_id, space.size)
        elif space.kind in ("composite", "blocks"):
            size = sum(size_of(part) for part in space.parts)
        else:
            size = 1
            for factor, count in space.factors:
                size *= size_of(factor) if factor else count
        sizes[space_id] = size
        return size

    spaces = {}
    for space_id, space in spec.spaces.items():
        factors = tuple((f, size_of(f) if f else n) for f, n in space.factors)
        spaces[space_id] = dataclasses.replace(space, size=size_of(space_id), factors=factors)
    return dataclasses.replace(spec, spaces=spaces)


def target_widths(spec_a: UnitSpec, spec_b: UnitSpec, width: Any) -> dict[str, int]:
    """The merged width of every free flat space: ``"max"`` (default), ``"min"``, ``"a"``,
    ``"b"``, ``"sum"`` (d_a + d_b: nothing merged), a fraction of d_a + d_b, or an int."""
    widths = {}
    for space_id, space in spec_a.spaces.items():
        other = spec_b.spaces[space_id]
        if space.kind == "blocks" and not space.parts and space.size != other.size \
                and space.block_count == other.block_count:
            widths[space_id] = space.block_count * _head_size(space, other, width)
            continue
        if space.kind != "flat" or not spec_a.is_free(space_id):
            continue
        d_a, d_b = space.size, other.size
        if width == "max":
            target = max(d_a, d_b)
        elif width == "min":
            target = min(d_a, d_b)
        elif width == "a":
            target = d_a
        elif width == "b":
            target = d_b
        elif width == "sum":
            target = d_a + d_b
        elif isinstance(width, float) and 0 < width <= 1:
            target = max(1, round(width * (d_a + d_b)))
        elif isinstance(width, int) and not isinstance(width, bool) and width >= 1:
            target = min(width, d_a + d_b)
        else:
            raise MergeError(f"merge: width must be 'max', 'min', 'a', 'b', 'sum', a fraction "
                             f"in (0, 1] or a positive int, got {width!r}")
        widths[space_id] = target
    return widths


def _head_size(space_a: Any, space_b: Any, width: Any) -> int:
    """The merged size of heads (or groups) whose count agrees and size differs."""
    sizes = {"max": max(space_a.block_size, space_b.block_size),
             "min": min(space_a.block_size, space_b.block_size),
             "a": space_a.block_size, "b": space_b.block_size}
    if width not in sizes:
        raise MergeError(f"merge: the heads of {space_a.origin} have sizes {space_a.block_size} "
                         f"and {space_b.block_size}; heads of different sizes merge at width "
                         f"'max', 'min', 'a' or 'b', not {width!r}")
    return sizes[width]


def attention_roles(module: fx.GraphModule, spec: UnitSpec) -> dict[str, str]:
    """The heads spaces read by ``scaled_dot_product_attention`` with its default scale
    (1/sqrt(head size)): "qk" for query and key, "v" for value. A space also read by another
    attention (one with a given scale) gets no role."""
    roles: dict[str, str] = {}
    refused: set[str] = set()
    for node in module.graph.nodes:
        if aten_name(node) != "scaled_dot_product_attention":
            continue
        default = node.kwargs.get("scale") is None
        for position, role in ((0, "qk"), (1, "qk"), (2, "v")):
            space = _heads_space(node.args[position], spec)
            if space is None:
                continue
            if not default or roles.get(space, role) != role:
                refused.add(space)
            roles[space] = role
    return {space: role for space, role in roles.items() if space not in refused}


def _heads_space(node: Any, spec: UnitSpec) -> str | None:
    """The blocks space whose heads ``node`` (an attention operand) carries: the nearest
    producer upstream, through reshapes, transposes and cuts, whose axes include one."""
    for _ in range(16):
        if not isinstance(node, fx.Node):
            return None
        units = node.meta.get("mergec")
        for space_id in (units.spaces or ()) if units is not None else ():
            if space_id is not None and spec.spaces[space_id].kind == "blocks":
                return space_id
        inputs = [a for a in node.all_input_nodes
                  if a.op != "get_attr" and isinstance(a.meta.get("val"), torch.Tensor)]
        if len(inputs) != 1:
            return None
        node = inputs[0]
    return None


# ---------------------------------------------------------------------------------------------
# Similarities
# ---------------------------------------------------------------------------------------------
def activation_similarity(moments: JointMoments | None, size: int) -> torch.Tensor:
    """Joint (2d_a + 2d_b) correlation; identity-like when there are no statistics.

    A unit that is constant on the calibration data (a dead ReLU) correlates with nothing. It
    never merges within its own model (-inf); across models it is as similar (1) to a unit
    constant at the same value, and ties go to the unit of the same index (a 1e-6 bonus),
    which is exact for a model and its copy."""
    if moments is None:
        return torch.eye(2 * size, dtype=torch.float64)
    joint = moments.correlation().to(torch.float64).cpu().clone()
    d_a = moments.dim_a if hasattr(moments, "dim_a") else size
    total = joint.shape[0]
    d_b = total - d_a
    constant = joint.diagonal() == 0
    model_of = torch.arange(total) >= d_a
    same_model = model_of[:, None] == model_of[None, :]
    off_diagonal = ~torch.eye(total, dtype=torch.bool)
    within = same_model & off_diagonal & (constant[:, None] | constant[None, :])
    joint[within] = -math.inf
    mean = moments.mean.to(torch.float64).cpu()
    equal = (mean[:, None] - mean[None, :]).abs() <= 1e-6 * (mean[:, None].abs()
                                                            + mean[None, :].abs() + 1e-12)
    joint[constant[:, None] & constant[None, :] & ~same_model & equal] = 1.0
    ties = torch.arange(min(d_a, d_b))
    joint[ties, d_a + ties] += 1e-6
    joint[d_a + ties, ties] += 1e-6
    return joint


def weight_similarity(spec: UnitSpec, leaf: str, params_a: Mapping[str, torch.Tensor],
                      params_b: Mapping[str, torch.Tensor], plans: Mapping[str, MergePlan]
                      ) -> torch.Tensor:
    """Joint (2d × 2d) cosine similarity of the weight vectors of ``leaf``'s units: every
    trainable parameter slice (``params``: no running statistics) along an axis where the leaf
    occurs, B's other axes aligned to A's order by
    the current plans (Git Re-Basin)."""
    size = spec.spaces[leaf].size
    gram = torch.zeros(2 * size, 2 * size, dtype=torch.float64)
    by_key: dict[str, list[Binding]] = {}
    for binding in spec.bindings:
        by_key.setdefault(binding.key, []).append(binding)
    for key, bindings in by_key.items():
        if any(b.groups > 1 for b in bindings) or key not in params_a:
            continue
        for binding in bindings:
            places = [pos for l, pos in occurrences(spec, binding.space) if l == leaf]
            if not places:
                continue
            a = params_a[key].detach().to(torch.float64).cpu()
            b = params_b[key].detach().to(torch.float64).cpu()
            for other in bindings:
                if other is not binding:
                    b = apply_along(b, other.axis, 2.0 * plans[other.space].merge_b)
            for positions in places:
                vectors_a = a.index_select(binding.axis, positions).movedim(binding.axis, 0)
                vectors_b = b.index_select(binding.axis, positions).movedim(binding.axis, 0)
                stacked = torch.cat([vectors_a.reshape(size, -1), vectors_b.reshape(size, -1)])
                gram += stacked @ stacked.T
    norms = gram.diagonal().clamp_min(1e-12).sqrt()
    return gram / norms[:, None] / norms[None, :]


# ---------------------------------------------------------------------------------------------
# Solving leaves
# ---------------------------------------------------------------------------------------------
def solve_flat(method: str, joint: torch.Tensor, size: int, alpha: float, beta: float
               ) -> MergePlan:
    if method == "average":
        return solvers.average(size)
    if method in ("permute", "weight-match"):
        return solvers.permute(joint[:size, size:])
    return solvers.zip(joint, size, size, target=size, alpha=alpha, beta=beta)


def solve_blocks(method: str, joints: list[torch.Tensor], count: int,
                 within_fixed: list[bool], alpha: float, beta: float, pair: bool = True
                 ) -> tuple[torch.Tensor, list[MergePlan]]:
    """Two-level matching of several blocks spaces sharing one block order (their blocks may
    differ in size: a grouped convolution's input and output). Returns the block pairing (B's
    block for each of A's) and each space's full plan. ``pair=False`` keeps block i with
    block i and matches only inside blocks."""
    sizes = [joint.shape[0] // 2 for joint in joints]
    if method == "average":
        return torch.arange(count), [solvers.average(size) for size in sizes]

    def within(joint: torch.Tensor, size: int, block_a: int, block_b: int, fixed: bool
               ) -> MergePlan:
        block = size // count
        index = torch.cat([torch.arange(block_a * block, (block_a + 1) * block),
                           size + torch.arange(block_b * block, (block_b + 1) * block)])
        if fixed:
            plan = solvers.average(block)
            identity = torch.eye(block, dtype=torch.float64)
            return MergePlan(plan.merge_a, plan.merge_b, identity, identity)
        return solve_flat(method, joint[index][:, index], block, alpha, beta)

    plans: dict[tuple[int, int, int], MergePlan] = {}
    scores = torch.zeros(count, count, dtype=torch.float64)
    for i, (joint, size, fixed) in enumerate(zip(joints, sizes, within_fixed)):
        block = size // count
        for block_a in range(count):
            for block_b in range(count):
                plan = within(joint, size, block_a, block_b, fixed)
                plans[(i, block_a, block_b)] = plan
                cross = joint[block_a * block:(block_a + 1) * block,
                              size + block_b * block:size + (block_b + 1) * block]
                # matched similarity: pairs put in one merged unit
                together = (plan.unmerge_a.to(torch.float64) @ plan.unmerge_b.T.to(torch.float64))
                scores[block_a, block_b] += (cross * together).sum() / block
    if pair:
        pairing, _ = _best_matching(scores)
    else:
        pairing = torch.arange(count)
    results = []
    for i, size in enumerate(sizes):
        block = size // count
        matrices = [torch.zeros(size, size, dtype=torch.float64) for _ in range(4)]
        for block_a in range(count):
            block_b = int(pairing[block_a])
            plan = plans[(i, block_a, block_b)]
            out = slice(block_a * block, (block_a + 1) * block)
            from_a = slice(block_a * block, (block_a + 1) * block)
            from_b = slice(block_b * block, (block_b + 1) * block)
            matrices[0][out, from_a] = plan.merge_a.to(torch.float64)
            matrices[1][out, from_b] = plan.merge_b.to(torch.float64)
            matrices[2][from_a, out] = plan.unmerge_a.to(torch.float64)
            matrices[3][from_b, out] = plan.unmerge_b.to(torch.float64)
        results.append(MergePlan(*matrices))
    return pairing, results


def _best_matching(similarity: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The Hungarian matching of rows to columns with the largest total similarity (-inf,
    a constant unit, counts as -1): the column of each row, and the mean matched similarity."""
    rows, columns = linear_sum_assignment(torch.nan_to_num(similarity, neginf=-1.0).numpy(),
                                          maximize=True)
    rows, columns = torch.as_tensor(rows), torch.as_tensor(columns)
    return columns[rows.argsort()], float(similarity[rows, columns].mean())


def pairing_plan(pairing: torch.Tensor) -> MergePlan:
    """The plan of a block-order space: merged block k averages A's block k and B's paired one."""
    count = len(pairing)
    merge_b = torch.zeros(count, count, dtype=torch.float64)
    merge_b[torch.arange(count), pairing] = 0.5
    identity = torch.eye(count, dtype=torch.float64)
    return MergePlan(identity / 2, merge_b, identity, 2 * merge_b.T)


@dataclass(frozen=True)
class Match:
    """The match pass: one :class:`MergePlan` per space."""

    method: str = "zip"
    alpha: float = 0.0
    beta: float = 0.0
    weight_beta: float = 0.5  # MuDSC's β: share of weight similarity in the dual space
    width: Any = "max"  # merged widths, see target_widths
    max_iter: int = 30
    seed: int = 0
    name: ClassVar[str] = "match"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MergeError(f"match: unknown method {self.method!r}; choose one of "
                             f"{', '.join(METHODS)}")

    def run(self, state: PipelineState) -> PipelineState:
        graphs, specs = state.require("graphs", self.name), state.require("specs", self.name)
        spec_a, spec_b = specs
        widths = target_widths(spec_a, spec_b, self.width)
        resizing = spec_a.shapes != spec_b.shapes or any(
            widths[s] != spec_a.spaces[s].size for s in widths)
        plans, summaries = self._plan(
            spec_a, state.moments, dict(graphs[0].named_parameters()),
            dict(graphs[1].named_parameters()), spec_b=spec_b,
            widths=widths if resizing else None, exclude=state.unaligned_spaces,
            attention=attention_roles(graphs[0], spec_a))
        return state.evolve(plans=plans, summaries=summaries)

    def _plan(self, spec: UnitSpec, moments: Mapping[str, JointMoments],
              params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor],
              spec_b: UnitSpec | None = None, widths: Mapping[str, int] | None = None,
              exclude: frozenset[str] = frozenset(), attention: Mapping[str, str] | None = None
              ) -> tuple[dict[str, MergePlan], dict[str, dict]]:
        """Plans for every space. ``spec_b`` is B's spec where B's widths differ from A's;
        ``widths`` the merged width of each leaf that is not to keep its width (elastic zip:
        models of different width, or a merged model wider or narrower than its parents).
        Leaves in ``exclude`` keep unit i with unit i (blocks that only one model has)."""
        leaves = [s for s in spec.spaces if is_leaf(spec, s)]
        widths = dict(widths or {})
        elastic = {s for s in leaves if widths.get(s, spec.spaces[s].size) != spec.spaces[s].size
                   or (spec_b is not None and spec_b.spaces[s].size != spec.spaces[s].size)}
        if elastic:
            return self._elastic(spec, spec_b or spec, moments, widths, leaves, elastic,
                                 attention or {})
        plans, summary = self._same_width(spec, moments, [s for s in leaves if s not in exclude],
                                          params_a, params_b)
        plans.update({s: solvers.average(spec.spaces[s].size) for s in exclude if s in leaves})
        return self._full(spec, plans), summary

    def _same_width(self, spec: UnitSpec, moments: Mapping[str, JointMoments],
                    leaves: list[str], params_a: Mapping[str, torch.Tensor] | None = None,
                    params_b: Mapping[str, torch.Tensor] | None = None
                    ) -> tuple[dict[str, MergePlan], dict[str, dict]]:
        """Leaf plans of ``leaves``, all of one width in both models."""
        all_leaves = [s for s in spec.spaces if is_leaf(spec, s)]
        plans: dict[str, MergePlan] = {s: solvers.average(spec.spaces[s].size)
                                       for s in all_leaves}
        summary: dict[str, dict] = {}

        def similarity(leaf: str, current: Mapping[str, MergePlan]) -> torch.Tensor | None:
            """None where nothing is known of the leaf: it is then averaged, unit i with i."""
            observed = moments.get(leaf)
            if self.method in ("weight-match", "mudsc"):
                weights = weight_similarity(spec, leaf, params_a, params_b,
                                            self._full(spec, current))
                if self.method == "weight-match" or observed is None:
                    return weights
                activation = activation_similarity(observed, spec.spaces[leaf].size)
                return self.weight_beta * weights + (1 - self.weight_beta) * activation
            if observed is None:
                return None
            return activation_similarity(observed, spec.spaces[leaf].size)

        groups = _block_groups(spec, all_leaves)
        sweeps = 1
        if self.method == "mudsc":
            sweeps = 2
        if self.method == "weight-match":
            sweeps = self.max_iter
        order = list(leaves)
        rng = random.Random(self.seed)
        for sweep in range(sweeps):
            changed = False
            if self.method == "weight-match":
                rng.shuffle(order)
            method = "zip" if (self.method == "mudsc" and sweep == 0) else self.method
            for leaf in order:
                space = spec.spaces[leaf]
                if not spec.is_free(leaf) or leaf in groups["order_of"]:
                    continue
                if space.kind == "blocks":
                    if leaf != groups["members"][space.block_space][0]:
                        continue  # solved once per group, with its first member
                    members = groups["members"][space.block_space]
                    joints = [similarity(m, plans) for m in members]
                    if any(joint is None for joint in joints):
                        continue  # no statistics for a member: the group stays averaged
                    pair = space.block_space not in groups["fixed_order"]
                    pairing, member_plans = solve_blocks(
                        method if method != "mudsc" else "zip", joints, space.block_count,
                        [spec.spaces[m].within_fixed is not None for m in members],
                        self.alpha, self.beta, pair=pair)
                    new = dict(zip(members, member_plans))
                    if pair and spec.is_free(space.block_space):
                        new[space.block_space] = pairing_plan(pairing)
                    joint = joints[0]
                else:
                    joint = similarity(leaf, plans)
                    if joint is None:
                        continue  # no statistics: stays averaged
                    new = {leaf: solve_flat("zip" if method == "mudsc" else method, joint,
                                            space.size, self.alpha, self.beta)}
                for member, plan in new.items():
                    if not _same_plan(plans.get(member), plan):
                        changed = True
                    plans[member] = plan
                    summary[member] = _summary(plan, joint if member == leaf else None)
            if self.method == "weight-match" and not changed:
                break
        return {s: plans[s] for s in leaves}, summary

    @staticmethod
    def _full(spec: UnitSpec, leaf_plans: Mapping[str, MergePlan]) -> dict[str, MergePlan]:
        return {s: full_plan(spec, s, leaf_plans) for s in spec.spaces}

    def _elastic(self, spec_a: UnitSpec, spec_b: UnitSpec, moments: Mapping[str, JointMoments],
                 widths: dict[str, int], leaves: list[str], elastic: set[str],
                 attention: Mapping[str, str]) -> tuple[dict[str, MergePlan], dict[str, dict]]:
        """Elastic zip (the heterogeneous-width method) on flat leaves whose widths differ;
        every other leaf keeps the same-width plan of ``zip``."""
        if self.method != "zip":
            raise MergeError(f"match: models or merged widths differ, which only method 'zip' "
                             f"(elastic zip) handles, not {self.method!r}")
        groups = _block_groups(spec_a, leaves)
        plans: dict[str, MergePlan] = {}
        summary: dict[str, dict] = {}
        for order, members in groups["members"].items():
            if order not in elastic and not elastic.intersection(members):
                continue
            sizes = (spec_a.spaces[order].size, spec_b.spaces[order].size)
            if order in groups["fixed_order"] or not spec_a.is_free(order):
                raise MergeError(f"match: the heads or groups of {', '.join(members)} (counts "
                                 f"{sizes[0]} and {sizes[1]}) have a fixed order (grouped-query "
                                 "attention, or separated parts); mergec cannot change their "
                                 "count")
            target = widths.get(order, max(sizes))
            if sizes[0] == sizes[1] == target:
                new, block_summary = self._elastic_within(spec_a, spec_b, moments, order,
                                                          members, widths, attention)
            else:
                new, block_summary = self._elastic_blocks(spec_a, spec_b, moments, order,
                                                          members, target)
            plans.update(new)
            summary.update(block_summary)
            elastic.update(new)
        for leaf in leaves:
            if leaf in plans:
                continue
            space_a, space_b = spec_a.spaces[leaf], spec_b.spaces[leaf]
            d_a, d_b = space_a.size, space_b.size
            target = widths.get(leaf, max(d_a, d_b))
            if leaf in elastic and (space_a.kind != "flat" or not spec_a.is_free(leaf)
                                    or leaf in groups["order_of"]):
                raise MergeError(
                    f"match: space {leaf} ({space_a.kind}, origin {space_a.origin}) has widths "
                    f"{d_a} and {d_b}{'' if spec_a.is_free(leaf) else ' and is fixed'}; only "
                    "free flat spaces, and heads or groups whose order is free, can change "
                    "width")
            observed = moments.get(leaf)
            if leaf in elastic:
                joint = (activation_similarity(observed, d_a) if observed is not None
                         else torch.eye(d_a + d_b, dtype=torch.float64))
                plans[leaf] = solvers.elastic_zip(joint, d_a, d_b, target=target,
                                                  alpha=self.alpha)
                summary[leaf] = {"width": target, "widths": [d_a, d_b]}
            else:
                plans[leaf] = solvers.average(d_a)
        same = [s for s in leaves if s not in elastic and s not in plans]
        if same:  # same-width leaves: the ordinary matcher, restricted to them
            sub_plans, sub_summary = Match(method=self.method, alpha=self.alpha, beta=self.beta,
                                           seed=self.seed)._same_width(spec_a, moments, same)
            plans.update(sub_plans)
            summary.update(sub_summary)
        merged = resized(spec_a, {s: plans[s].width for s in leaves})
        full = {s: full_plan(spec_a, s, plans, spec_b, merged) for s in spec_a.spaces}
        return full, summary

    def _elastic_blocks(self, spec_a: UnitSpec, spec_b: UnitSpec,
                        moments: Mapping[str, JointMoments], order: str, members: list[str],
                        target: int) -> tuple[dict[str, MergePlan], dict[str, dict]]:
        """Elastic zip over heads or groups whose count differs: blocks of one size, scored
        pairwise (within and across models) by their best within-block match summed over the
        spaces sharing the block order, are zipped to ``target`` blocks; inside a merged block
        every contributor is permuted to the first one's order and averaged."""
        counts = (spec_a.spaces[order].size, spec_b.spaces[order].size)
        block_sizes = []
        for member in members:
            size_a, size_b = spec_a.spaces[member].block_size, spec_b.spaces[member].block_size
            if size_a != size_b:
                raise MergeError(
                    f"match: the blocks of {member} ({spec_a.spaces[member].origin}) have "
                    f"sizes {size_a} and {size_b}; elastic merging changes the number of heads "
                    "or groups, not their size")
            block_sizes.append(size_a)
        total = sum(counts)

        def positions(member_index: int, block: int) -> torch.Tensor:
            """Block ``block``'s units in a member's joint matrix (A's blocks, then B's)."""
            size = block_sizes[member_index]
            return torch.arange(block * size, (block + 1) * size)

        joints = []
        for member, size in zip(members, block_sizes):
            observed = moments.get(member)
            dims = (counts[0] * size, counts[1] * size)
            joints.append(activation_similarity(observed, dims[0]) if observed is not None
                          else torch.eye(sum(dims), dtype=torch.float64))
        alignments: dict[tuple[int, int, int], torch.Tensor] = {}
        scores = torch.eye(total, dtype=torch.float64)
        for x in range(total):
            for y in range(x + 1, total):
                score = 0.0
                for index, (member, joint) in enumerate(zip(members, joints)):
                    cross = joint[positions(index, x)][:, positions(index, y)]
                    if spec_a.spaces[member].within_fixed is not None:
                        order_y = torch.arange(len(cross))
                        matched = float(cross.diagonal().mean())
                    else:
                        order_y, matched = _best_matching(cross)
                    alignments[(index, x, y)] = order_y
                    score += matched
                scores[x, y] = scores[y, x] = score / len(members)
        block_plan = solvers.elastic_zip(scores, counts[0], counts[1], target=target,
                                         alpha=self.alpha)
        merges = (block_plan.merge_a.to(torch.float64), block_plan.merge_b.to(torch.float64))
        unmerges = (block_plan.unmerge_a.to(torch.float64), block_plan.unmerge_b.to(torch.float64))
        plans = {order: block_plan}
        summary = {order: {"width": target, "widths": list(counts), "merged blocks": [
            [("A" if x < counts[0] else "B", x if x < counts[0] else x - counts[0])
             for x in range(total) if _unmerge_of(unmerges, counts, x)[k] > 0]
            for k in range(target)]}}
        for index, (member, size) in enumerate(zip(members, block_sizes)):
            matrices = [torch.zeros(target * size, counts[0] * size, dtype=torch.float64),
                        torch.zeros(target * size, counts[1] * size, dtype=torch.float64),
                        torch.zeros(counts[0] * size, target * size, dtype=torch.float64),
                        torch.zeros(counts[1] * size, target * size, dtype=torch.float64)]
            for k in range(target):
                merged = torch.arange(k * size, (k + 1) * size)
                contributors = [x for x in range(total) if _unmerge_of(unmerges, counts, x)[k] > 0]
                anchor = contributors[0]
                for x in contributors:
                    model = 0 if x < counts[0] else 1
                    block = x if model == 0 else x - counts[0]
                    inside = (torch.arange(size) if x == anchor
                              else alignments[(index, anchor, x)] if anchor < x
                              else alignments[(index, x, anchor)].argsort())
                    source = block * size + inside  # contributor unit for each merged unit
                    matrices[model][merged, source] = merges[model][k, block]
                    matrices[2 + model][source, merged] = unmerges[model][block, k]
            plans[member] = MergePlan(*matrices)
            summary[member] = {"width": target * size,
                               "widths": [counts[0] * size, counts[1] * size]}
        return plans, summary

    def _elastic_within(self, spec_a: UnitSpec, spec_b: UnitSpec,
                        moments: Mapping[str, JointMoments], order: str, members: list[str],
                        widths: Mapping[str, int], roles: Mapping[str, str]
                        ) -> tuple[dict[str, MergePlan], dict[str, dict]]:
        """Elastic zip inside heads whose count agrees and whose size differs: heads are
        paired across the models (Hungarian on their best unit matching), then each pair is
        zipped to the merged head size. Query and key heads of an attention whose scale is
        1/sqrt(head size) are rescaled so that each model's attention logits keep their scale."""
        count = spec_a.spaces[order].size
        sizes, joints = [], []
        for member in members:
            size_a, size_b = spec_a.spaces[member].block_size, spec_b.spaces[member].block_size
            size = widths.get(member, count * max(size_a, size_b)) // count
            if len({size_a, size_b, size}) > 1 and (
                    roles.get(member) not in ("qk", "v")
                    or spec_a.spaces[member].within_fixed is not None):
                raise MergeError(
                    f"match: the heads of {member} ({spec_a.spaces[member].origin}) have sizes "
                    f"{size_a} and {size_b}; mergec changes the size of heads only for "
                    "scaled_dot_product_attention with its default scale, whose scale it can "
                    "follow, and not for heads whose inside order is pinned (rotary embeddings)")
            sizes.append((size_a, size_b, size))
            observed = moments.get(member)
            joints.append(activation_similarity(observed, count * size_a) if observed is not None
                          else torch.eye(count * (size_a + size_b), dtype=torch.float64))

        def cross(index: int, block_a: int, block_b: int) -> torch.Tensor:
            size_a, size_b, _ = sizes[index]
            rows = torch.arange(block_a * size_a, (block_a + 1) * size_a)
            columns = count * size_a + torch.arange(block_b * size_b, (block_b + 1) * size_b)
            return torch.cat([rows, columns])

        scores = torch.zeros(count, count, dtype=torch.float64)
        for index, joint in enumerate(joints):
            size_a = sizes[index][0]
            for block_a in range(count):
                for block_b in range(count):
                    positions = cross(index, block_a, block_b)
                    block = joint[positions[:size_a]][:, positions[size_a:]]
                    scores[block_a, block_b] += _best_matching(block)[1]
        pairing, _ = _best_matching(scores)
        plans = {order: pairing_plan(pairing)}
        summary = {order: {"width": count, "pairing": pairing.tolist()}}
        for index, (member, joint) in enumerate(zip(members, joints)):
            size_a, size_b, size = sizes[index]
            matrices = [torch.zeros(count * size, count * size_a, dtype=torch.float64),
                        torch.zeros(count * size, count * size_b, dtype=torch.float64),
                        torch.zeros(count * size_a, count * size, dtype=torch.float64),
                        torch.zeros(count * size_b, count * size, dtype=torch.float64)]
            scale = ((size / size_a) ** 0.25, (size / size_b) ** 0.25) \
                if roles.get(member) == "qk" else (1.0, 1.0)
            for block_a in range(count):
                block_b = int(pairing[block_a])
                positions = cross(index, block_a, block_b)
                plan = solvers.elastic_zip(joint[positions][:, positions], size_a, size_b,
                                           target=size, alpha=self.alpha)
                out = slice(block_a * size, (block_a + 1) * size)
                from_a = slice(block_a * size_a, (block_a + 1) * size_a)
                from_b = slice(block_b * size_b, (block_b + 1) * size_b)
                matrices[0][out, from_a] = plan.merge_a.to(torch.float64) * scale[0]
                matrices[1][out, from_b] = plan.merge_b.to(torch.float64) * scale[1]
                matrices[2][from_a, out] = plan.unmerge_a.to(torch.float64)
                matrices[3][from_b, out] = plan.unmerge_b.to(torch.float64)
            plans[member] = MergePlan(*matrices)
            summary[member] = {"width": count * size,
                               "widths": [count * size_a, count * size_b]}
        return plans, summary


def _unmerge_of(unmerges: tuple[torch.Tensor, torch.Tensor], counts: tuple[int, int],
                block: int) -> torch.Tensor:
    """The row of the block plan's unmerge matrix of block ``block`` (A's blocks first)."""
    return unmerges[0][block] if block < counts[0] else unmerges[1][block - counts[0]]


def _block_groups(spec: UnitSpec, leaves: list[str]) -> dict:
    """Blocks spaces grouped by their shared block order. ``orders`` holds every space that is
    some space's block order: those are never matched on their own. ``fixed_order`` holds the
    orders that must stay the identity because a space with separated parts or a repeated
    order (grouped-query attention) also depends on them."""
    members: dict[str, list[str]] = {}
    orders: set[str] = set()
    fixed_order: set[str] = set()
    for space in spec.spaces.values():
        if space.kind != "blocks" or space.block_space is None:
            continue
        orders.add(space.block_space)
        order = spec.spaces[space.block_space]
        if space.parts or order.kind != "flat":
            fixed_order.add(space.block_space)
            fixed_order.update(f for f, _ in order.factors if f is not None)
    for leaf in leaves:
        space = spec.spaces[leaf]
        if space.kind == "blocks" and spec.is_free(leaf):
            members.setdefault(space.block_space, []).append(leaf)
    return {"members": members, "order_of": orders, "fixed_order": fixed_order}


def _same_plan(old: MergePlan | None, new: MergePlan) -> bool:
    return old is not None and torch.equal(old.merge_b.to(new.merge_b), new.merge_b) \
        and torch.equal(old.merge_a.to(new.merge_a), new.merge_a)


def _summary(plan: MergePlan, joint: torch.Tensor | None) -> dict:
    """What the report keeps of a plan: width, how many A–B pairs, mean matched correlation."""
    together = (plan.unmerge_a.detach().to(torch.float64)
                @ plan.unmerge_b.detach().T.to(torch.float64))
    result = {"width": plan.width, "cross_pairs": int((together > 0).sum())}
    if joint is not None:
        size = plan.dim_a
        cross = joint[:size, size:]
        pairs = together > 0
        result["matched_similarity"] = float(cross[pairs].mean()) if pairs.any() else 0.0
        result["identity_similarity"] = float(cross.diagonal().mean())
    return result
