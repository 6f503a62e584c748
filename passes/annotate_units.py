"""annotate-units: discovers the permutation-equivalent units of a model from its graph alone.

The pass walks the aten graph once in topological order and labels every axis of every tensor:

* ``None`` — not a feature axis (batch, sequence, spatial, a constant's axis) or one that must
  keep its order;
* an ``int`` — an element of a union-find over feature axes; one class is one *space*;
* :class:`Within` — the axis inside the blocks (heads, groups) of a blocks space;
* :class:`Product` — an axis that merges several factors row-major (``flatten`` of C×H×W, batch
  merged with heads).

Per-op rules (the table ``RULES``, one line of comment each) join labels (union-find), create
structure (heads, groups, composite parts) or *fix* spaces (identity only) with a reason. An op
without a rule fixes every space it touches, unless all its inputs are constants. Soundness
first: a wrong space silently breaks a merged model, a fixed space only merges less.

The result is a :class:`~mergec.ir.spec.UnitSpec`; the labels of every node are also written to
``node.meta["mergec"]`` as an immutable :class:`NodeUnits`.
"""
from __future__ import annotations

import logging
import operator
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, NamedTuple, Sequence, Union

import sympy
import torch
from torch import fx

from mergec.ir.fx import STATE_KEYS, call_arguments, module_path
from mergec.ir.spec import Binding, Space, UnitSpec
from mergec.ir.state import PipelineState

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Within:
    """The axis inside the blocks of blocks space ``space`` (an element id)."""

    space: int


@dataclass(frozen=True)
class Product:
    """An axis that is the row-major product of ``factors`` ((label, size), ...)."""

    factors: tuple[tuple["Label", Any], ...]


@dataclass(frozen=True)
class PartLevel:
    """Heads inside the blocks of ``space`` before a block is picked (a fused qkv projection
    reshaped to (3, heads, head_dim)): ``level`` is "blocks" or "within" of the picked block's
    inner space, which :func:`select` resolves."""

    space: int
    level: str


Label = Union[int, Within, Product, PartLevel, None]
Labels = tuple  # tuple[Label, ...] for a tensor; a list of those for a tuple of tensors


class NodeUnits(NamedTuple):
    """What annotate-units recorded on a node: the axis labels, the rule that fired and, once
    the spec is built, the space id of each axis (None: not a plain feature axis)."""

    labels: Any
    rule: str
    spaces: tuple | None = None


@dataclass(frozen=True)
class Blocks:
    count: int
    block: int  # element of the block-level space (heads / groups)
    parts: tuple[int, ...] | None = None  # per-block inner spaces, once blocks are separated


@dataclass(frozen=True)
class Composite:
    parts: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class Tiled:
    factors: tuple[tuple[Label, int], ...]


Structure = Union[Blocks, Composite, Tiled, None]


@dataclass
class ClassInfo:
    size: Any
    origin: str
    fixed: str | None = None
    within_fixed: str | None = None
    structure: Structure = None
    feature: bool = False  # seen on a tensor axis or given a role by a rule


# ---------------------------------------------------------------------------------------------
# Symbolic sizes
# ---------------------------------------------------------------------------------------------
def _expr(size: Any) -> sympy.Expr:
    if isinstance(size, sympy.Basic):
        return size
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(int(size))


def _quotient(big: sympy.Expr, small: sympy.Expr) -> sympy.Expr | None:
    """``big / small`` if it is a whole (polynomial) quotient, else None."""
    if big.is_Integer and small.is_Integer:
        return sympy.Integer(int(big) // int(small)) if int(big) % int(small) == 0 else None
    numerator, denominator = sympy.fraction(sympy.cancel(big / small))
    return numerator if denominator == 1 else None


def _is_one(size: Any) -> bool:
    return _expr(size) == 1


def _static(size: Any) -> int | None:
    expr = _expr(size)
    return int(expr) if expr.is_Integer else None


# ---------------------------------------------------------------------------------------------
# The annotator: union-find over feature axes plus the per-op rules
# ---------------------------------------------------------------------------------------------
class Annotator:
    """Labels the axes of one graph. Use :func:`annotate_units`."""

    def __init__(self, graph_module: fx.GraphModule, state_keys: Iterable[str],
                 fix_outputs: bool = True):
        self.graph_module = graph_module
        self.state_keys = set(state_keys)
        self.fix_outputs = fix_outputs
        self.parent: list[int] = []
        self.info: list[ClassInfo] = []
        self.labels: dict[fx.Node, Any] = {}
        self.param_axes: dict[int, tuple[str, int]] = {}
        self.roles: dict[tuple[str, int], str] = {}
        self.grouped: dict[tuple[str, int], tuple[Label, int]] = {}
        self.probes: dict[int, list[str]] = defaultdict(list)
        self.split_probes: dict[int, list[tuple[str, int, int]]] = defaultdict(list)
        self.fallbacks: list[str] = []
        self.dynamic: set[fx.Node] = set()
        self.node = None  # node being annotated, for reasons

    # -- union-find ------------------------------------------------------------------------
    def new(self, size: Any, origin: str) -> int:
        self.parent.append(len(self.parent))
        self.info.append(ClassInfo(size=size, origin=origin))
        return len(self.parent) - 1

    def find(self, element: int) -> int:
        root = element
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[element] != root:
            self.parent[element], element = root, self.parent[element]
        return root

    def cls(self, element: int) -> ClassInfo:
        return self.info[self.find(element)]

    def where(self) -> str:
        node = self.node
        if node is None:
            return ""
        path = module_path(node)
        return f"{node.format_node()}" + (f" (module {path})" if path else "")

    def fix(self, label: Label, reason: str) -> None:
        """Marks every space in ``label`` as identity-only, with a reason."""
        if label is None:
            return
        if isinstance(label, int):
            info = self.cls(label)
            if info.fixed is None:
                info.fixed = f"{reason} at {self.where()}"
        elif isinstance(label, Within):
            info = self.cls(label.space)
            if info.within_fixed is None:
                info.within_fixed = f"{reason} at {self.where()}"
        elif isinstance(label, Product):
            for factor, _ in label.factors:
                self.fix(factor, reason)
        elif isinstance(label, PartLevel):
            for part in self.cls(label.space).structure.parts:
                self.fix(part, reason)

    def union(self, a: int, b: int) -> int:
        root_a, root_b = self.find(a), self.find(b)
        if root_a == root_b:
            return root_a
        info_a, info_b = self.info[root_a], self.info[root_b]
        if _expr(info_a.size) != _expr(info_b.size):
            reason = f"joins axes of different sizes ({info_a.size} and {info_b.size})"
            self.fix(root_a, reason)
            self.fix(root_b, reason)
            return root_a
        if root_b < root_a:  # the older element stays the root: stable, readable ids
            root_a, root_b, info_a, info_b = root_b, root_a, info_b, info_a
        self.parent[root_b] = root_a
        info_a.fixed = info_a.fixed or info_b.fixed
        info_a.within_fixed = info_a.within_fixed or info_b.within_fixed
        info_a.feature = info_a.feature or info_b.feature
        self.probes[root_a].extend(self.probes.pop(root_b, []))
        self.split_probes[root_a].extend(self.split_probes.pop(root_b, []))
        structure_a, structure_b = info_a.structure, info_b.structure
        info_a.structure = structure_a or structure_b
        if structure_a is not None and structure_b is not None:
            self._reconcile(root_a, structure_a, structure_b)
        return root_a

    def _reconcile(self, root: int, first: Structure, second: Structure) -> None:
        """Joins the structures of two spaces being joined, or fixes the space."""
        if isinstance(first, Blocks) and isinstance(second, Blocks) and first.count == second.count:
            self.union(first.block, second.block)
            if first.parts and second.parts:
                for part_a, part_b in zip(first.parts, second.parts):
                    self.union(part_a, part_b)
            self.info[self.find(root)].structure = Blocks(
                first.count, first.block, first.parts or second.parts)
        elif isinstance(first, Composite) and isinstance(second, Composite) \
                and first.sizes == second.sizes:
            for part_a, part_b in zip(first.parts, second.parts):
                self.union(part_a, part_b)
        elif isinstance(first, Tiled) and isinstance(second, Tiled) \
                and [n for _, n in first.factors] == [n for _, n in second.factors]:
            for (label_a, _), (label_b, _) in zip(first.factors, second.factors):
                self.unify(label_a, label_b, "tiled factors")
        else:
            self.fix(root, f"joins incompatible structures ({type(first).__name__} and "
                           f"{type(second).__name__})")

    def unify(self, a: Label, b: Label, why: str) -> Label:
        """Joins two axis labels: the axes must be permuted together."""
        if a is None and b is None:
            return None
        if a is None or b is None:
            self.fix(a if b is None else b, f"{why}: meets an axis that must keep its order "
                                        "(a model input, a constant, a non-feature axis)")
            return None
        if isinstance(a, int) and isinstance(b, int):
            self.union(a, b)
            return a
        if isinstance(a, Within) and isinstance(b, Within):
            if _expr(self.cls(a.space).size) != _expr(self.cls(b.space).size) and \
                    (self._repeat_blocks(a.space, b.space) or self._repeat_blocks(b.space, a.space)):
                return a
            self.union(a.space, b.space)
            return a
        if isinstance(a, Product) and isinstance(b, Product):
            if [_expr(n) for _, n in a.factors] == [_expr(n) for _, n in b.factors]:
                for (label_a, _), (label_b, _) in zip(a.factors, b.factors):
                    self.unify(label_a, label_b, why)
                return a
        elif isinstance(a, Product) or isinstance(b, Product):
            element, product = (b, a) if isinstance(a, Product) else (a, b)
            if isinstance(element, int) and self._tile(element, product):
                return element
        self.fix(a, f"{why}: joins axes of different structure")
        self.fix(b, f"{why}: joins axes of different structure")
        return None

    def repeats(self, many: int, few: int) -> int | None:
        """``n`` if blocks space ``many``'s block order is ``few``'s repeated n times
        (grouped-query attention: each key/value head serves n query heads), else None."""
        structure_many, structure_few = self.cls(many).structure, self.cls(few).structure
        if not (isinstance(structure_many, Blocks) and isinstance(structure_few, Blocks)):
            return None
        order = self.cls(structure_many.block).structure
        if not isinstance(order, Tiled) or len(order.factors) != 2:
            return None
        (base, count), (rest, times) = order.factors
        if rest is not None or not isinstance(base, int) or \
                self.find(base) != self.find(structure_few.block) or count != structure_few.count:
            return None
        block_many = _static(self.cls(many).size) // structure_many.count
        block_few = _static(self.cls(few).size) // structure_few.count
        return times if block_many == block_few else None

    def _repeat_blocks(self, many: int, few: int) -> bool:
        """Ties the inside of each block of ``many`` to the inside of the block of ``few`` it
        repeats. Returns False when the two are not so related."""
        times = self.repeats(many, few)
        if times is None:
            return False
        structure = self.cls(many).structure
        shared = tuple(self.block_part(few, h // times) for h in range(structure.count))
        if structure.parts:
            for part, wanted in zip(structure.parts, shared):
                self.union(part, wanted)
        else:
            self.cls(many).structure = Blocks(structure.count, structure.block, shared)
        return True

    def _tile(self, element: int, product: Product) -> bool:
        """Gives ``element``'s space the structure of ``product`` (a linear after flatten)."""
        factors = []
        for label, size in product.factors:
            static = _static(size)
            if static is None or isinstance(label, (Within, Product)):
                return False
            factors.append((label, static))
        info = self.cls(element)
        tiled = Tiled(tuple(factors))
        if info.structure is None:
            info.structure = tiled
        else:
            self._reconcile(self.find(element), info.structure, tiled)
        return True

    def unify_all(self, labels: Sequence[Label], why: str) -> Label:
        labels = list(labels)
        if not labels:
            return None
        result = labels[0]
        for label in labels[1:]:
            result = self.unify(result, label, why)
        return result

    # -- structure ------------------------------------------------------------------------
    def blockify(self, label: Label, count: Any, size: Any) -> tuple[Label, Label]:
        """Splits a feature axis into (blocks, within): heads or groups."""
        if label is None:
            return None, None
        count_static, size_static = _static(count), _static(size)
        if isinstance(label, int) and count_static is not None and size_static is not None:
            root = self.find(label)
            info = self.info[root]
            if info.structure is None:
                block = self.new(count_static, f"blocks of {info.origin}")
                self.info[block].feature = True
                info.structure = Blocks(count_static, block)
                return block, Within(root)
            if isinstance(info.structure, Blocks) and info.structure.count == count_static:
                return info.structure.block, Within(root)
        self.fix(label, f"split into {count}×{size} in a way no rule describes")
        return None, None


    def blockify_parts(self, space: int, count: Any, size: Any) -> tuple[Label, Label]:
        """Splits the inside of every block of ``space`` into (count, size): the heads of a
        fused qkv projection reshaped to (3, heads, head_dim)."""
        structure = self.cls(space).structure
        blocks = _static(count)
        if isinstance(structure, Blocks) and blocks is not None and _static(size) is not None:
            parts = [self.block_part(space, i) for i in range(structure.count)]
            if all(self.blockify(part, count, size)[0] is not None for part in parts):
                return PartLevel(self.find(space), "blocks"), PartLevel(self.find(space), "within")
        self.fix(Within(space), f"split again inside its blocks into {count}×{size}")
        return None, None

    def split(self, label: Label, sizes: Sequence[int]) -> list[Label]:
        """Splits a feature axis into consecutive parts (split, chunk, slice): composite."""
        if label is None:
            return [None] * len(sizes)
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) == 1:
            return [label]
        if isinstance(label, int):
            root = self.find(label)
            info = self.info[root]
            if info.structure is None:
                parts = tuple(self.new(s, f"part {i} of {info.origin}") for i, s in enumerate(sizes))
                for part in parts:
                    self.info[part].feature = True
                info.structure = Composite(parts, sizes)
                return list(parts)
            if isinstance(info.structure, Composite) and info.structure.sizes == sizes:
                return list(info.structure.parts)
        self.fix(label, f"split into parts {sizes} that do not match its structure")
        return [None] * len(sizes)

    def block_part(self, space: int, index: int) -> int:
        """The inner space of block ``index`` of blocks space ``space`` (blocks separated)."""
        root = self.find(space)
        info = self.info[root]
        structure = info.structure
        assert isinstance(structure, Blocks)
        if structure.parts is None:
            inner = _static(info.size) // structure.count
            parts = tuple(self.new(inner, f"block {i} of {info.origin}")
                          for i in range(structure.count))
            for part in parts:
                self.info[part].feature = True
            info.structure = structure = Blocks(structure.count, structure.block, parts)
        return structure.parts[index]

    def owner_of_block(self, element: int, labels: Sequence[Label]) -> int | None:
        """The blocks space among ``labels`` (as Within) whose block element is ``element``."""
        for label in labels:
            if isinstance(label, (Within, PartLevel)):
                structure = self.cls(label.space).structure
                if isinstance(structure, Blocks) and self.find(structure.block) == self.find(element):
                    return label.space
        return None

    # -- labels of nodes --------------------------------------------------------------------
    def of(self, argument: Any) -> Any:
        """Labels of a node argument; None for non-tensors."""
        if isinstance(argument, fx.Node):
            return self.labels.get(argument)
        return None

    def role(self, label: Label, role: str) -> None:
        """Records the role of a parameter axis. A parameter used twice (an embedding tied to
        the output layer) takes "consumes" where one use consumes the axis: the output layer
        is then merged exactly, and the embedding too under a permutation (for zip, whose
        merge and unmerge differ, the embedding's rows are its units' unmerged sums)."""
        if isinstance(label, int):
            self.cls(label).feature = True
            if label in self.param_axes:
                axis = self.param_axes[label]
                if role == "consumes" or axis not in self.roles:
                    self.roles[axis] = role

    def run(self) -> None:
        for node in self.graph_module.graph.nodes:
            self.node = node
            rule_name, labels = self.annotate(node)
            self.labels[node] = labels
            self._record_probes(node, labels)
            node.meta["mergec"] = NodeUnits(labels=labels, rule=rule_name)
        self.node = None

    def annotate(self, node: fx.Node) -> tuple[str, Any]:
        value = node.meta.get("val")
        if node.op == "placeholder":
            return "input", _none_labels(value)
        if node.op == "get_attr":
            return "parameter", self._parameter_labels(node, value)
        if node.op == "output":
            self._output(node)
            return "output", None
        name = _op_name(node)
        rule = RULES.get(name)
        if rule is None:
            return f"fallback:{name}", self._fallback(node, f"no rule for {name}")
        labels = rule(self, node)
        return name, labels

    def _parameter_labels(self, node: fx.Node, value: Any) -> Any:
        key = node.target
        if not isinstance(value, torch.Tensor) or key not in self.state_keys \
                or not value.is_floating_point():
            return _none_labels(value)
        labels = []
        for axis, size in enumerate(value.shape):
            if int(size) <= 1:
                labels.append(None)
                continue
            element = self.new(int(size), key)
            self.param_axes[element] = (key, axis)
            labels.append(element)
        return tuple(labels)

    def _output(self, node: fx.Node) -> None:
        if not self.fix_outputs:
            return
        for argument in _flat_nodes(node.args):
            labels = self.labels.get(argument)
            for label in _flat_labels(labels):
                self.fix(label, "reaches a model output")

    def _fallback(self, node: fx.Node, reason: str) -> Any:
        inputs = [label for argument in _flat_nodes((node.args, node.kwargs))
                  for label in _flat_labels(self.labels.get(argument))]
        if any(label is not None for label in inputs):
            self.fallbacks.append(f"{reason}: {node.format_node()}")
            for label in inputs:
                self.fix(label, reason)
        return _none_labels(node.meta.get("val"))

    def _record_probes(self, node: fx.Node, labels: Any) -> None:
        if node.op == "placeholder" or (
                not isinstance(node.meta.get("val"), (torch.SymInt, int, float, type(None)))
                and any(n in self.dynamic for n in node.all_input_nodes)):
            self.dynamic.add(node)  # a tensor computed from the model input: features vary
        if node.op != "call_function" or not isinstance(labels, tuple):
            return
        for label in labels:
            if isinstance(label, int):
                self.cls(label).feature = True
            elif isinstance(label, Within):
                self.cls(label.space).feature = True
        if node not in self.dynamic:
            return  # a constant (a class token broadcast): no statistics to observe
        for axis, label in enumerate(labels):
            if isinstance(label, int):
                self.cls(label).feature = True
                self.probes[self.find(label)].append(node.name)
            elif isinstance(label, Within):
                # a blocks space carried as (blocks, within) axes: q and k split into heads
                structure = self.cls(label.space).structure
                blocks = [i for i, other in enumerate(labels) if isinstance(other, int)
                          and isinstance(structure, Blocks)
                          and self.find(other) == self.find(structure.block)]
                if blocks:
                    self.split_probes[self.find(label.space)].append((node.name, blocks[0], axis))


# ---------------------------------------------------------------------------------------------
# Helpers over fx nodes
# ---------------------------------------------------------------------------------------------
def _op_name(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_function" and target is operator.getitem:
        return "getitem"
    packet = getattr(target, "_overloadpacket", None)
    if packet is not None:
        name = packet.__name__
        if name.endswith("_") and not name.endswith("__"):
            name = name[:-1]  # in-place variant: same labels
        overload = getattr(target, "_overloadname", "")
        return f"{name}.{overload}" if f"{name}.{overload}" in OVERLOAD_RULES else name
    return getattr(target, "__name__", str(target))


def _none_labels(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (None,) * value.dim()
    if isinstance(value, (tuple, list)):
        return [_none_labels(v) for v in value]
    return None


def _flat_nodes(structure: Any) -> list[fx.Node]:
    if isinstance(structure, fx.Node):
        return [structure]
    if isinstance(structure, (tuple, list)):
        return [n for item in structure for n in _flat_nodes(item)]
    if isinstance(structure, dict):
        return [n for item in structure.values() for n in _flat_nodes(item)]
    return []


def _flat_labels(labels: Any) -> list[Label]:
    if labels is None:
        return []
    if isinstance(labels, list):
        return [label for item in labels for label in _flat_labels(item)]
    return list(labels)


def _shape(node: Any) -> tuple:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _reduced_dims(value: Any, rank: int) -> set[int]:
    if value is None or value == [] or value == ():
        return set(range(rank))
    if isinstance(value, int):
        value = [value]
    return {_dim(d, rank) for d in value}


def _dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


# ---------------------------------------------------------------------------------------------
# Rules. Each takes the annotator and the node and returns the node's labels.
# ---------------------------------------------------------------------------------------------
def same_as_input(a: Annotator, node: fx.Node) -> Any:
    """Elementwise unary op: the output is labelled like the input."""
    return a.of(node.args[0])


def elementwise(a: Annotator, node: fx.Node) -> Any:
    """Broadcasting n-ary op: axes that line up (size > 1) are one space."""
    out_shape = _shape(node)
    tensors = [arg for arg in _flat_nodes((node.args, node.kwargs))
               if isinstance(a.of(arg), tuple)]
    labels = []
    for position in range(1, len(out_shape) + 1):
        joined = []
        for tensor in tensors:
            shape, tensor_labels = _shape(tensor), a.of(tensor)
            if len(shape) >= position and not _is_one(shape[-position]):
                joined.append(tensor_labels[-position])
        labels.append(a.unify_all(joined, f"{_op_name(node)} of two tensors"))
    return tuple(reversed(labels))


def _with_saved(node: fx.Node, out: tuple) -> Any:
    """``out`` for a one-tensor op; for an op returning (output, saved statistics...) the
    output's labels and none for the rest."""
    value = node.meta.get("val")
    if isinstance(value, (tuple, list)):
        return [out] + [_none_labels(v) for v in value[1:]]
    return out


def tuple_of_input(a: Annotator, node: fx.Node) -> Any:
    """Op returning (output, saved...) where the output is labelled like the input."""
    return _with_saved(node, a.of(node.args[0]))


def getitem(a: Annotator, node: fx.Node) -> Any:
    """Element of a tuple-valued node."""
    labels = a.of(node.args[0])
    if isinstance(labels, list):
        return labels[node.args[1]]
    return _none_labels(node.meta.get("val"))


def constant(a: Annotator, node: fx.Node) -> Any:
    """A tensor created from sizes or values only (arange, zeros, full): no feature axis."""
    return _none_labels(node.meta.get("val"))


def no_value(a: Annotator, node: fx.Node) -> Any:
    """An op without a tensor result (assertions, symbolic sizes)."""
    return _none_labels(node.meta.get("val"))


def linear(a: Annotator, node: fx.Node) -> Any:
    """y = x Wᵀ + b: x's last axis is W's input axis; the output axis is W's output axis."""
    x, weight = a.of(node.args[0]), a.of(node.args[1])
    bias = a.of(_arg(node, 2, "bias"))
    a.role(weight[1], "consumes")
    a.role(weight[0], "produces")
    a.unify(x[-1], weight[1], "linear input")
    if bias is not None:
        a.role(bias[0], "produces")
        a.unify(bias[0], weight[0], "linear bias")
    return x[:-1] + (weight[0],)


def addmm(a: Annotator, node: fx.Node) -> Any:
    """y = b + x @ W (transformers Conv1D): like linear with W transposed."""
    bias, x, weight = (a.of(arg) for arg in node.args[:3])
    a.role(weight[0], "consumes")
    a.role(weight[1], "produces")
    a.unify(x[-1], weight[0], "addmm input")
    out = a.unify(bias[-1], weight[1], "addmm bias") if bias and len(bias) else weight[1]
    if bias is not None and bias:
        a.role(bias[-1], "produces")
    return x[:-1] + (weight[1] if out is not None else None,)


def matmul(a: Annotator, node: fx.Node) -> Any:
    """Batched matrix product: the contracted axes are one space; batch axes broadcast."""
    left, right = a.of(node.args[0]), a.of(node.args[1])
    left_shape, right_shape = _shape(node.args[0]), _shape(node.args[1])
    if len(left) < 2 or len(right) < 2:
        return a._fallback(node, "matmul of a vector")
    for label in right[-2:-1]:
        a.role(label, "consumes")
    a.role(left[-1], "consumes")
    a.role(right[-1], "produces")
    a.role(left[-2], "produces")
    a.unify(left[-1], right[-2], "matmul contraction")
    batch = []
    for position in range(3, len(_shape(node)) + 1):
        joined = []
        for labels, shape in ((left, left_shape), (right, right_shape)):
            if len(shape) >= position and not _is_one(shape[-position]):
                joined.append(labels[-position])
        batch.append(a.unify_all(joined, "matmul batch axes"))
    return tuple(reversed(batch)) + (left[-2], right[-1])


def convolution(a: Annotator, node: fx.Node) -> Any:
    """conv: channel axis 1. Plain: a new output space; depthwise: output space = input space;
    grouped: input and output spaces get blocks tied to each other."""
    x, weight = a.of(node.args[0]), a.of(node.args[1])
    bias = a.of(_arg(node, 2, "bias"))
    groups = int(_arg(node, 6, "groups", 1) or 1)
    in_channels = _static(_shape(node.args[0])[1])
    out_channels, per_group = (int(s) for s in _shape(node.args[1])[:2])
    spatial = (None,) * (len(x) - 2)
    for label in x[2:]:
        a.fix(label, "is a spatial axis of a convolution")
    if groups == 1:
        a.role(weight[1], "consumes")
        a.role(weight[0], "produces")
        a.unify(x[1], weight[1], "convolution input")
        out = weight[0]
    elif groups == in_channels == out_channels and per_group == 1:
        a.role(weight[0], "elementwise")
        out = a.unify(x[1], weight[0], "depthwise convolution")
    else:
        a.role(weight[0], "produces")
        block_in, _ = a.blockify(x[1], groups, in_channels // groups)
        block_out, _ = a.blockify(weight[0], groups, out_channels // groups)
        a.unify(block_in, block_out, "grouped convolution")
        key = node.args[1].target if isinstance(node.args[1], fx.Node) else None
        if key in a.state_keys and x[1] is not None:
            a.grouped[(key, 1)] = (x[1], groups)
        out = weight[0]
    if bias is not None:
        a.role(bias[0], "produces" if groups == 1 else "elementwise")
        out = a.unify(out, bias[0], "convolution bias")
    return (x[0], out) + spatial


def conv_transpose(a: Annotator, node: fx.Node) -> Any:
    """Transposed conv: weight is (in, out/groups, ...); only groups == 1 has a rule."""
    x, weight = a.of(node.args[0]), a.of(node.args[1])
    bias = a.of(_arg(node, 2, "bias"))
    if int(_arg(node, 6, "groups", 1) or 1) != 1:
        return a._fallback(node, "grouped transposed convolution")
    for label in x[2:]:
        a.fix(label, "is a spatial axis of a convolution")
    a.role(weight[0], "consumes")
    a.role(weight[1], "produces")
    a.unify(x[1], weight[0], "transposed convolution input")
    out = weight[1]
    if bias is not None:
        a.role(bias[0], "produces")
        out = a.unify(out, bias[0], "transposed convolution bias")
    return (x[0], out) + (None,) * (len(x) - 2)


def convolution_overload(a: Annotator, node: fx.Node) -> Any:
    """aten.convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups)."""
    if node.args[6]:
        return a._fallback(node, "transposed aten.convolution")
    groups = node.args[8]
    x, weight = a.of(node.args[0]), a.of(node.args[1])
    if groups != 1:
        return a._fallback(node, "grouped aten.convolution")
    a.role(weight[1], "consumes")
    a.role(weight[0], "produces")
    a.unify(x[1], weight[1], "convolution input")
    bias = a.of(node.args[2])
    out = weight[0] if bias is None else a.unify(weight[0], bias[0], "convolution bias")
    return (x[0], out) + (None,) * (len(x) - 2)


def embedding(a: Annotator, node: fx.Node) -> Any:
    """Lookup table: the output feature axis is the table's axis 1."""
    weight, indices = a.of(node.args[0]), a.of(node.args[1])
    a.role(weight[1], "produces")
    a.fix(weight[0], "is the vocabulary axis of an embedding")
    return tuple(None for _ in indices) + (weight[1],)


def batch_norm(a: Annotator, node: fx.Node) -> Any:
    """BatchNorm: per-channel affine and running statistics bind to the channel space."""
    x = a.of(node.args[0])
    channel = x[1] if len(x) > 1 else None
    for argument in node.args[1:5]:
        labels = a.of(argument)
        if labels:
            a.role(labels[0], "elementwise")
            channel = a.unify(channel, labels[0], "batch norm parameter")
    return _with_saved(node, x[:1] + (channel,) + x[2:])


def layer_norm(a: Annotator, node: fx.Node) -> Any:
    """LayerNorm / RMSNorm over the last axes: an invariant reduction; the affine parameters
    bind to the normalised axes."""
    arguments = call_arguments(node)
    x = a.of(arguments.get("input", node.args[0]))
    normalized = len(arguments.get("normalized_shape", node.args[1]))
    out = list(x)
    for argument in (arguments.get("weight"), arguments.get("bias")):
        labels = a.of(argument)
        if labels:
            for offset in range(normalized):
                a.role(labels[offset], "elementwise")
                position = len(x) - normalized + offset
                out[position] = a.unify(out[position], labels[offset], "norm parameter")
    return _with_saved(node, tuple(out))


def group_norm(a: Annotator, node: fx.Node) -> Any:
    """GroupNorm(G): the channel space gets G groups; affine parameters bind."""
    x = a.of(node.args[0])
    groups = int(node.args[1])
    channels = _static(_shape(node.args[0])[1])
    channel = x[1]
    if 1 < groups < channels:
        a.blockify(channel, groups, channels // groups)
    for argument in (_arg(node, 2, "weight"), _arg(node, 3, "bias")):
        labels = a.of(argument)
        if labels:
            a.role(labels[0], "elementwise")
            channel = a.unify(channel, labels[0], "group norm parameter")
    return x[:1] + (channel,) + x[2:]


def native_group_norm(a: Annotator, node: fx.Node) -> Any:
    """native_group_norm(x, w, b, N, C, HxW, group, eps) -> (out, mean, rstd)."""
    x = a.of(node.args[0])
    groups, channels = int(node.args[6]), _static(_shape(node.args[0])[1])
    channel = x[1]
    if 1 < groups < channels:
        a.blockify(channel, groups, channels // groups)
    for argument in node.args[1:3]:
        labels = a.of(argument)
        if labels:
            a.role(labels[0], "elementwise")
            channel = a.unify(channel, labels[0], "group norm parameter")
    return _with_saved(node, x[:1] + (channel,) + x[2:])


def attention(a: Annotator, node: fx.Node) -> Any:
    """scaled_dot_product_attention(q, k, v, mask): heads shared by q, k, v; q and k one space
    within heads (their dot product); v and the output one space. Grouped-query attention
    (k/v heads repeated) ties each query head to its key/value head."""
    q, k, v = (a.of(arg) for arg in node.args[:3])
    mask = a.of(_arg(node, 3, "attn_mask"))
    batch = []
    for position in range(3, len(q) + 1):
        joined = [labels[-position] for labels in (q, k, v) if len(labels) >= position]
        if mask is not None and len(mask) >= position and \
                not _is_one(_shape(node.args[3])[-position]):
            joined.append(mask[-position])
        batch.append(a.unify_all(joined, "attention heads"))
    a.unify(q[-1], k[-1], "attention query·key")
    if mask is not None:
        for label in mask[-2:]:
            a.fix(label, "is a sequence axis of an attention mask")
    return tuple(reversed(batch)) + (q[-2], v[-1])


def reduction(a: Annotator, node: fx.Node) -> Any:
    """Symmetric reduction (sum, mean, amax, var, norm): invariant; reduced axes disappear
    (or keep size 1 with keepdim). Reducing over the block axis of heads or groups lines the
    blocks up position by position: the permutation inside blocks must then be shared."""
    x = a.of(node.args[0])
    arguments = call_arguments(node)
    dims = _reduced_dims(arguments.get("dim"), len(x))
    keepdim = bool(arguments.get("keepdim", False))
    _tie_blocks_reduced(a, x, dims)
    out = tuple(None if i in dims else label for i, label in enumerate(x)
                if keepdim or i not in dims)
    value = node.meta.get("val")
    if isinstance(value, (tuple, list)):
        return [out for _ in value]
    return out


def _tie_blocks_reduced(a: Annotator, x: Sequence[Label], dims: set[int]) -> None:
    """A block axis reduced while the axis inside blocks stays: fix the inside of blocks."""
    kept = [label for i, label in enumerate(x) if i not in dims]
    for i in dims:
        label = x[i]
        if isinstance(label, int):
            owner = a.owner_of_block(label, kept)
            if owner is not None:
                a.fix(Within(owner), "blocks are reduced position by position")


def max_with_indices(a: Annotator, node: fx.Node) -> Any:
    """max.dim / min.dim: values are a reduction; indices are positions along that axis, so a
    feature axis reduced there is fixed."""
    x = a.of(node.args[0])
    arguments = call_arguments(node)
    dims = _reduced_dims(arguments.get("dim"), len(x))
    keepdim = bool(arguments.get("keepdim", False))
    for d in dims:
        a.fix(x[d], "positions are exposed (the indices of max/min)")
    out = tuple(None if i in dims else label for i, label in enumerate(x)
                if keepdim or i not in dims)
    return [out, out]


def positional_reduction(a: Annotator, node: fx.Node) -> Any:
    """argmax / sort / topk / median: the result exposes positions along the axis, which is
    fixed if it is a feature axis; other axes keep their labels."""
    x = a.of(node.args[0])
    arguments = call_arguments(node)
    dim = arguments.get("dim")
    dims = _reduced_dims(dim, len(x))
    for d in dims:
        a.fix(x[d], "positions are exposed (argmax, sort, topk)")
    value = node.meta.get("val")
    values = value if isinstance(value, (tuple, list)) else [value]
    results = []
    for item in values:
        rank = item.dim() if isinstance(item, torch.Tensor) else 0
        if rank == len(x):
            results.append(tuple(None if i in dims else label for i, label in enumerate(x)))
        elif rank == len(x) - len(dims):
            results.append(tuple(label for i, label in enumerate(x) if i not in dims))
        else:
            results.append(_none_labels(item))
    return results if isinstance(value, (tuple, list)) else results[0]


def triangular(a: Annotator, node: fx.Node) -> Any:
    """tril / triu: the last two axes' positions matter; they are fixed if features."""
    x = a.of(node.args[0])
    for label in x[-2:]:
        a.fix(label, "positions matter in a triangular mask")
    return x


def softmax(a: Annotator, node: fx.Node) -> Any:
    """Softmax over any axis is equivariant: output = input labels."""
    return a.of(node.args[0])


def along_axis(a: Annotator, node: fx.Node) -> Any:
    """cumsum / cumprod / flip / roll along an axis: order matters there."""
    x = a.of(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else list(range(len(x)))
    if _op_name(node) == "roll":
        dims = node.args[2] if len(node.args) > 2 else list(range(len(x)))
    dims = [dims] if isinstance(dims, int) else list(dims)
    for d in dims:
        a.fix(x[_dim(d, len(x))], f"{_op_name(node)} depends on the order of this axis")
    return x


def spatial_op(a: Annotator, node: fx.Node) -> Any:
    """Pooling, interpolation: batch and channel axes pass, spatial axes are not features."""
    x = a.of(node.args[0])
    for label in x[2:]:
        a.fix(label, "is a spatial axis of pooling")
    return _with_saved(node, x[:2] + (None,) * (len(x) - 2))


def pad(a: Annotator, node: fx.Node) -> Any:
    """Constant padding: padded axes are not features (padding a feature axis fixes it)."""
    x = a.of(node.args[0])
    padding = list(node.args[1])
    out = list(x)
    for i in range(len(padding) // 2):
        axis = len(x) - 1 - i
        if padding[2 * i] or padding[2 * i + 1]:
            a.fix(out[axis], "is padded")
            out[axis] = None
    return tuple(out)


def permute(a: Annotator, node: fx.Node) -> Any:
    """Axis reordering: labels move with their axes."""
    x = a.of(node.args[0])
    return tuple(x[_dim(d, len(x))] for d in node.args[1])


def transpose(a: Annotator, node: fx.Node) -> Any:
    """Swap of two axes."""
    x = list(a.of(node.args[0]))
    if len(x) < 2:
        return tuple(x)
    first, second = (_dim(d, len(x)) for d in node.args[1:3]) if len(node.args) > 2 else (0, 1)
    x[first], x[second] = x[second], x[first]
    return tuple(x)


def unsqueeze(a: Annotator, node: fx.Node) -> Any:
    """A new axis of size 1."""
    x = list(a.of(node.args[0]))
    x.insert(_dim(node.args[1], len(x) + 1), None)
    return tuple(x)


def squeeze(a: Annotator, node: fx.Node) -> Any:
    """Removal of size-1 axes."""
    x = a.of(node.args[0])
    shape = _shape(node.args[0])
    dims = _arg(node, 1, "dim")
    if dims is None:
        dims = [i for i, s in enumerate(shape) if _is_one(s)]
    dims = [dims] if isinstance(dims, int) else dims
    dims = {_dim(d, len(x)) for d in dims if _is_one(shape[_dim(d, len(x))])}
    return tuple(label for i, label in enumerate(x) if i not in dims)


def expand(a: Annotator, node: fx.Node) -> Any:
    """Broadcast of size-1 axes and new leading axes: those are not features."""
    x = a.of(node.args[0])
    shape, out_shape = _shape(node.args[0]), _shape(node)
    new = len(out_shape) - len(x)
    out = [None] * new
    for label, size, out_size in zip(x, shape, out_shape[new:]):
        out.append(label if _expr(size) == _expr(out_size) else None)
    return tuple(out)


def reshape(a: Annotator, node: fx.Node) -> Any:
    """view / reshape / flatten / unflatten: factor the axes of input and output into their
    common refinement; a split feature axis becomes blocks (heads, groups), merged factors a
    product (flatten: tiled space)."""
    x = a.of(node.args[0])
    atoms: list[tuple[Label, sympy.Expr]] = []
    for label, size in zip(x, _shape(node.args[0])):
        if isinstance(label, Product):
            atoms.extend((factor, _expr(n)) for factor, n in label.factors)
        else:
            atoms.append((label, _expr(size)))
    atoms = [(label, size) for label, size in atoms if size != 1]
    out_sizes = [_expr(s) for s in _shape(node)]
    out_factors = _refine(a, atoms, out_sizes)
    if out_factors is None:
        for label, _ in atoms:
            a.fix(label, f"reshaped {tuple(_shape(node.args[0]))} -> {tuple(_shape(node))} "
                         "in a way no rule describes")
        return (None,) * len(out_sizes)
    return tuple(_merge_factors(a, factors) for factors in out_factors)


def _refine(a: Annotator, atoms: list, out_sizes: list) -> list | None:
    """Assigns input atoms to output axes, splitting an atom where an output axis is smaller."""
    out: list[list] = [[] for _ in out_sizes]
    atoms = list(atoms)
    index = 0
    for j, size in enumerate(out_sizes):
        remaining = size
        while remaining != 1:
            if index >= len(atoms):
                return None
            label, atom = atoms[index]
            if atom == remaining:
                out[j].append((label, atom))
                index += 1
                remaining = sympy.Integer(1)
            elif (rest := _quotient(remaining, atom)) is not None:
                out[j].append((label, atom))
                index += 1
                remaining = rest
            elif (rest := _quotient(atom, remaining)) is not None:
                if isinstance(label, int):
                    head, tail = a.blockify(label, remaining, rest)
                elif isinstance(label, Within):
                    head, tail = a.blockify_parts(label.space, remaining, rest)
                elif label is None:
                    head, tail = None, None
                else:
                    a.fix(label, "split again inside its blocks")
                    head, tail = None, None
                out[j].append((head, remaining))
                atoms[index] = (tail, rest)
                remaining = sympy.Integer(1)
            else:
                return None
    return out if index == len(atoms) else None


def _merge_factors(a: Annotator, factors: list) -> Label:
    if not factors:
        return None
    if len(factors) == 1:
        return factors[0][0]
    if all(label is None for label, _ in factors):
        return None
    if len(factors) == 2:
        (first, _), (second, _) = factors
        if isinstance(first, PartLevel) and isinstance(second, PartLevel) and \
                (first.level, second.level) == ("blocks", "within") and first.space == second.space:
            return Within(first.space)
        if isinstance(first, int) and isinstance(second, Within):
            structure = a.cls(second.space).structure
            if isinstance(structure, Blocks) and a.find(structure.block) == a.find(first):
                return second.space
            repeated = _repeated_output(a, first, second.space)
            if repeated is not None:
                return repeated
    merged: list = []
    for label, size in factors:  # consecutive non-feature factors are one: (C, H*W)
        if label is None and merged and merged[-1][0] is None:
            merged[-1] = (None, _expr(merged[-1][1]) * _expr(size))
        else:
            merged.append((label, size))
    return Product(tuple(merged))


def _repeated_output(a: Annotator, order: int, space: int) -> int | None:
    """Attention output of grouped-query heads: query heads ``order`` (a key/value head order
    repeated n times) over the inside of value space ``space``: a new blocks space whose block
    i is value block i // n."""
    structure = a.cls(space).structure
    tiled = a.cls(order).structure
    if not (isinstance(structure, Blocks) and isinstance(tiled, Tiled) and len(tiled.factors) == 2):
        return None
    (base, count), (rest, times) = tiled.factors
    if rest is not None or not isinstance(base, int) or count != structure.count or \
            a.find(base) != a.find(structure.block):
        return None
    block = _static(a.cls(space).size) // structure.count
    output = a.new(block * count * times, f"grouped heads of {a.cls(space).origin}")
    a.info[output].feature = True
    a.info[output].structure = Blocks(count * times, order, tuple(
        a.block_part(space, h // times) for h in range(count * times)))
    return output


def cat(a: Annotator, node: fx.Node) -> Any:
    """Concatenation: other axes are one space; on the cat axis a composite space."""
    tensors = node.args[0]
    labels = [a.of(t) for t in tensors]
    shapes = [_shape(t) for t in tensors]
    keep = [i for i, shape in enumerate(shapes) if len(shape) and not
            (len(shape) == 1 and _is_one(shape[0]) and len(_shape(node)) > 1)]
    labels, shapes = [labels[i] for i in keep], [shapes[i] for i in keep]
    rank = len(_shape(node))
    dim = _dim(_arg(node, 1, "dim", 0), rank)
    out = []
    for axis in range(rank):
        if axis != dim:
            out.append(a.unify_all([l[axis] for l in labels], "concatenated tensors"))
            continue
        parts = [l[axis] for l in labels]
        if all(p is None for p in parts):
            out.append(None)
            continue
        sizes = [_static(s[axis]) for s in shapes]
        if any(size is None for size in sizes):
            for part in parts:
                a.fix(part, "concatenated along an axis of unknown size")
            out.append(None)
            continue
        whole = a.new(sum(sizes), f"cat {node.name}")
        pieces = a.split(whole, sizes)
        for piece, part in zip(pieces, parts):
            a.unify(piece, part, "concatenation")
        out.append(whole)
    return tuple(out)


def stack(a: Annotator, node: fx.Node) -> Any:
    """Stacking: a new non-feature axis; other axes one space."""
    tensors = node.args[0]
    labels = [a.of(t) for t in tensors]
    rank = len(_shape(node))
    dim = _dim(_arg(node, 1, "dim", 0), rank)
    joined = [a.unify_all([l[axis] for l in labels], "stacked tensors")
              for axis in range(rank - 1)]
    joined.insert(dim, None)
    return tuple(joined)


def split(a: Annotator, node: fx.Node) -> Any:
    """split / split_with_sizes / chunk / unbind: the axis becomes composite."""
    x = a.of(node.args[0])
    values = node.meta.get("val")
    name = _op_name(node)
    default_dim = 0
    dim = _dim(_arg(node, 2 if name != "unbind" else 1, "dim", default_dim), len(x))
    if name == "unbind":
        rest = list(x[:dim]) + list(x[dim + 1:])
        owner = a.owner_of_block(x[dim], rest) if isinstance(x[dim], int) else None
        if owner is None:
            a.fix(x[dim], "unbound into its positions")
            return [tuple(rest) for _ in values]
        a.fix(x[dim], "blocks are unbound by position")  # fused qkv: q, k, v separated
        parts = [a.block_part(owner, i) for i in range(len(values))]
        return [tuple(_pick_part(a, label, owner, part) for label in rest) for part in parts]
    sizes = [_static(v.shape[dim]) for v in values]
    if any(size is None for size in sizes):
        a.fix(x[dim], "split into parts of unknown size")
        return [tuple(x[:dim]) + (None,) + tuple(x[dim + 1:]) for _ in values]
    pieces = a.split(x[dim], sizes)
    return [tuple(x[:dim]) + (piece,) + tuple(x[dim + 1:]) for piece in pieces]


def slice_(a: Annotator, node: fx.Node) -> Any:
    """Slice with step 1 of a feature axis: the axis becomes composite, the slice one part."""
    x = a.of(node.args[0])
    shape = _shape(node.args[0])
    dim = _dim(_arg(node, 1, "dim", 0), len(x))
    label = x[dim]
    out = list(x)
    if label is None or _expr(shape[dim]) == _expr(_shape(node)[dim]):
        return tuple(out)
    start, end, step = (_arg(node, i, n, d) for i, n, d in
                        ((2, "start", 0), (3, "end", None), (4, "step", 1)))
    size = _static(shape[dim])
    if step != 1 or size is None or not isinstance(start, int):
        a.fix(label, "sliced with a step or unknown bounds")
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
    x = a.of(node.args[0])
    dim = _dim(node.args[1], len(x))
    index = node.args[2]
    label = x[dim]
    rest = list(x[:dim]) + list(x[dim + 1:])
    if label is None:
        return tuple(rest)
    owner = a.owner_of_block(label, rest) if isinstance(label, int) else None
    if owner is not None and isinstance(index, int):
        a.fix(label, f"block {index} is selected by position")
        count = a.cls(owner).structure.count
        part = a.block_part(owner, index % count)
        return tuple(_pick_part(a, l, owner, part) for l in rest)
    a.fix(label, "a single position is selected")
    return tuple(rest)


def _pick_part(a: Annotator, label: Label, owner: int, part: int) -> Label:
    """Resolves the labels of ``owner``'s blocks once block ``part`` is picked."""
    if isinstance(label, Within) and a.find(label.space) == a.find(owner):
        return part
    if isinstance(label, PartLevel) and a.find(label.space) == a.find(owner):
        block = a.cls(part).structure.block
        return block if label.level == "blocks" else Within(a.find(part))
    return label


def index(a: Annotator, node: fx.Node) -> Any:
    """Advanced indexing: indexed axes are not features (fixes them if they are)."""
    x = a.of(node.args[0])
    indices = node.args[1]
    indexed = [i for i, idx in enumerate(indices) if idx is not None]
    for i in indexed:
        a.fix(x[i], "indexed by a computed index")
    out_rank = len(_shape(node))
    remaining = [x[i] for i in range(len(x)) if i not in indexed]
    trailing = list(x[len(indices):])
    leading_kept = [x[i] for i in range(len(indices)) if i not in indexed]
    result_rank = out_rank - len(remaining)
    contiguous = indexed == list(range(indexed[0], indexed[-1] + 1)) if indexed else True
    if contiguous and indexed:
        before = [x[i] for i in range(indexed[0]) if i not in indexed]
        after = [x[i] for i in range(indexed[-1] + 1, len(x))]
        return tuple(before + [None] * result_rank + after)
    return tuple([None] * result_rank + leading_kept + trailing)


def masked_fill(a: Annotator, node: fx.Node) -> Any:
    """x with positions where a mask holds replaced by a value: an elementwise op."""
    return elementwise(a, node)


def pixel_shuffle(a: Annotator, node: fx.Node) -> Any:
    """Channels moved into space: fixes the channel space."""
    return a._fallback(node, "pixel shuffle moves channels into space")


def repeat(a: Annotator, node: fx.Node) -> Any:
    """Tiling along axes: repeated feature axes are fixed."""
    x = a.of(node.args[0])
    repeats = list(node.args[1])
    new = len(repeats) - len(x)
    out = [None] * new
    for label, times in zip(x, repeats[new:]):
        if times != 1:
            a.fix(label, "repeated along its own axis")
            out.append(None)
        else:
            out.append(label)
    return tuple(out)


RULES: dict[str, Callable[[Annotator, fx.Node], Any]] = {}


def _register(names: str, rule: Callable) -> None:
    for name in names.split():
        RULES[name] = rule


# layout and identity ops: labels pass through unchanged
_register("contiguous clone detach alias to _to_copy type_as lift_fresh_copy "
          "dropout feature_dropout alpha_dropout _assert_tensor_metadata", same_as_input)
_register("native_dropout", tuple_of_input)
# elementwise unary ops (any elementwise function commutes with a permutation)
_register("relu relu6 gelu silu sigmoid tanh hardswish hardsigmoid hardtanh leaky_relu elu "
          "selu celu mish softplus softsign log_sigmoid exp expm1 log log1p log2 sqrt rsqrt "
          "neg abs reciprocal sign square erf erfc sin cos "
          "nan_to_num round floor ceil trunc logical_not bitwise_not gelu_tanh prelu_scalar "
          "exp2", same_as_input)
# elementwise binary/ternary ops with broadcasting: aligned axes are one space
_register("add sub mul div true_divide floor_divide remainder maximum minimum where "
          "eq ne lt le gt ge logical_and logical_or logical_xor __and__ __or__ bitwise_and "
          "bitwise_or atan2 fmod addcmul addcdiv lerp rsub copy hypot pow clamp clamp_min "
          "clamp_max", elementwise)
_register("masked_fill", masked_fill)
_register("getitem", getitem)
# tensors made from sizes or values alone
_register("arange zeros ones full empty zeros_like ones_like full_like empty_like new_zeros "
          "new_ones new_full new_empty rand randn rand_like randn_like scalar_tensor tensor "
          "linspace fill", constant)
_register("tril triu", triangular)
_register("sym_size sym_numel sym_stride _assert_scalar sym_constrain_range_for_size "
          "_assert_async", no_value)
# layers with parameters
_register("linear", linear)
_register("addmm", addmm)
_register("matmul mm bmm", matmul)
_register("conv1d conv2d conv3d", convolution)
_register("conv_transpose1d conv_transpose2d conv_transpose3d", conv_transpose)
_register("convolution", convolution_overload)
_register("embedding", embedding)
# normalisations
_register("batch_norm _native_batch_norm_legit_no_training _native_batch_norm_legit "
          "native_batch_norm cudnn_batch_norm instance_norm", batch_norm)
_register("layer_norm native_layer_norm", layer_norm)
_register("rms_norm", layer_norm)
_register("group_norm", group_norm)
_register("native_group_norm", native_group_norm)
# attention
_register("scaled_dot_product_attention", attention)
_register("softmax _softmax log_softmax _log_softmax", softmax)
# reductions
_register("sum mean amax amin var std var_mean std_mean prod logsumexp norm "
          "linalg_vector_norm all any", reduction)
_register("argmax argmin max min sort topk argsort kthvalue median mode", positional_reduction)
_register("cumsum cumprod flip roll diff", along_axis)
# spatial ops
_register("max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d "
          "adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool2d "
          "max_pool2d_with_indices upsample_nearest2d upsample_bilinear2d upsample_bicubic2d "
          "upsample_nearest1d upsample_linear1d upsample_nearest3d _upsample_bilinear2d_aa "
          "grid_sampler_2d", spatial_op)
_register("pad constant_pad_nd", pad)
# axis layout
_register("permute", permute)
_register("transpose t swapaxes", transpose)
_register("unsqueeze", unsqueeze)
_register("squeeze", squeeze)
_register("expand expand_as broadcast_to", expand)
_register("view reshape _unsafe_view flatten unflatten view_as reshape_as", reshape)
_register("cat concat concatenate", cat)
_register("stack", stack)
_register("split split_with_sizes chunk unbind tensor_split", split)
_register("slice", slice_)
_register("select", select)
_register("index", index)
_register("pixel_shuffle pixel_unshuffle channel_shuffle native_channel_shuffle", pixel_shuffle)
_register("repeat", repeat)

#: overloads whose labels differ from their packet's (looked up as "name.overload")
OVERLOAD_RULES: dict[str, Callable] = {}
RULES["max.dim"] = max_with_indices
RULES["min.dim"] = max_with_indices
RULES["max.default"] = reduction
RULES["min.default"] = reduction
RULES["max.other"] = elementwise
RULES["min.other"] = elementwise
for _name in ("max.dim", "min.dim", "max.default", "min.default", "max.other", "min.other"):
    OVERLOAD_RULES[_name] = RULES[_name]


# ---------------------------------------------------------------------------------------------
# From the union-find to the spec
# ---------------------------------------------------------------------------------------------
def _propagate_fixed(a: Annotator) -> None:
    """A fixed space fixes its blocks and parts; a fixed part of nothing more."""
    changed = True
    while changed:
        changed = False
        for root in {a.find(e) for e in range(len(a.parent))}:
            info = a.info[root]
            structure = info.structure
            if info.fixed is None or structure is None:
                continue
            nested: list[Label] = []
            if isinstance(structure, Blocks):
                nested = [structure.block] + list(structure.parts or ())
                if info.within_fixed is None:
                    info.within_fixed = info.fixed
                    changed = True
            elif isinstance(structure, Composite):
                nested = list(structure.parts)
            elif isinstance(structure, Tiled):
                nested = [label for label, _ in structure.factors]
            for label in nested:
                if isinstance(label, int) and a.cls(label).fixed is None:
                    a.cls(label).fixed = f"part of a fixed space: {info.fixed}"
                    changed = True


_ACTIVATIONS = {"relu", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid",
                "hardtanh", "leaky_relu", "elu", "selu", "mish", "softplus", "relu6", "mul"}


def _choose_probe(a: Annotator, root: int) -> tuple[str | None, int | None, int | None]:
    """The node where a space's features are observed, and the axis: the first activation
    output carrying the space, else the first node carrying it; else a node carrying a blocks
    space as two axes (heads, inside heads), with the inside axis third."""
    names = a.probes.get(root, [])
    if not names:
        split = a.split_probes.get(root, [])
        return split[0] if split else (None, None, None)
    nodes = {node.name: node for node in a.graph_module.graph.nodes}
    chosen = next((name for name in names if _op_name(nodes[name]) in _ACTIVATIONS - {"mul"}),
                  names[0])
    labels = a.labels[nodes[chosen]]
    axis = next(i for i, label in enumerate(labels)
                if isinstance(label, int) and a.find(label) == root)
    return chosen, axis, None


def build_spec(a: Annotator, model_name: str = "") -> UnitSpec:
    """Turns the annotator's union-find into a :class:`UnitSpec`."""
    _propagate_fixed(a)
    roots: dict[int, None] = {}

    def visit(element: int) -> None:
        root = a.find(element)
        if root in roots:
            return
        roots[root] = None
        structure = a.info[root].structure
        if isinstance(structure, Blocks):
            visit(structure.block)
            for part in structure.parts or ():
                visit(part)
        elif isinstance(structure, Composite):
            for part in structure.parts:
                visit(part)
        elif isinstance(structure, Tiled):
            for label, _ in structure.factors:
                if isinstance(label, int):
                    visit(label)

    param_elements = sorted(a.param_axes)
    relevant = [e for e in param_elements if a.cls(e).feature and _static(a.cls(e).size) != 1]
    for element in relevant:
        visit(element)
    for label, _ in a.grouped.values():
        if isinstance(label, int):
            visit(label)
    output_labels = [a.labels.get(argument)
                     for node in a.graph_module.graph.find_nodes(op="output")
                     for argument in _flat_nodes(node.args)]
    for labels in output_labels:
        for label in labels if isinstance(labels, tuple) else ():
            if isinstance(label, int) and a.cls(label).feature:
                visit(label)
    ordered = sorted(roots)
    ids = {root: f"s{i}" for i, root in enumerate(ordered)}

    def label_id(label: Label) -> str | None:
        return ids.get(a.find(label)) if isinstance(label, int) else None

    spaces: dict[str, Space] = {}
    for root in ordered:
        info = a.info[root]
        structure = info.structure
        fields: dict[str, Any] = {}
        if isinstance(structure, Blocks):
            fields = dict(kind="blocks", block_count=structure.count,
                          block_space=label_id(structure.block),
                          parts=tuple(label_id(p) for p in structure.parts or ()))
        elif isinstance(structure, Composite):
            fields = dict(kind="composite", parts=tuple(label_id(p) for p in structure.parts))
        elif isinstance(structure, Tiled):
            fields = dict(kind="tiled", factors=tuple((label_id(l), int(n))
                                                      for l, n in structure.factors))
        probe, probe_axis, probe_within_axis = _choose_probe(a, root)
        space = Space(id=ids[root], size=int(_static(info.size) or 0), fixed=info.fixed,
                      within_fixed=info.within_fixed if isinstance(structure, Blocks) else None,
                      probe=probe, probe_axis=probe_axis, probe_within_axis=probe_within_axis,
                      origin=info.origin, **fields)
        spaces[space.id] = space

    bindings = []
    for element in relevant:
        key, axis = a.param_axes[element]
        if (key, axis) in a.grouped:
            continue
        bindings.append(Binding(key=key, axis=axis, space=ids[a.find(element)],
                                role=a.roles.get((key, axis), "elementwise")))
    for (key, axis), (label, groups) in a.grouped.items():
        if isinstance(label, int):
            bindings.append(Binding(key=key, axis=axis, space=ids[a.find(label)],
                                    role="consumes", groups=groups))
    bindings.sort(key=lambda b: (b.key, b.axis))
    shapes = {}
    state = dict(a.graph_module.state_dict())
    for key in a.state_keys:
        if key in state:
            shapes[key] = tuple(state[key].shape)
    shapes = {key: shapes[key] for key in sorted(shapes)}
    outputs = [tuple(label_id(label) for label in labels)
               for labels in output_labels if isinstance(labels, tuple)]
    for node, labels in a.labels.items():
        if isinstance(labels, tuple) and "mergec" in node.meta:
            node.meta["mergec"] = node.meta["mergec"]._replace(
                spaces=tuple(label_id(label) for label in labels))
    return UnitSpec(spaces=spaces, bindings=tuple(bindings), shapes=shapes, model=model_name,
                    outputs=tuple(outputs))


def annotate_units(graph_module: fx.GraphModule, state_keys: Iterable[str] | None = None,
                   fix_outputs: bool = True, model_name: str = "") -> UnitSpec:
    """The unit spec of a traced graph module. ``fix_outputs=False`` treats model outputs as
    features that may come out permuted (a backbone whose hidden states are merged further
    on)."""
    keys = state_keys if state_keys is not None else graph_module.meta.get(
        STATE_KEYS, tuple(graph_module.state_dict()))
    annotator = Annotator(graph_module, keys, fix_outputs=fix_outputs)
    annotator.run()
    if annotator.fallbacks:
        log.info("annotate-units: %d ops without a rule fixed their spaces",
                 len(annotator.fallbacks))
    return build_spec(annotator, model_name)


@dataclass(frozen=True)
class AnnotateUnits:
    """The annotate-units pass: the unit spec of every graph of the state (``specs``)."""

    fix_outputs: bool = True
    name: ClassVar[str] = "annotate-units"

    def run(self, state: PipelineState) -> PipelineState:
        graphs = state.require("graphs", self.name)
        specs = tuple(annotate_units(graph, graph.meta[STATE_KEYS], self.fix_outputs,
                                     type(model).__name__)
                      for graph, model in zip(graphs, state.models))
        return state.evolve(specs=specs)
