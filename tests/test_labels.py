"""The label algebra of the IR (``mergec/ir/labels.py``) on its own, without a graph: the
union-find over feature axes, the structures spaces gain and how joining reconciles them, and
the size arithmetic of symbolic shapes."""
from __future__ import annotations

import pytest
import sympy
from hypothesis import given
from hypothesis import strategies as st

from mergec.ir.labels import (
    Blocks,
    Composite,
    NodeUnits,
    PartLevel,
    Product,
    Spaces,
    Tiled,
    Within,
    as_expr,
    exact_quotient,
    is_one,
    static_size,
)


def located(where: str = "node %x") -> Spaces:
    return Spaces(locate=lambda: where)


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------
def test_sizes_of_ints_and_symbols() -> None:
    s = sympy.Symbol("s", positive=True, integer=True)
    assert as_expr(6) == sympy.Integer(6) and as_expr(s) == s
    assert exact_quotient(sympy.Integer(12), sympy.Integer(4)) == 3
    assert exact_quotient(sympy.Integer(12), sympy.Integer(5)) is None
    assert exact_quotient(4 * s, s) == 4 and exact_quotient(4 * s, 3 * s) is None
    assert is_one(1) and not is_one(2)
    assert static_size(7) == 7 and static_size(s) is None


# ---------------------------------------------------------------------------------------------
# Union-find
# ---------------------------------------------------------------------------------------------
def test_the_oldest_element_is_the_root_and_state_is_merged() -> None:
    spaces = located()
    first, second, third = (spaces.new(4, name) for name in ("a", "b", "c"))
    spaces.add_probe(third, "relu")
    spaces.mark_feature(third)
    spaces.unify(third, second, "test")
    spaces.unify(second, first, "test")
    assert {spaces.find(e) for e in (first, second, third)} == {first}
    info = spaces.info(third)
    assert info.origin == "a" and info.feature and info.fixed is None
    assert spaces.probes(first) == ["relu"]
    assert spaces.roots() == {first}


def test_joining_axes_of_different_sizes_fixes_both() -> None:
    spaces = located("node %add")
    small, big = spaces.new(4, "small"), spaces.new(6, "big")
    spaces.unify(small, big, "add")
    assert spaces.find(small) != spaces.find(big)
    assert spaces.info(small).fixed == "joins axes of different sizes (4 and 6) at node %add"
    assert spaces.info(big).fixed is not None


def test_meeting_a_non_feature_axis_fixes_the_space_with_the_reason() -> None:
    spaces = located("node %mul")
    hidden = spaces.new(4, "hidden")
    assert spaces.unify(hidden, None, "mul of two tensors") is None
    assert spaces.info(hidden).fixed.startswith("mul of two tensors: meets an axis that must")
    assert spaces.info(hidden).fixed.endswith("at node %mul")
    spaces.fix(hidden, "a later reason")
    assert "a later reason" not in spaces.info(hidden).fixed  # the first reason stays


@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7)), max_size=20))
def test_unions_form_the_connected_components(pairs: list[tuple[int, int]]) -> None:
    spaces = located()
    elements = [spaces.new(3, str(i)) for i in range(8)]
    for a, b in pairs:
        spaces.unify(elements[a], elements[b], "test")
    components = {i: {i} for i in range(8)}  # reference: merge sets
    for a, b in pairs:
        merged = components[a] | components[b]
        for i in merged:
            components[i] = merged
    for i in range(8):
        same = {j for j in range(8) if spaces.find(elements[j]) == spaces.find(elements[i])}
        assert same == components[i]
        assert spaces.find(elements[i]) == min(components[i])


# ---------------------------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------------------------
def test_blockify_gives_heads_and_joining_shares_them() -> None:
    spaces = located()
    q, k = spaces.new(8, "q"), spaces.new(8, "k")
    heads_q, within_q = spaces.blockify(q, 2, 4)
    heads_k, within_k = spaces.blockify(k, 2, 4)
    assert within_q == Within(q) and spaces.structure(q) == Blocks(2, heads_q)
    spaces.unify(within_q, within_k, "attention query·key")
    assert spaces.find(q) == spaces.find(k) and spaces.find(heads_q) == spaces.find(heads_k)
    assert spaces.is_block_order(heads_k, q)
    assert spaces.owner_of_block(heads_q, [None, Within(k)]) == k
    assert spaces.block_count(q) == 2


def test_blocks_of_different_counts_fix_the_space() -> None:
    spaces = located()
    a, b = spaces.new(8, "a"), spaces.new(8, "b")
    spaces.blockify(a, 2, 4)
    spaces.blockify(b, 4, 2)
    spaces.unify(a, b, "add")
    assert spaces.find(a) == spaces.find(b)
    assert spaces.info(b).fixed.startswith("joins incompatible structures (Blocks and Blocks)")


def test_split_gives_a_composite_and_matching_splits_share_parts() -> None:
    spaces = located()
    fused = spaces.new(6, "qkv")
    q, k, v = spaces.split(fused, [2, 2, 2])
    assert spaces.structure(fused) == Composite((q, k, v), (2, 2, 2))
    assert spaces.split(fused, [2, 2, 2]) == [q, k, v]
    assert spaces.split(fused, [3, 3]) == [None, None]
    assert "do not match its structure" in spaces.info(fused).fixed


def test_joining_a_flat_space_with_a_product_tiles_it() -> None:
    spaces = located()
    channels, features = spaces.new(4, "conv"), spaces.new(36, "fc.weight")
    flattened = Product(((channels, 4), (None, 9)))
    assert spaces.unify(flattened, features, "linear input") == features
    assert spaces.structure(features) == Tiled(((channels, 4), (None, 9)))


def test_selected_blocks_become_separate_spaces() -> None:
    spaces = located()
    fused = spaces.new(6, "qkv")
    order, inside = spaces.blockify(fused, 3, 2)
    parts = [spaces.block_part(fused, i) for i in range(3)]
    assert spaces.structure(fused) == Blocks(3, order, tuple(parts))
    assert [spaces.info(p).size for p in parts] == [2, 2, 2]
    assert spaces.picked(inside, fused, parts[1]) == parts[1]
    assert spaces.picked(None, fused, parts[1]) is None


def test_a_fixed_space_fixes_what_it_is_made_of() -> None:
    spaces = located()
    grouped = spaces.new(8, "conv")
    order, _ = spaces.blockify(grouped, 2, 4)
    fused = spaces.new(6, "qkv")
    parts = spaces.split(fused, [3, 3])
    spaces.fix(grouped, "reaches a model output")
    spaces.fix(fused, "reaches a model output")
    spaces.propagate_fixed()
    assert spaces.info(grouped).within_fixed == spaces.info(grouped).fixed
    assert spaces.info(order).fixed.startswith("part of a fixed space: reaches a model output")
    assert all(spaces.info(p).fixed is not None for p in parts)
    assert spaces.closure([grouped, fused]) == sorted([grouped, order, fused, *parts])


# ---------------------------------------------------------------------------------------------
# Reshapes
# ---------------------------------------------------------------------------------------------
def test_a_reshape_into_heads_and_back_is_the_same_space() -> None:
    spaces = located()
    hidden = spaces.new(8, "q")
    atoms = [(None, sympy.Integer(2)), (hidden, sympy.Integer(8))]
    split = spaces.refine(atoms, [sympy.Integer(2), sympy.Integer(2), sympy.Integer(4)])
    assert split is not None
    (batch,), (heads,), (within,) = split
    assert batch == (None, 2) and within == (Within(hidden), 4)
    assert spaces.merge_factors([heads, within]) == hidden
    assert spaces.refine(atoms, [sympy.Integer(3)]) is None


def test_a_fused_qkv_reshaped_to_three_times_heads_gives_part_levels() -> None:
    spaces = located()
    fused = spaces.new(12, "qkv")
    _, inside = spaces.blockify(fused, 3, 4)
    heads, within = spaces.blockify_parts(fused, 2, 2)
    assert heads == PartLevel(fused, "blocks") and within == PartLevel(fused, "within")
    assert spaces.merge_factors([(heads, 2), (within, 2)]) == inside
    assert spaces.merge_factors([(None, 2), (None, 3)]) is None


def test_node_units_are_immutable() -> None:
    units = NodeUnits(labels=(None, 3), op="conv2d", rule="convolution")
    assert units.fallback is None and units.spaces is None
    with pytest.raises(AttributeError):
        units.rule = "elementwise"
    assert units._replace(spaces=(None, "s0")).spaces == (None, "s0")
