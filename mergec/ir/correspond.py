"""Whether two traced models correspond: one topology, one structure of spaces."""
from __future__ import annotations

import torch
from torch import fx

from mergec.errors import MergeError
from mergec.ir.spec import UnitSpec


def _describe(node: fx.Node) -> str:
    """A node as a user reads it: what it does and the module it belongs to."""
    what = node.target if node.op == "get_attr" else getattr(node.target, "__name__",
                                                             str(node.target))
    stack = node.meta.get("nn_module_stack") or {}
    module = next(reversed(stack.values()))[0] if stack else ""
    place = f" in module {module!r}" if module and node.op != "get_attr" else ""
    return f"{node.op} {what!r} (node {node.name!r}{place})"


def correspond(spec_a: UnitSpec, spec_b: UnitSpec, module_a: fx.GraphModule,
               module_b: fx.GraphModule) -> bool:
    """Checks that two graphs have one topology and their specs one structure; returns whether
    their widths differ. Raises a MergeError naming the first node where they part ways."""
    nodes_a = [n for n in module_a.graph.nodes if n.op != "output"]
    nodes_b = [n for n in module_b.graph.nodes if n.op != "output"]
    for node_a, node_b in zip(nodes_a, nodes_b):
        rank_a, rank_b = (len(n.meta["val"].shape) if isinstance(n.meta.get("val"), torch.Tensor)
                          else None for n in (node_a, node_b))
        if node_a.target != node_b.target or rank_a != rank_b:
            raise MergeError(
                "merge: the two models do not correspond. They part ways at A's "
                f"{_describe(node_a)} and B's {_describe(node_b)}. mergec merges models "
                "of one architecture, also at different widths, and residual networks or plain "
                "chains of one family at different depths.")
    if len(nodes_a) != len(nodes_b):
        raise MergeError(f"merge: the two models do not correspond: A's graph has {len(nodes_a)} "
                         f"nodes, B's {len(nodes_b)}")
    if set(spec_a.shapes) != set(spec_b.shapes):
        missing = sorted(set(spec_a.shapes) ^ set(spec_b.shapes))[:5]
        raise MergeError(f"merge: the models' state dicts differ in keys, e.g. {missing}")
    bindings_a = {(b.key, b.axis): b.space for b in spec_a.bindings}
    bindings_b = {(b.key, b.axis): b.space for b in spec_b.bindings}
    if bindings_a != bindings_b or spec_a.spaces.keys() != spec_b.spaces.keys():
        raise MergeError(f"merge: the two models' units do not correspond: "
                         f"{_first_difference(spec_a, spec_b, bindings_a, bindings_b)}; their "
                         "graphs share a topology but not their spaces")
    for space_id, space_a in spec_a.spaces.items():
        space_b = spec_b.spaces[space_id]
        if (space_a.kind, space_a.fixed is None) != (space_b.kind, space_b.fixed is None):
            raise MergeError(f"merge: space {space_id} ({space_a.origin}) is {space_a.kind} in "
                             f"A and {space_b.kind} in B")
    return spec_a.shapes != spec_b.shapes


def _first_difference(spec_a: UnitSpec, spec_b: UnitSpec, bindings_a: dict, bindings_b: dict
                      ) -> str:
    """Where two specs of one topology part ways: the first axis bound to different spaces,
    else the first space only one of them has (one head against several: a flat space against
    a blocks space and its block order)."""
    for key in sorted(bindings_a.keys() | bindings_b.keys()):
        if bindings_a.get(key) != bindings_b.get(key):
            return (f"axis {key[1]} of {key[0]} is in space {bindings_a.get(key)} in A and "
                    f"{bindings_b.get(key)} in B")
    for name, spec, other in (("A", spec_a, spec_b), ("B", spec_b, spec_a)):
        for space_id in sorted(spec.spaces.keys() - other.spaces.keys()):
            space = spec.spaces[space_id]
            return f"only {name} has space {space_id} ({space.kind}, {space.origin})"
    return "their spaces differ"
