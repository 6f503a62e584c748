"""align-depth: aligns the blocks of a shallow and a deep model of one family, and pads the
shallow one with identity blocks so that both graphs correspond node for node.

Per stage, linear CKA (unbiased minibatch HSIC, features flattened per sample, averaged over
the calibration batches) between every block output of the two models; dynamic programming
finds the monotone alignment of the shallow model's blocks to the deep model's with the
largest total similarity, first block to first (``mergec.algorithms.alignment``). The shallow
model is then rebuilt in the deep model's architecture: aligned blocks carry the shallow
model's weights, every other block is an identity block (the deep model's block with its
residual branch's last producer zeroed), so it computes the shallow model's function.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import fx, nn

from mergec.algorithms.alignment import DepthAlignment, align_depth
from mergec.algorithms.cka import LinearCKA
from mergec.errors import MergeError
from mergec.passes.collect_stats import ProbeInterpreter, check_batch
from mergec.passes.segment import Block
from mergec.passes.trace import module_path

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
    swapped: bool = False

    def unaligned_keys(self, keys: Iterable[str]) -> set[str]:
        return {k for k in keys if any(k.startswith(p + ".") for p in self.padded_paths)}

    def to_dict(self) -> dict:
        return {"swapped": self.swapped, "padded": self.padded_paths, "zeroed": self.zeroed,
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
        branches = [a for a in add.args[:2] if isinstance(a, fx.Node)
                    and module_path(a).startswith(block.path) and a.op == "call_function"]
        if not branches:
            raise MergeError(f"align-depth: cannot tell the residual branch of {add.format_node()}")
        node = branches[-1]
        while True:
            name = getattr(getattr(node.target, "_overloadpacket", None), "__name__", "")
            name = name[:-1] if name.endswith("_") and not name.endswith("__") else name
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
        for stage, (cka, shallow, deep) in enumerate(zip(matrices, stages_shallow, stages_deep)):
            # ties (an identity block repeats its input) go to the earlier deep block
            tie_break = 1e-9 * torch.arange(cka.shape[1], dtype=cka.dtype)
            alignment: DepthAlignment = align_depth(cka - tie_break, self.variant)
            for i, j in enumerate(alignment.mapping):
                mapping[deep[j].path] = shallow[i].path
            plan.stages.append({"stage": stage, "cka": cka, "mapping": list(alignment.mapping),
                                "shallow": [b.path for b in shallow],
                                "deep": [b.path for b in deep]})
            plan.padded_paths += [deep[j].path for j in alignment.padding]
        padded = self._pad(model_shallow, model_deep, module_deep, stages_deep, mapping, plan)
        return padded, plan

    def _pad(self, model_shallow: nn.Module, model_deep: nn.Module, module_deep: fx.GraphModule,
             stages_deep: list[list[Block]], mapping: dict[str, str], plan: DepthPlan
             ) -> nn.Module:
        shallow_state = model_shallow.state_dict()
        deep_state = model_deep.state_dict()
        blocks = {b.path: b for stage in stages_deep for b in stage}
        for path in plan.padded_paths:
            plan.zeroed += _last_producers(module_deep, blocks[path])
        state = {}
        for key, value in deep_state.items():
            block = next((p for p in blocks if key.startswith(p + ".")), None)
            if block is not None and block in plan.padded_paths:
                state[key] = torch.zeros_like(value) if key in plan.zeroed else value.clone()
                continue
            source = key if block is None else mapping[block] + key[len(block):]
            if source not in shallow_state or shallow_state[source].shape != value.shape:
                raise MergeError(f"align-depth: the shallow model has no entry {source!r} of "
                                 f"shape {tuple(value.shape)} for the deep model's {key!r}; "
                                 "the two models are not of one family")
            state[key] = shallow_state[source].clone()
        padded = copy.deepcopy(model_deep)
        padded.load_state_dict(state)
        return padded.eval()
