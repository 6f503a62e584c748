"""Human-readable views of a unit spec: the space table and the space graph."""
from __future__ import annotations

import math
from collections import Counter

import networkx as nx

from mergec.ir.spec import Space, UnitSpec


def describe_structure(space: Space) -> str:
    if space.kind == "blocks":
        text = f"blocks {space.block_count}x{space.block_size} (order {space.block_space})"
        if space.parts:
            text += f" parts {','.join(space.parts)}"
        if space.group == "orthogonal":
            text += ", rotations inside"
        return text
    if space.kind == "composite":
        return f"composite {'+'.join(space.parts)}"
    if space.kind == "tiled":
        return "tiled " + "x".join(f"{f or '·'}[{n}]" for f, n in space.factors)
    if space.group == "orthogonal":
        return "flat, rotations" + (" keeping 1" if space.ones_fixed else "")
    return "flat"


def space_table(spec: UnitSpec, width: int = 60) -> str:
    """The table printed by ``mergec inspect``: one row a space."""
    bound = Counter(binding.space for binding in spec.bindings)
    rows = [("space", "size", "structure", "params", "probe", "fixed because")]
    for space in spec.spaces.values():
        reason = space.fixed or (f"inside blocks: {space.within_fixed}"
                                 if space.within_fixed else "")
        if len(reason) > width:
            reason = reason[: width - 1] + "…"
        rows.append((space.id, str(space.size), describe_structure(space),
                     str(bound.get(space.id, 0)), space.probe or "-", reason or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row[:-1], widths)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    free = len(spec.free_spaces())
    lines.append("")
    lines.append(f"{len(spec.spaces)} spaces, {free} free; coverage {spec.coverage():.3f} "
                 f"(fraction of parameter elements with an axis in a free space)")
    unread = spec.unread()
    if unread:
        elements = sum(math.prod(spec.shapes[key]) for key in unread)
        shown = ", ".join(unread[:3]) + (", …" if len(unread) > 3 else "")
        lines.append(f"{elements:,} elements in {len(unread)} entries the traced graph never "
                     f"reads ({shown}); of what it reads, coverage "
                     f"{spec.coverage(read_only=True):.3f}")
    return "\n".join(lines)


def space_graph(spec: UnitSpec) -> nx.DiGraph:
    """Spaces and parameters as a graph: parameter -> space edges labelled by role, space ->
    part / block-order / factor edges for structure."""
    graph = nx.DiGraph()
    for space in spec.spaces.values():
        graph.add_node(space.id, kind="space", label=f"{space.id} [{space.size}] "
                       f"{describe_structure(space)}", fixed=space.fixed is not None)
        for part in space.parts:
            graph.add_edge(space.id, part, label="part")
        if space.block_space:
            graph.add_edge(space.id, space.block_space, label="block order")
        for factor, _ in space.factors:
            if factor:
                graph.add_edge(space.id, factor, label="factor")
    for binding in spec.bindings:
        graph.add_node(binding.key, kind="parameter", label=binding.key)
        graph.add_edge(binding.key, binding.space, label=f"{binding.role} axis {binding.axis}")
    return graph


def to_dot(graph: nx.DiGraph) -> str:
    """Graphviz DOT text of a space graph (fixed spaces grey, parameters as boxes)."""
    def quote(text: str) -> str:
        return '"' + str(text).replace('"', '\\"') + '"'

    lines = ["digraph spaces {", "  rankdir=LR;"]
    for node, data in graph.nodes(data=True):
        shape = "box" if data.get("kind") == "parameter" else "ellipse"
        style = ', style=filled, fillcolor="#dddddd"' if data.get("fixed") else ""
        lines.append(f"  {quote(node)} [label={quote(data.get('label', node))}, "
                     f"shape={shape}{style}];")
    for source, target, data in graph.edges(data=True):
        label = quote(data.get("label", ""))
        lines.append(f"  {quote(source)} -> {quote(target)} [label={label}];")
    lines.append("}")
    return "\n".join(lines) + "\n"
