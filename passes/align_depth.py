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
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import fx, nn

from mergec.algorithms.alignment import DepthAlignment, align_depth
from mergec.algorithms.cka import LinearCKA
from mergec.errors import MergeError
from mergec.passes.collect_stats import ProbeInterpreter, check_batch
from mergec.passes.segment import Block, tensor_ancestors
from mergec.passes.trace import aten_name, call_arguments

log = logging.getLogger(__name__)

_PRODUCERS = {"batch_norm", "_native_batch_norm_legit_no_training", "layer_norm", "group_norm",
              "linear", "conv1d", "conv2d", "conv3d", "mul", "addmm"}
_PASS_THROUGH = {"dropout", "clone", "contiguous", "alias", "view", "reshape", "permute",
                 "transpose", "flatten", "to", "_to_copy"}


@dataclass
class DepthPlan:
    """What align-depth decided: the CKA matrix and alignment of every stage, and how the
    shallow model was padded (deep block paths that are identity blocks, keys zeroed)."""

    stages: list[dict] = field(default_factory=list)
    padded_paths: list[str] = field(default_factory=list)
    zeroed: list[str] = field(default_factory=list)
    identity: list[str] = field(default_factory=list)  # keys of plain layers made identities
    swapped: bool = False

    def unaligned_keys(self, keys: Iterable[str]) -> set[str]:
        return {k for k in keys if any(k.startswith(p + ".") for p in self.padded_paths)}

    def to_dict(self) -> dict:
        return {"swapped": self.swapped, "padded": self.padded_paths, "zeroed": self.zeroed,
                "identity": self.identity,
                "stages": [{key: value for key, value in stage.items() if key != "cka"}
                           | {"cka": stage["cka"].tolist()} for stage in self.stages]}


def block_cka(module_a: fx.GraphModule, module_b: fx.GraphModule, stages_a: list[list[Block]],
              stages_b: list[list[Block]], calibration: Iterable[Any], example: tuple,
              device: str | None = None) -> list[torch.Tensor]:
    """Linear CKA between the block outputs of A and B, one matrix per stage."""
    device = torch.device(device) if device else torch.device("cpu")
    wanted_a = {block.output for stage in stages_a for block in stage}
    wanted_b = {block.output for stage in stages_b for block in stage}
    accumulators = [LinearCKA(len(a), len(b), device=device) for a, b in zip(stages_a, stages_b)]
    module_a, module_b = module_a.to(device), module_b.to(device)
    with torch.no_grad():
        for index, batch in enumerate(calibration):
            inputs = tuple(t.to(device) for t in check_batch(batch, example, index))
            run_a, run_b = ProbeInterpreter(module_a, wanted_a), ProbeInterpreter(module_b, wanted_b)
            run_a.run(*inputs)
            run_b.run(*inputs)
            for accumulator, stage_a, stage_b in zip(accumulators, stages_a, stages_b):
                accumulator.update([run_a.captured[b.output] for b in stage_a],
                                   [run_b.captured[b.output] for b in stage_b])
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


@dataclass(frozen=True)
class AlignDepth:
    """The align-depth pass. ``variant`` is "segment-wise" or "layer-wise"."""

    variant: str = "segment-wise"
    device: str | None = None
    name: str = "align-depth"

    def __call__(self, model_shallow: nn.Module, model_deep: nn.Module,
                 module_shallow: fx.GraphModule, module_deep: fx.GraphModule,
                 stages_shallow: list[list[Block]], stages_deep: list[list[Block]],
                 calibration: list, example: tuple) -> tuple[nn.Module, DepthPlan]:
        if len(stages_shallow) != len(stages_deep):
            raise MergeError(f"align-depth: the models have {len(stages_shallow)} and "
                             f"{len(stages_deep)} residual stages; they must have as many")
        matrices = block_cka(module_shallow, module_deep, stages_shallow, stages_deep,
                             calibration, example, self.device)
        plan = DepthPlan()
        mapping: dict[str, str] = {}
        state_shallow, state_deep = model_shallow.state_dict(), model_deep.state_dict()
        for stage, (cka, shallow, deep) in enumerate(zip(matrices, stages_shallow, stages_deep)):
            # ties (an identity block repeats its input) go to the earlier deep block
            tie_break = 1e-9 * torch.arange(cka.shape[1], dtype=cka.dtype)
            signatures = ([_signature(b, state_shallow) for b in shallow],
                          [_signature(b, state_deep) for b in deep])
            allowed = torch.tensor([[a == b for b in signatures[1]] for a in signatures[0]],
                                   dtype=torch.bool)
            try:
                alignment: DepthAlignment = align_depth(cka - tie_break, self.variant,
                                                        allowed=allowed)
            except MergeError as error:
                raise MergeError(f"align-depth: stage {stage} ({shallow[0].path} ...): {error}; "
                                 "the models are not of one family") from None
            for i, j in enumerate(alignment.mapping):
                mapping.update(zip(deep[j].modules, shallow[i].modules))
            plan.stages.append({"stage": stage, "cka": cka, "mapping": list(alignment.mapping),
                                "shallow": [b.path for b in shallow],
                                "deep": [b.path for b in deep]})
            plan.padded_paths += [m for j in alignment.padding for m in deep[j].modules]
        padded = self._pad(model_shallow, model_deep, module_deep, stages_deep, mapping, plan)
        return padded, plan

    def _pad(self, model_shallow: nn.Module, model_deep: nn.Module, module_deep: fx.GraphModule,
             stages_deep: list[list[Block]], mapping: dict[str, str], plan: DepthPlan
             ) -> nn.Module:
        shallow_state = model_shallow.state_dict()
        deep_state = model_deep.state_dict()
        padded_modules = set(plan.padded_paths)
        state = {}
        for key, value in deep_state.items():
            owner = next((m for m in (*mapping, *padded_modules) if key.startswith(m + ".")), None)
            if owner in padded_modules:
                state[key] = value.clone()
                continue
            source = key if owner is None else mapping[owner] + key[len(owner):]
            if source not in shallow_state or shallow_state[source].shape != value.shape:
                raise MergeError(f"align-depth: the shallow model has no entry {source!r} of "
                                 f"shape {tuple(value.shape)} for the deep model's {key!r}; "
                                 "the two models are not of one family")
            state[key] = shallow_state[source].clone()
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
        padded = copy.deepcopy(model_deep)
        padded.load_state_dict(state)
        return padded.eval()
