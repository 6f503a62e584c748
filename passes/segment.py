"""segment: the stages and blocks of a network, from its annotated graph.

In a residual network, a *stage* is a residual stream: a space joined by adds of two
input-dependent feature tensors. A *block* is the part of a stage owned by one module
(``layer1.2``, ``encoder.layers.3``): the residual adds inside that module, in graph order; its
output is its last add. A transformer layer with an attention and an MLP residual is one block
with two adds.

A network without residual adds is cut as a plain chain (VGG): a *layer* is a weight layer
(convolution or linear) and the ops that follow it one after the other without changing the
shape of its output (normalisation, activation, dropout); a *stage* is a run of layers each
consuming the previous layer's output directly. Pooling, flattening, or anything else between
two layers starts a new stage, so within a stage every layer but the first maps a shape to
itself and can become an identity.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar, Iterable

from torch import fx

from mergec.errors import MergeError
from mergec.ir.blocks import Block, Stages
from mergec.ir.correspond import correspond
from mergec.ir.fx import aten_name, module_path, tensor_ancestors
from mergec.ir.state import PipelineState

_WEIGHT_LAYERS = {"conv1d", "conv2d", "conv3d", "convolution", "linear", "addmm"}
_FOLLOWERS = {"batch_norm", "_native_batch_norm_legit_no_training", "relu", "gelu",
              "silu", "tanh", "sigmoid", "leaky_relu", "hardtanh", "elu", "dropout", "clone",
              "layer_norm", "group_norm", "contiguous", "alias"}


def _residual_add(node: fx.Node) -> tuple[str, str] | None:
    """The stream space and the owning module of a residual add, or None. Both inputs carry
    the stream's space and fork from one input-dependent tensor (not a sum of token and
    position embeddings), and a node only one of them depends on reads a parameter: a residual
    branch holds a layer, GELU's x + 0.044715·x³ does not. The add belongs to the innermost
    module holding it and its branch's layers (BERT's attention add sits in
    ``attention.output``, its branch in ``attention``)."""
    if aten_name(node) != "add":
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
    first, second = (tensor_ancestors(argument) for argument in inputs)
    if not any(n.op == "placeholder" for n in first & second):
        return None
    branch = _state_modules(first ^ second)
    if not branch or len(spaces) != 1:
        return None
    return spaces[0], _common_module([module_path(node), *sorted(branch)])


def _common_module(paths: list[str]) -> str:
    """The innermost module holding every one of ``paths``."""
    parts = [path.split(".") if path else [] for path in paths]
    common = []
    for names in zip(*parts):
        if len(set(names)) != 1:
            break
        common.append(names[0])
    return ".".join(common)


def _shape(node: fx.Node) -> tuple | None:
    value = node.meta.get("val")
    return tuple(value.shape) if hasattr(value, "shape") else None


def _state_modules(nodes: Iterable[fx.Node]) -> tuple[str, ...]:
    """The modules whose parameters and buffers ``nodes`` read, in order of first use."""
    return tuple(dict.fromkeys(
        str(argument.target).rsplit(".", 1)[0] for node in nodes
        for argument in node.all_input_nodes
        if argument.op == "get_attr" and "." in str(argument.target)))


def _plain_layers(module: fx.GraphModule) -> list[list[Block]]:
    """The layers of a plain chain, grouped into stages."""
    stages: list[list[tuple[list[fx.Node], str]]] = []
    previous_output: fx.Node | None = None
    for node in module.graph.nodes:
        if aten_name(node) not in _WEIGHT_LAYERS or not any(
                a.op == "get_attr" for a in node.all_input_nodes):
            continue
        data = [a for a in node.all_input_nodes if a.op != "get_attr"]
        nodes, shape = [node], _shape(node)
        while len(nodes[-1].users) == 1:
            user = next(iter(nodes[-1].users))
            if aten_name(user) not in _FOLLOWERS and user.target is not operator.getitem:
                break
            if user.all_input_nodes[0] is not nodes[-1] or _shape(user) not in (shape, None):
                break
            nodes.append(user)
        chained = previous_output is not None and data == [previous_output]
        if chained:
            stages[-1].append((nodes, module_path(node)))
        else:
            stages.append([(nodes, module_path(node))])
        previous_output = nodes[-1]
    return [[Block(stage, index, path, nodes=tuple(n.name for n in nodes),
                   modules=_state_modules(nodes))
             for index, (nodes, path) in enumerate(layers)]
            for stage, layers in enumerate(stages)]


def _nested(outer: str, inner: str) -> bool:
    return outer == inner or inner.startswith(outer + ".") or outer.startswith(inner + ".")


def segment(module: fx.GraphModule) -> Stages:
    """Stages of blocks, in graph order: residual stages when the graph has residual adds,
    else the layers of a plain chain."""
    stages: dict[str, list[tuple[str, list[str]]]] = {}
    for node in module.graph.nodes:
        residual = _residual_add(node)
        if residual is None:
            continue
        space, path = residual
        blocks = stages.setdefault(space, [])
        if blocks and _nested(blocks[-1][0], path):
            # one layer's adds: the block is owned by the outer module
            outer = min(blocks[-1][0], path, key=len)
            blocks[-1] = (outer, blocks[-1][1] + [node.name])
        else:
            blocks.append((path, [node.name]))
    if not stages:
        return _plain_layers(module)
    result = []
    for stage, blocks in enumerate(stages.values()):
        paths = [path for path, _ in blocks]
        if len(set(paths)) != len(paths) or "" in paths:
            raise MergeError(f"segment: stage {stage} has residual adds that no single module "
                             f"owns ({paths}); depth alignment needs one module per block")
        result.append([Block(stage, index, path, tuple(adds), modules=(path,))
                       for index, (path, adds) in enumerate(blocks)])
    return result


@dataclass(frozen=True)
class Segment:
    """The segment pass. Models that do not correspond node for node are cut into stages of
    blocks (``stages``), for align-depth; when that does not make them one family of
    different depths, the error says where the graphs part ways. Models that correspond are
    left as they are."""

    name: ClassVar[str] = "segment"

    def run(self, state: PipelineState) -> PipelineState:
        graphs, specs = state.require("graphs", self.name), state.require("specs", self.name)
        try:
            correspond(specs[0], specs[1], graphs[0], graphs[1])
            return state
        except MergeError as error:
            mismatch = error
        try:
            stages = tuple(segment(graph) for graph in graphs)
        except MergeError:
            raise mismatch from None
        blocks = [sum(len(stage) for stage in model_stages) for model_stages in stages]
        if not stages[0] or len(stages[0]) != len(stages[1]) or blocks[0] == blocks[1]:
            raise mismatch
        return state.evolve(stages=stages)
