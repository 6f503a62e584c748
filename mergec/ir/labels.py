"""Axis labels and the spaces they name: the algebra that annotate-units' rules are written in.

Every axis of every tensor in a graph gets a :data:`Label`:

* ``None`` — not a feature axis (batch, sequence, spatial, a constant's axis) or one that must
  keep its order;
* an ``int`` — an *element* of a union-find over feature axes; one class of elements is one
  *space* (a set of axes permuted together);
* :class:`Within` — the axis inside the blocks (heads, groups) of a blocks space;
* :class:`Product` — an axis that merges several factors row-major (``flatten`` of C×H×W,
  batch merged with heads);
* :class:`PartLevel` — heads inside the blocks of a space before a block is picked.

:class:`Spaces` is the union-find together with what each space carries: its size (an integer
or a symbolic size), why it is fixed, and its *structure* (:class:`Blocks`, :class:`Composite`,
:class:`Tiled`). Joining two spaces joins their structures, or fixes them when the structures
disagree: a wrong space silently breaks a merged model, a fixed space only merges less.

Example::

    spaces = Spaces()
    hidden = spaces.new(8, "fc1.weight")
    consumed = spaces.new(8, "fc2.weight")
    spaces.unify(hidden, consumed, "linear input")      # one space now
    heads, inside = spaces.blockify(hidden, 2, 4)       # two blocks of four
    assert spaces.structure(consumed) == Blocks(2, heads)
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence, Union

import sympy
import torch


# ---------------------------------------------------------------------------------------------
# Labels and structures
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
    inner space, which :meth:`Spaces.picked` resolves."""

    space: int
    level: str


Label = Union[int, Within, Product, PartLevel, None]


@dataclass(frozen=True)
class Blocks:
    """``count`` blocks (heads, groups) permuted by the space of element ``block``; ``parts``
    are the per-block inner spaces once the blocks are separated (a fused qkv indexed)."""

    count: int
    block: int
    parts: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Composite:
    """A direct sum of ``parts`` of ``sizes`` (cat, split): each part permuted on its own."""

    parts: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class Tiled:
    """A row-major product of ``factors`` ((label, size), ...): flatten of (C, H, W)."""

    factors: tuple[tuple[Label, int], ...]


Structure = Union[Blocks, Composite, Tiled, None]


class NodeUnits(NamedTuple):
    """What annotate-units recorded on a node (``node.meta["mergec"]``): the axis labels, the
    op they were derived for, the rule that fired, the reason when that rule took the sound
    fallback (identity for every space the op touches), and, once the spec is built, the space
    id of each axis (None: not a plain feature axis) and, for an axis inside the blocks of a
    blocks space (heads split off), that space's id (``within``)."""

    labels: Any
    op: str
    rule: str
    fallback: str | None = None
    spaces: tuple | None = None
    within: tuple | None = None


class SpaceInfo(NamedTuple):
    """What a space carries, as a snapshot: see :meth:`Spaces.info`."""

    size: Any
    origin: str
    fixed: str | None
    within_fixed: str | None
    structure: Structure
    feature: bool  # seen on a tensor axis or given a role by a rule


@dataclass
class _Record:
    """The mutable record of one union-find root."""

    size: Any
    origin: str
    fixed: str | None = None
    within_fixed: str | None = None
    structure: Structure = None
    feature: bool = False


# ---------------------------------------------------------------------------------------------
# Sizes: integers or the symbolic sizes of a dynamic trace
# ---------------------------------------------------------------------------------------------
def as_expr(size: Any) -> sympy.Expr:
    """``size`` (an int, a ``torch.SymInt`` or a sympy expression) as a sympy expression."""
    if isinstance(size, sympy.Basic):
        return size
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(int(size))


def exact_quotient(big: sympy.Expr, small: sympy.Expr) -> sympy.Expr | None:
    """``big / small`` if it is a whole (polynomial) quotient, else None."""
    if big.is_Integer and small.is_Integer:
        return sympy.Integer(int(big) // int(small)) if int(big) % int(small) == 0 else None
    numerator, denominator = sympy.fraction(sympy.cancel(big / small))
    return numerator if denominator == 1 else None


def is_one(size: Any) -> bool:
    """Whether ``size`` is 1 (a broadcast axis)."""
    return as_expr(size) == 1


def static_size(size: Any) -> int | None:
    """``size`` as an int when it is one, else None (a symbolic size)."""
    expr = as_expr(size)
    return int(expr) if expr.is_Integer else None


# ---------------------------------------------------------------------------------------------
# The union-find over feature axes
# ---------------------------------------------------------------------------------------------
class Spaces:
    """A union-find over feature-axis elements; a class is a space with a size, a structure
    and, when it may only keep its order, the reason. ``locate`` says where the graph walk is
    (appended to every reason); elements are numbered in creation order, and the oldest element
    of a class is its root, so ids are stable and readable."""

    def __init__(self, locate: Callable[[], str] = lambda: "") -> None:
        self._locate = locate
        self._parent: list[int] = []
        self._records: list[_Record] = []
        self._probes: dict[int, list[str]] = defaultdict(list)
        self._split_probes: dict[int, list[tuple[str, int, int]]] = defaultdict(list)

    # -- elements ----------------------------------------------------------------------------
    def new(self, size: Any, origin: str, feature: bool = False) -> int:
        """A new element in a space of its own; ``origin`` names it in reports."""
        self._parent.append(len(self._parent))
        self._records.append(_Record(size=size, origin=origin, feature=feature))
        return len(self._parent) - 1

    def find(self, element: int) -> int:
        """The root of ``element``'s space (path compression)."""
        root = element
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[element] != root:
            self._parent[element], element = root, self._parent[element]
        return root

    def _record(self, element: int) -> _Record:
        """The mutable record of ``element``'s space."""
        return self._records[self.find(element)]

    def info(self, element: int) -> SpaceInfo:
        """A snapshot of what ``element``'s space carries."""
        record = self._record(element)
        return SpaceInfo(record.size, record.origin, record.fixed, record.within_fixed,
                         record.structure, record.feature)

    def structure(self, element: int) -> Structure:
        """The structure of ``element``'s space (None: flat)."""
        return self._record(element).structure

    def mark_feature(self, element: int) -> None:
        """Records that ``element``'s space is a feature space (it belongs in the spec)."""
        self._record(element).feature = True

    def roots(self) -> set[int]:
        """The root of every space."""
        return {self.find(e) for e in range(len(self._parent))}

    # -- where features are observed ---------------------------------------------------------
    def add_probe(self, element: int, node_name: str) -> None:
        """Node ``node_name`` carries ``element``'s space as one axis."""
        self._probes[self.find(element)].append(node_name)

    def add_split_probe(self, space: int, node_name: str, block_axis: int, axis: int) -> None:
        """Node ``node_name`` carries blocks space ``space`` as two axes (blocks, within)."""
        self._split_probes[self.find(space)].append((node_name, block_axis, axis))

    def probes(self, root: int) -> list[str]:
        """The nodes that carry space ``root`` as one axis, in graph order."""
        return self._probes.get(root, [])

    def split_probes(self, root: int) -> list[tuple[str, int, int]]:
        """(node, block axis, within axis) of the nodes that carry ``root`` as two axes."""
        return self._split_probes.get(root, [])

    # -- fixing ------------------------------------------------------------------------------
    def fix(self, label: Label, reason: str) -> None:
        """Marks every space in ``label`` as identity-only, with a reason (the first wins)."""
        if label is None:
            return
        if isinstance(label, int):
            record = self._record(label)
            if record.fixed is None:
                record.fixed = self._placed(reason)
        elif isinstance(label, Within):
            record = self._record(label.space)
            if record.within_fixed is None:
                record.within_fixed = self._placed(reason)
        elif isinstance(label, Product):
            for factor, _ in label.factors:
                self.fix(factor, reason)
        elif isinstance(label, PartLevel):
            for part in self.structure(label.space).parts:
                self.fix(part, reason)

    def _placed(self, reason: str) -> str:
        """``reason`` with the place it was found, where there is one."""
        where = self._locate()
        return f"{reason} at {where}" if where else reason

    def propagate_fixed(self) -> None:
        """A fixed space fixes its blocks and parts; a fixed part fixes nothing more."""
        changed = True
        while changed:
            changed = False
            for root in self.roots():
                record = self._records[root]
                structure = record.structure
                if record.fixed is None or structure is None:
                    continue
                if isinstance(structure, Blocks) and record.within_fixed is None:
                    record.within_fixed = record.fixed
                    changed = True
                for label in _nested(structure):
                    if isinstance(label, int) and self._record(label).fixed is None:
                        self._record(label).fixed = f"part of a fixed space: {record.fixed}"
                        changed = True

    def closure(self, elements: Sequence[int]) -> list[int]:
        """The roots of ``elements``' spaces and of every space nested in their structures
        (blocks, parts, factors), sorted."""
        seen: set[int] = set()
        stack = list(elements)
        while stack:
            root = self.find(stack.pop())
            if root not in seen:
                seen.add(root)
                stack.extend(label for label in _nested(self._records[root].structure)
                             if isinstance(label, int))
        return sorted(seen)

    # -- joining -----------------------------------------------------------------------------
    def union(self, a: int, b: int) -> int:
        """Joins the spaces of two elements (and their structures); axes of different sizes
        are not joined but fixed."""
        root_a, root_b = self.find(a), self.find(b)
        if root_a == root_b:
            return root_a
        record_a, record_b = self._records[root_a], self._records[root_b]
        if as_expr(record_a.size) != as_expr(record_b.size):
            reason = f"joins axes of different sizes ({record_a.size} and {record_b.size})"
            self.fix(root_a, reason)
            self.fix(root_b, reason)
            return root_a
        if root_b < root_a:  # the older element stays the root: stable, readable ids
            root_a, root_b, record_a, record_b = root_b, root_a, record_b, record_a
        self._parent[root_b] = root_a
        record_a.fixed = record_a.fixed or record_b.fixed
        record_a.within_fixed = record_a.within_fixed or record_b.within_fixed
        record_a.feature = record_a.feature or record_b.feature
        self._probes[root_a].extend(self._probes.pop(root_b, []))
        self._split_probes[root_a].extend(self._split_probes.pop(root_b, []))
        structure_a, structure_b = record_a.structure, record_b.structure
        record_a.structure = structure_a or structure_b
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
            self._record(root).structure = Blocks(
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
        """Joins two axis labels: the axes must be permuted together. Labels that cannot be
        joined (a feature axis with a non-feature one, different structures) are fixed."""
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
            size_a, size_b = self._record(a.space).size, self._record(b.space).size
            if as_expr(size_a) != as_expr(size_b) and (self._repeat_blocks(a.space, b.space)
                                 or self._repeat_blocks(b.space, a.space)):
                return a
            self.union(a.space, b.space)
            return a
        if isinstance(a, Product) and isinstance(b, Product):
            if [as_expr(n) for _, n in a.factors] == [as_expr(n) for _, n in b.factors]:
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

    def unify_all(self, labels: Sequence[Label], why: str) -> Label:
        """Joins all ``labels`` (None when there are none)."""
        labels = list(labels)
        if not labels:
            return None
        result = labels[0]
        for label in labels[1:]:
            result = self.unify(result, label, why)
        return result

    def _repetitions(self, order: int, blocks: Blocks) -> int | None:
        """``n`` if block order ``order`` is that of ``blocks`` repeated n times (a tiled
        (blocks, n) space: grouped-query heads), else None."""
        tiled = self.structure(order)
        if not isinstance(tiled, Tiled) or len(tiled.factors) != 2:
            return None
        (base, count), (rest, times) = tiled.factors
        if rest is not None or not isinstance(base, int) or count != blocks.count or \
                self.find(base) != self.find(blocks.block):
            return None
        return times

    def _repeats(self, many: int, few: int) -> int | None:
        """``n`` if blocks space ``many``'s block order is ``few``'s repeated n times
        (grouped-query attention: each key/value head serves n query heads), else None."""
        structure_many, structure_few = self.structure(many), self.structure(few)
        if not (isinstance(structure_many, Blocks) and isinstance(structure_few, Blocks)):
            return None
        times = self._repetitions(structure_many.block, structure_few)
        if times is None:
            return None
        block_many = static_size(self._record(many).size) // structure_many.count
        block_few = static_size(self._record(few).size) // structure_few.count
        return times if block_many == block_few else None

    def _repeat_blocks(self, many: int, few: int) -> bool:
        """Ties the inside of each block of ``many`` to the inside of the block of ``few`` it
        repeats. Returns False when the two are not so related."""
        times = self._repeats(many, few)
        if times is None:
            return False
        structure = self.structure(many)
        shared = tuple(self.block_part(few, h // times) for h in range(structure.count))
        if structure.parts:
            for part, wanted in zip(structure.parts, shared):
                self.union(part, wanted)
        else:
            self._record(many).structure = Blocks(structure.count, structure.block, shared)
        return True

    def _tile(self, element: int, product: Product) -> bool:
        """Gives ``element``'s space the structure of ``product`` (a linear after flatten)."""
        factors = []
        for label, size in product.factors:
            static = static_size(size)
            if static is None or isinstance(label, (Within, Product, PartLevel)):
                return False
            factors.append((label, static))
        record = self._record(element)
        tiled = Tiled(tuple(factors))
        if record.structure is None:
            record.structure = tiled
        else:
            self._reconcile(self.find(element), record.structure, tiled)
        return True

    # -- structure ---------------------------------------------------------------------------
    def blockify(self, label: Label, count: Any, size: Any) -> tuple[Label, Label]:
        """Splits a feature axis into (blocks, within): heads or groups."""
        if label is None:
            return None, None
        count_static, size_static = static_size(count), static_size(size)
        if isinstance(label, int) and count_static is not None and size_static is not None:
            root = self.find(label)
            record = self._records[root]
            if record.structure is None:
                block = self.new(count_static, f"blocks of {record.origin}", feature=True)
                record.structure = Blocks(count_static, block)
                return block, Within(root)
            if isinstance(record.structure, Blocks) and record.structure.count == count_static:
                return record.structure.block, Within(root)
        self.fix(label, f"split into {count}×{size} in a way no rule describes")
        return None, None

    def blockify_parts(self, space: int, count: Any, size: Any) -> tuple[Label, Label]:
        """Splits the inside of every block of ``space`` into (count, size): the heads of a
        fused qkv projection reshaped to (3, heads, head_dim)."""
        structure = self.structure(space)
        blocks = static_size(count)
        if isinstance(structure, Blocks) and blocks is not None and static_size(size) is not None:
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
            record = self._records[root]
            if record.structure is None:
                parts = tuple(self.new(s, f"part {i} of {record.origin}", feature=True)
                              for i, s in enumerate(sizes))
                record.structure = Composite(parts, sizes)
                return list(parts)
            if isinstance(record.structure, Composite) and record.structure.sizes == sizes:
                return list(record.structure.parts)
        self.fix(label, f"split into parts {sizes} that do not match its structure")
        return [None] * len(sizes)

    def block_part(self, space: int, index: int) -> int:
        """The inner space of block ``index`` of blocks space ``space`` (blocks separated)."""
        record = self._record(space)
        structure = record.structure
        assert isinstance(structure, Blocks)
        if structure.parts is None:
            inner = static_size(record.size) // structure.count
            parts = tuple(self.new(inner, f"block {i} of {record.origin}", feature=True)
                          for i in range(structure.count))
            record.structure = structure = Blocks(structure.count, structure.block, parts)
        return structure.parts[index]

    def block_count(self, space: int) -> int:
        """The number of blocks of blocks space ``space``."""
        structure = self.structure(space)
        assert isinstance(structure, Blocks)
        return structure.count

    def is_block_order(self, element: int, space: int) -> bool:
        """Whether ``element`` is in the space that orders the blocks of ``space``."""
        structure = self.structure(space)
        return isinstance(structure, Blocks) and self.find(structure.block) == self.find(element)

    def owner_of_block(self, element: int, labels: Sequence[Label]) -> int | None:
        """The blocks space among ``labels`` (as Within) whose block element is ``element``."""
        for label in labels:
            if isinstance(label, (Within, PartLevel)) and self.is_block_order(element, label.space):
                return label.space
        return None

    def picked(self, label: Label, owner: int, part: int) -> Label:
        """``label`` once block ``part`` of ``owner`` is picked by position (fused qkv)."""
        if isinstance(label, Within) and self.find(label.space) == self.find(owner):
            return part
        if isinstance(label, PartLevel) and self.find(label.space) == self.find(owner):
            block = self.structure(part).block
            return block if label.level == "blocks" else Within(self.find(part))
        return label

    # -- reshapes ----------------------------------------------------------------------------
    def refine(self, atoms: list[tuple[Label, sympy.Expr]],
               out_sizes: list[sympy.Expr]) -> list[list[tuple[Label, sympy.Expr]]] | None:
        """Assigns the (label, size) atoms of a reshape's input, in order, to its output axes,
        splitting an atom into blocks where an output axis is smaller; None when the output
        axes do not refine the atoms."""
        out: list[list[tuple[Label, sympy.Expr]]] = [[] for _ in out_sizes]
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
                elif (rest := exact_quotient(remaining, atom)) is not None:
                    out[j].append((label, atom))
                    index += 1
                    remaining = rest
                elif (rest := exact_quotient(atom, remaining)) is not None:
                    head, tail = self._split_atom(label, remaining, rest)
                    out[j].append((head, remaining))
                    atoms[index] = (tail, rest)
                    remaining = sympy.Integer(1)
                else:
                    return None
        return out if index == len(atoms) else None

    def _split_atom(self, label: Label, count: sympy.Expr,
                    size: sympy.Expr) -> tuple[Label, Label]:
        """An atom split into (count, size) by a reshape: blocks of a flat space, blocks inside
        the blocks of a blocks space."""
        if isinstance(label, int):
            return self.blockify(label, count, size)
        if isinstance(label, Within):
            return self.blockify_parts(label.space, count, size)
        if label is not None:
            self.fix(label, "split again inside its blocks")
        return None, None

    def merge_factors(self, factors: list[tuple[Label, Any]]) -> Label:
        """The label of a reshape output axis made of ``factors`` (label, size): a factor
        alone, blocks and within merged back into their space, else a :class:`Product`."""
        if not factors:
            return None
        if len(factors) == 1:
            return factors[0][0]
        if all(label is None for label, _ in factors):
            return None
        if len(factors) == 2:
            (first, _), (second, _) = factors
            if isinstance(first, PartLevel) and isinstance(second, PartLevel) and \
                    (first.level, second.level) == ("blocks", "within") and \
                    first.space == second.space:
                return Within(first.space)
            if isinstance(first, int) and isinstance(second, Within):
                if self.is_block_order(first, second.space):
                    return second.space
                repeated = self._grouped_heads(first, second.space)
                if repeated is not None:
                    return repeated
        merged: list = []
        for label, size in factors:  # consecutive non-feature factors are one: (C, H*W)
            if label is None and merged and merged[-1][0] is None:
                merged[-1] = (None, as_expr(merged[-1][1]) * as_expr(size))
            else:
                merged.append((label, size))
        return Product(tuple(merged))

    def _grouped_heads(self, order: int, space: int) -> int | None:
        """Attention output of grouped-query heads: query heads ``order`` (a key/value head
        order repeated n times) over the inside of value space ``space``: a new blocks space
        whose block i is value block i // n."""
        structure = self.structure(space)
        if not isinstance(structure, Blocks):
            return None
        times = self._repetitions(order, structure)
        if times is None:
            return None
        count = structure.count
        record = self._record(space)
        block = static_size(record.size) // count
        output = self.new(block * count * times, f"grouped heads of {record.origin}",
                          feature=True)
        self._records[output].structure = Blocks(count * times, order, tuple(
            self.block_part(space, h // times) for h in range(count * times)))
        return output


def _nested(structure: Structure) -> list[Label]:
    """The labels a structure is made of: blocks and parts, parts, or factors."""
    if isinstance(structure, Blocks):
        return [structure.block] + list(structure.parts or ())
    if isinstance(structure, Composite):
        return list(structure.parts)
    if isinstance(structure, Tiled):
        return [label for label, _ in structure.factors]
    return []
