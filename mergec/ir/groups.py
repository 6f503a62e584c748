"""The largest symmetry group of each space, read from the graph.

annotate-units finds spaces whose units can be *permuted*. Some of them admit more: a flat space
(or the inside of the heads of an attention)
whose tensors only pass through maps that commute with every orthogonal map (linear layers that
produce or consume it, sums, moves of other axes, scalar scales, norms whose statistics are
rotation-invariant) admits any orthogonal ``Q``: the layers that produce it multiplied by ``Q``,
those that consume it by ``Qᵀ``, the function unchanged (SliceGPT's computational invariance).
A pre-norm transformer's residual stream is such a space once ``fold-norms`` has moved the
LayerNorms' gains and shifts into the layers that read them.

Rules, per node that reads or writes the space (anything else restricts it to permutations, and
the first such node is the space's ``group_reason``):

* ``linear``, ``addmm``, ``conv`` (one group), ``embedding``, products with a parameter:
  linear in the activation; the space is an input or output feature axis;
* ``add``/``sub`` of tensors that all carry the space on the same axis;
* ``mul``/``div`` by a scalar or by a tensor that is constant along the space's axis; by a
  gain of ones (bound to the space, so the maps must keep the all-ones direction);
* ``x ** 2`` averaged or summed over the space's axis alone (an RMSNorm's mean square);
* moves that keep the space whole on one axis: views, transposes, selects and slices of other
  axes, ``cat`` of tensors that all carry it, means and sums over other axes, dropout, copies;
* ``scaled_dot_product_attention``: a head's queries and keys rotated alike (their dot
  products stay), or its values (the output carries the rotation on to the output projection);
* ``layer_norm`` with unit gain and zero shift: its centring commutes with the orthogonal maps
  that keep the all-ones direction (``ones_fixed``); ``rms_norm`` without a gain with all.

A free space that reaches a model output (a backbone's hidden states, which a merge matches)
admits rotations too: zip maps the output back into a model's basis by its unmerge matrix, and
fold-norms takes a last norm's gain and shift into the output, where zip applies them after
the map. An output kept in order is a fixed space.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
from torch import fx

from mergec.ir.fx import aten_name, attribute, call_arguments, module_path
from mergec.ir.spec import UnitSpec

LINEAR_OPS = {"linear", "addmm", "mm", "matmul", "bmm", "conv1d", "conv2d", "conv3d",
              "convolution", "conv_transpose1d", "conv_transpose2d", "embedding"}
ADDITIVE_OPS = {"add", "sub"}
SCALING_OPS = {"mul", "div"}
MOVES = {"select", "slice", "index", "index_select", "expand", "clone", "alias", "detach",
         "contiguous", "dropout", "transpose", "permute", "view", "reshape", "_unsafe_view",
         "flatten", "unflatten", "unsqueeze", "squeeze", "t", "cat", "stack", "_to_copy", "to",
         "type_as", "mean", "sum", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d",
         "adaptive_avg_pool2d", "repeat", "lift_fresh_copy", "narrow", "split", "getitem"}
#: Ops that read a tensor's metadata, not its values.
CHECKS = {"_assert_tensor_metadata", "sym_size", "sym_numel", "sym_stride", "_assert_scalar"}
ORTHOGONAL = "orthogonal"


def with_groups(graph_module: fx.GraphModule, spec: UnitSpec) -> UnitSpec:
    """``spec`` with the group of every flat free space and every blocks space (heads) that
    permutes freely inside its blocks: orthogonal (inside each block, for heads) where every
    node that reads or writes it allows it (the graph's nodes carry annotate-units' space
    ids)."""
    candidates = {s.id for s in spec.spaces.values() if spec.is_free(s.id) and (
        s.kind == "flat" or (s.kind == "blocks" and not s.parts and s.within_fixed is None))}
    if not candidates:
        return spec
    dynamic = _dynamic_nodes(graph_module.graph)
    reasons = _inside_structures(spec, candidates)
    centred: set[str] = set()
    seen: set[str] = set()
    for node in graph_module.graph.nodes:
        for space in _touched(node) & candidates:
            seen.add(space)
            if space in reasons:
                continue
            verdict = _verdict(graph_module, node, space, dynamic)
            if verdict == "centred":
                centred.add(space)
            elif verdict is not None:
                reasons[space] = verdict
    for space in candidates - seen:
        reasons.setdefault(space, "no node carries it as a feature axis")
    spaces = dict(spec.spaces)
    for space in candidates:
        if space in reasons:
            spaces[space] = dataclasses.replace(spaces[space], group_reason=reasons[space])
        else:
            blocks = spaces[space].kind == "blocks"
            spaces[space] = dataclasses.replace(spaces[space], group=ORTHOGONAL,
                                                ones_fixed=space in centred,
                                                **_sites(graph_module, space, dynamic, blocks))
    return dataclasses.replace(spec, spaces=spaces)


def _sites(graph_module: fx.GraphModule, space: str, dynamic: set[fx.Node], blocks: bool
           ) -> dict[str, Any]:
    """Where a rotation space is observed when it is aligned by a rotation (``sites``, pooled
    by collect-stats): a stream at every residual sum (one rotation serves it at every depth;
    its probe, the first node carrying it, a patch embedding, spans only as many directions as
    a patch has pixels), heads at every projection that writes them (the queries and the keys
    of one rotation)."""
    wanted = LINEAR_OPS if blocks else {"add"}
    sites = []
    for node in graph_module.graph.nodes:
        if aten_name(node) in wanted and node in dynamic:
            axes = [i for i, s in enumerate(_spaces(node)) if s == space]
            if len(axes) == 1:
                sites.append((node.name, axes[0]))
    return {"sites": tuple(sites)}


def _inside_structures(spec: UnitSpec, candidates: set[str]) -> dict[str, str]:
    """Flat spaces that are a part, factor or block order of a structured space: the nodes
    that carry the structured space act on them too, so they keep permutations."""
    reasons = {}
    for space in spec.spaces.values():
        inner = set(space.parts) | {f for f, _ in space.factors if f} | (
            {space.block_space} if space.block_space else set())
        for part in inner & candidates:
            reasons.setdefault(part, f"part of the {space.kind} space {space.id}")
    return reasons


def _spaces(node: Any) -> tuple:
    """The space id of each axis of a node's value (annotate-units' record), () if none: a
    plain feature axis's space, or for an axis inside the blocks of a blocks space (a head's
    units, split off) that space."""
    units = node.meta.get("mergec") if isinstance(node, fx.Node) else None
    if units is None or units.spaces is None:
        return ()
    within = units.within or (None,) * len(units.spaces)
    return tuple(plain or inner for plain, inner in zip(units.spaces, within))


def _touched(node: fx.Node) -> set[str]:
    """The spaces a node writes (on its value's axes) or reads (on its inputs' axes)."""
    found = {s for s in _spaces(node) if s is not None}
    for argument in node.all_input_nodes:
        found.update(s for s in _spaces(argument) if s is not None)
    return found


def _dynamic_nodes(graph: fx.Graph) -> set[fx.Node]:
    """The nodes computed from a model input (the others are parameters and constants)."""
    dynamic: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in dynamic for a in node.all_input_nodes):
            dynamic.add(node)
    return dynamic


def _verdict(graph_module: fx.GraphModule, node: fx.Node, space: str,
             dynamic: set[fx.Node]) -> str | None:
    """None where ``node`` commutes with every orthogonal map of ``space``; "centred" where
    with those that keep the all-ones direction; else why not."""
    path = module_path(node)
    where = f"node {node.name}" + (f" (module {path})" if path else "")
    if node.op in ("get_attr", "placeholder"):
        return None  # the nodes that use it decide
    if node.op == "output":
        return None  # a free space at an output is matched and mapped back there (zip)
    op = aten_name(node) or ("getitem" if node.op == "call_function" else node.op)
    if op in CHECKS:
        return None
    if op in LINEAR_OPS:
        return _linear(node, dynamic, where)
    if op in ADDITIVE_OPS:
        return _additive(node, space, where)
    if op in SCALING_OPS:
        return _scaling(graph_module, node, space, where)
    if op == "pow" or (op in ("mean", "sum") and aten_name(node.args[0]) == "pow"):
        return _squared_norm(node, space, where)
    if op in MOVES:
        kept = sum(1 for s in _spaces(node) if s == space)
        if op in ("split", "getitem") and not _spaces(node):
            return f"{op} of a tuple: {where}"
        if kept != 1:
            return f"{op} does not keep the space whole on one axis: {where}"
        return _moved_inputs(node, space, where)
    if op == "scaled_dot_product_attention":
        return _attention(node, space, where)
    if op == "layer_norm":
        return _layer_norm(graph_module, node, where)
    if op == "rms_norm":
        weight = call_arguments(node).get("weight")
        return None if _is_constant(graph_module, weight, 1.0) else f"rms_norm gain: {where}"
    return f"{op or node.op} admits permutations only: {where}"


def _linear(node: fx.Node, dynamic: set[fx.Node], where: str) -> str | None:
    """A linear layer: one operand is a parameter, and a convolution has one group."""
    operands = [a for a in node.args[:3] if isinstance(a, fx.Node)]
    if sum(1 for a in operands if a in dynamic) > 1:
        return f"a product of two activations: {where}"
    groups = call_arguments(node).get("groups", 1)
    if isinstance(groups, int) and groups > 1:
        return f"a grouped convolution: {where}"
    return None


def _attention(node: fx.Node, space: str, where: str) -> str | None:
    """Attention keeps the logits ``q·k`` under one rotation of the queries' and the keys'
    units inside each head, and carries a rotation of the values' units to its output."""
    last = [(_spaces(a) or (None,))[-1] for a in node.args[:3]]
    if space == last[0] == last[1] != last[2] or space == last[2] not in last[:2]:
        return None
    return f"attention reads the space otherwise than as one head's queries and keys or " \
        f"values: {where}"


def _axis_from_right(node: fx.Node, space: str) -> int | None:
    spaces = _spaces(node)
    positions = [i for i, s in enumerate(spaces) if s == space]
    return len(spaces) - positions[0] if len(positions) == 1 else None


def _additive(node: fx.Node, space: str, where: str) -> str | None:
    """Sums: every operand carries the space on the output's axis."""
    axis = _axis_from_right(node, space)
    if axis is None:
        return f"a sum that does not keep the space on one axis: {where}"
    for operand in node.args[:2]:
        if not isinstance(operand, fx.Node):
            return f"a scalar added to the space's units: {where}"
        spaces = _spaces(operand)
        if len(spaces) < axis or spaces[len(spaces) - axis] != space:
            return f"a term without the space's units: {where}"
    return None


def _squared_norm(node: fx.Node, space: str, where: str) -> str | None:
    """``x ** 2`` summed or averaged over the space's axis (an RMSNorm's statistic) is a
    squared norm, which rotations keep; every other use of a power admits permutations only."""
    square = node if aten_name(node) == "pow" else node.args[0]
    users = list(square.users)
    if square.args[1] != 2 or not users:
        return f"a power of the units: {where}"
    source = _spaces(square.args[0])
    axis = [i for i, s in enumerate(source) if s == space]
    for user in users:
        dims = user.args[1] if len(user.args) > 1 else None
        if aten_name(user) not in ("mean", "sum") or len(axis) != 1 or not isinstance(
                dims, (list, tuple)) or [d % len(source) for d in dims] != axis:
            return f"a power of the units not reduced over them alone: {where}"
    return None


def _scaling(graph_module: fx.GraphModule, node: fx.Node, space: str, where: str
             ) -> str | None:
    """Products and quotients by a scalar or by a tensor constant along the space. A gain of
    ones (what fold-norms leaves of an RMSNorm's) is the identity, but a parameter bound to the
    space: the maps that keep it ones keep the all-ones direction ("centred")."""
    axis = _axis_from_right(node, space)
    if axis is None:
        return f"a product that does not keep the space on one axis: {where}"
    carriers, ones = 0, False
    for operand in node.args[:2]:
        if not isinstance(operand, fx.Node):
            continue
        if aten_name(node) == "mul" and operand.op == "get_attr" \
                and _is_constant(graph_module, operand, 1.0):
            ones = True  # bound to the space: a merge must keep it ones, so Q 1 = 1
            continue
        spaces = _spaces(operand)
        value = operand.meta.get("val")
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else ()
        if len(spaces) >= axis and spaces[len(spaces) - axis] == space:
            carriers += 1
        elif len(shape) >= axis and shape[len(shape) - axis] != 1:
            return f"a scale per unit: {where}"
    if carriers != 1:
        return f"a product of the space with itself: {where}"
    return "centred" if ones else None


def _moved_inputs(node: fx.Node, space: str, where: str) -> str | None:
    """A move (cat, stack) whose tensor inputs all carry the space."""
    if aten_name(node) not in ("cat", "stack"):
        return None
    parts = node.args[0] if node.args else ()
    for part in parts if isinstance(parts, (list, tuple)) else ():
        if not isinstance(part, fx.Node) or space not in _spaces(part):
            return f"{aten_name(node)} with a part without the space's units: {where}"
    return None


def _layer_norm(graph_module: fx.GraphModule, node: fx.Node, where: str) -> str | None:
    """A LayerNorm over the space alone, without gain or shift (or unit and zero ones)."""
    arguments = call_arguments(node)
    shape = arguments.get("normalized_shape", ())
    if len(shape) != 1:
        return f"layer_norm over more than the space: {where}"
    if not _is_constant(graph_module, arguments.get("weight"), 1.0):
        return f"layer_norm with a gain (fold-norms did not fold it): {where}"
    if not _is_constant(graph_module, arguments.get("bias"), 0.0):
        return f"layer_norm with a shift (fold-norms did not fold it): {where}"
    return "centred"


def _is_constant(graph_module: fx.GraphModule, argument: Any, value: float) -> bool:
    """Whether a norm's affine argument is absent or a parameter equal to ``value``."""
    if argument is None:
        return True
    if not isinstance(argument, fx.Node) or argument.op != "get_attr":
        return False
    try:
        tensor = attribute(graph_module, argument.target)
    except AttributeError:
        return False
    return isinstance(tensor, torch.Tensor) and bool(torch.all(tensor == value))


def one_width(shapes_a: Mapping[str, Any], shapes_b: Mapping[str, Any]) -> bool:
    """Whether two models' common state-dict entries have one shape: only then does a merge
    rotate (an elastic merge of models of different widths permutes every space)."""
    return all(tuple(shapes_b[key]) == tuple(shape) for key, shape in shapes_a.items()
               if key in shapes_b)
