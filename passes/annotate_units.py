"""annotate-units: discovers the permutation-equivalent units of a model from its graph alone.

The pass walks the aten graph once in topological order and labels every axis of every tensor
with a :data:`~mergec.ir.labels.Label` (see :mod:`mergec.ir.labels`: ``None`` for a non-feature
axis, an element of the union-find :class:`~mergec.ir.labels.Spaces` for a feature axis, or a
structured label inside heads, groups or products).

Per-op rules (the table ``RULES``, one line of comment each) join labels, create structure
(heads, groups, composite parts) or *fix* spaces (identity only) with a reason. An op without a
rule takes the sound fallback: it fixes every space it touches, unless all its inputs are
constants. Soundness first: a wrong space silently breaks a merged model, a fixed space only
merges less.

The result is a :class:`~mergec.ir.spec.UnitSpec`; every node also gets an immutable
:class:`~mergec.ir.labels.NodeUnits` in ``node.meta["mergec"]``: its labels, the rule that fired
(``"fallback"`` for an op without a rule, with the reason in ``fallback`` whenever a rule took
the fallback) and the space of each axis.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Sequence

import sympy
import torch
from torch import fx

from mergec.errors import MergeError
from mergec.ir.fx import STATE_KEYS, aten_name, call_arguments, module_path, output_names
from mergec.ir.groups import with_groups
from mergec.ir.labels import (
    Blocks,
    Composite,
    Label,
    NodeUnits,
    Product,
    Spaces,
    Tiled,
    Within,
    as_expr,
    is_one,
    static_size,
)
from mergec.ir.spec import Binding, Space, UnitSpec
from mergec.ir.state import SPEC_OUTPUTS, PipelineState

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------
class Annotator:
    """Labels the axes of one graph by applying ``RULES`` node by node; use
    :func:`annotate_units`. Rules read labels with :meth:`labels_of`, join and structure them
    through ``spaces``, and record parameter roles with :meth:`role`.

    What the walk leaves for :func:`build_spec`: ``node_labels`` (node -> labels),
    ``param_axes`` (element -> (state key, axis)), ``roles`` ((key, axis) -> role), ``grouped``
    ((key, axis) -> (consumed label, groups)) and ``fallbacks`` (ops that fixed spaces).
    """

    def __init__(self, graph_module: fx.GraphModule, state_keys: Iterable[str],
                 outputs: str = "auto") -> None:
        if outputs not in SPEC_OUTPUTS:
            raise MergeError(f"annotate-units: outputs must be one of "
                             f"{', '.join(SPEC_OUTPUTS)}, got {outputs!r}")
        self.graph_module = graph_module
        self.state_keys = set(state_keys)
        self.outputs = outputs
        self.spaces = Spaces(locate=self.where)
        self.node_labels: dict[fx.Node, Any] = {}
        self.param_axes: dict[int, tuple[str, int]] = {}
        self.param_parts: dict[int, int] = {}  # a split parameter axis's part -> the axis
        self.roles: dict[tuple[str, int], str] = {}
        self.grouped: dict[tuple[str, int], tuple[Label, int]] = {}
        self.fallbacks: list[str] = []
        self._dynamic: set[fx.Node] = set()
        self._node: fx.Node | None = None  # node being annotated, for reasons
        self._fallback_reason: str | None = None  # why the current node took the fallback

    def where(self) -> str:
        """The node being annotated and its module, for the reasons of fixed spaces."""
        node = self._node
        if node is None:
            return ""
        path = module_path(node)
        return f"{node.format_node()}" + (f" (module {path})" if path else "")

    def run(self) -> None:
        """Annotates every node in topological order and records the rule that fired."""
        for node in self.graph_module.graph.nodes:
            self._node, self._fallback_reason = node, None
            op, rule, labels = self._annotate(node)
            self.node_labels[node] = labels
            self._record_probes(node, labels)
            node.meta["mergec"] = NodeUnits(labels=labels, op=op, rule=rule,
                                            fallback=self._fallback_reason)
        self._node = None

    def _annotate(self, node: fx.Node) -> tuple[str, str, Any]:
        """(op name, rule name, labels) of one node."""
        value = node.meta.get("val")
        if node.op == "placeholder":
            return node.op, "input", _none_labels(value)
        if node.op == "get_attr":
            return node.op, "parameter", self._parameter_labels(node, value)
        if node.op == "output":
            self._output(node)
            return node.op, "output", None
        name = _op_name(node)
        rule = RULES.get(name)
        if rule is None:
            return name, "fallback", self.fallback(node, f"no rule for {name}")
        return name, rule.__name__, rule(self, node)

    # -- what rules use ----------------------------------------------------------------------
    def labels_of(self, argument: Any) -> Any:
        """Labels of a node argument; None for non-tensors."""
        if isinstance(argument, fx.Node):
            return self.node_labels.get(argument)
        return None

    def role(self, label: Label, role: str) -> None:
        """Records the role of a parameter axis. A parameter used twice (an embedding tied to
        the output layer) takes "consumes" where one use consumes the axis: the output layer
        is then merged exactly, and the embedding too under a permutation (for zip, whose
        merge and unmerge differ, the embedding's rows are its units' unmerged sums)."""
        if isinstance(label, int):
            self.spaces.mark_feature(label)
            label = self.param_parts.get(label, label)
            if label in self.param_axes:
                self.spaces.mark_feature(label)
                axis = self.param_axes[label]
                if role == "consumes" or axis not in self.roles:
                    self.roles[axis] = role

    def split(self, label: Label, sizes: Sequence[int]) -> list[Label]:
        """The consecutive parts of a feature axis (split, chunk, slice, a cat's inputs): see
        :meth:`Spaces.split`. The parts of a parameter axis (a packed q/k/v weight cut into
        each projection's rows) are recorded: a role a part takes is the whole axis's role,
        and the axis is bound to the composite, so that permuting a part moves its rows."""
        parts = self.spaces.split(label, sizes)
        whole = self.param_parts.get(label, label) if isinstance(label, int) else None
        if whole in self.param_axes:
            for part in parts:
                if isinstance(part, int):
                    self.param_parts[part] = whole
        return parts

    def bind_grouped_input(self, weight: Any, label: Label, groups: int) -> None:
        """Axis 1 of a grouped convolution's weight consumes ``label`` group by group: bound
        with ``groups`` so that zip slices it per group."""
        key = weight.target if isinstance(weight, fx.Node) else None
        if key in self.state_keys and label is not None:
            self.grouped[(key, 1)] = (label, groups)

    def fallback(self, node: fx.Node, reason: str) -> Any:
        """The sound fallback for what no rule describes: every space among the inputs is
        fixed with ``reason`` and the output has no feature axis. Recorded on the node."""
        if self._fallback_reason is None:
            self._fallback_reason = reason
        inputs = [label for argument in _flat_nodes((node.args, node.kwargs))
                  for label in _flat_labels(self.node_labels.get(argument))]
        if any(label is not None for label in inputs):
            self.fallbacks.append(f"{reason}: {node.format_node()}")
            for label in inputs:
                self.spaces.fix(label, reason)
        return _none_labels(node.meta.get("val"))

    # -- graph inputs, parameters, outputs ---------------------------------------------------
    def _parameter_labels(self, node: fx.Node, value: Any) -> Any:
        """Every axis (size > 1) of a floating-point parameter or buffer is a new element."""
        key = node.target
        if not isinstance(value, torch.Tensor) or key not in self.state_keys \
                or not value.is_floating_point():
            return _none_labels(value)
        labels = []
        for axis, size in enumerate(value.shape):
            if int(size) <= 1:
                labels.append(None)
                continue
            element = self.spaces.new(int(size), key)
            self.param_axes[element] = (key, axis)
            labels.append(element)
        return tuple(labels)

    def _output(self, node: fx.Node) -> None:
        """Model outputs keep their order (``outputs="fixed"``), or only those that are labels
        (``"auto"``: logits; hidden states are features a merge maps back), or none
        (``"free"``)."""
        if self.outputs == "free":
            return
        names = output_names(self.graph_module)
        for argument, (name, feature) in zip(_flat_nodes(node.args), names):
            if self.outputs == "auto" and feature:
                continue
            reason = f"reaches a model output ({name})" if name else "reaches a model output"
            for label in _flat_labels(self.node_labels.get(argument)):
                self.spaces.fix(label, reason)

    def _record_probes(self, node: fx.Node, labels: Any) -> None:
        """Marks the spaces a node carries as features and, for a tensor computed from the
        model input, records the node as a place to observe them."""
        if node.op == "placeholder" or (
                not isinstance(node.meta.get("val"), (torch.SymInt, int, float, type(None)))
                and any(n in self._dynamic for n in node.all_input_nodes)):
            self._dynamic.add(node)  # a tensor computed from the model input: features vary
        if node.op != "call_function" or not isinstance(labels, tuple):
            return
        for label in labels:
            if isinstance(label, int):
                self.spaces.mark_feature(label)
            elif isinstance(label, Within):
                self.spaces.mark_feature(label.space)
        if node not in self._dynamic:
            return  # a constant (a class token broadcast): no statistics to observe
        for axis, label in enumerate(labels):
            if isinstance(label, int):
                self.spaces.add_probe(label, node.name)
            elif isinstance(label, Within):
                # a blocks space carried as (blocks, within) axes: q and k split into heads
                blocks = [i for i, other in enumerate(labels) if isinstance(other, int)
                          and self.spaces.is_block_order(other, label.space)]
                if blocks:
                    self.spaces.add_split_probe(label.space, node.name, blocks[0], axis)


# ---------------------------------------------------------------------------------------------
# Helpers over fx nodes
# ---------------------------------------------------------------------------------------------
def _op_name(node: fx.Node) -> str:
    """The name rules are looked up by: the aten op (in-place as out-of-place), as
    "name.overload" where the overload has its own rule."""
    if node.op == "call_function" and node.target is operator.getitem:
        return "getitem"
    name = aten_name(node)
    if not name:
        return getattr(node.target, "__name__", str(node.target))
    overload = f"{name}.{getattr(node.target, '_overloadname', '')}"
    return overload if overload in OVERLOAD_RULES else name


def _none_labels(value: Any) -> Any:
    """Labels of a value without feature axes (a tensor, or a tuple of them)."""
    if isinstance(value, torch.Tensor):
        return (None,) * value.dim()
    if isinstance(value, (tuple, list)):
        return [_none_labels(v) for v in value]
    return None


def _flat_nodes(structure: Any) -> list[fx.Node]:
    """The nodes inside nested args / kwargs."""
    if isinstance(structure, fx.Node):
        return [structure]
    if isinstance(structure, (tuple, list)):
        return [n for item in structure for n in _flat_nodes(item)]
    if isinstance(structure, dict):
        return [n for item in structure.values() for n in _flat_nodes(item)]
    return []


def _flat_labels(labels: Any) -> list[Label]:
    """Every axis label of a node (of every tensor of a tuple-valued node)."""
    if labels is None:
        return []
    if isinstance(labels, list):
        return [label for item in labels for label in _flat_labels(item)]
    return list(labels)


def _shape(node: Any) -> tuple:
    """The shape of a tensor-valued node; () for anything else."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` of a call, or keyword ``name``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _reduced_dims(value: Any, rank: int) -> set[int]:
    """The axes a reduction's ``dim`` argument names (all of them when it names none)."""
    if value is None or value == [] or value == ():
        return set(range(rank))
    if isinstance(value, int):
        value = [value]
    return {_dim(d, rank) for d in value}


def _dim(dim: int, rank: int) -> int:
    """A possibly negative axis index as a non-negative one."""
    return dim + rank if dim < 0 else dim


def _with_saved(node: fx.Node, out: tuple) -> Any:
    """``out`` for a one-tensor op; for an op returning (output, saved statistics...) the
    output's labels and none for the rest."""
    value = node.meta.get("val")
    if isinstance(value, (tuple, list)):
        return [out] + [_none_labels(v) for v in value[1:]]
    return out


def _broadcast(a: Annotator, operands: Sequence[tuple[tuple, tuple]], positions: range,
               why: str) -> list[Label]:
    """For each trailing position (1 = last axis), the join of the operands' (labels, shape)
    axes there that are not broadcast (size 1): broadcasting lines those axes up."""
    joined_axes = []
    for position in positions:
        joined = [labels[-position] for labels, shape in operands
                  if len(shape) >= position and not is_one(shape[-position])]
        joined_axes.append(a.spaces.unify_all(joined, why))
    return joined_axes


def _reduced(x: Sequence[Label], dims: set[int], keepdim: bool) -> tuple:
    """Labels after reducing ``dims``: gone, or None with ``keepdim``."""
    return tuple(None if i in dims else label for i, label in enumerate(x)
                 if keepdim or i not in dims)


# ---------------------------------------------------------------------------------------------
# Rules. Each takes the annotator and the node and returns the node's labels.
# ---------------------------------------------------------------------------------------------
Rule = Callable[[Annotator, fx.Node], Any]


def same_as_input(a: Annotator, node: fx.Node) -> Any:
    """Elementwise unary op, or an equivariant one (softmax): labelled like the input."""
    return a.labels_of(node.args[0])


def elementwise(a: Annotator, node: fx.Node) -> Any:
    """Broadcasting n-ary op: axes that line up (size > 1) are one space."""
    operands = [(a.labels_of(arg), _shape(arg)) for arg in _flat_nodes((node.args, node.kwargs))
                if isinstance(a.labels_of(arg), tuple)]
    positions = range(1, len(_shape(node)) + 1)
    return tuple(reversed(_broadcast(a, operands, positions, f"{_op_name(node)} of two tensors")))


def tuple_of_input(a: Annotator, node: fx.Node) -> Any:
    """Op returning (output, saved...) where the output is labelled like the input."""
    return _with_saved(node, a.labels_of(node.args[0]))


def getitem(a: Annotator, node: fx.Node) -> Any:
    """Element of a tuple-valued node."""
    labels = a.labels_of(node.args[0])
    if isinstance(labels, list):
        return labels[node.args[1]]
    return _none_labels(node.meta.get("val"))


def constant(a: Annotator, node: fx.Node) -> Any:
    """A tensor made from sizes or values only (arange, zeros), or no tensor at all
    (assertions, symbolic sizes): no feature axis."""
    return _none_labels(node.meta.get("val"))


def _weight(a: Annotator, feature: Label, weight: tuple, consumed: int, why: str) -> Label:
    """A weight whose axis ``consumed`` (0 or 1) reads ``feature`` and whose other leading axis
    produces the output: the roles, the join; returns the produced axis's label."""
    produced = 1 - consumed
    a.role(weight[consumed], "consumes")
    a.role(weight[produced], "produces")
    a.spaces.unify(feature, weight[consumed], why)
    return weight[produced]


def _bias(a: Annotator, out: Label, bias: Label, role: str | None, why: str) -> Label:
    """A bias added to output axis ``out``: one space with it (``role`` None: none recorded)."""
    if role is not None:
        a.role(bias, role)
    return a.spaces.unify(out, bias, why)


def linear(a: Annotator, node: fx.Node) -> Any:
    """y = x Wᵀ + b: x's last axis is W's input axis; the output axis is W's output axis."""
    x, weight = a.labels_of(node.args[0]), a.labels_of(node.args[1])
    bias = a.labels_of(_arg(node, 2, "bias"))
    out = _weight(a, x[-1], weight, 1, "linear input")
    if bias is not None:
        _bias(a, out, bias[0], "produces", "linear bias")
    return x[:-1] + (out,)


def addmm(a: Annotator, node: fx.Node) -> Any:
    """y = b + x @ W (transformers Conv1D): like linear with W transposed."""
    bias, x, weight = (a.labels_of(arg) for arg in node.args[:3])
    out = _weight(a, x[-1], weight, 0, "addmm input")
    if bias:
        out = _bias(a, out, bias[-1], "produces", "addmm bias")
    return x[:-1] + (weight[1] if out is not None else None,)


def matmul(a: Annotator, node: fx.Node) -> Any:
    """Batched matrix product: the contracted axes are one space; batch axes broadcast."""
    left, right = a.labels_of(node.args[0]), a.labels_of(node.args[1])
    if len(left) < 2 or len(right) < 2:
        return a.fallback(node, "matmul of a vector")
    a.role(right[-2], "consumes")
    a.role(left[-1], "consumes")
    a.role(right[-1], "produces")
    a.role(left[-2], "produces")
    a.spaces.unify(left[-1], right[-2], "matmul contraction")
    operands = ((left, _shape(node.args[0])), (right, _shape(node.args[1])))
    batch = _broadcast(a, operands, range(3, len(_shape(node)) + 1), "matmul batch axes")
    return tuple(reversed(batch)) + (left[-2], right[-1])


def grouped_matmul(a: Annotator, node: fx.Node) -> Any:
    """A mixture of experts' grouped product (``_grouped_mm``, transformers'
    ``grouped_mm_fallback``): rows of x (S, in), sorted by expert, times their expert's matrix
    of w (experts, in, out). The contracted axes are one space, every expert's output axis one
    space; the experts, chosen by position, keep their order."""
    x, weight = a.labels_of(node.args[0]), a.labels_of(node.args[1])
    if len(x) != 2 or len(weight) != 3:
        return a.fallback(node, "a grouped product of other ranks than (S, in) × (experts, "
                                "in, out)")
    a.role(weight[0], "elementwise")
    a.role(weight[1], "consumes")
    a.role(weight[2], "produces")
    a.spaces.unify(x[1], weight[1], "grouped product contraction")
    a.spaces.fix(weight[0], "is the experts axis of a grouped product, chosen by position")
    return (x[0], weight[2])


def convolution(a: Annotator, node: fx.Node) -> Any:
    """conv: channel axis 1. Plain: a new output space; depthwise: output space = input space;
    grouped: input and output spaces get blocks tied to each other."""
    x, weight = a.labels_of(node.args[0]), a.labels_of(node.args[1])
    bias = a.labels_of(_arg(node, 2, "bias"))
    groups = int(_arg(node, 6, "groups", 1) or 1)
    in_channels = static_size(_shape(node.args[0])[1])
    out_channels, per_group = (int(s) for s in _shape(node.args[1])[:2])
    for label in x[2:]:
        a.spaces.fix(label, "is a spatial axis of a convolution")
    if groups == 1:
        out = _weight(a, x[1], weight, 1, "convolution input")
    elif groups == in_channels == out_channels and per_group == 1:
        a.role(weight[0], "elementwise")
        out = a.spaces.unify(x[1], weight[0], "depthwise convolution")
    else:
        a.role(weight[0], "produces")
        block_in, _ = a.spaces.blockify(x[1], groups, in_channels // groups)
        block_out, _ = a.spaces.blockify(weight[0], groups, out_channels // groups)
        a.spaces.unify(block_in, block_out, "grouped convolution")
        a.bind_grouped_input(node.args[1], x[1], groups)
        out = weight[0]
    if bias is not None:
        role = "produces" if groups == 1 else "elementwise"
        out = _bias(a, out, bias[0], role, "convolution bias")
    return (x[0], out) + (None,) * (len(x) - 2)


def conv_transpose(a: Annotator, node: fx.Node) -> Any:
    """Transposed conv: weight is (in, out/groups, ...); only groups == 1 has a rule."""
    x, weight = a.labels_of(node.args[0]), a.labels_of(node.args[1])
    bias = a.labels_of(_arg(node, 2, "bias"))
    if int(_arg(node, 6, "groups", 1) or 1) != 1:
        return a.fallback(node, "grouped transposed convolution")
    for label in x[2:]:
        a.spaces.fix(label, "is a spatial axis of a convolution")
    out = _weight(a, x[1], weight, 0, "transposed convolution input")
    if bias is not None:
        out = _bias(a, out, bias[0], "produces", "transposed convolution bias")
    return (x[0], out) + (None,) * (len(x) - 2)


def convolution_overload(a: Annotator, node: fx.Node) -> Any:
    """aten.convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups):
    plain convolutions only."""
    if node.args[6]:
        return a.fallback(node, "transposed aten.convolution")
    if node.args[8] != 1:
        return a.fallback(node, "grouped aten.convolution")
    x, weight = a.labels_of(node.args[0]), a.labels_of(node.args[1])
    out = _weight(a, x[1], weight, 1, "convolution input")
    bias = a.labels_of(node.args[2])
    if bias is not None:
        out = _bias(a, out, bias[0], None, "convolution bias")
    return (x[0], out) + (None,) * (len(x) - 2)


def embedding(a: Annotator, node: fx.Node) -> Any:
    """Lookup table: the output feature axis is the table's axis 1."""
    weight, indices = a.labels_of(node.args[0]), a.labels_of(node.args[1])
    a.role(weight[1], "produces")
    a.spaces.fix(weight[0], "is the vocabulary axis of an embedding")
    return tuple(None for _ in indices) + (weight[1],)


def _bind_per_channel(a: Annotator, channel: Label, arguments: Iterable[Any], why: str) -> Label:
    """Per-channel parameters and statistics of a norm (those given) bind elementwise to the
    channel space; returns the channel's label."""
    for argument in arguments:
        labels = a.labels_of(argument)
        if labels:
            a.role(labels[0], "elementwise")
            channel = a.spaces.unify(channel, labels[0], why)
    return channel


def batch_norm(a: Annotator, node: fx.Node) -> Any:
    """BatchNorm: per-channel affine and running statistics bind to the channel space."""
    x = a.labels_of(node.args[0])
    channel = x[1] if len(x) > 1 else None
    channel = _bind_per_channel(a, channel, node.args[1:5], "batch norm parameter")
    return _with_saved(node, x[:1] + (channel,) + x[2:])


def layer_norm(a: Annotator, node: fx.Node) -> Any:
    """LayerNorm / RMSNorm over the last axes: an invariant reduction; the affine parameters
    bind to the normalised axes."""
    arguments = call_arguments(node)
    x = a.labels_of(arguments.get("input", node.args[0]))
    normalized = len(arguments.get("normalized_shape", node.args[1]))
    out = list(x)
    for argument in (arguments.get("weight"), arguments.get("bias")):
        labels = a.labels_of(argument)
        if labels:
            for offset in range(normalized):
                a.role(labels[offset], "elementwise")
                position = len(x) - normalized + offset
                out[position] = a.spaces.unify(out[position], labels[offset], "norm parameter")
    return _with_saved(node, tuple(out))


def group_norm(a: Annotator, node: fx.Node) -> Any:
    """GroupNorm(G) (group_norm, or native_group_norm returning (out, mean, rstd)): the
    channel space gets G groups; affine parameters bind."""
    arguments = call_arguments(node)
    x = a.labels_of(arguments.get("input", node.args[0]))
    groups = int(arguments["group"] if "group" in arguments else
                 arguments.get("num_groups", node.args[1]))
    channels = static_size(_shape(node.args[0])[1])
    if 1 < groups < channels:
        a.spaces.blockify(x[1], groups, channels // groups)
    channel = _bind_per_channel(a, x[1], (arguments.get("weight"), arguments.get("bias")),
                                "group norm parameter")
    return _with_saved(node, x[:1] + (channel,) + x[2:])


def attention(a: Annotator, node: fx.Node) -> Any:
    """scaled_dot_product_attention(q, k, v, mask): heads shared by q, k, v; q and k one space
    within heads (their dot product); v and the output one space. Grouped-query attention
    (k/v heads repeated) ties each query head to its key/value head."""
    q, k, v = (a.labels_of(arg) for arg in node.args[:3])
    mask = a.labels_of(_arg(node, 3, "attn_mask"))
    batch = []
    for position in range(3, len(q) + 1):
        joined = [labels[-position] for labels in (q, k, v) if len(labels) >= position]
        if mask is not None and len(mask) >= position and \
                not is_one(_shape(node.args[3])[-position]):
            joined.append(mask[-position])
        batch.append(a.spaces.unify_all(joined, "attention heads"))
    a.spaces.unify(q[-1], k[-1], "attention query·key")
    if mask is not None:
        for label in mask[-2:]:
            a.spaces.fix(label, "is a sequence axis of an attention mask")
    return tuple(reversed(batch)) + (q[-2], v[-1])


def reduction(a: Annotator, node: fx.Node) -> Any:
    """Symmetric reduction (sum, mean, amax, var, norm): invariant; reduced axes disappear
    (or keep size 1 with keepdim). Reducing over the block axis of heads or groups lines the
    blocks up position by position: the permutation inside blocks must then be shared."""
    x = a.labels_of(node.args[0])
    arguments = call_arguments(node)
    dims = _reduced_dims(arguments.get("dim"), len(x))
    kept = [label for i, label in enumerate(x) if i not in dims]
    for i in dims:  # a block axis reduced while the axis inside blocks stays
        owner = a.spaces.owner_of_block(x[i], kept) if isinstance(x[i], int) else None
        if owner is not None:
            a.spaces.fix(Within(owner), "blocks are reduced position by position")
    out = _reduced(x, dims, bool(arguments.get("keepdim", False)))
    value = node.meta.get("val")
    if isinstance(value, (tuple, list)):
        return [out for _ in value]
    return out


def max_with_indices(a: Annotator, node: fx.Node) -> Any:
    """max.dim / min.dim: values are a reduction; indices are positions along that axis, so a
    feature axis reduced there is fixed."""
    x = a.labels_of(node.args[0])
    arguments = call_arguments(node)
    dims = _reduced_dims(arguments.get("dim"), len(x))
    for d in dims:
        a.spaces.fix(x[d], "positions are exposed (the indices of max/min)")
    out = _reduced(x, dims, bool(arguments.get("keepdim", False)))
    return [out, out]


def positional_reduction(a: Annotator, node: fx.Node) -> Any:
    """argmax / sort / topk / median: the result exposes positions along the axis, which is
    fixed if it is a feature axis; other axes keep their labels."""
    x = a.labels_of(node.args[0])
    dims = _reduced_dims(call_arguments(node).get("dim"), len(x))
    for d in dims:
        a.spaces.fix(x[d], "positions are exposed (argmax, sort, topk)")
    value = node.meta.get("val")
    values = value if isinstance(value, (tuple, list)) else [value]
    results = []
    for item in values:
        rank = item.dim() if isinstance(item, torch.Tensor) else 0
        if rank == len(x):
            results.append(_reduced(x, dims, keepdim=True))
        elif rank == len(x) - len(dims):
            results.append(_reduced(x, dims, keepdim=False))
        else:
            results.append(_none_labels(item))
    return results if isinstance(value, (tuple, list)) else results[0]


def triangular(a: Annotator, node: fx.Node) -> Any:
    """tril / triu: the last two axes' positions matter; they are fixed if features."""
    x = a.labels_of(node.args[0])
    for label in x[-2:]:
        a.spaces.fix(label, "positions matter in a triangular mask")
    return x


def along_axis(a: Annotator, node: fx.Node) -> Any:
    """cumsum / cumprod / flip / roll along an axis: order matters there."""
    x = a.labels_of(node.args[0])
    name = _op_name(node)
    dims_index = 2 if name == "roll" else 1
    dims = node.args[dims_index] if len(node.args) > dims_index else list(range(len(x)))
    dims = [dims] if isinstance(dims, int) else list(dims)
    for d in dims:
        a.spaces.fix(x[_dim(d, len(x))], f"{name} depends on the order of this axis")
    return x


def spatial_op(a: Annotator, node: fx.Node) -> Any:
    """Pooling, interpolation: batch and channel axes pass, spatial axes are not features."""
    x = a.labels_of(node.args[0])
    for label in x[2:]:
        a.spaces.fix(label, "is a spatial axis of pooling")
    return _with_saved(node, x[:2] + (None,) * (len(x) - 2))


def pad(a: Annotator, node: fx.Node) -> Any:
    """Constant padding: padded axes are not features (padding a feature axis fixes it)."""
    x = a.labels_of(node.args[0])
    padding = list(node.args[1])
    out = list(x)
    for i in range(len(padding) // 2):
        axis = len(x) - 1 - i
        if padding[2 * i] or padding[2 * i + 1]:
            a.spaces.fix(out[axis], "is padded")
            out[axis] = None
    return tuple(out)


def permute(a: Annotator, node: fx.Node) -> Any:
    """Axis reordering: labels move with their axes."""
    x = a.labels_of(node.args[0])
    return tuple(x[_dim(d, len(x))] for d in node.args[1])


def transpose(a: Annotator, node: fx.Node) -> Any:
    """Swap of two axes."""
    x = list(a.labels_of(node.args[0]))
    if len(x) < 2:
        return tuple(x)
    first, second = (_dim(d, len(x)) for d in node.args[1:3]) if len(node.args) > 2 else (0, 1)
    x[first], x[second] = x[second], x[first]
    return tuple(x)


def reverse_axes(a: Annotator, node: fx.Node) -> Any:
    """``Tensor.T``: every axis reversed."""
    return tuple(reversed(a.labels_of(node.args[0])))


def unsqueeze(a: Annotator, node: fx.Node) -> Any:
    """A new axis of size 1."""
    x = list(a.labels_of(node.args[0]))
    x.insert(_dim(node.args[1], len(x) + 1), None)
    return tuple(x)


def squeeze(a: Annotator, node: fx.Node) -> Any:
    """Removal of size-1 axes."""
    x = a.labels_of(node.args[0])
    shape = _shape(node.args[0])
    dims = _arg(node, 1, "dim")
    if dims is None:
        dims = [i for i, s in enumerate(shape) if is_one(s)]
    dims = [dims] if isinstance(dims, int) else dims
    dims = {_dim(d, len(x)) for d in dims if is_one(shape[_dim(d, len(x))])}
    return tuple(label for i, label in enumerate(x) if i not in dims)


def expand(a: Annotator, node: fx.Node) -> Any:
    """Broadcast of size-1 axes and new leading axes: those are not features."""
    x = a.labels_of(node.args[0])
    shape, out_shape = _shape(node.args[0]), _shape(node)
    new = len(out_shape) - len(x)
    out = [None] * new
    for label, size, out_size in zip(x, shape, out_shape[new:]):
        out.append(label if as_expr(size) == as_expr(out_size) else None)
    return tuple(out)


def reshape(a: Annotator, node: fx.Node) -> Any:
    """view / reshape / flatten / unflatten: factor the axes of input and output into their
    common refinement; a split feature axis becomes blocks (heads, groups), merged factors a
    product (flatten: tiled space)."""
    x = a.labels_of(node.args[0])
    atoms: list[tuple[Label, sympy.Expr]] = []
    for label, size in zip(x, _shape(node.args[0])):
        if isinstance(label, Product):
            atoms.extend((factor, as_expr(n)) for factor, n in label.factors)
        else:
            atoms.append((label, as_expr(size)))
    atoms = [(label, size) for label, size in atoms if size != 1]
    out_sizes = [as_expr(s) for s in _shape(node)]
    out_factors = a.spaces.refine(atoms, out_sizes)
    if out_factors is None:
        for label, _ in atoms:
            a.spaces.fix(label, f"reshaped {tuple(_shape(node.args[0]))} -> {tuple(_shape(node))} "
                                "in a way no rule describes")
        return (None,) * len(out_sizes)
    return tuple(a.spaces.merge_factors(factors) for factors in out_factors)


def cat(a: Annotator, node: fx.Node) -> Any:
    """Concatenation: other axes are one space; on the cat axis a composite space."""
    tensors = node.args[0]
    labels = [a.labels_of(t) for t in tensors]
    shapes = [_shape(t) for t in tensors]
    keep = [i for i, shape in enumerate(shapes) if len(shape) and not
            (len(shape) == 1 and is_one(shape[0]) and len(_shape(node)) > 1)]
    labels, shapes = [labels[i] for i in keep], [shapes[i] for i in keep]
    rank = len(_shape(node))
    dim = _dim(_arg(node, 1, "dim", 0), rank)
    out = []
    for axis in range(rank):
        parts = [tensor_labels[axis] for tensor_labels in labels]
        if axis != dim:
            out.append(a.spaces.unify_all(parts, "concatenated tensors"))
        elif all(part is None for part in parts):
            out.append(None)
        else:
            out.append(_concatenated(a, node, parts, [s[axis] for s in shapes]))
    return tuple(out)


def _concatenated(a: Annotator, node: fx.Node, parts: list[Label], sizes: list[Any]) -> Label:
    """The label of a cat axis: a new composite space whose parts are ``parts``."""
    static = [static_size(s) for s in sizes]
    if any(size is None for size in static):
        for part in parts:
            a.spaces.fix(part, "concatenated along an axis of unknown size")
        return None
    whole = a.spaces.new(sum(static), f"cat {node.name}")
    for piece, part in zip(a.split(whole, static), parts):
        a.spaces.unify(piece, part, "concatenation")
    return whole


def stack(a: Annotator, node: fx.Node) -> Any:
    """Stacking: a new non-feature axis; other axes one space."""
    labels = [a.labels_of(t) for t in node.args[0]]
    rank = len(_shape(node))
    dim = _dim(_arg(node, 1, "dim", 0), rank)
    joined = [a.spaces.unify_all([tensor_labels[axis] for tensor_labels in labels],
                                 "stacked tensors")
              for axis in range(rank - 1)]
    joined.insert(dim, None)
    return tuple(joined)


def split(a: Annotator, node: fx.Node) -> Any:
    """split / split_with_sizes / chunk / tensor_split: the axis becomes composite."""
    x = a.labels_of(node.args[0])
    values = node.meta.get("val")
    dim = _dim(_arg(node, 2, "dim", 0), len(x))
    sizes = [static_size(v.shape[dim]) for v in values]
    if any(size is None for size in sizes):
        a.spaces.fix(x[dim], "split into parts of unknown size")
        return [tuple(x[:dim]) + (None,) + tuple(x[dim + 1:]) for _ in values]
    pieces = a.split(x[dim], sizes)
    return [tuple(x[:dim]) + (piece,) + tuple(x[dim + 1:]) for piece in pieces]


def unbind(a: Annotator, node: fx.Node) -> Any:
    """unbind: every position becomes a tensor; on the block axis of a blocks space that
    separates the blocks (fused qkv: q, k, v), elsewhere it fixes a feature axis."""
    x = a.labels_of(node.args[0])
    values = node.meta.get("val")
    dim = _dim(_arg(node, 1, "dim", 0), len(x))
    rest = list(x[:dim]) + list(x[dim + 1:])
    owner = a.spaces.owner_of_block(x[dim], rest) if isinstance(x[dim], int) else None
    if owner is None:
        a.spaces.fix(x[dim], "unbound into its positions")
        return [tuple(rest) for _ in values]
    a.spaces.fix(x[dim], "blocks are unbound by position")
    parts = [a.spaces.block_part(owner, i) for i in range(len(values))]
    return [tuple(a.spaces.picked(label, owner, part) for label in rest) for part in parts]


def slice_axis(a: Annotator, node: fx.Node) -> Any:
    """Slice with step 1 of a feature axis: the axis becomes composite, the slice one part."""
    x = a.labels_of(node.args[0])
    shape = _shape(node.args[0])
    dim = _dim(_arg(node, 1, "dim", 0), len(x))
    label = x[dim]
    out = list(x)
    if label is None or as_expr(shape[dim]) == as_expr(_shape(node)[dim]):
        return tuple(out)
    if as_expr(_shape(node)[dim]) == 0:
        out[dim] = None  # an empty slice (Phi-3's pass-through of a full rotary) holds no units
        return tuple(out)
    start, end, step = (_arg(node, i, n, d) for i, n, d in
                        ((2, "start", 0), (3, "end", None), (4, "step", 1)))
    size = static_size(shape[dim])
    if step != 1 or size is None or not isinstance(start, int):
        a.spaces.fix(label, "sliced with a step or unknown bounds")
        out[dim] = None
        return tuple(out)
    start = max(0, start + size if start < 0 else start)
    end = size if end is None else min(size, end + size if end < 0 else end)
    sizes = [s for s in (start, end - start, size - end) if s > 0]
    pieces = a.split(label, sizes)
    out[dim] = pieces[1 if start > 0 else 0]
    return tuple(out)


def select(a: Annotator, node: fx.Node) -> Any:
    """Indexing one position: on a non-feature axis the axis goes; on the block axis of a
    blocks space it separates the blocks (fused qkv); elsewhere it fixes the space."""
    x = a.labels_of(node.args[0])
    dim = _dim(node.args[1], len(x))
    index = node.args[2]
    label = x[dim]
    rest = list(x[:dim]) + list(x[dim + 1:])
    if label is None:
        return tuple(rest)
    owner = a.spaces.owner_of_block(label, rest) if isinstance(label, int) else None
    if owner is not None and isinstance(index, int):
        a.spaces.fix(label, f"block {index} is selected by position")
        part = a.spaces.block_part(owner, index % a.spaces.block_count(owner))
        return tuple(a.spaces.picked(other, owner, part) for other in rest)
    a.spaces.fix(label, "a single position is selected")
    return tuple(rest)


def index(a: Annotator, node: fx.Node) -> Any:
    """Advanced indexing: indexed axes are not features (fixes them if they are)."""
    x = a.labels_of(node.args[0])
    indices = node.args[1]
    indexed = [i for i, idx in enumerate(indices) if idx is not None]
    for i in indexed:
        a.spaces.fix(x[i], "indexed by a computed index")
    result_rank = len(_shape(node)) - (len(x) - len(indexed))
    if indexed and indexed == list(range(indexed[0], indexed[-1] + 1)):
        before = [x[i] for i in range(indexed[0])]
        after = [x[i] for i in range(indexed[-1] + 1, len(x))]
        return tuple(before + [None] * result_rank + after)
    leading_kept = [x[i] for i in range(len(indices)) if i not in indexed]
    return tuple([None] * result_rank + leading_kept + list(x[len(indices):]))


def pixel_shuffle(a: Annotator, node: fx.Node) -> Any:
    """Channels moved into space: the sound fallback fixes the channel space."""
    return a.fallback(node, "pixel shuffle moves channels into space")


def repeat(a: Annotator, node: fx.Node) -> Any:
    """Tiling along axes: repeated feature axes are fixed."""
    x = a.labels_of(node.args[0])
    repeats = list(node.args[1])
    new = len(repeats) - len(x)
    out = [None] * new
    for label, times in zip(x, repeats[new:]):
        if times != 1:
            a.spaces.fix(label, "repeated along its own axis")
            out.append(None)
        else:
            out.append(label)
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# The rule table: op names (in-place variants by their out-of-place name) -> rule
# ---------------------------------------------------------------------------------------------
_TABLE: tuple[tuple[str, Rule], ...] = (
    # layout and identity ops: labels pass through unchanged
    ("contiguous clone detach alias to _to_copy type_as lift_fresh_copy dropout "
     "feature_dropout alpha_dropout _assert_tensor_metadata", same_as_input),
    # dropout returning (output, mask)
    ("native_dropout", tuple_of_input),
    # elementwise unary ops (any elementwise function commutes with a permutation)
    ("relu relu6 gelu silu sigmoid tanh hardswish hardsigmoid hardtanh leaky_relu elu selu "
     "celu mish softplus softsign log_sigmoid exp expm1 log log1p log2 sqrt rsqrt neg abs "
     "reciprocal sign square erf erfc sin cos nan_to_num round floor ceil trunc logical_not "
     "bitwise_not gelu_tanh prelu_scalar exp2", same_as_input),
    # elementwise n-ary ops with broadcasting (masked_fill too): aligned axes are one space
    ("add sub mul div true_divide floor_divide remainder maximum minimum where eq ne lt le gt "
     "ge logical_and logical_or logical_xor __and__ __or__ bitwise_and bitwise_or atan2 fmod "
     "addcmul addcdiv lerp rsub copy hypot pow clamp clamp_min clamp_max masked_fill",
     elementwise),
    # one tensor of a tuple-valued node
    ("getitem", getitem),
    # tensors made from sizes or values alone
    ("arange zeros ones full empty zeros_like ones_like full_like empty_like new_zeros "
     "new_ones new_full new_empty rand randn rand_like randn_like scalar_tensor tensor "
     "linspace fill", constant),
    # triangular masks: positions of the last two axes matter
    ("tril triu", triangular),
    # ops without a tensor result
    ("sym_size sym_numel sym_stride _assert_scalar sym_constrain_range_for_size "
     "_assert_async", constant),
    # a new output space; the input space binds the weight's input axis
    ("linear", linear),
    # transformers Conv1D: linear with the weight transposed
    ("addmm", addmm),
    # contracted axes one space, batch axes broadcast
    ("matmul mm bmm", matmul),
    ("_grouped_mm grouped_mm_fallback", grouped_matmul),
    # plain, depthwise and grouped convolutions
    ("conv1d conv2d conv3d", convolution),
    # transposed convolutions without groups
    ("conv_transpose1d conv_transpose2d conv_transpose3d", conv_transpose),
    # the generic aten.convolution, plain convolutions only
    ("convolution", convolution_overload),
    # the table's axis 1 is the output space
    ("embedding", embedding),
    # per-channel normalisations: parameters and statistics bind to the channels
    ("batch_norm _native_batch_norm_legit_no_training _native_batch_norm_legit "
     "native_batch_norm cudnn_batch_norm instance_norm", batch_norm),
    # normalisations over the last axes: affine parameters bind to them
    ("layer_norm native_layer_norm rms_norm", layer_norm),
    # channels in G groups: a blocks space
    ("group_norm native_group_norm", group_norm),
    # heads shared by q, k, v; q·k and v·out one space within heads
    ("scaled_dot_product_attention", attention),
    # softmax over any axis is equivariant
    ("softmax _softmax log_softmax _log_softmax", same_as_input),
    # symmetric reductions: invariant
    ("sum mean amax amin var std var_mean std_mean prod logsumexp norm linalg_vector_norm "
     "all any", reduction),
    # reductions that expose positions along their axis
    ("argmax argmin max min sort topk argsort kthvalue median mode", positional_reduction),
    # ops that depend on the order along an axis
    ("cumsum cumprod flip roll diff", along_axis),
    # pooling and interpolation: spatial axes are not features
    ("max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d "
     "adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool2d max_pool2d_with_indices "
     "upsample_nearest2d upsample_bilinear2d upsample_bicubic2d upsample_nearest1d "
     "upsample_linear1d upsample_nearest3d _upsample_bilinear2d_aa grid_sampler_2d",
     spatial_op),
    # padded axes are not features
    ("pad constant_pad_nd", pad),
    # labels move with their axes
    ("permute", permute),
    # two axes swapped
    ("transpose t swapaxes", transpose),
    # Tensor.T: the axes in reverse order
    ("numpy_T", reverse_axes),
    # a new size-1 axis
    ("unsqueeze", unsqueeze),
    # size-1 axes removed
    ("squeeze", squeeze),
    # broadcast axes are not features
    ("expand expand_as broadcast_to", expand),
    # common refinement of input and output axes: blocks, products
    ("view reshape _unsafe_view flatten unflatten view_as reshape_as", reshape),
    # composite space on the cat axis
    ("cat concat concatenate", cat),
    # a new non-feature axis
    ("stack", stack),
    # the split axis becomes composite
    ("split split_with_sizes chunk tensor_split", split),
    # positions become tensors: blocks separated, or the axis fixed
    ("unbind", unbind),
    # a step-1 slice is a part of a composite space
    ("slice", slice_axis),
    # one position: blocks separated, or the axis fixed
    ("select", select),
    # indexed axes are not features
    ("index", index),
    # channels moved into space: the fallback
    ("pixel_shuffle pixel_unshuffle channel_shuffle native_channel_shuffle", pixel_shuffle),
    # repeated axes are fixed
    ("repeat", repeat),
)

#: overloads whose labels differ from their packet's (looked up as "name.overload")
OVERLOAD_RULES: dict[str, Rule] = {
    "max.dim": max_with_indices,  # (values, indices) along one axis
    "min.dim": max_with_indices,  # (values, indices) along one axis
    "max.default": reduction,  # the maximum of every element
    "min.default": reduction,  # the minimum of every element
    "max.other": elementwise,  # elementwise maximum of two tensors
    "min.other": elementwise,  # elementwise minimum of two tensors
}

RULES: dict[str, Rule] = {name: rule for names, rule in _TABLE for name in names.split()}
RULES.update(OVERLOAD_RULES)


# ---------------------------------------------------------------------------------------------
# From the union-find to the spec
# ---------------------------------------------------------------------------------------------
_ACTIVATIONS = {"relu", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid",
                "hardtanh", "leaky_relu", "elu", "selu", "mish", "softplus", "relu6"}


def _choose_probe(a: Annotator, nodes: dict[str, fx.Node],
                  root: int) -> tuple[str | None, int | None, int | None]:
    """The node where a space's features are observed, and the axis: the last activation
    output carrying the space, else the first node carrying it; else a node carrying a blocks
    space as two axes (heads, inside heads), with the inside axis third. A residual stream
    carries its space through every block: its last activation is the stage's end, the
    features the next stage reads (and a partial zip's cut, where the tails read them)."""
    names = a.spaces.probes(root)
    if not names:
        split_probes = a.spaces.split_probes(root)
        return split_probes[0] if split_probes else (None, None, None)
    chosen = next((name for name in reversed(names) if _op_name(nodes[name]) in _ACTIVATIONS),
                  names[0])
    labels = a.node_labels[nodes[chosen]]
    axis = next(i for i, label in enumerate(labels)
                if isinstance(label, int) and a.spaces.find(label) == root)
    return chosen, axis, None


def _output_labels(a: Annotator) -> list[Any]:
    """The labels of every tensor the graph returns, in output order."""
    return [a.node_labels.get(argument)
            for node in a.graph_module.graph.find_nodes(op="output")
            for argument in _flat_nodes(node.args)]


def _spec_roots(a: Annotator, bound: list[int], output_labels: list[Any]) -> list[int]:
    """The spaces the spec lists: those of bound parameter axes, of grouped convolutions'
    inputs and of feature outputs, with every space nested in their structures."""
    elements = list(bound)
    elements += [label for label, _ in a.grouped.values() if isinstance(label, int)]
    elements += [label for labels in output_labels
                 for label in (labels if isinstance(labels, tuple) else ())
                 if isinstance(label, int) and a.spaces.info(label).feature]
    return a.spaces.closure(elements)


def _space(a: Annotator, nodes: dict[str, fx.Node], root: int,
           label_id: Callable[[Label], str | None]) -> Space:
    """The spec's description of space ``root``."""
    info = a.spaces.info(root)
    structure = info.structure
    fields: dict[str, Any] = {}
    if isinstance(structure, Blocks):
        fields = dict(kind="blocks", block_count=structure.count,
                      block_space=label_id(structure.block),
                      parts=tuple(label_id(p) for p in structure.parts or ()))
    elif isinstance(structure, Composite):
        fields = dict(kind="composite", parts=tuple(label_id(p) for p in structure.parts))
    elif isinstance(structure, Tiled):
        fields = dict(kind="tiled", factors=tuple((label_id(label), int(n))
                                                  for label, n in structure.factors))
    probe, probe_axis, probe_within_axis = _choose_probe(a, nodes, root)
    return Space(id=label_id(root), size=int(static_size(info.size) or 0), fixed=info.fixed,
                 within_fixed=info.within_fixed if isinstance(structure, Blocks) else None,
                 probe=probe, probe_axis=probe_axis, probe_within_axis=probe_within_axis,
                 origin=info.origin, **fields)


def _bindings(a: Annotator, bound: list[int],
              label_id: Callable[[Label], str | None]) -> tuple[Binding, ...]:
    """Per parameter axis, its space and role; a grouped convolution's input axis per group."""
    bindings = [Binding(key=key, axis=axis, space=label_id(element),
                        role=a.roles.get((key, axis), "elementwise"))
                for element in bound
                for key, axis in (a.param_axes[element],) if (key, axis) not in a.grouped]
    bindings += [Binding(key=key, axis=axis, space=label_id(label), role="consumes",
                         groups=groups)
                 for (key, axis), (label, groups) in a.grouped.items() if isinstance(label, int)]
    return tuple(sorted(bindings, key=lambda b: (b.key, b.axis)))


def _fix_unbound_parts(a: Annotator) -> None:
    """The sound default for a parameter axis that no rule bound but whose parts, blocks or
    factors became feature spaces (the parameter was cut or reshaped before its use in a way
    no role follows back): its data flows into those spaces, and permuting them without
    moving the parameter would change the function, so they are fixed."""
    for element, (key, axis) in a.param_axes.items():
        if a.spaces.info(element).feature:
            continue
        root = a.spaces.find(element)
        for nested in a.spaces.closure([element]):
            if nested != root and a.spaces.info(nested).feature:
                a.spaces.fix(nested, f"part of {key}[{axis}], which no rule binds")


def build_spec(a: Annotator, model_name: str = "") -> UnitSpec:
    """Turns the annotator's union-find into a :class:`UnitSpec` (spaces numbered s0, s1, ...
    in the order of their oldest element) and writes each annotated node's space ids into
    its ``node.meta["mergec"]``."""
    _fix_unbound_parts(a)
    a.spaces.propagate_fixed()
    bound = [e for e in sorted(a.param_axes)
             if a.spaces.info(e).feature and static_size(a.spaces.info(e).size) != 1]
    output_labels = _output_labels(a)
    ids = {root: f"s{i}" for i, root in enumerate(_spec_roots(a, bound, output_labels))}

    def label_id(label: Label) -> str | None:
        """The spec id of a plain feature label; None for any other label."""
        return ids.get(a.spaces.find(label)) if isinstance(label, int) else None

    nodes = {node.name: node for node in a.graph_module.graph.nodes}
    spaces = {ids[root]: _space(a, nodes, root, label_id) for root in ids}
    state = a.graph_module.state_dict()
    shapes = {key: tuple(state[key].shape) for key in sorted(a.state_keys) if key in state}
    outputs = tuple(tuple(label_id(label) for label in labels)
                    for labels in output_labels if isinstance(labels, tuple))
    for node, labels in a.node_labels.items():
        if isinstance(labels, tuple) and "mergec" in node.meta:
            node.meta["mergec"] = node.meta["mergec"]._replace(
                spaces=tuple(label_id(label) for label in labels),
                within=tuple(label_id(label.space) if isinstance(label, Within) else None
                             for label in labels))
    return UnitSpec(spaces=spaces, bindings=_bindings(a, bound, label_id), shapes=shapes,
                    model=model_name, outputs=outputs)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def annotate_units(graph_module: fx.GraphModule, state_keys: Iterable[str] | None = None,
                   outputs: str = "auto", model_name: str = "") -> UnitSpec:
    """The unit spec of a traced graph module. ``outputs`` says which model outputs keep their
    order: ``"auto"`` those that are labels (logits, plain tensors), not the hidden states a
    transformers backbone returns; ``"fixed"`` every output (the spec whose permutations
    compute the same function); ``"free"`` none (outputs may come out permuted).

    Example::

        graph_module = mergec.trace(model, x)
        spec = annotate_units(graph_module)
        print(spec.coverage())
    """
    keys = state_keys if state_keys is not None else graph_module.meta.get(
        STATE_KEYS, tuple(graph_module.state_dict()))
    annotator = Annotator(graph_module, keys, outputs=outputs)
    annotator.run()
    if annotator.fallbacks:
        log.info("annotate-units: %d ops without a rule fixed their spaces",
                 len(annotator.fallbacks))
    return with_groups(graph_module, build_spec(annotator, model_name))


@dataclass(frozen=True)
class AnnotateUnits:
    """The annotate-units pass: the unit spec of every graph of the state (``specs``)."""

    outputs: str = "auto"  # which outputs keep their order: see annotate_units
    name: ClassVar[str] = "annotate-units"

    def run(self, state: PipelineState) -> PipelineState:
        """The state with ``specs``: one unit spec per traced graph."""
        graphs = state.require("graphs", self.name)
        specs = tuple(annotate_units(graph, graph.meta[STATE_KEYS], self.outputs,
                                     type(model).__name__)
                      for graph, model in zip(graphs, state.models))
        return state.evolve(specs=specs)
