"""align-depth: aligns the blocks of a shallow and a deep model of one family, and pads the
shallow one with identity blocks so that both graphs correspond node for node.

Per stage, linear CKA (unbiased minibatch HSIC, features flattened per sample, averaged over
the calibration batches) between every block output of the two models; dynamic programming
finds the monotone alignment of the shallow model's blocks to the deep model's with the
largest total similarity, first block to first (``mergec.algorithms.alignment``). The shallow
model is then rebuilt in the deep model's architecture: aligned blocks carry the shallow
model's weights, every other block is an identity block, so it computes the shallow model's
function. A residual block becomes an identity by zeroing its residual branch's last producer;
a plain layer (convolution or linear, normalisation, activation) by a Dirac kernel or identity
matrix, a normalisation that passes its input through, and an activation that is the identity
on the layer's inputs (ReLU after a ReLU layer: its inputs are never negative).
"""
from __future__ import annotations

import copy
import logging
import operator
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

import torch
from torch import fx, nn

from mergec.algorithms.alignment import DepthAlignment, align_depth
from mergec.algorithms.cka import LinearCKA
from mergec.errors import MergeError
from mergec.ir.blocks import Block, DepthPlan, Stages
from mergec.ir.fx import (
    Probes,
    aten_name,
    call_arguments,
    check_batch,
    module_device,
    tensor_ancestors,
    tensor_leaves,
    to_device,
)
from mergec.ir.spec import UnitSpec
from mergec.ir.state import PipelineState

log = logging.getLogger(__name__)

_PRODUCERS = {"batch_norm", "_native_batch_norm_legit_no_training", "layer_norm", "group_norm",
              "linear", "conv1d", "conv2d", "conv3d", "mul", "addmm"}
_PASS_THROUGH = {"dropout", "clone", "contiguous", "alias", "view", "reshape", "permute",
                 "transpose", "flatten", "to", "_to_copy"}


def block_cka(module_a: fx.GraphModule, module_b: fx.GraphModule, stages_a: list[list[Block]],
              stages_b: list[list[Block]], calibration: Iterable[Any], example: tuple,
              device: str | None = None) -> list[torch.Tensor]:
    """Linear CKA between the block outputs of A and B, one matrix per stage."""
    device = torch.device(device) if device else torch.device("cpu")
    wanted_a = {block.output for stage in stages_a for block in stage}
    wanted_b = {block.output for stage in stages_b for block in stage}
    accumulators = [LinearCKA(len(a), len(b), device=device) for a, b in zip(stages_a, stages_b)]
    module_a, module_b = to_device(module_a, device), to_device(module_b, device)
    probes_a, probes_b = Probes(module_a, wanted_a), Probes(module_b, wanted_b)
    with torch.no_grad():
        for index, batch in enumerate(calibration):
            inputs = tuple(t.to(device) for t in check_batch(batch, example, index))
            values_a, values_b = probes_a(*inputs), probes_b(*inputs)
            for accumulator, stage_a, stage_b in zip(accumulators, stages_a, stages_b):
                accumulator.update([values_a[b.output] for b in stage_a],
                                   [values_b[b.output] for b in stage_b])
    for accumulator in accumulators:
        accumulator.all_reduce()
    return [accumulator.matrix().cpu() for accumulator in accumulators]


def _last_producers(module: fx.GraphModule, block: Block) -> list[str]:
    """State-dict keys whose zeroing makes every residual branch of ``block`` output zero."""
    keys: list[str] = []
    nodes = {node.name: node for node in module.graph.nodes}
    for add_name in block.adds:
        add = nodes[add_name]
        first, second = add.args[:2]
        # the skip is the input that the branch forks from
        branches = [branch for skip, branch in ((first, second), (second, first))
                    if skip in tensor_ancestors(branch)]
        if len(branches) != 1:
            raise MergeError(f"align-depth: cannot tell the residual branch of {add.format_node()}")
        node = branches[0]
        while True:
            name = aten_name(node)
            parameters = [a.target for a in node.args if isinstance(a, fx.Node)
                          and a.op == "get_attr"]
            if name in _PRODUCERS and parameters:
                if name in ("batch_norm", "_native_batch_norm_legit_no_training"):
                    parameters = parameters[:2]  # weight and bias, not the running statistics
                keys.extend(parameters)
                break
            if name in _PASS_THROUGH and isinstance(node.args[0], fx.Node):
                node = node.args[0]
                continue
            raise MergeError(f"align-depth: the residual branch of block {block.path} ends in "
                             f"{node.format_node()}, which mergec cannot make an identity")
    return keys


def _layer_identity(module: fx.GraphModule, layer: Block, previous: Block,
                    state: dict[str, torch.Tensor]) -> list[str]:
    """Sets the entries of plain layer ``layer`` in ``state`` so that it computes the identity
    on the outputs of ``previous`` (the layer before it in its stage); returns their keys."""
    nodes = {node.name: node for node in module.graph.nodes}
    after_relu = aten_name(nodes[previous.output]) == "relu"
    keys: list[str] = []

    def entry(node: fx.Node, index: int) -> str | None:
        argument = node.args[index] if index < len(node.args) else None
        return str(argument.target) if isinstance(argument, fx.Node) else None

    for name in layer.nodes:
        node = nodes[name]
        op = aten_name(node)
        if op in ("conv1d", "conv2d", "conv3d", "convolution", "linear"):
            weight_key, bias_key = entry(node, 1), entry(node, 2)
            weight = state[weight_key]
            if weight.shape[0] != weight.shape[1]:
                raise MergeError(f"align-depth: layer {layer.path} maps {weight.shape[1]} to "
                                 f"{weight.shape[0]} features; only a layer that keeps its width "
                                 "can become an identity")
            if weight.dim() == 2:
                state[weight_key] = torch.eye(weight.shape[0], dtype=weight.dtype)
            else:
                state[weight_key] = nn.init.dirac_(torch.empty_like(weight))
            keys.append(weight_key)
            if bias_key is not None:
                state[bias_key] = torch.zeros_like(state[bias_key])
                keys.append(bias_key)
        elif op in ("batch_norm", "_native_batch_norm_legit_no_training"):
            weight_key, bias_key, mean_key, var_key = (entry(node, i) for i in range(1, 5))
            eps = float(call_arguments(node)["eps"])
            for key, value in ((weight_key, 1.0), (bias_key, 0.0), (mean_key, 0.0),
                               (var_key, 1.0 - eps)):
                if key is not None:
                    state[key] = torch.full_like(state[key], value)
                    keys.append(key)
        elif op == "relu" and after_relu:
            continue
        elif op in ("dropout", "clone", "contiguous", "alias") or node.target is operator.getitem:
            continue
        else:
            raise MergeError(f"align-depth: layer {layer.path} has {node.format_node()}, which "
                             "mergec cannot make an identity on the layer's inputs; the models "
                             "cannot be aligned in depth")
    return keys


def _signature(block: Block, state: dict[str, torch.Tensor]) -> tuple:
    """The state a block holds, by module position and name within it, with shapes: blocks
    with equal signatures can stand for each other."""
    return tuple((position, key[len(module) + 1:], tuple(state[key].shape))
                 for position, module in enumerate(block.modules)
                 for key in state if key.startswith(module + "."))


def _align_stages(matrices: list[torch.Tensor], stages_shallow: Stages, stages_deep: Stages,
                  states: tuple[dict, dict], variant: str) -> DepthPlan:
    """Per stage, the monotone alignment of the shallow model's blocks to the deep model's
    blocks of the same state shapes with the largest total CKA."""
    plan = DepthPlan()
    for stage, (cka, shallow, deep) in enumerate(zip(matrices, stages_shallow, stages_deep)):
        # ties (an identity block repeats its input) go to the earlier deep block
        tie_break = 1e-9 * torch.arange(cka.shape[1], dtype=cka.dtype)
        signatures = ([_signature(b, states[0]) for b in shallow],
                      [_signature(b, states[1]) for b in deep])
        allowed = torch.tensor([[a == b for b in signatures[1]] for a in signatures[0]],
                               dtype=torch.bool)
        try:
            alignment: DepthAlignment = align_depth(cka - tie_break, variant, allowed=allowed)
        except MergeError as error:
            raise MergeError(f"align-depth: stage {stage} ({shallow[0].path} ...): {error}; "
                             "the models are not of one family") from None
        plan.stages.append({"stage": stage, "cka": cka, "mapping": list(alignment.mapping),
                            "shallow": [b.path for b in shallow],
                            "deep": [b.path for b in deep]})
        plan.padded_paths += [m for j in alignment.padding for m in deep[j].modules]
    return plan


def _read_order(module: fx.GraphModule, skipped: set[str] = frozenset()) -> list[str]:
    """The state-dict keys the graph reads, in the order it first reads them, but for keys of
    the ``skipped`` modules."""
    keys = (str(node.target) for node in module.graph.nodes if node.op == "get_attr")
    return [key for key in dict.fromkeys(keys)
            if not any(key.startswith(m + ".") for m in skipped)]


def structural_sources(module_shallow: fx.GraphModule, module_deep: fx.GraphModule,
                       padded_modules: set[str]) -> dict[str, str]:
    """For every state-dict key of the deep model outside the padded blocks, the shallow
    model's key at the same place in the graph. With the padded blocks taken out, the deep
    graph reads its state in the order the shallow graph reads its own: keys pair by that
    order, never by name (a deeper sibling that numbers its blocks flat, ``blocks.0 ...
    blocks.15``, shifts every later name). Keys the graph does not read
    (``num_batches_tracked``) follow their module's pairing."""
    deep = _read_order(module_deep, padded_modules)
    shallow = _read_order(module_shallow)
    if len(deep) != len(shallow):
        raise MergeError(f"align-depth: without its {len(padded_modules)} padded modules the "
                         f"deep model reads {len(deep)} weights and the shallow model "
                         f"{len(shallow)}; the two models are not of one family")
    sources = dict(zip(deep, shallow))
    modules = {d.rpartition(".")[0]: s.rpartition(".")[0] for d, s in sources.items()}
    for key in module_deep.state_dict():
        owner, _, leaf = key.rpartition(".")
        if key not in sources and owner in modules \
                and not any(key.startswith(m + ".") for m in padded_modules):
            sources[key] = f"{modules[owner]}.{leaf}" if modules[owner] else leaf
    return sources


def _padded_state(shallow_state: dict[str, torch.Tensor], deep_state: dict[str, torch.Tensor],
                  sources: dict[str, str], padded_modules: set[str]) -> dict[str, torch.Tensor]:
    """The deep model's state dict filled from the shallow model: every key outside the
    padded blocks takes the shallow key at its place in the graph, padded blocks (made
    identities next) keep the deep model's."""
    state = {}
    for key, value in deep_state.items():
        if any(key.startswith(m + ".") for m in padded_modules):
            state[key] = value.clone()
            continue
        source = sources.get(key, key)
        if source not in shallow_state or shallow_state[source].shape != value.shape:
            found = tuple(shallow_state[source].shape) if source in shallow_state else "none"
            raise MergeError(f"align-depth: the deep model's {key!r} {tuple(value.shape)} sits "
                             f"where the shallow model has {source!r} ({found}); the two "
                             "models are not of one family")
        state[key] = shallow_state[source].clone()
    return state


def _make_identities(module_deep: fx.GraphModule, stages_deep: Stages,
                     state: dict[str, torch.Tensor], plan: DepthPlan) -> None:
    """Turns every padded block of ``state`` into an identity block or layer, recording in
    ``plan`` which keys it zeroed or made identities."""
    padded_modules = set(plan.padded_paths)
    for stage in stages_deep:
        for index, block in enumerate(stage):
            if not padded_modules.issuperset(block.modules):
                continue
            if not block.is_layer:
                zeroed = _last_producers(module_deep, block)
                plan.zeroed += zeroed
                state.update({key: torch.zeros_like(state[key]) for key in zeroed})
            elif index == 0:
                raise MergeError(f"align-depth: the first layer of a stage ({block.path}) "
                                 "cannot be an identity")
            else:
                plan.identity += _layer_identity(module_deep, block, stage[index - 1], state)


def pad_shallow(module_shallow: fx.GraphModule, module_deep: fx.GraphModule,
                stages_shallow: Stages, stages_deep: Stages, calibration: Iterable[Any],
                example: tuple, variant: str = "segment-wise", device: str | None = None
                ) -> tuple[fx.GraphModule, DepthPlan]:
    """The shallow model in the deep model's graph: aligned blocks with the shallow model's
    state, every other block an identity, so that it computes the shallow model's function."""
    if len(stages_shallow) != len(stages_deep):
        raise MergeError(f"align-depth: the models have {len(stages_shallow)} and "
                         f"{len(stages_deep)} residual stages; they must have as many")
    matrices = block_cka(module_shallow, module_deep, stages_shallow, stages_deep,
                         calibration, example, device)
    states = (module_shallow.state_dict(), module_deep.state_dict())
    plan = _align_stages(matrices, stages_shallow, stages_deep, states, variant)
    padded_modules = set(plan.padded_paths)
    sources = structural_sources(module_shallow, module_deep, padded_modules)
    state = _padded_state(*states, sources, padded_modules)
    _make_identities(module_deep, stages_deep, state, plan)
    padded = copy.deepcopy(module_deep)
    padded.load_state_dict(state)
    _check_padded(module_shallow, padded, example)
    return padded, plan


def _check_padded(shallow: fx.GraphModule, padded: fx.GraphModule, example: tuple) -> None:
    """The padded model must compute the shallow model's function."""
    device = module_device(shallow)
    inputs = tuple(t.to(device) for t in example)
    with torch.no_grad():
        expected, got = shallow(*inputs), to_device(padded, device)(*inputs)
    expected, got = tensor_leaves(expected), tensor_leaves(got)
    if len(expected) != len(got) or not all(
            a.shape == b.shape and torch.allclose(a, b, rtol=1e-3, atol=1e-4)
            for a, b in zip(expected, got)):
        raise MergeError("align-depth: the padded shallow model does not compute the shallow "
                         "model's function; its blocks cannot be made identities")


def unaligned_entries(plan: DepthPlan, spec: UnitSpec, unaligned: str
                      ) -> tuple[dict[str, float], frozenset[str]]:
    """The state-dict keys of blocks only the deep model (B) has, each with the factor of B's
    entry in the merged one, and the spaces inside those blocks."""
    # A residual block only B has: its zeroed producers averaged with B's (factor 1: the
    # paper's average with the identity) and the rest of it B's alone (factor 2). A plain
    # layer only B has: averaged with A's identity layer by the ordinary merge, or B's alone
    # with unaligned="keep".
    factors = {}
    for key in plan.unaligned_keys(spec.shapes):
        if unaligned == "keep":
            factors[key] = 2.0
        elif key in plan.zeroed:
            factors[key] = 1.0
        elif key not in plan.identity:
            factors[key] = 2.0
    inside = frozenset(s for s in spec.spaces
                       if (bound := {b.key for b in spec.bindings if b.space == s})
                       and bound <= factors.keys())
    return factors, inside


@dataclass(frozen=True)
class AlignDepth:
    """The align-depth pass, for models that segment found to differ in depth: the shallow
    model becomes A, padded with identity blocks into the deep model's graph, and the deep
    model B (``swapped`` in the plan when the caller's A was the deep one). ``variant`` is
    "segment-wise" or "layer-wise"; ``unaligned`` says how blocks only B has merge."""

    variant: str = "segment-wise"
    unaligned: str = "average"
    device: str | None = None
    name: ClassVar[str] = "align-depth"

    def applies(self, state: PipelineState) -> bool:
        return bool(state.stages)

    def run(self, state: PipelineState) -> PipelineState:
        graphs, specs = state.require("graphs", self.name), state.require("specs", self.name)
        blocks = [sum(len(stage) for stage in stages) for stages in state.stages]
        swapped = blocks[0] > blocks[1]
        shallow, deep = (1, 0) if swapped else (0, 1)
        padded, plan = pad_shallow(graphs[shallow], graphs[deep], state.stages[shallow],
                                   state.stages[deep], state.calibration, state.example,
                                   self.variant, self.device)
        plan.swapped = swapped
        only_b, inside = unaligned_entries(plan, specs[deep], self.unaligned)
        return state.evolve(graphs=(padded, graphs[deep]), specs=(specs[deep], specs[deep]),
                            depth=plan, only_b=only_b, unaligned_spaces=inside)
