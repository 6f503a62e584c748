"""segment: the stages and blocks of a residual network, from its annotated graph.

A *stage* is a residual stream: a space joined by adds of two input-dependent feature tensors.
A *block* is the part of a stage owned by one module (``layer1.2``, ``encoder.layers.3``): the
residual adds inside that module, in graph order; its output is its last add. A transformer
layer with an attention and an MLP residual is one block with two adds.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from mergec.errors import MergeError
from mergec.passes.trace import module_path


@dataclass(frozen=True)
class Block:
    """One block: the module ``path`` that owns it, its residual adds and its output node."""

    stage: int
    index: int
    path: str
    adds: tuple[str, ...]

    @property
    def output(self) -> str:
        return self.adds[-1]


def _is_residual_add(node: fx.Node) -> str | None:
    """The stream space of a residual add, or None."""
    packet = getattr(node.target, "_overloadpacket", None)
    if node.op != "call_function" or packet is None or packet.__name__ not in ("add", "add_"):
        return None
    inputs = [a for a in node.args[:2] if isinstance(a, fx.Node) and a.op == "call_function"]
    units = node.meta.get("mergec")
    if len(inputs) != 2 or units is None or not units.spaces:
        return None
    spaces = [s for s in units.spaces if s is not None]
    for argument in inputs:
        argument_units = argument.meta.get("mergec")
        if argument_units is None or argument_units.spaces != units.spaces:
            return None
    return spaces[0] if len(spaces) == 1 else None


@dataclass(frozen=True)
class Segment:
    """The segment pass: stages of blocks, in graph order."""

    name: str = "segment"

    def __call__(self, module: fx.GraphModule) -> list[list[Block]]:
        stages: dict[str, list[tuple[str, list[str]]]] = {}
        for node in module.graph.nodes:
            space = _is_residual_add(node)
            if space is None:
                continue
            path = module_path(node)
            blocks = stages.setdefault(space, [])
            if blocks and blocks[-1][0] == path:
                blocks[-1][1].append(node.name)
            else:
                blocks.append((path, [node.name]))
        result = []
        for stage, blocks in enumerate(stages.values()):
            paths = [path for path, _ in blocks]
            if len(set(paths)) != len(paths) or "" in paths:
                raise MergeError(f"segment: stage {stage} has residual adds that no single module "
                                 f"owns ({paths}); depth alignment needs one module per block")
            result.append([Block(stage, index, path, tuple(adds))
                           for index, (path, adds) in enumerate(blocks)])
        return result
