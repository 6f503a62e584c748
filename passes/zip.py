"""zip: emits the merged model.

Every parameter becomes Σ_m (M_m on its produced and elementwise axes) · W_m · (U_m on its
consumed axes). An entry with no produced or elementwise axis bound (a scalar parameter, a table
indexed only by non-features) averages the two models. The merged weights go into a copy of
model A's graph module, which keeps A's graph: same widths, same code.
"""
from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import fx
from torch.utils import _pytree as pytree

from mergec.algorithms.solvers import ManyPlan, MergePlan
from mergec.algorithms.tensors import apply_along, block_diagonal, diagonal_blocks
from mergec.errors import MergeError
from mergec.ir.fx import (
    OUTPUT_MAP,
    aten_name,
    attach,
    is_guard,
    module_device,
    output_names,
    owner_of,
)
from mergec.ir.spec import Binding, UnitSpec
from mergec.ir.state import OutputAffine, PipelineState

log = logging.getLogger(__name__)


def merge_entry(tensors: tuple[torch.Tensor, ...], bindings: list[Binding],
                plans: Mapping[str, MergePlan | ManyPlan]) -> torch.Tensor:
    """One merged state-dict entry from every model's tensor (two, or N with
    :class:`~mergec.algorithms.solvers.ManyPlan` plans).

    A merge matrix averages as it maps (for N models its rows sum to 1/N over each model's
    units), so an entry is averaged once whatever its number of output or elementwise axes: by
    a merge matrix where it has one, by 1/N where it has none, and each further such axis
    (a mixture of experts' ``(experts, out, in)`` weight bound along all three) is mapped by
    N · merge, which only moves units."""
    reference = tensors[0]
    if not reference.is_floating_point():
        return reference.clone()
    groups = _group_counts(tensors[0], bindings, plans)
    merged = None
    for model, tensor in enumerate(tensors):
        work = tensor.to(torch.float64)
        if groups is not None:
            work = block_diagonal(work, groups[model])
        for binding in bindings:
            plan = plans[binding.space]
            if binding.role == "consumes":
                work = apply_along(work, binding.axis, plan.unmerges[model].T)
            else:
                work = apply_along(work, binding.axis, plan.merges[model])
        if groups is not None:
            work = diagonal_blocks(work, groups[-1])
        merged = work if merged is None else merged + work
    mapped = sum(b.role != "consumes" for b in bindings)
    if mapped == 0:
        merged = merged / len(tensors)
    elif mapped > 1:
        merged = merged * len(tensors) ** (mapped - 1)
    return merged.to(reference.dtype)


def _group_counts(tensor: torch.Tensor, bindings: list[Binding],
                  plans: Mapping[str, MergePlan | ManyPlan]) -> tuple[int, ...] | None:
    """A grouped convolution's group counts in each model and merged (None for other entries):
    the channels of one group (the weight's input axis) stay, their number follows the width of
    the input space in each model and merged (a depthwise conv has as many groups as
    channels)."""
    grouped = next((b for b in bindings if b.groups > 1), None)
    if grouped is None:
        return None
    per_group = tensor.shape[grouped.axis]
    plan = plans[grouped.space]
    return tuple(d // per_group for d in plan.dims) + (plan.width // per_group,)


def _b_alone(tensor: torch.Tensor, bindings: list[Binding], plans: Mapping[str, MergePlan],
             factor: float) -> torch.Tensor:
    if not tensor.is_floating_point():
        return tensor.clone()
    zero = torch.zeros_like(tensor)
    alone = merge_entry((zero, tensor), bindings, plans)  # M_b W U_b, A contributing nothing
    if not any(b.role != "consumes" for b in bindings):
        alone = alone * 2  # merge_entry halved an entry with no output axis
    return (alone.to(torch.float64) * factor).to(tensor.dtype)


def merged_state(states: Sequence[Mapping[str, torch.Tensor]], spec: UnitSpec,
                 plans: Mapping[str, MergePlan | ManyPlan],
                 only_b: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
    """The merged state dict of the models' state dicts ``states`` (A's and B's, or N models'
    with :class:`~mergec.algorithms.solvers.ManyPlan` plans). ``only_b`` maps keys that come
    from model B alone (blocks that only B has) to a factor: the entry is factor · (B's entry
    in merged coordinates), where B's share of an average is one half."""
    only_b = only_b or {}
    by_key: dict[str, list[Binding]] = {}
    for binding in spec.bindings:
        by_key.setdefault(binding.key, []).append(binding)
    names = "AB" if len(states) == 2 else [f"model {index}" for index in range(len(states))]
    merged = {}
    for key, tensor_a in states[0].items():
        tensors = [tensor_a]
        bound = {b.axis for b in by_key.get(key, [])}
        for name, other in zip(names[1:], states[1:]):
            if key not in other:
                raise MergeError(f"zip: {name if len(states) > 2 else 'model B'} has no "
                                 f"state-dict entry {key!r}")
            tensor = other[key]
            if tensor_a.dim() != tensor.dim() or any(
                    tensor_a.shape[axis] != tensor.shape[axis]
                    for axis in range(tensor_a.dim()) if axis not in bound):
                raise MergeError(f"zip: {key!r} has shape {tuple(tensor_a.shape)} in "
                                 f"{names[0]} and {tuple(tensor.shape)} in {name}, and the "
                                 "axes that differ are not feature axes")
            tensors.append(tensor.to(tensor_a.device))
        if key in only_b:
            merged[key] = _b_alone(tensors[1], by_key.get(key, []), plans, only_b[key])
            continue
        merged[key] = merge_entry(tuple(tensors), by_key.get(key, []), plans)
    return merged


@dataclass(frozen=True)
class Zip:
    """The zip pass: a new graph module with the merged weights. With ``stop_at`` (a node name
    or module path every path crosses) only the trunk before it is merged; the module then
    returns the outputs of both models' tails. ``heads="separate"`` stops at the input of the
    output layer."""

    stop_at: str | None = None
    heads: str = "average"
    outputs: str = "auto"  # "both": a full merge returns its outputs in A's and in B's basis
    name: ClassVar[str] = "zip"

    def run(self, state: PipelineState) -> PipelineState:
        graphs, specs = state.require("graphs", self.name), state.require("specs", self.name)
        plans = state.require("plans", self.name)
        stop = self.stop_node(graphs[0])
        merged = self._emit(graphs[0], graphs[1], specs[0], plans, state.only_b, stop,
                            _affines(state))
        maps: list[dict] = []
        if stop is None:
            # align-depth makes the shallow model "A"; the caller's A is then plans' B
            own = 1 if state.depth is not None and state.depth.swapped else 0
            bases = (own, 1 - own) if self.outputs == "both" else (own,)
            maps = map_outputs(merged, specs[0], plans, bases, _affines(state))
        if specs[0].shapes != specs[1].shapes or any(
                plan.width != specs[0].spaces[s].size for s, plan in plans.items()):
            check_runs(merged, state.example)
        return state.evolve(merged=merged, output_maps=tuple(maps))

    def _emit(self, module_a: fx.GraphModule, module_b: fx.GraphModule, spec: UnitSpec,
              plans: Mapping[str, MergePlan], only_b: Mapping[str, float],
              stop: fx.Node | None, affines: Sequence[Mapping[int, OutputAffine]] = ()
              ) -> fx.GraphModule:
        state = merged_state((module_a.state_dict(), module_b.state_dict()), spec, plans,
                             only_b)
        if stop is None:
            return full_module(module_a, state, plans, spec)
        return partial_of((module_a, module_b), spec, plans, state, stop, affines)

    def stop_node(self, module: fx.GraphModule) -> fx.Node | None:
        if self.stop_at is not None:
            return find_stop_node(module, self.stop_at)
        if self.heads == "separate":
            return last_feature_node(module)
        return None


def _affines(state: PipelineState) -> tuple[Mapping[int, OutputAffine], ...]:
    """fold-norms' output affines in the order of the graphs (align-depth may swap them)."""
    affines = tuple(state.output_affines) or ({}, {})
    return affines[::-1] if state.depth is not None and state.depth.swapped else affines


# ---------------------------------------------------------------------------------------------
# Outputs: a free space that reaches an output is mapped back into a model's basis there
# ---------------------------------------------------------------------------------------------
def map_outputs(module: fx.GraphModule, spec: UnitSpec, plans: Mapping[str, MergePlan],
                bases: tuple[int, ...], affines: Sequence[Mapping[int, OutputAffine]] = ()
                ) -> list[dict]:
    """Rewrites the merged module's outputs into the bases of the models in ``bases`` (0: A,
    1: B): each output axis in a free space is multiplied by that model's unmerge matrix
    (``x_a ≈ unmerge_a z``), by selection where the matrix picks one merged unit per unit. A
    map that is the identity (permute, weight-match, rotations: the merged units are A's)
    adds nothing. Then the model's own norm gain and shift that fold-norms took into the
    output (``affines[basis]``, by flat output) are applied. With two bases the module returns
    the outputs twice, (in A's, in B's), each of the model's output type. Returns one record
    per map: output, space, basis, form."""
    graph = module.graph
    output = graph.find_nodes(op="output")[0]
    result, flat = output.args[0], _flat(module)
    names = [name for name, _ in output_names(module)]
    records: list[dict] = []
    mapped: list[list[fx.Node]] = []
    with graph.inserting_before(output):
        for basis in bases:
            values = []
            own = affines[basis] if basis < len(affines) else {}
            for index, (node, axes, name) in enumerate(zip(flat, spec.outputs, names)):
                for axis, space in enumerate(axes):
                    if space is None or not spec.is_free(space) or space not in plans:
                        continue
                    plan = plans[space]
                    matrix = plan.unmerge_a if basis == 0 else plan.unmerge_b
                    node, form = _map_axis(module, node, axis, matrix, len(records))
                    records.append({"output": name, "space": space, "basis": "ab"[basis],
                                    "map": form})
                if index in own:
                    node, form = _apply_affine(module, node, flat[index], own[index],
                                               f"{basis}_{index}", len(bases) == 1)
                    records.append({"output": name, "basis": "ab"[basis], "map": form})
                values.append(node)
            mapped.append(values)
    if all(record["map"] == "identity" for record in records) and len(bases) == 1:
        return records
    _set_outputs(module, output, result, mapped)
    return records


def _apply_affine(module: fx.GraphModule, node: fx.Node, unmapped: fx.Node,
                  affine: OutputAffine, name: str, alone: bool) -> tuple[fx.Node, str]:
    """The output ``node`` with a model's last norm's affine: put back into the merged norm
    (form "identity") where the output is the norm's own, unmapped, read by nothing else, and
    returned in one basis; else applied after the map (:func:`output_affine`)."""
    if alone and node is unmapped and affine.norm is not None:
        for key, tensor in zip(affine.norm, (affine.gain, affine.shift)):
            if key is not None:
                owner, attr = owner_of(module, key)
                getattr(owner, attr).data.copy_(tensor)
        return node, "identity"
    return output_affine(module, node, affine, name), "the model's last norm's gain and shift"


def output_affine(module: fx.GraphModule, node: fx.Node, affine: OutputAffine, name: str
                  ) -> fx.Node:
    """``node ⊙ gain + shift`` along its last axis (a norm's affine that fold-norms took into
    the output), the tensors attached as buffers of ``module``."""
    graph = module.graph
    for tensor, op, part in zip((affine.gain, affine.shift),
                                (torch.ops.aten.mul.Tensor, torch.ops.aten.add.Tensor),
                                ("gain", "shift")):
        if tensor is not None:
            attach(module, f"{OUTPUT_MAP}_{part}_{name}", tensor.detach().clone(),
                   parameter=False)
            node = graph.call_function(op, (node, graph.get_attr(f"{OUTPUT_MAP}_{part}_{name}")))
    return node


def _map_axis(module: fx.GraphModule, node: fx.Node, axis: int, matrix: torch.Tensor,
              index: int) -> tuple[fx.Node, str]:
    """``node`` with axis ``axis`` multiplied by ``matrix`` (d × r), and how: "identity",
    "selection" (``index_select`` of one merged unit per unit) or "matrix"."""
    matrix = (matrix.to_dense() if matrix.is_sparse else matrix).to(torch.float32).cpu()
    rows, width = matrix.shape
    picked = matrix.argmax(dim=1)
    if rows == width and torch.equal(matrix, torch.eye(rows)):
        return node, "identity"
    graph, name = module.graph, f"{OUTPUT_MAP}_{index}"
    if torch.equal(torch.eye(width)[picked], matrix):
        attach(module, name, picked, parameter=False)
        return graph.call_function(torch.ops.aten.index_select.default,
                                   (node, axis, graph.get_attr(name))), "selection"
    attach(module, name, matrix.T.contiguous(), parameter=False)
    moved = graph.call_function(torch.ops.aten.movedim.int, (node, axis, -1))
    product = graph.call_function(torch.ops.aten.matmul.default, (moved, graph.get_attr(name)))
    return graph.call_function(torch.ops.aten.movedim.int, (product, -1, axis)), "matrix"


def _set_outputs(module: fx.GraphModule, output: fx.Node, result: Any,
                 mapped: list[list[fx.Node]]) -> None:
    """The output node returns ``mapped`` (one flat list per basis) in the model's structure;
    several bases are returned side by side, as a tuple of the model's outputs."""
    if len(mapped) == 1:
        values = mapped[0] if isinstance(result, (tuple, list)) else mapped[0][0]
        output.args = (type(result)(values) if isinstance(result, (tuple, list)) else values,)
    else:
        output.args = ([node for values in mapped for node in values],)
        codegen = module.graph._codegen
        info = getattr(codegen, "pytree_info", None)
        if info is not None and info.out_spec is not None:
            leaves = list(range(info.out_spec.num_leaves))
            one = pytree.tree_unflatten(leaves, info.out_spec)
            out_spec = pytree.tree_structure(tuple(one for _ in mapped))
            codegen.pytree_info = info._replace(out_spec=out_spec)
            module._out_spec = out_spec
        else:  # a graph without export's output tree: a tuple of the model's outputs
            output.args = (tuple(tuple(values) if isinstance(result, (tuple, list))
                                 else values[0] for values in mapped),)
    module.graph.lint()
    module.recompile()


def check_runs(module: fx.GraphModule, example: tuple) -> None:
    """A merged model of new widths must run: a size the graph fixes elsewhere would not."""
    device = module_device(module)
    try:
        with torch.no_grad():
            module(*(t.to(device) for t in example))
    except Exception as error:  # noqa: BLE001 - reported with what the user can do
        raise MergeError(f"zip: the merged model at its new widths does not run ({error}); a "
                         "size in the graph is fixed by something mergec does not rewrite. "
                         "Merge at the models' own width (width='a').") from error


def full_module(module: fx.GraphModule, state: Mapping[str, torch.Tensor],
                plans: Mapping[str, MergePlan | ManyPlan], spec: UnitSpec) -> fx.GraphModule:
    """A copy of ``module`` (model A's graph) holding the merged state dict ``state``, resized
    to the plans' widths where they differ from A's."""
    merged = copy.deepcopy(module)
    original = merged.state_dict()
    if all(state[key].shape == original[key].shape for key in state):
        merged.load_state_dict(state)
    else:
        resize_module(merged, state, {s: p.width for s, p in plans.items()}, spec)
    return merged


def resize_module(module: fx.GraphModule, state: Mapping[str, torch.Tensor],
                  widths: Mapping[str, int], spec: UnitSpec) -> None:
    """Puts tensors of new widths into ``module`` and rewrites the literal sizes of reshapes
    whose axes are spaces, so that the graph runs at the merged widths."""
    parameters = {name for name, _ in module.named_parameters()}
    for key, value in state.items():
        owner_path, _, name = key.rpartition(".")
        delattr(module.get_submodule(owner_path) if owner_path else module, name)
        attach(module, key, value, key in parameters)
    rewrite_sizes(module, widths, spec)


def rewrite_sizes(module: fx.GraphModule, widths: Mapping[str, int], spec: UnitSpec,
                  nodes: set[fx.Node] | None = None) -> None:
    """Rewrites the literal sizes of reshapes (of ``nodes``, default all) whose axes are spaces
    to the spaces' merged widths."""
    sized = {"view", "reshape", "_unsafe_view", "expand", "new_zeros", "new_ones", "new_empty"}
    for node in module.graph.nodes:
        if nodes is not None and node not in nodes:
            continue
        name = aten_name(node)
        if name in _GROUPS_ARGUMENT or name == "split_with_sizes":
            _rewrite_input_sizes(node, name, widths, spec)
            continue
        units = node.meta.get("mergec")
        if not name or units is None or not units.spaces:
            continue
        if name in ("layer_norm", "group_norm"):
            _rewrite_norm_sizes(node, name, widths, spec)
            continue
        if name == "unflatten":  # (input, dim, sizes): the sizes are output axes dim...
            rank = len(units.spaces) - len(node.args[2]) + 1
            first = node.args[1] % rank
            sizes = _resized(node, list(node.args[2]), units.spaces[first:], widths, spec)
            if sizes is not None:
                node.args = (node.args[0], node.args[1], sizes) + tuple(node.args[3:])
            continue
        if name not in sized:
            continue
        sizes = _resized(node, list(node.args[1]), units.spaces, widths, spec)
        if sizes is not None:
            node.args = (node.args[0], sizes) + tuple(node.args[2:])
    module.graph.lint()
    module.recompile()


def _resized(node: fx.Node, sizes: list, spaces: tuple, widths: Mapping[str, int],
             spec: UnitSpec) -> list | None:
    """``sizes`` (literal sizes of the axes whose spaces are ``spaces``) at the merged widths,
    or None where none changes."""
    changed = False
    for axis, space_id in enumerate(spaces):
        if space_id is not None and axis < len(sizes) and isinstance(sizes[axis], int) \
                and sizes[axis] == spec.spaces[space_id].size:
            sizes[axis] = widths[space_id]
            changed = True
        # heads split off a blocks space: the axis after the heads is the head size
        blocks = _split_blocks(node, space_id, spec)
        if blocks is not None and axis + 1 < len(sizes) \
                and sizes[axis + 1] == blocks.block_size and blocks.id in widths:
            sizes[axis + 1] = widths[blocks.id] // widths[space_id]
            changed = True
    return sizes if changed else None


# the position of a convolution's ``groups`` argument
_GROUPS_ARGUMENT = {"conv1d": 6, "conv2d": 6, "conv3d": 6, "convolution": 8}


def _rewrite_input_sizes(node: fx.Node, name: str, widths: Mapping[str, int],
                         spec: UnitSpec) -> None:
    """Literals sized by the input's channel space: a grouped (depthwise) convolution's group
    count, which keeps the channels per group, and the sizes of ``split_with_sizes``, which
    become the merged sizes of the composite space's parts."""
    source = node.args[0]
    units = source.meta.get("mergec") if isinstance(source, fx.Node) else None
    if units is None or not units.spaces:
        return
    if name == "split_with_sizes":
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        space = spec.spaces.get(units.spaces[dim]) if units.spaces[dim] is not None else None
        if space is not None and space.kind == "composite" \
                and [spec.spaces[part].size for part in space.parts] == list(node.args[1]):
            sizes = [widths.get(part, spec.spaces[part].size) for part in space.parts]
            node.args = (source, sizes) + tuple(node.args[2:])
        return
    position = _GROUPS_ARGUMENT[name]
    groups = node.args[position] if len(node.args) > position else node.kwargs.get("groups", 1)
    channels = units.spaces[1] if len(units.spaces) > 1 else None
    if groups == 1 or channels is None or channels not in widths:
        return
    merged = widths[channels] * groups // spec.spaces[channels].size
    if len(node.args) > position:
        node.args = node.args[:position] + (merged,) + node.args[position + 1:]
    else:
        node.kwargs = {**node.kwargs, "groups": merged}


def _split_blocks(node: fx.Node, order: str | None, spec: UnitSpec) -> Any:
    """The blocks space of ``node``'s input whose blocks ``node`` splits into axis ``order``."""
    if order is None or not isinstance(node.args[0], fx.Node):
        return None
    units = node.args[0].meta.get("mergec")
    for space_id in (units.spaces or ()) if units is not None else ():
        space = spec.spaces.get(space_id) if space_id is not None else None
        if space is not None and space.kind == "blocks" and space.block_space == order:
            return space
    return None


def _rewrite_norm_sizes(node: fx.Node, name: str, widths: Mapping[str, int],
                        spec: UnitSpec) -> None:
    """LayerNorm's normalized shape (the trailing axes) and GroupNorm's group count are
    literals of the call: set them to the merged widths."""
    units = node.meta["mergec"]
    if name == "layer_norm":
        shape = list(node.args[1])
        trailing = units.spaces[len(units.spaces) - len(shape):]
        for axis, space_id in enumerate(trailing):
            if space_id is not None and shape[axis] == spec.spaces[space_id].size:
                shape[axis] = widths.get(space_id, shape[axis])
        node.args = (node.args[0], shape) + tuple(node.args[2:])
        return
    channels = units.spaces[1] if len(units.spaces) > 1 else None
    space = spec.spaces.get(channels) if channels is not None else None
    if space is not None and space.block_space is not None and isinstance(node.args[1], int):
        node.args = (node.args[0], widths.get(space.block_space, node.args[1])) \
            + tuple(node.args[2:])


def _space_ids_of(spec: UnitSpec, module: fx.GraphModule, node: fx.Node) -> list[str | None]:
    """The space of each axis of ``node``'s value (None for non-feature axes)."""
    units = node.meta.get("mergec")
    if units is None or units.spaces is None:
        raise MergeError(f"zip: stop node {node.name!r} carries no annotation; run "
                         "annotate-units on this graph first")
    ids = list(units.spaces)
    if sum(space_id is not None for space_id in ids) > 1:
        raise MergeError(f"zip: stop node {node.name!r} has several feature axes {ids}; stop "
                         "at a node with one")
    return ids


# ---------------------------------------------------------------------------------------------
# Partial zipping: merge the trunk up to a stop node, run both models' tails after it
# ---------------------------------------------------------------------------------------------
def find_stop_node(module: fx.GraphModule, stop_at: str) -> fx.Node:
    """The node named ``stop_at``, or the last node computed inside module path ``stop_at``."""
    inside = None
    for node in module.graph.nodes:
        if node.name == stop_at:
            return node
        stack = node.meta.get("nn_module_stack") or {}
        paths = [path for path, _ in stack.values()]
        if stop_at in paths or any(p.startswith(stop_at + ".") for p in paths):
            inside = node
    if inside is None:
        raise MergeError(f"zip: stop_at={stop_at!r} names no node and no module path of the "
                         "graph (see `mergec inspect` for node names)")
    return inside


def last_feature_node(module: fx.GraphModule) -> fx.Node:
    """The input of the layer that produces the (first) model output: where heads begin."""
    output = module.graph.find_nodes(op="output")[0]
    node = output.args[0]
    while isinstance(node, (tuple, list)):
        node = node[0]
    while isinstance(node, fx.Node) and node.op == "call_function":
        name = aten_name(node)
        if name in ("linear", "conv2d", "conv1d", "matmul", "mm"):
            return node.args[0]
        if name == "addmm":
            return node.args[1]
        node = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    raise MergeError("zip: heads='separate' could not find the layer that produces the output")


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = {node}, [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def check_cut(module: fx.GraphModule, stop: fx.Node) -> None:
    """Every path from a model input to an output must cross ``stop``. Paths through shapes
    only (``x.size(0)``: the batch, the tokens) do not count: they are the same in both
    models."""
    reached = {n for n in module.graph.nodes if n.op == "placeholder"} - {stop}
    for node in module.graph.nodes:
        if node is stop or node in reached or node.op == "placeholder":
            continue
        if node.op != "output" and not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        if any(parent in reached for parent in node.all_input_nodes):
            reached.add(node)
            if node.op == "output":
                raise MergeError(
                    f"zip: not every path from the inputs to the outputs crosses stop_at node "
                    f"{stop.name!r}: {node.format_node()} is reached around it. Choose a node "
                    "that every path crosses (e.g. a residual stream's add, not a branch).")


def partial_of(modules: Sequence[fx.GraphModule], spec: UnitSpec,
               plans: Mapping[str, MergePlan | ManyPlan], merged: Mapping[str, torch.Tensor],
               stop: fx.Node, affines: Sequence[Mapping[int, OutputAffine]] = ()) -> fx.GraphModule:
    """The partial merge of ``modules`` (two, or N with N-way plans) cut at ``stop``: the
    merged trunk (``merged``, the merged state) and every model's tail on its unmerged
    features, each tail's outputs with their model's ``affines`` (fold-norms') applied."""
    check_cut(modules[0], stop)
    axis, unmerges = None, tuple(None for _ in modules)
    for position, space_id in enumerate(_space_ids_of(spec, modules[0], stop)):
        if space_id is not None:
            axis = position
            unmerges = tuple(u.to_dense().to(torch.float32) for u in plans[space_id].unmerges)
    widths = {s: p.width for s, p in plans.items()}
    partial = partial_module(modules, stop, merged, unmerges, axis, widths, spec)
    if any(affines):
        _tail_affines(partial, [len(_flat(module)) for module in modules], affines)
    return partial


def _flat(module: fx.GraphModule) -> list[Any]:
    result = module.graph.find_nodes(op="output")[0].args[0]
    return list(result) if isinstance(result, (tuple, list)) else [result]


def _tail_affines(partial: fx.GraphModule, counts: list[int],
                  affines: Sequence[Mapping[int, OutputAffine]]) -> None:
    """Applies each model's output affines to its tail's outputs (returned one model after
    the other, ``counts[m]`` each)."""
    output = partial.graph.find_nodes(op="output")[0]
    values, start = list(output.args[0]), 0
    with partial.graph.inserting_before(output):
        for model, count in enumerate(counts):
            own = affines[model] if model < len(affines) else {}
            for index in range(count):
                if index in own:
                    values[start + index] = output_affine(partial, values[start + index],
                                                          own[index], f"{model}_{index}")
            start += count
    output.args = (tuple(values),)
    partial.graph.lint()
    partial.recompile()


def partial_module(modules: Sequence[fx.GraphModule], stop: fx.Node,
                   merged: Mapping[str, torch.Tensor], unmerge: tuple[torch.Tensor | None, ...],
                   axis: int | None, widths: Mapping[str, int] | None = None,
                   spec: UnitSpec | None = None) -> fx.GraphModule:
    """The merged trunk up to ``stop`` (a node of ``modules[0]``), then every model's tail on
    its unmerged features (``unmerge[m]``); returns (output of A's tail, output of B's tail),
    one per model. Each tail is copied from its own model's graph, so the models may differ
    in width; ``widths`` rewrites the trunk's sizes."""
    module_a = modules[0]
    trunk = _ancestors(stop)
    parameters = {name for name, _ in module_a.named_parameters()}
    root = torch.nn.Module()
    graph = fx.Graph()
    values: dict[fx.Node, fx.Node] = {}
    for node in module_a.graph.nodes:
        if node in trunk:
            values[node] = graph.node_copy(node, lambda n: values[n])
            if node.op == "get_attr":
                attach(root, node.target, merged[node.target], node.target in parameters)
    outputs = []
    states = [module.state_dict() for module in modules]
    prefixes = ("tail_a", "tail_b") if len(modules) == 2 else \
        tuple(f"tail_{index}" for index in range(len(modules)))
    for index, (prefix, module) in enumerate(zip(prefixes, modules)):
        as_a = dict(zip(module.graph.nodes, module_a.graph.nodes))
        own_stop = next(n for n, m in as_a.items() if m is stop)
        start = values[stop]
        if axis is not None:
            attach(root, f"{prefix}_unmerge", unmerge[index].T.contiguous(), False)
            matrix = graph.get_attr(f"{prefix}_unmerge")
            moved = graph.call_function(torch.ops.aten.movedim.int, (start, axis, -1))
            product = graph.call_function(torch.ops.aten.matmul.default, (moved, matrix))
            start = graph.call_function(torch.ops.aten.movedim.int, (product, -1, axis))
        tail_values: dict[fx.Node, fx.Node] = {own_stop: start}
        for node in module.graph.nodes:
            if as_a[node] in trunk or node.op in ("placeholder", "output") or is_guard(node):
                continue
            if node.op == "get_attr":
                target = f"{prefix}.{node.target}"
                attach(root, target, states[index][node.target].clone(),
                        node.target in parameters)
                tail_values[node] = graph.get_attr(target)
                continue
            tail_values[node] = graph.node_copy(
                node, functools.partial(_copied, tail_values, values, as_a))
        result = module.graph.find_nodes(op="output")[0].args[0]
        flat = result if isinstance(result, (tuple, list)) else (result,)
        outputs.extend(tail_values[n] if n in tail_values else values[as_a[n]] for n in flat)
    graph.output(tuple(outputs))
    partial = fx.GraphModule(root, graph)
    if widths is not None and spec is not None:
        rewrite_sizes(partial, widths, spec, set(values.values()))
    partial.graph.lint()
    partial.recompile()
    return partial


def _copied(tail_values: Mapping[fx.Node, fx.Node], values: Mapping[fx.Node, fx.Node],
            as_a: Mapping[fx.Node, fx.Node], node: fx.Node) -> fx.Node:
    """The emitted node of a tail's input: the tail's own copy, else the merged trunk's."""
    return tail_values[node] if node in tail_values else values[as_a[node]]
