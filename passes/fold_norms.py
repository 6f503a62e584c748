"""fold-norms: moves every LayerNorm's gain and shift into the layers that read it.

``LayerNorm(x) = g ⊙ n(x) + β`` with ``n`` the centring and scaling to unit RMS. When every
reader of the norm's output is a linear layer ``W y + c`` (through moves that keep the feature
axis last: selects of a token, transposes and views of other axes, dropout), the function is
unchanged with ``W' = W diag(g)``, ``c' = c + W β`` and the norm's gain set to ones, its shift
to zeros. What remains on the residual stream is ``n``, which commutes with every orthogonal map
that keeps the all-ones direction, so the stream admits rotations (annotate-units records the
group, :mod:`mergec.ir.groups`) and the merged model is still of the model's architecture.

A norm whose output feeds anything else (a post-norm block's residual add, a model output, a
nonlinearity) is left as it is, with the reason recorded per node in ``state.folds``; its
stream then admits permutations only. The pass works on the pipeline's own graph modules
(trace's export): the user's models keep their weights.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx, nn

from mergec.ir.fx import aten_name, call_arguments, module_path
from mergec.ir.state import PipelineState

log = logging.getLogger(__name__)

#: Moves a norm's output may pass through on the way to a reader: each keeps every feature
#: vector whole (checked: the last axis keeps its size and its place).
_MOVES = {"select", "slice", "transpose", "permute", "view", "reshape", "_unsafe_view", "clone",
          "alias", "contiguous", "dropout", "detach", "expand", "_to_copy", "to", "unsqueeze",
          "squeeze"}


@dataclass(frozen=True)
class Reader:
    """A linear layer that reads a norm's output: the node, and its weight's and bias's
    state-dict keys (``transposed``: the weight is (in, out), as ``addmm``'s)."""

    node: fx.Node
    weight: str
    bias: str | None
    transposed: bool


def fold_norms(graph_module: fx.GraphModule) -> dict[str, str]:
    """Folds every LayerNorm of ``graph_module`` whose readers allow it, in place; returns,
    per norm node, what was done or why not."""
    report: dict[str, str] = {}
    for node in list(graph_module.graph.nodes):
        if aten_name(node) != "layer_norm":
            continue
        name = module_path(node) or node.name
        arguments = call_arguments(node)
        weight, bias = arguments.get("weight"), arguments.get("bias")
        if len(arguments.get("normalized_shape", ())) != 1:
            report[name] = "left: normalises more than the feature axis"
            continue
        if not all(a is None or (isinstance(a, fx.Node) and a.op == "get_attr")
                   for a in (weight, bias)):
            report[name] = "left: its gain or shift is computed, not a parameter"
            continue
        readers, why = _readers(graph_module, node)
        if why is None:
            why = _check_readers(graph_module, readers, bias)
        if why is not None:
            report[name] = f"left: {why}"
            continue
        _fold(graph_module, readers, weight, bias)
        report[name] = "folded into " + ", ".join(
            module_path(r.node) or r.node.name for r in readers)
    return report


def _readers(graph_module: fx.GraphModule, norm: fx.Node
             ) -> tuple[list[Reader], str | None]:
    """The linear layers that read ``norm``'s output through moves, or why there are others."""
    readers, pending, seen = [], [norm], set()
    while pending:
        value = pending.pop()
        for user in value.users:
            if user in seen:
                continue
            seen.add(user)
            reader = _as_reader(user, value)
            if reader is not None:
                readers.append(reader)
            elif _keeps_features(user, value):
                pending.append(user)
            else:
                op = aten_name(user) or user.op
                return [], f"its output feeds {op} (node {user.name})"
    return readers, None


def _as_reader(user: fx.Node, value: fx.Node) -> Reader | None:
    """``user`` as a linear layer with parameter weights that reads ``value`` as its input."""
    op = aten_name(user)
    if op == "linear" and user.args[0] is value:
        weight, bias = user.args[1], user.args[2] if len(user.args) > 2 else None
        transposed = False
    elif op == "addmm" and user.args[1] is value:
        weight, bias, transposed = user.args[2], user.args[0], True
    else:
        return None
    if not _is_parameter(weight) or not (bias is None or _is_parameter(bias)):
        return None
    return Reader(user, weight.target, None if bias is None else bias.target, transposed)


def _is_parameter(argument: Any) -> bool:
    return isinstance(argument, fx.Node) and argument.op == "get_attr"


def _keeps_features(user: fx.Node, value: fx.Node) -> bool:
    """Whether ``user`` moves ``value`` without touching its feature vectors (the last axis)."""
    if aten_name(user) not in _MOVES or not user.args or user.args[0] is not value:
        return False
    before, after = value.meta.get("val"), user.meta.get("val")
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor) \
            or before.dim() == 0 or after.dim() == 0 or before.shape[-1] != after.shape[-1]:
        return False
    last = before.dim() - 1
    dims = [a for a in user.args[1:] if isinstance(a, int)]
    if aten_name(user) in ("select", "slice", "transpose", "squeeze", "unsqueeze"):
        return all(d % before.dim() != last for d in dims[:2 if aten_name(user) == "transpose"
                                                            else 1])
    if aten_name(user) == "permute":
        order = user.args[1]
        return order[-1] % before.dim() == last
    return True


def _check_readers(graph_module: fx.GraphModule, readers: list[Reader],
                   bias: fx.Node | None) -> str | None:
    """Why the readers cannot take the norm's affine: none, a weight shared with other uses,
    or a shift and a reader without a bias to take it."""
    if not readers:
        return "no linear layer reads it"
    nodes = {r.node for r in readers}
    for reader in readers:
        weight_node = reader.node.args[2 if reader.transposed else 1]
        if any(user not in nodes for user in weight_node.users):
            return f"the weight {reader.weight} has other uses"
        if bias is not None and reader.bias is None \
                and bool(torch.any(_tensor(graph_module, bias.target) != 0)):
            return f"{reader.weight} has no bias to take the norm's shift"
    return None


def _fold(graph_module: fx.GraphModule, readers: list[Reader], weight: fx.Node | None,
          bias: fx.Node | None) -> None:
    """The fold itself, in float64, each reader once (a weight read twice is folded once)."""
    gain = None if weight is None else _tensor(graph_module, weight.target)
    shift = None if bias is None else _tensor(graph_module, bias.target)
    done = set()
    for reader in readers:
        if reader.weight in done:
            continue
        done.add(reader.weight)
        w = _tensor(graph_module, reader.weight)
        matrix = (w.T if reader.transposed else w).to(torch.float64)  # (out, in)
        if reader.bias is not None or shift is not None:
            c = torch.zeros(matrix.shape[0], dtype=torch.float64, device=w.device) \
                if reader.bias is None else _tensor(graph_module, reader.bias).to(torch.float64)
            if shift is not None:
                c = c + matrix @ shift.to(torch.float64)
            if reader.bias is not None:
                _replace(graph_module, reader.bias, c.to(w.dtype))
        if gain is not None:
            matrix = matrix * gain.to(torch.float64)[None, :]
        _replace(graph_module, reader.weight, (matrix.T if reader.transposed else matrix)
                 .to(w.dtype).contiguous())
    if gain is not None:
        _replace(graph_module, weight.target, torch.ones_like(gain))
    if shift is not None:
        _replace(graph_module, bias.target, torch.zeros_like(shift))


def _tensor(graph_module: fx.GraphModule, key: str) -> torch.Tensor:
    owner, name = _owner(graph_module, key)
    return getattr(owner, name).detach()


def _owner(graph_module: fx.GraphModule, key: str) -> tuple[nn.Module, str]:
    *path, name = key.split(".")
    owner: nn.Module = graph_module
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def _replace(graph_module: fx.GraphModule, key: str, value: torch.Tensor) -> None:
    """A new tensor under ``key`` (the old one may be the user's model's own)."""
    owner, name = _owner(graph_module, key)
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[name] = value


@dataclass(frozen=True)
class FoldNorms:
    """The fold-norms pass (with ``symmetry="auto"``): the graphs' LayerNorms folded where
    their readers allow (``state.folds``: per model, per norm, what was done or why not)."""

    enabled: bool = True
    name: ClassVar[str] = "fold-norms"

    def applies(self, state: PipelineState) -> bool:
        return self.enabled

    def run(self, state: PipelineState) -> PipelineState:
        graphs = state.require("graphs", self.name)
        folds = tuple(fold_norms(graph) for graph in graphs)
        count = sum(text.startswith("folded") for fold in folds for text in fold.values())
        log.info("fold-norms: %d of %d norms folded", count, sum(len(f) for f in folds))
        return state.evolve(folds=folds)
