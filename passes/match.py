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

This module holds what needs the spec: leaves and their occurrences, merged widths, attention
roles, which spaces are solved together and how. The maths is graph-free, in
:mod:`mergec.algorithms`: the solvers and the Hungarian (:mod:`~mergec.algorithms.solvers`),
placement and block matching (:mod:`~mergec.algorithms.blocks`), weight similarity
(:mod:`~mergec.algorithms.weight_matching`).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import torch
from torch import fx

from mergec.algorithms import blocks, solvers
from mergec.algorithms.blocks import Placement, place
from mergec.algorithms.covariance import (
    DEAD_UNIT_RELATIVE_VARIANCE,
    JointMoments,
    activation_similarity,
)
from mergec.algorithms.solvers import BlockSolver, ManyPlan, MergePlan
from mergec.algorithms.tensors import as_permutation, block_diagonal
from mergec.algorithms.weight_matching import weight_similarity, weight_similarity_many
from mergec.errors import MergeError
from mergec.ir.fx import aten_name
from mergec.ir.groups import ORTHOGONAL
from mergec.ir.spec import UnitSpec
from mergec.ir.state import METHODS, PipelineState

Occurrence = tuple[str, torch.Tensor]  # (leaf space id, positions of its units in the space)


def is_leaf(spec: UnitSpec, space_id: str) -> bool:
    """Whether match decides on ``space_id`` itself: a flat space, a blocks space without
    separated parts, or a fixed space (which keeps unit i with unit i)."""
    space = spec.spaces[space_id]
    return space.kind == "flat" or (space.kind == "blocks" and not space.parts) \
        or space.fixed is not None


def occurrences(spec: UnitSpec, space_id: str,
                pairing: Callable[[str], torch.Tensor] | None = None) -> list[Occurrence]:
    """Where the units of each leaf sit inside ``space_id``. The parts of a blocks space are
    the insides of its blocks and move with them (see :mod:`mergec.permute`): ``pairing``
    (B's side of a plan) gives, for a block order, the block each part sits at."""
    space = spec.spaces[space_id]
    if is_leaf(spec, space_id):
        return [(space_id, torch.arange(space.size))]
    if space.kind in ("composite", "blocks"):
        result, offset = [], 0
        blocks_at = pairing(space.block_space) if pairing is not None and space.kind == "blocks" \
            and space.block_space else None
        for index, part in enumerate(space.parts):
            if blocks_at is not None:
                offset = int(blocks_at[index]) * spec.spaces[part].size
            result += [(leaf, positions + offset)
                       for leaf, positions in occurrences(spec, part, pairing)]
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


def output_leaves(spec: UnitSpec) -> list[str]:
    """The free flat spaces that reach a model output (a backbone's hidden states)."""
    spaces = dict.fromkeys(space for axes in spec.outputs for space in axes
                           if space is not None and spec.is_free(space)
                           and spec.spaces[space].kind == "flat" and is_leaf(spec, space))
    return list(spaces)


def full_plan(spec: UnitSpec, space_id: str, leaf_plans: Mapping[str, MergePlan],
              spec_b: UnitSpec | None = None, merged: UnitSpec | None = None) -> MergePlan:
    """The plan of a space (r × d_a, r × d_b, d_a × r, d_b × r), assembled from its leaves'
    plans. ``spec_b`` and ``merged`` give B's and the merged model's sizes where they differ
    from ``spec``'s (models of different width)."""
    spec_b, merged = spec_b or spec, merged or spec
    pairing = functools.partial(_block_pairing, spec, leaf_plans)
    layouts = zip(occurrences(spec, space_id), occurrences(spec_b, space_id, pairing),
                  occurrences(merged, space_id))
    placements = [Placement(leaf_plans[leaf], out, in_a, in_b)
                  for (leaf, in_a), (_, in_b), (_, out) in layouts]
    return place(placements, merged.spaces[space_id].size, spec.spaces[space_id].size,
                 spec_b.spaces[space_id].size)


def _block_pairing(spec: UnitSpec, leaf_plans: Mapping[str, MergePlan], order: str
                   ) -> torch.Tensor:
    """B's block merged into each merged block of block order ``order``, from its plan: a
    permutation wherever blocks whose insides are separated parts move (grouped-query
    attention), the identity elsewhere."""
    plan = full_plan(spec, order, leaf_plans)
    size = spec.spaces[order].size
    if plan.width == size == plan.dim_b:
        index = as_permutation(2.0 * plan.merge_b.to_dense().to(torch.float64))
        if index is not None:
            return index
    if torch.equal(plan.merge_b.to_dense().to(torch.float64),
                   torch.eye(plan.width, plan.dim_b, dtype=torch.float64) / 2):
        return torch.arange(plan.width)
    raise MergeError(f"match: the blocks of {order} ({spec.spaces[order].origin}) hold "
                     "separated parts and are merged otherwise than paired; mergec cannot "
                     "place their parts")


def resized(spec: UnitSpec, widths: Mapping[str, int]) -> UnitSpec:
    """``spec`` with its leaves resized to ``widths``; structured spaces follow their parts."""
    sizes: dict[str, int] = {}

    def size_of(space_id: str) -> int:
        """The merged size of a space, memoised in ``sizes``."""
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
        widths[space_id] = flat_width((space.size, other.size), width)
    return widths


def flat_width(dims: tuple[int, ...], width: Any) -> int:
    """The merged width of a flat space whose models have widths ``dims`` (two, or N):
    ``"max"``, ``"min"``, ``"a"`` (the first model's), ``"b"`` (the second's, for two models),
    ``"sum"`` (nothing merged), a fraction of the sum, or an int (at most the sum)."""
    total = sum(dims)
    named = {"max": max(dims), "min": min(dims), "a": dims[0], "sum": total}
    if len(dims) == 2:
        named["b"] = dims[1]
    if isinstance(width, str) and width in named:
        return named[width]
    if width == "b":
        raise MergeError("merge_many: width='b' names model B of a pair; give N models' "
                         "merged width as 'max', 'min', 'a', 'sum', a fraction or an int")
    if isinstance(width, float) and 0 < width <= 1:
        return max(1, round(width * total))
    if isinstance(width, int) and not isinstance(width, bool) and width >= 1:
        return min(width, total)
    raise MergeError(f"merge: width must be 'max', 'min', 'a', 'b', 'sum', a fraction "
                     f"in (0, 1] or a positive int, got {width!r}")


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
def elastic_similarity(moments: Mapping[str, JointMoments], space_id: str, d_a: int, d_b: int
                       ) -> torch.Tensor:
    """The joint similarity of a space of widths ``d_a`` and ``d_b`` for elastic zip: the
    activation similarity, or the identity where there are no statistics."""
    observed = moments.get(space_id)
    if observed is None:
        return torch.eye(d_a + d_b, dtype=torch.float64)
    return activation_similarity(observed, d_a)


def leaf_weight_similarity(spec: UnitSpec, leaf: str, params_a: Mapping[str, torch.Tensor],
                           params_b: Mapping[str, torch.Tensor],
                           plans: Mapping[str, MergePlan]) -> torch.Tensor:
    """Git Re-Basin's joint weight similarity of ``leaf``'s units
    (:func:`~mergec.algorithms.weight_matching.weight_similarity`): every trainable parameter
    (``params``: no running statistics) bound along a space where the leaf occurs, B's other
    axes put in A's order by the current full ``plans`` (twice B's merge matrix: a pair's merged
    unit averages two). A grouped convolution's weight is compared as the block-diagonal matrix
    it holds the blocks of, where that is not too large (:class:`WeightParameters`). This is
    the computation from scratch; the pass uses :class:`WeightSimilarities`, which gives the
    same numbers while leaf plans change one at a time."""
    axes = _weight_axes(spec, params_a)
    params_a, params_b = WeightParameters(spec, params_a), WeightParameters(spec, params_b)
    spaces = {space for bound in axes.values() for _, space in bound}
    align_b = {space: 2.0 * plans[space].merge_b for space in spaces}
    units = _leaf_units({space: occurrences(spec, space) for space in spaces}, leaf)
    return weight_similarity(params_a, params_b, axes, units, align_b, spec.spaces[leaf].size)


class ManyWeightSimilarities:
    """:func:`leaf_weight_similarity` of N models of one width, for the N-way zip's sweeps: the
    ``(N d × N d)`` joint similarity of a leaf's units, model m ≥ 1's other axes put in model
    0's order by N times its merge matrix of the space's full plan (a merged unit of every
    model averages N). The bindings and occurrences are read once and each parameter becomes
    float64 once, as in :class:`WeightSimilarities`. Two models give the two-model
    similarity."""

    def __init__(self, spec: UnitSpec, params: Sequence[Mapping[str, torch.Tensor]]) -> None:
        self.spec = spec
        self.axes = _weight_axes(spec, params[0])
        self.params = [WeightParameters(spec, p) for p in params]
        self.spaces = {space for bound in self.axes.values() for _, space in bound}
        self.occurrences = {space: occurrences(spec, space) for space in self.spaces}

    def __call__(self, leaf: str, full_plans: Callable[[str], ManyPlan]) -> torch.Tensor:
        """``leaf``'s similarity under the plans ``full_plans(space)`` gives."""
        units = _leaf_units(self.occurrences, leaf)
        read = {space for bound in self.axes.values() if any(s in units for _, s in bound)
                for _, space in bound}
        plans = {space: full_plans(space) for space in read}
        count = len(self.params)
        aligns = [None] + [{space: count * plan.merges[model].to_dense()
                            for space, plan in plans.items()} for model in range(1, count)]
        return weight_similarity_many(self.params, self.axes, units, aligns,
                                      self.spec.spaces[leaf].size)


def _leaf_units(occurrences_of: Mapping[str, list[Occurrence]], leaf: str
                ) -> dict[str, list[torch.Tensor]]:
    """Where ``leaf``'s units sit in each space of ``occurrences_of`` that holds them."""
    units = {}
    for space, found in occurrences_of.items():
        places = [positions for got, positions in found if got == leaf]
        if places:
            units[space] = places
    return units


def parameters_of(graph: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every parameter of ``graph`` under each of its names: a tied weight (T5's token
    embedding, ``shared.weight`` and ``encoder.embed_tokens.weight``) is listed once by
    ``named_parameters()``, and the spec may bind it under the other name."""
    return dict(graph.named_parameters(remove_duplicate=False))


def _weight_axes(spec: UnitSpec, params: Mapping[str, torch.Tensor]
                 ) -> dict[str, list[tuple[int, str]]]:
    """The bound axes of every parameter in ``params`` but grouped convolution weights too
    large to compare as block-diagonal matrices (:data:`MAX_EXPANDED`)."""
    axes: dict[str, list[tuple[int, str]]] = {}
    too_large = {b.key for b in spec.bindings if b.groups > 1 and b.key in params
                 and params[b.key].numel() * b.groups > MAX_EXPANDED}
    for binding in spec.bindings:
        if binding.key in params and binding.key not in too_large:
            axes.setdefault(binding.key, []).append((binding.axis, binding.space))
    return axes


#: the most elements a grouped convolution's weight may have as a block-diagonal matrix for
#: weight matching to compare it (32 MB in float64); a larger one (a wide depthwise convolution:
#: channels² × kernel) is left out
MAX_EXPANDED = 2**22
# the weights' share in the similarity of an under-observed rotation space (_break_ties): small,
# so that the activations decide every direction they observe and the weights only the rest
TIE_SHARE = 1e-3


class WeightParameters(Mapping):
    """The parameters weight matching compares (those of :func:`_weight_axes`), float64 on the
    CPU, each converted when it is first read (a leaf's similarity reads only the parameters
    bound along its spaces: breaking one leaf's ties converts a few, not the whole model). A
    grouped convolution's ``(out, in/groups, ...)`` weight becomes the ``(out, in, ...)``
    block-diagonal matrix it holds the blocks of, whose axes are the spaces' full widths (the
    zeros off the blocks stay off them under every permutation the spec allows)."""

    def __init__(self, spec: UnitSpec, params: Mapping[str, torch.Tensor]) -> None:
        self._params, self._keys = params, dict.fromkeys(_weight_axes(spec, params))
        self._groups = {b.key: b.groups for b in spec.bindings if b.groups > 1}
        self.converted: dict[str, torch.Tensor] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.converted:
            if key not in self._keys:
                raise KeyError(key)
            tensor = self._params[key].detach().to("cpu", torch.float64)
            self.converted[key] = block_diagonal(tensor, self._groups[key]) \
                if key in self._groups else tensor
        return self.converted[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


#: What WeightSimilarities keeps of the leaves' weight similarities between calls, in bytes.
SIMILARITY_CACHE_BYTES = 1 << 30


class WeightSimilarities:
    """:func:`leaf_weight_similarity` of any leaf under the leaf plans in ``plans`` (the caller's
    dict, read when needed), for coordinate descent, where one leaf's plan changes at a time.

    The parameters become float64 once, the bindings and occurrences are read once, and B's
    alignment of a space (twice its full merge matrix) is kept until the plan of one of its
    leaves moves B's units otherwise: the caller hands every plan it replaces to
    :meth:`replaced`. A leaf's similarity is kept until
    an alignment it reads changes (a later sweep re-solves leaves whose neighbours kept their
    plans). An alignment that is a permutation is kept as its index and applied by selection,
    which gives the same numbers as the product with its matrix
    (:func:`~mergec.algorithms.tensors.as_permutation`), so the similarities equal
    :func:`leaf_weight_similarity`'s from the full plans.

    Leaves in :attr:`unknown` have no plan yet (weight matching's first sweep): a space where
    one of them occurs has no alignment, and parameters that run along it are left out of the
    similarities, which then say only what the known spaces say.
    """

    def __init__(self, spec: UnitSpec, params_a: Mapping[str, torch.Tensor],
                 params_b: Mapping[str, torch.Tensor], plans: Mapping[str, MergePlan],
                 repeated: Mapping[str, dict] | None = None, cross_only: bool = False) -> None:
        """Reads the spec; the parameters it binds become float64 on the CPU when first read.
        ``repeated`` holds the grouped-query attention groups whose separated parts follow
        their block order (:func:`_free_repeated`). ``cross_only``: every similarity holds the
        cross-model block alone (:func:`~mergec.algorithms.weight_matching.weight_similarity`),
        for callers whose solvers read nothing else."""
        self.spec, self.plans, self.cross_only = spec, plans, cross_only
        self.axes = _weight_axes(spec, params_a)
        self.params_a = WeightParameters(spec, params_a)
        self.params_b = WeightParameters(spec, params_b)
        spaces = {space for bound in self.axes.values() for _, space in bound}
        self.occurrences = {space: occurrences(spec, space) for space in spaces}
        self.leaves_of = {space: {leaf for leaf, _ in found}
                          for space, found in self.occurrences.items()}
        self.spaces_of: dict[str, list[str]] = {}
        for space, found in self.occurrences.items():
            for leaf in dict.fromkeys(leaf for leaf, _ in found):
                self.spaces_of.setdefault(leaf, []).append(space)
        self.alignments: dict[str, torch.Tensor] = {}
        self.permutations: dict[str, torch.Tensor | None] = {}
        self.versions = dict.fromkeys(spaces, 0)  # how many times each alignment changed
        self.layouts: dict[str, tuple[dict, dict, tuple[str, ...]]] = {}
        # kept similarities, oldest first, at most SIMILARITY_CACHE_BYTES in all
        self.similarities: OrderedDict[str, tuple[tuple, torch.Tensor]] = OrderedDict()
        self.unknown: set[str] = set()
        self._follow_block_orders(repeated or {})

    def _follow_block_orders(self, repeated: Mapping[str, dict]) -> None:
        """For every group of ``repeated``: its parents (value heads, whose parts are solved
        together as one similarity over all their units) and the spaces holding its parts,
        whose B alignment follows the block order's plan (:attr:`paired`, built from the full
        plan) and changes with it (:attr:`dependents`)."""
        self.parents: dict[str, tuple[str, ...]] = {}
        self.paired: set[str] = set()
        self.dependents: dict[str, list[str]] = {}
        for order, group in repeated.items():
            parts = {part for parent in group["parents"] for part in self.spec.spaces[parent].parts}
            self.parents.update({parent: self.spec.spaces[parent].parts
                                 for parent in group["parents"]})
            for space, found in self.occurrences.items():
                if parts & {leaf for leaf, _ in found}:
                    self.paired.add(space)
                    self.leaves_of[space].add(order)
                    self.dependents.setdefault(order, []).append(space)

    def __call__(self, leaf: str, among: torch.Tensor | None = None) -> torch.Tensor:
        """The joint ``(2 d × 2 d)`` weight similarity of ``leaf`` under the current plans;
        only between the units ``among`` where given (the rest 0)."""
        axes, units, aligned = self._layout(leaf)
        versions = tuple((self.versions[space], self.known(space)) for space in aligned)
        versions += (None if among is None else tuple(among.tolist()),)
        kept = self.similarities.get(leaf)
        if kept is not None and kept[0] == versions:
            return kept[1]
        align_b = {space: self._alignment(space) if self.known(space) else None
                   for space in aligned}
        similarity = weight_similarity(self.params_a, self.params_b, axes, units, align_b,
                                       self.spec.spaces[leaf].size, among, self.cross_only)
        self._keep(leaf, versions, similarity)
        return similarity

    def _keep(self, leaf: str, versions: tuple, similarity: torch.Tensor) -> None:
        """Caches ``leaf``'s similarity, dropping the oldest ones past the byte budget (a
        wide model's similarities are as large as its statistics: recomputing one costs
        time, keeping all can exhaust memory)."""
        self.similarities.pop(leaf, None)
        self.similarities[leaf] = versions, similarity
        held = sum(kept.numel() * kept.element_size() for _, kept in self.similarities.values())
        while held > SIMILARITY_CACHE_BYTES and len(self.similarities) > 1:
            _, (_, dropped) = self.similarities.popitem(last=False)
            held -= dropped.numel() * dropped.element_size()

    def known(self, space: str) -> bool:
        """Whether B's order of ``space`` is known: no leaf of it is in :attr:`unknown`."""
        return self.unknown.isdisjoint(self.leaves_of[space])

    def ready(self, leaf: str) -> bool:
        """Whether a parameter that maps ``leaf``'s units to or from other units has all its
        other axes known (or none does): its similarity then rests on weights."""
        axes, units, _ = self._layout(leaf)
        connected = False
        for bound in axes.values():
            for index, (_, space) in enumerate(bound):
                if space not in units:
                    continue
                others = [other for i, (_, other) in enumerate(bound) if i != index]
                if others and all(self.known(other) for other in others):
                    return True
                connected |= bool(others)
        return not connected

    def replaced(self, leaf: str, old: MergePlan | None) -> None:
        """Forgets what was derived from ``old``, the plan of ``leaf`` before the one now in
        ``plans``, unless both merge B's units alike."""
        new = self.plans[leaf].merge_b.detach().to("cpu", torch.float64)
        if old is not None and not new.is_sparse and not old.merge_b.is_sparse \
                and torch.equal(old.merge_b.detach().to("cpu", torch.float64), new):
            return
        self.permutations.pop(leaf, None)
        for space in self.spaces_of.get(leaf, []) + self.dependents.get(leaf, []):
            self.alignments.pop(space, None)
            self.versions[space] += 1

    def _layout(self, leaf: str) -> tuple[dict, dict, tuple[str, ...]]:
        """The parameters bound along a space where ``leaf`` occurs (in binding order), the
        places of its units in each such space, and the spaces whose alignments it reads: the
        other bound axes of those parameters."""
        if leaf not in self.layouts:
            if leaf in self.parents:
                units = _parent_units(self.parents[leaf], self.spaces_of, self.occurrences)
            else:
                units = {space: [positions for found, positions in self.occurrences[space]
                                 if found == leaf]
                         for space in self.spaces_of.get(leaf, ())}
            axes = {key: bound for key, bound in self.axes.items()
                    if any(space in units for _, space in bound)}
            aligned = {other_space: None for bound in axes.values()
                       for index, (_, space) in enumerate(bound) if space in units
                       for other, (_, other_space) in enumerate(bound) if other != index}
            self.layouts[leaf] = axes, units, tuple(aligned)
        return self.layouts[leaf]

    def _alignment(self, space: str) -> torch.Tensor:
        """B's alignment of ``space``: a permutation index, or twice the full merge matrix."""
        if space not in self.alignments:
            index = self._permutation(space)
            self.alignments[space] = index if index is not None else \
                2.0 * full_plan(self.spec, space, self.plans).merge_b
        return self.alignments[space]

    def _permutation(self, space: str) -> torch.Tensor | None:
        """The index of twice the full merge matrix of ``space``, where every leaf's is a
        permutation and the leaves' occurrences tile the space; else None."""
        if space in self.paired:
            return None  # B's units of the parts sit where the block order's plan puts them
        size, found = self.spec.spaces[space].size, self.occurrences[space]
        placed = torch.cat([positions for _, positions in found])
        if not torch.equal(placed.sort().values, torch.arange(size)):
            return None  # units not covered, or covered twice: not a permutation
        index = torch.empty(size, dtype=torch.long)
        for leaf, positions in found:
            if leaf not in self.permutations:
                merge_b = self.plans[leaf].merge_b.detach().to("cpu", torch.float64)
                self.permutations[leaf] = as_permutation(2.0 * merge_b)
            perm = self.permutations[leaf]
            if perm is None:
                return None
            index[positions] = positions[perm]
        return index


def _parent_units(parts: tuple[str, ...], spaces_of: Mapping[str, list[str]],
                  occurrences_of: Mapping[str, list[Occurrence]]) -> dict[str, list[torch.Tensor]]:
    """Where the units of a blocks space made of ``parts`` (block i's inside is part i) sit in
    every space holding its parts: the k-th place takes the k-th occurrence of every part (the
    output projection's input holds each value head once per query head it serves)."""
    units: dict[str, list[torch.Tensor]] = {}
    for space in dict.fromkeys(s for part in parts for s in spaces_of.get(part, [])):
        found = [[positions for leaf, positions in occurrences_of[space] if leaf == part]
                 for part in parts]
        places = min(len(positions) for positions in found)
        units[space] = [torch.cat([positions[k] for positions in found]) for k in range(places)]
    return units


# ---------------------------------------------------------------------------------------------
# Solving leaves
# ---------------------------------------------------------------------------------------------
def keep_order(joint: torch.Tensor, d_a: int, d_b: int) -> MergePlan:
    """A :data:`~mergec.algorithms.solvers.BlockSolver` that averages unit i with unit i."""
    return solvers.average(d_a)


def _solver(method: str, alpha: float, beta: float) -> BlockSolver:
    """The solver of a same-width leaf, or of one block pair, for ``method``."""
    if method == "average":
        return keep_order
    if method in ("permute", "weight-match"):
        return solvers.permute_joint
    return solvers.ZipSolver(alpha, beta)  # zip, and mudsc's zip


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
    symmetry: str = "auto"  # "auto": rotation spaces are rotated; "permutation": permuted
    name: ClassVar[str] = "match"

    def __post_init__(self) -> None:
        """Refuses an unknown method when the pass is built, before any work."""
        if self.method not in METHODS:
            raise MergeError(f"match: unknown method {self.method!r}; choose one of "
                             f"{', '.join(METHODS)}")

    def run(self, state: PipelineState) -> PipelineState:
        """The state with a plan and a summary for every space of the two models."""
        graphs, specs = state.require("graphs", self.name), state.require("specs", self.name)
        spec_a, spec_b = specs
        widths = target_widths(spec_a, spec_b, self.width)
        resizing = spec_a.shapes != spec_b.shapes or any(
            widths[s] != spec_a.spaces[s].size for s in widths)
        plans, summaries = self._plan(
            spec_a, state.moments, parameters_of(graphs[0]), parameters_of(graphs[1]),
            spec_b=spec_b, widths=widths if resizing else None, exclude=state.unaligned_spaces,
            attention=attention_roles(graphs[0], spec_a),
            # align-depth makes the shallow model "A"; the caller's A is then plans' B
            outputs_in=int(state.depth is not None and state.depth.swapped))
        return state.evolve(plans=plans, summaries=summaries)

    def _plan(self, spec: UnitSpec, moments: Mapping[str, JointMoments],
              params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor],
              spec_b: UnitSpec | None = None, widths: Mapping[str, int] | None = None,
              exclude: frozenset[str] = frozenset(), attention: Mapping[str, str] | None = None,
              outputs_in: int = 0) -> tuple[dict[str, MergePlan], dict[str, dict]]:
        """Plans for every space. ``spec_b`` is B's spec where B's widths differ from A's;
        ``widths`` the merged width of each leaf that is not to keep its width (elastic zip:
        models of different width, or a merged model wider or narrower than its parents).
        Leaves in ``exclude`` keep unit i with unit i (blocks that only one model has). The
        merged units of spaces that reach an output take model ``outputs_in``'s order."""
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
        for space in output_leaves(spec):  # merged outputs in A's basis where they can be
            relabel = solvers.in_basis_of if self.rotates(spec, space) else solvers.in_order_of
            plans[space] = relabel(plans[space], outputs_in)
        return self._full(spec, plans), summary

    def _same_width(self, spec: UnitSpec, moments: Mapping[str, JointMoments],
                    leaves: list[str], params_a: Mapping[str, torch.Tensor],
                    params_b: Mapping[str, torch.Tensor]
                    ) -> tuple[dict[str, MergePlan], dict[str, dict]]:
        """Leaf plans of ``leaves``, all of one width in both models. One sweep over the leaves
        (permute and zip then break the ties of constant units by weights: :meth:`_break_ties`);
        mudsc makes two, the second with the weight similarity under the first one's plans;
        weight-match makes a first sweep from the fixed spaces (:meth:`_first_sweep`), then
        sweeps in a random order until no plan changes (at most ``max_iter``)."""
        all_leaves = [s for s in spec.spaces if is_leaf(spec, s)]
        plans: dict[str, MergePlan] = {s: solvers.average(spec.spaces[s].size)
                                       for s in all_leaves}
        summary: dict[str, dict] = {}
        groups = block_groups(spec, all_leaves, free_repeated=True)
        solve = _solver(self.method, self.alpha, self.beta)
        weights = WeightSimilarities(spec, params_a, params_b, plans, groups["repeated"],
                                     cross_only=self.method == "weight-match") \
            if self.method in ("weight-match", "mudsc") else None
        similarity = functools.partial(self._similarity, moments, weights, spec=spec)
        update = functools.partial(_update, plans, weights, summary)
        if self.method == "weight-match":
            self._first_sweep(spec, leaves, groups, solve, similarity, weights, update)
        order, rng = list(leaves), random.Random(self.seed)
        for _ in range({"mudsc": 2, "weight-match": self.max_iter}.get(self.method, 1)):
            if self.method == "weight-match":
                rng.shuffle(order)
            changed = False
            for leaf in order:
                solved = self._solve_leaf(spec, leaf, groups, solve, similarity)
                if solved is not None:  # else not solved here (see _solve_leaf): keeps its plan
                    changed |= update(leaf, *solved)
            if self.method == "weight-match" and not changed:
                break
        if self.method in ("permute", "zip"):
            self._break_ties(spec, moments, leaves, groups, solve, plans, summary,
                             (params_a, params_b))
        return {s: plans[s] for s in leaves}, summary

    def _break_ties(self, spec: UnitSpec, moments: Mapping[str, JointMoments],
                    leaves: list[str], groups: dict, solve: BlockSolver,
                    plans: dict[str, MergePlan], summary: dict[str, dict],
                    params: tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]
                    ) -> None:
        """Activation matching's last step. A unit constant on the calibration data (dead)
        correlates with nothing, so the statistics cannot tell such units apart; the leaves
        that hold some are solved again (with their groups), ties broken by the weight
        similarity under the plans found so far
        (:func:`~mergec.algorithms.covariance.activation_similarity`'s ``tie_break``), until
        no plan changes. A free leaf no activation carries (DeBERTa's relative position
        embeddings, read by the attention's position projections as a parameter) has no
        statistics at all: it is solved on its weight similarity alone, first in weight matching's
        order (:meth:`_first_sweep`: Swin v2's position-bias MLP, which reads a constant table,
        has a hidden space and a 2-wide input no activation tells apart). A leaf observed on
        fewer samples than it has units ties varying units too (collinear on those samples:
        :func:`~mergec.algorithms.covariance.activation_similarity`'s ``tied``); a rotation
        leaf so observed (a pooled output over a few sequences) has a cross moment of too low
        a rank to fix a rotation: the weight similarity, at a small share, fixes the rest
        (:meth:`_rotation_similarity`). merge(A, π(A)) then recovers A wherever the weights
        identify π."""
        def unsettled(leaf: str) -> bool:
            if leaf not in moments:
                return spec.is_free(leaf)
            few = _underdetermined(moments[leaf], spec.spaces[leaf].size)
            return few or (not self.rotates(spec, leaf)
                           and len(_constant_units(moments[leaf])) > 0)

        tied = dict.fromkeys(_members(spec, leaf, groups)[0] for leaf in leaves
                             if unsettled(leaf))
        if not tied:
            return
        # permute's solvers and every tie-break read the cross-model block only; zip solves a
        # leaf without statistics on its weights alone, within-model merges included
        weights = WeightSimilarities(spec, *params, plans, groups["repeated"],
                                     cross_only=self.method == "permute")
        similarity = functools.partial(self._similarity, moments, None, spec=spec,
                                       ties=weights)
        update = functools.partial(_update, plans, weights, summary)
        blind = [leaf for leaf in tied if leaf not in moments]
        if blind:  # no statistics at all: propagated from the spaces whose order is known
            self._first_sweep(spec, blind, groups, solve, similarity, weights, update)
        for _ in range(self.max_iter):
            changed = False
            for leaf in tied:
                solved = self._solve_leaf(spec, leaf, groups, solve, similarity)
                if solved is not None:
                    changed |= update(leaf, *solved)
            if not changed:
                break

    def _first_sweep(self, spec: UnitSpec, leaves: list[str], groups: dict, solve: BlockSolver,
                     similarity: Callable[[str], torch.Tensor | None],
                     weights: WeightSimilarities, update: Callable[..., bool]) -> None:
        """Weight matching's first sweep: every leaf solved once, on the weights that connect
        it to spaces whose order is known (fixed spaces, leaves solved before it); the next leaf
        is the first, in graph order, that such weights connect (a group of blocks spaces: all
        its members), else the first left. The random sweeps that follow see every weight.

        Started from the identity, every space's order but the fixed ones is a guess, and
        weights read through wrong guesses are noise that can outweigh a leaf's true match
        (squeezenet: a squeeze conv's 128 input weights a unit against the 640 of the expand
        convs that read it) and leave the descent in a local optimum. Propagated from the
        model's inputs and outputs, the sweep recovers an exactly permuted copy: the true
        permutation, a global optimum, then changes nothing."""
        weights.unknown = {leaf for leaf in leaves if spec.is_free(leaf)} - groups["fixed_order"]
        pending = list(leaves)
        while pending:
            leaf = next((leaf for leaf in pending
                         if all(weights.ready(m) for m in _members(spec, leaf, groups))),
                        pending[0])
            pending.remove(leaf)
            solved = self._solve_leaf(spec, leaf, groups, solve, similarity)
            if solved is not None:
                update(leaf, *solved)
        weights.unknown = set()

    def rotates(self, spec: UnitSpec, leaf: str) -> bool:
        """Whether ``leaf`` is merged under rotations: its group is orthogonal, the symmetry
        option allows it and the method matches (``average`` keeps unit i with unit i)."""
        return self.symmetry == "auto" and self.method != "average" \
            and spec.spaces[leaf].group == ORTHOGONAL

    def _rotation_similarity(self, observed: JointMoments | None,
                             weights: torch.Tensor | None, share: float | None = None
                             ) -> torch.Tensor | None:
        """What a rotation space is aligned on: the joint second moment ``E[x xᵀ]`` of the
        activations (the least-squares map ``x_a ≈ Q x_b`` reads its cross block), the weight
        similarity for weight-match, and for mudsc both, each scaled to a unit cross block
        (weights at a ``share`` of the sum: MuDSC's β unless given)."""
        moment = None if observed is None else (observed.sum_outer / observed.count).cpu()
        if self.method == "weight-match" or moment is None:
            return weights
        if weights is None:
            return moment
        d = moment.shape[0] // 2

        def unit(matrix: torch.Tensor) -> torch.Tensor:
            return matrix / matrix[:d, d:].norm().clamp(min=1e-30)

        share = self.weight_beta if share is None else share
        return share * unit(weights) + (1 - share) * unit(moment)

    def _similarity(self, moments: Mapping[str, JointMoments],
                    weight_similarities: WeightSimilarities | None, leaf: str, spec: UnitSpec,
                    ties: WeightSimilarities | None = None, rotation: bool = False
                    ) -> torch.Tensor | None:
        """The joint similarity ``leaf`` is solved on, under the current leaf plans (those
        ``weight_similarities`` reads, for the methods that use weights; those ``ties`` reads,
        whose weight similarity breaks the ties of constant units for the methods that use
        activations only, and is all they know of a leaf without statistics); None where
        nothing is known of the leaf: it is then averaged, unit i with i. ``rotation``: the
        similarity of a rotation space (:meth:`_rotation_similarity`)."""
        observed = moments.get(leaf)
        if rotation:
            if weight_similarities is not None:
                return self._rotation_similarity(observed, weight_similarities(leaf))
            if ties is None:
                return self._rotation_similarity(observed, None)
            return self._rotation_similarity(observed, ties(leaf), TIE_SHARE)
        if weight_similarities is not None:
            weights = weight_similarities(leaf)
            if self.method == "weight-match" or observed is None:
                return weights
            activation = activation_similarity(observed, spec.spaces[leaf].size)
            return self.weight_beta * weights + (1 - self.weight_beta) * activation
        if observed is None:
            return ties(leaf) if ties is not None else None
        constant = _constant_units(observed)
        tie_break = ties(leaf, constant) if ties is not None and len(constant) else None
        tied = None if ties is None else functools.partial(ties, leaf)
        return activation_similarity(observed, spec.spaces[leaf].size, tie_break, tied=tied)

    def _solve_leaf(self, spec: UnitSpec, leaf: str, groups: dict, solve: BlockSolver,
                    similarity: Callable[[str], torch.Tensor | None]
                    ) -> tuple[dict[str, MergePlan], torch.Tensor] | None:
        """New plans from solving ``leaf`` (a blocks space: its whole group, once, with its
        first member) and the similarity of ``leaf`` they came from; None where the leaf is not
        solved: fixed, a block order (solved with its group), or without statistics."""
        space = spec.spaces[leaf]
        if not spec.is_free(leaf) or leaf in groups["order_of"] or leaf in groups["parts"]:
            return None
        if space.kind != "blocks":
            if self.rotates(spec, leaf):
                joint = similarity(leaf, rotation=True)
                solve = functools.partial(solvers.procrustes, ones_fixed=space.ones_fixed)
            else:
                joint = similarity(leaf)
                if self.method in ("zip", "mudsc") and leaf in output_leaves(spec):
                    # each unit of an output keeps a merged unit of its own, in A's basis
                    solve = solvers.ZipSolver(self.alpha, 0.0)
            return None if joint is None else ({leaf: solve(joint, space.size, space.size)}, joint)
        order = groups["key"].get(leaf, space.block_space)
        members = groups["members"][order]
        if leaf != members[0]:
            return None
        repeated = groups["repeated"].get(order)
        joints = [similarity(member, rotation=self.rotates(spec, member))
                  for member in members + (repeated or {}).get("parents", [])]
        if any(joint is None for joint in joints):
            return None  # no statistics for a member: the group stays averaged
        if repeated is not None:
            return self._solve_repeated(spec, order, members, joints, repeated, solve), joints[0]
        plans = self._solve_group(spec, order, members, joints, groups, solve)
        return plans, joints[0]

    def _solve_repeated(self, spec: UnitSpec, order: str, members: list[str],
                        joints: list[torch.Tensor], repeated: dict, solve: BlockSolver
                        ) -> dict[str, MergePlan]:
        """Two-level matching of grouped-query attention over the key/value head order
        ``order``: key/value head i of A and j of B score their keys' and values' best
        within-head matches and those of the n query heads each serves (query head i·n + r
        with j·n + r); the Hungarian pairs the key/value heads, query heads follow their
        group, and each value part (the inside of key/value head i) is its pair's plan."""
        count = spec.spaces[order].size
        spaces = list(members) + repeated["parents"]
        layouts = []  # (space, blocks of the space per key/value head, its block solver)
        scores = torch.zeros(count, count, dtype=torch.float64)
        for space_id, joint in zip(spaces, joints):
            space = spec.spaces[space_id]
            times = repeated["times"].get(space_id, 1)
            pinned = space.within_fixed is not None if not space.parts else \
                any(not spec.is_free(part) for part in space.parts)
            within = keep_order if pinned else solve
            width = space.size // space.block_count
            block_space = blocks.BlockSpace(joint, width, width, within, blocks.plan_score(within))
            layouts.append((space, times, block_space))
            triples = list(itertools.product(range(count), range(count), range(times)))
            pairs = (block_space.pair(a * times + r, b * times + r, count * times)
                     for a, b, r in triples)
            for (a, b, _), value in zip(triples, blocks.score_pairs(block_space.score, pairs,
                                                                   width, width)):
                scores[a, b] += value
        pairing = solvers.hungarian(scores)[1] if self.method != "average" \
            else torch.arange(count)
        plans = {order: solvers.pairing_plan(pairing)}
        for space, times, block_space in layouts:
            if not space.parts:
                repeat = (pairing[:, None] * times + torch.arange(times)).reshape(-1)
                plans[space.id] = blocks.paired_plan(block_space, repeat)
                continue
            for index, part in enumerate(space.parts):
                solver = solve if spec.is_free(part) else keep_order
                pair = block_space.pair(index, int(pairing[index]), count)
                plans[part] = solver(pair, block_space.width_a, block_space.width_b)
        return plans

    def _solve_group(self, spec: UnitSpec, order: str, members: list[str],
                     joints: list[torch.Tensor], groups: dict, solve: BlockSolver
                     ) -> dict[str, MergePlan]:
        """Two-level matching of the blocks spaces sharing the block order ``order`` (their
        blocks may differ in width: a grouped convolution's input and output). A pair of
        blocks scores the similarity its within-block plan merges; a space whose order inside
        blocks is pinned keeps it; a space whose heads rotate inside is aligned per block pair by
        Procrustes, the pair scored by the energy the rotation aligns. A fixed block order keeps
        block i with block i, and ``average`` pairs nothing."""
        count = spec.spaces[members[0]].block_count
        spaces = []
        for member, joint in zip(members, joints):
            within = keep_order if spec.spaces[member].within_fixed is not None else solve
            score = blocks.plan_score(within)
            if self.rotates(spec, member):  # heads rotated inside, paired by aligned energy
                within, score = solvers.procrustes, blocks.rotation_score
            width = spec.spaces[member].size // count
            spaces.append(blocks.BlockSpace(joint, width, width, within, score))
        pair = order not in groups["fixed_order"]
        pairing, plans = blocks.match_blocks(spaces, count, pair=pair and self.method != "average")
        new = dict(zip(members, plans))
        if pair and spec.is_free(order):
            new[order] = solvers.pairing_plan(pairing)
        return new

    @staticmethod
    def _full(spec: UnitSpec, leaf_plans: Mapping[str, MergePlan]) -> dict[str, MergePlan]:
        """Every space's plan from the leaves' plans (same-width models)."""
        return {s: full_plan(spec, s, leaf_plans) for s in spec.spaces}

    def _elastic(self, spec_a: UnitSpec, spec_b: UnitSpec, moments: Mapping[str, JointMoments],
                 widths: dict[str, int], leaves: list[str], elastic: set[str],
                 attention: Mapping[str, str]) -> tuple[dict[str, MergePlan], dict[str, dict]]:
        """Elastic zip (the heterogeneous-width method) on the leaves whose widths differ, heads
        and groups together with the spaces sharing their block order; every other leaf is
        averaged, unit i with unit i."""
        if self.method != "zip":
            raise MergeError(f"match: models or merged widths differ, which only method 'zip' "
                             f"(elastic zip) handles, not {self.method!r}")
        groups = block_groups(spec_a, leaves)
        plans: dict[str, MergePlan] = {}
        summary: dict[str, dict] = {}
        elastic = set(elastic)  # grows by every space of a group that changes width
        for order, members in groups["members"].items():
            if order in elastic or elastic.intersection(members):
                new, group_summary = self._elastic_group(spec_a, spec_b, moments, widths, order,
                                                         members, groups, attention)
                plans.update(new)
                summary.update(group_summary)
                elastic.update(new)
        for leaf in leaves:
            if leaf not in plans:
                plans[leaf], leaf_summary = self._elastic_leaf(
                    spec_a, spec_b, moments, widths, leaf, leaf in elastic, groups)
                summary.update(leaf_summary)
        merged = resized(spec_a, {s: plans[s].width for s in leaves})
        full = {s: full_plan(spec_a, s, plans, spec_b, merged) for s in spec_a.spaces}
        return full, summary

    def _elastic_group(self, spec_a: UnitSpec, spec_b: UnitSpec,
                       moments: Mapping[str, JointMoments], widths: Mapping[str, int],
                       order: str, members: list[str], groups: dict,
                       attention: Mapping[str, str]
                       ) -> tuple[dict[str, MergePlan], dict[str, dict]]:
        """Plans of the heads or groups sharing ``order``: zipped over blocks where the number
        of blocks changes, zipped inside paired blocks where only their size does."""
        sizes = (spec_a.spaces[order].size, spec_b.spaces[order].size)
        if order in groups["fixed_order"] or not spec_a.is_free(order):
            raise MergeError(f"match: the heads or groups of {', '.join(members)} (counts "
                             f"{sizes[0]} and {sizes[1]}) have a fixed order (grouped-query "
                             "attention, or separated parts); mergec cannot change their "
                             "count")
        target = widths.get(order, max(sizes))
        if sizes[0] == sizes[1] == target:
            return self._elastic_within(spec_a, spec_b, moments, order, members, widths,
                                        attention)
        return self._elastic_blocks(spec_a, spec_b, moments, order, members, target)

    def _elastic_leaf(self, spec_a: UnitSpec, spec_b: UnitSpec,
                      moments: Mapping[str, JointMoments], widths: Mapping[str, int], leaf: str,
                      elastic: bool, groups: dict) -> tuple[MergePlan, dict[str, dict]]:
        """The plan of one leaf outside the groups: elastic zip to its merged width where
        ``elastic`` (it must be a free flat space), else unit i with unit i; and its summary."""
        space_a, space_b = spec_a.spaces[leaf], spec_b.spaces[leaf]
        d_a, d_b = space_a.size, space_b.size
        if not elastic:
            return solvers.average(d_a), {}
        if space_a.kind != "flat" or not spec_a.is_free(leaf) or leaf in groups["order_of"]:
            raise MergeError(
                f"match: space {leaf} ({space_a.kind}, origin {space_a.origin}) has widths "
                f"{d_a} and {d_b}{'' if spec_a.is_free(leaf) else ' and is fixed'}; only "
                "free flat spaces, and heads or groups whose order is free, can change "
                "width")
        target = widths.get(leaf, max(d_a, d_b))
        plan = solvers.elastic_zip(elastic_similarity(moments, leaf, d_a, d_b), d_a, d_b,
                                   target=target, alpha=self.alpha)
        return plan, {leaf: {"width": target, "widths": [d_a, d_b]}}

    def _elastic_blocks(self, spec_a: UnitSpec, spec_b: UnitSpec,
                        moments: Mapping[str, JointMoments], order: str, members: list[str],
                        target: int) -> tuple[dict[str, MergePlan], dict[str, dict]]:
        """Elastic zip over heads or groups whose count differs
        (:func:`~mergec.algorithms.blocks.zip_blocks`) to ``target`` blocks of one size."""
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
        joints = [elastic_similarity(moments, member, counts[0] * size, counts[1] * size)
                  for member, size in zip(members, block_sizes)]
        pinned = [spec_a.spaces[member].within_fixed is not None for member in members]
        block_plan, member_plans = blocks.zip_blocks(joints, counts, block_sizes, pinned,
                                                     target, alpha=self.alpha)
        merged = [[("A", x) if x < counts[0] else ("B", x - counts[0]) for x in contributors]
                  for contributors in blocks.merged_blocks(block_plan)]
        plans = {order: block_plan, **dict(zip(members, member_plans))}
        summary = {order: {"width": target, "widths": list(counts), "merged blocks": merged}}
        for member, size in zip(members, block_sizes):
            summary[member] = {"width": target * size,
                               "widths": [counts[0] * size, counts[1] * size]}
        return plans, summary

    def _elastic_within(self, spec_a: UnitSpec, spec_b: UnitSpec,
                        moments: Mapping[str, JointMoments], order: str, members: list[str],
                        widths: Mapping[str, int], roles: Mapping[str, str]
                        ) -> tuple[dict[str, MergePlan], dict[str, dict]]:
        """Elastic zip inside heads whose count agrees and whose size differs
        (:func:`~mergec.algorithms.blocks.zip_paired_blocks`). Query and key heads of an
        attention whose scale is 1/sqrt(head size) are rescaled so that each model's attention
        logits keep their scale."""
        count = spec_a.spaces[order].size
        sizes, joints, scales = [], [], []
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
            joints.append(elastic_similarity(moments, member, count * size_a, count * size_b))
            scales.append(((size / size_a) ** 0.25, (size / size_b) ** 0.25)
                          if roles.get(member) == "qk" else (1.0, 1.0))
        pairing, member_plans = blocks.zip_paired_blocks(joints, count, sizes, scales,
                                                         alpha=self.alpha)
        plans = {order: solvers.pairing_plan(pairing), **dict(zip(members, member_plans))}
        summary = {order: {"width": count, "pairing": pairing.tolist()}}
        for member, (size_a, size_b, size) in zip(members, sizes):
            summary[member] = {"width": count * size,
                               "widths": [count * size_a, count * size_b]}
        return plans, summary


def block_groups(spec: UnitSpec, leaves: list[str], free_repeated: bool = False) -> dict:
    """Blocks spaces grouped by their shared block order. ``orders`` holds every space that is
    some space's block order: those are never matched on their own. ``fixed_order`` holds the
    orders that must stay the identity because a space with separated parts or a repeated
    order (grouped-query attention) also depends on them; ``free_repeated`` (same-width
    merges) frees those of grouped-query attention (:func:`_free_repeated`): ``key`` then
    names the group of each leaf whose order is repeated, ``repeated`` describes the group and
    ``parts`` holds the parts it solves."""
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
    groups = {"members": members, "order_of": orders, "fixed_order": fixed_order, "key": {},
              "repeated": {}, "parts": set()}
    if free_repeated:
        for order in sorted(fixed_order):
            _free_repeated(spec, order, groups)
    return groups


def _repeated_order(spec: UnitSpec, order_id: str) -> tuple[str, int] | None:
    """``(order, n)`` when block order ``order_id`` is the flat ``order`` with every block
    repeated ``n`` times (query heads over grouped key/value heads: a tiled ``((order, c),
    (None, n))``; n = 1 for ``order`` itself), else None."""
    space = spec.spaces[order_id]
    if space.kind == "flat":
        return order_id, 1
    if space.kind == "tiled" and len(space.factors) == 2 and space.factors[1][0] is None:
        base = space.factors[0][0]
        if base is not None and spec.spaces[base].kind == "flat":
            return base, space.factors[1][1]
    return None


def _free_repeated(spec: UnitSpec, order: str, groups: dict) -> None:
    """Frees the fixed block order ``order`` of ``groups`` for grouped-query attention, when
    every space over it (or over its blocks repeated) is a blocks leaf or holds separated
    parts that are the insides of its blocks (values, and the output projection's input, whose
    query head h reads the parts of key/value head h // n) and those parts appear nowhere
    else: the group is then matched in two levels over ``order`` (:meth:`Match._solve_repeated`)
    and each part is placed at the block its pair sits at (:func:`occurrences`)."""
    if spec.spaces[order].kind != "flat" or not spec.is_free(order):
        return
    leaves, parents, repeats, tiled = {}, [], [], set()
    for space in spec.spaces.values():
        if space.kind != "blocks" or space.block_space is None:
            continue
        found = _repeated_order(spec, space.block_space)
        if found is None:
            if order in _flat_factors(spec, space.block_space):
                return  # the order is used in a way this does not describe
            continue
        if found[0] != order:
            continue
        if found[1] > 1:
            tiled.add(space.block_space)
        if not space.parts:
            if spec.is_free(space.id):
                leaves[space.id] = found[1]
        elif found[1] == 1:
            parents.append(space)
        else:
            repeats.append((space, found[1]))
    parts = [part for parent in parents for part in parent.parts]
    if not leaves or not _parts_only_inside(spec, parts, parents, repeats):
        return
    groups["fixed_order"] -= {order} | tiled
    groups["members"][order] = [leaf for leaf in groups["members"].get(order, [])]
    for tiled_order in tiled:
        groups["members"].pop(tiled_order, None)
    groups["members"][order] += [leaf for leaf, n in leaves.items() if n > 1]
    groups["key"].update(dict.fromkeys(leaves, order))
    groups["repeated"][order] = {"times": leaves, "parents": [p.id for p in parents]}
    groups["parts"].update(parts)


def _flat_factors(spec: UnitSpec, space_id: str) -> set[str]:
    """The spaces a tiled space is made of (nothing for another kind)."""
    return {f for f, _ in spec.spaces[space_id].factors if f is not None}


def _parts_only_inside(spec: UnitSpec, parts: list[str], parents: list[Any],
                       repeats: list[tuple[Any, int]]) -> bool:
    """Whether the parts of ``parents`` (one blocks space each, over the order) are distinct,
    bound to no parameter and nested in no other space than their parents and ``repeats``
    (blocks spaces whose block h holds the part of block h // n of a parent)."""
    if len(set(parts)) != len(parts) or any(b.space in parts for b in spec.bindings):
        return False
    repeated = {tuple(parent.parts[h // n] for h in range(len(parent.parts) * n))
                for parent in parents for _, n in repeats}
    for space, _ in repeats:
        if tuple(space.parts) not in repeated:
            return False
    holders = {p.id for p in parents} | {space.id for space, _ in repeats}
    return not any(set(parts) & (set(other.parts) | _flat_factors(spec, other.id))
                   for other in spec.spaces.values() if other.id not in holders)


def _constant_units(moments: JointMoments) -> torch.Tensor:
    """The units of ``[x_a; x_b]`` constant on the calibration data, those whose correlation
    with themselves :meth:`~mergec.algorithms.covariance.JointMoments.correlation` sets to 0,
    found from the diagonal alone (a wide space's whole correlation costs d^2)."""
    mean_square = moments.sum_outer.diagonal() / moments.count
    variance = mean_square - moments.mean ** 2
    return (variance <= DEAD_UNIT_RELATIVE_VARIANCE * mean_square).nonzero().squeeze(1).cpu()


def _underdetermined(moments: JointMoments, units: int) -> bool:
    """Whether a space's moments leave its match open: observed on fewer samples than it has
    units, their cross block has a rank below the width. Procrustes then maps the directions no
    sample reached arbitrarily, and units collinear on the samples tie."""
    return float(moments.count) < units


def _members(spec: UnitSpec, leaf: str, groups: dict) -> list[str]:
    """The leaves solved together with ``leaf``: its group of blocks spaces, or itself."""
    space = spec.spaces[leaf]
    if space.kind == "blocks":
        return groups["members"].get(groups["key"].get(leaf, space.block_space), [leaf])
    return [leaf]


def _update(plans: dict[str, MergePlan], weights: WeightSimilarities | None,
            summary: dict[str, dict], leaf: str, new: Mapping[str, MergePlan],
            joint: torch.Tensor) -> bool:
    """Puts the plans of one solve of ``leaf`` (from its similarity ``joint``) into ``plans``
    and ``summary``, telling ``weights`` which are decided and replaced; whether any changed."""
    changed = False
    for member, plan in new.items():
        old, plans[member] = plans.get(member), plan
        changed |= not _same_plan(old, plan)
        if weights is not None:
            weights.unknown.discard(member)
            weights.replaced(member, old)
        summary[member] = _summary(plan, joint if member == leaf else None)
    return changed


def _same_plan(old: MergePlan | None, new: MergePlan) -> bool:
    """Whether a new plan equals the old one (coordinate descent stops when none changes)."""
    return old is not None and torch.equal(old.merge_b.to(new.merge_b), new.merge_b) \
        and torch.equal(old.merge_a.to(new.merge_a), new.merge_a)


def _summary(plan: MergePlan, joint: torch.Tensor | None) -> dict:
    """What the report keeps of a plan: width, how many A–B pairs, mean matched correlation."""
    together = solvers.together(plan)
    if not plan.unmerge_b.is_sparse and not solvers.is_binary(together):
        return _rotation_summary(plan, joint)
    result = {"width": plan.width, "cross_pairs": int((together > 0).sum())}
    if joint is not None:
        size = plan.dim_a
        cross = joint[:size, size:]
        pairs = together > 0
        result["matched_similarity"] = float(cross[pairs].mean()) if pairs.any() else 0.0
        result["identity_similarity"] = float(cross.diagonal().mean())
    return result


def _rotation_summary(plan: MergePlan, joint: torch.Tensor | None) -> dict:
    """The report of a rotation space: the mean similarity along the rotation (``tr(Qᵀ C) /
    d`` for the cross block ``C``, what a permutation's matched pairs average) and without it."""
    result: dict[str, Any] = {"width": plan.width, "group": ORTHOGONAL}
    if joint is not None:
        size = plan.dim_a
        cross = joint[:size, size:].to(torch.float64)
        rotation = 2.0 * plan.merge_b.detach().to("cpu", torch.float64)
        result["matched_similarity"] = float((cross * rotation).sum() / size)
        result["identity_similarity"] = float(cross.diagonal().mean())
    return result
