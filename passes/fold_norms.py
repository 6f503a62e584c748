"""fold-norms: moves every LayerNorm's (and RMSNorm's) gain and shift into the layers that
read it.

``LayerNorm(x) = g ⊙ n(x) + β`` with ``n`` the centring and scaling to unit RMS. When every
reader of the norm's output is a linear layer ``W y + c`` (through moves that keep the feature
axis last: selects of a token, transposes and views of other axes, dropout), the function is
unchanged with ``W' = W diag(g)``, ``c' = c + W β`` and the norm's gain set to ones, its shift
to zeros (a reader without a bias is given one, ``<layer>.bias``, where the shift is not
zero: the merged model then has that one more entry). What remains on the residual stream is
``n``, which commutes with every orthogonal map that keeps the all-ones direction, so the
stream admits rotations (annotate-units records the group, :mod:`mergec.ir.groups`) and the
merged model is still of the model's architecture. An RMSNorm (``g ⊙ x / rms(x)``, as
transformers writes Llama's) folds its gain alike; what remains commutes with every rotation.

A norm with unit gain and zero shift needs no fold, wherever it sits: a post-norm block's norm
(its output feeds the next residual sum) commutes with those rotations too.

A pre-norm backbone's last norm feeds a model output (transformers' ``last_hidden_state``),
which a merge matches and maps back into a model's basis (zip's output maps). The output is
then a reader too: the gain and shift are taken out of the graph and recorded per output
(``state.output_affines``), and zip applies each model's own after the map, where the merged
module returns that model's output (``g ⊙ (U z) + β``, with ``U`` the map). The merged stream
before the map is ``n`` again and admits rotations. Outputs kept in order (``outputs="fixed"``,
and under ``"auto"`` the labels: logits, plain tensors) are not readers.

A norm whose output feeds anything else (a post-norm block's residual sum, a nonlinearity, an
output kept in order) is left as it is, with the reason recorded per node in ``state.folds``;
its stream then admits permutations only. The pass works on the pipeline's own graph modules
(trace's export): the user's models keep their weights.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Collection

import torch
from torch import fx, nn

from mergec.ir.fx import (
    STATE_KEYS,
    aten_name,
    attach,
    attribute,
    call_arguments,
    module_path,
    output_names,
    owner_of,
)
from mergec.ir.groups import one_width
from mergec.ir.state import OutputAffine, PipelineState

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


def fold_norms(graph_module: fx.GraphModule, outputs: Collection[int] = ()
               ) -> tuple[dict[str, str], dict[int, OutputAffine]]:
    """Folds every LayerNorm and RMSNorm of ``graph_module`` whose readers allow it, in place;
    ``outputs`` are the flat outputs that may read a norm (they are matched and mapped back).
    Returns, per norm (module path, else node), what was done or why not, and the gain and
    shift taken into each such output."""
    report: dict[str, str] = {}
    at_outputs: list[tuple[str, list[Reader], list[int], Any, Any]] = []
    pinned = None  # the first norm left with a gain or shift (its stream keeps permutations)
    for node in list(graph_module.graph.nodes):
        affine = _norm_affine(node)
        if affine is None:
            continue
        name = module_path(node) or node.name
        if isinstance(affine, str):
            report[name], pinned = f"left: {affine}", pinned or name
            continue
        output, weight, bias = affine
        readers, read_out, why = _readers(graph_module, output, outputs)
        if why is None and not read_out:
            why = _check_readers(readers)
        if why is not None:
            report[name] = f"left: {why}"
            if not _is_identity(OutputAffine(*_affine_tensors(graph_module, weight, bias))):
                pinned = pinned or name
        elif read_out:
            at_outputs.append((name, readers, read_out, weight, bias))
        else:
            _fold(graph_module, readers, weight, bias)
            report[name] = "folded into " + _names(readers)
    return report, _fold_into_outputs(graph_module, at_outputs, pinned, report)


def _fold_into_outputs(graph_module: fx.GraphModule,
                       norms: list[tuple[str, list[Reader], list[int], Any, Any]],
                       pinned: str | None, report: dict[str, str]) -> dict[int, OutputAffine]:
    """Folds the norms that feed a model output (and their linear readers), once every other
    norm is folded: where one is left with its gain, the stream keeps permutations, and
    taking the last norm's affine out of the graph would gain nothing (and keep the merged
    model from its architecture). Returns the affine taken into each output."""
    affines: dict[int, OutputAffine] = {}
    for name, readers, read_out, weight, bias in norms:
        gain, shift = _affine_tensors(graph_module, weight, bias)
        keys = None if readers else tuple(None if p is None else p.target for p in (weight, bias))
        affine = OutputAffine(gain, shift, keys)
        if _is_identity(affine):  # a unit gain and zero shift need no fold at an output
            report[name] = "unit gain and zero shift: nothing to fold"
            continue
        if pinned is not None:
            report[name] = (f"left: its output feeds output (node output); the stream keeps "
                            f"permutations ({pinned} is left)")
            continue
        affines.update((index, affine) for index in read_out)
        _fold(graph_module, readers, weight, bias)
        report[name] = "folded into " + _names(readers, read_out)
    return affines


def _names(readers: list[Reader], outputs: list[int] = ()) -> str:
    return ", ".join([module_path(r.node) or r.node.name for r in readers]
                     + [f"output {index}" for index in outputs])


def _affine_tensors(graph_module: fx.GraphModule, weight: Any, bias: Any
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return tuple(None if p is None else _tensor(graph_module, p.target).clone()
                 for p in (weight, bias))


def _norm_affine(node: fx.Node) -> tuple[fx.Node, fx.Node | None, fx.Node | None] | str | None:
    """For a norm over the feature axis, (its output node, gain, shift); why it cannot be
    folded; or None for any other node. A LayerNorm is ``aten.layer_norm``; an RMSNorm as
    transformers writes it (Llama, Mistral, Qwen2) is ``gain * (x * rsqrt(mean(x², -1) +
    eps))``, casts allowed, whose output is the gain's product."""
    if aten_name(node) == "layer_norm":
        arguments = call_arguments(node)
        weight, bias = arguments.get("weight"), arguments.get("bias")
        if len(arguments.get("normalized_shape", ())) != 1:
            return "normalises more than the feature axis"
        if not all(a is None or _is_parameter(a) for a in (weight, bias)):
            return "its gain or shift is computed, not a parameter"
        return node, weight, bias
    if aten_name(node) != "mul" or len(node.args) != 2:
        return None
    gains = [a for a in node.args if _is_parameter(a)]
    others = [a for a in node.args if isinstance(a, fx.Node) and not _is_parameter(a)]
    if len(gains) != 1 or len(others) != 1 or not is_rms_normalised(others[0]):
        return None
    value = gains[0].meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dim() != 1:
        return None
    return node, gains[0], None


def _skip_casts(node: Any) -> Any:
    while isinstance(node, fx.Node) and aten_name(node) in ("to", "_to_copy", "type_as"):
        node = node.args[0]
    return node


def is_rms_normalised(node: fx.Node) -> bool:
    """Whether ``node`` is ``x * rsqrt(mean(x ** 2, -1, keepdim) + eps)`` (casts allowed)."""
    node = _skip_casts(node)
    if aten_name(node) != "mul" or len(node.args) != 2:
        return False
    for x, scale in (node.args, node.args[::-1]):
        scale = _skip_casts(scale)
        if aten_name(scale) != "rsqrt":
            continue
        total = _skip_casts(scale.args[0])
        if aten_name(total) == "add":
            total = _skip_casts(next((a for a in total.args if isinstance(a, fx.Node)), None))
        if aten_name(total) != "mean" or list(total.args[1]) not in ([-1], [_last(total)]):
            continue
        square = _skip_casts(total.args[0])
        if aten_name(square) == "pow" and square.args[1] == 2 \
                and _skip_casts(square.args[0]) is _skip_casts(x):
            return True
    return False


def _last(node: fx.Node) -> int:
    value = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    return value.dim() - 1 if isinstance(value, torch.Tensor) else -1


def _readers(graph_module: fx.GraphModule, norm: fx.Node, outputs: Collection[int] = ()
             ) -> tuple[list[Reader], list[int], str | None]:
    """The linear layers and the flat outputs (of ``outputs``) that read ``norm``'s output
    through moves, or why there are others."""
    readers, read_out, pending, seen = [], [], [norm], set()
    while pending:
        value = pending.pop()
        for user in value.users:
            if user.op == "output":
                flat = _flat_outputs(user)
                found = [index for index, leaf in enumerate(flat) if leaf is value]
                if found and all(index in outputs for index in found):
                    read_out.extend(found)
                    continue
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
                return [], [], f"its output feeds {op} (node {user.name})"
    return readers, sorted(read_out), None


def _is_identity(affine: OutputAffine) -> bool:
    gain, shift = affine.gain, affine.shift
    return (gain is None or bool(torch.all(gain == 1))) and \
        (shift is None or bool(torch.all(shift == 0)))


def _flat_outputs(output: fx.Node) -> list[Any]:
    result = output.args[0]
    return list(result) if isinstance(result, (tuple, list)) else [result]


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


def _check_readers(readers: list[Reader]) -> str | None:
    """Why the readers cannot take the norm's affine: there are none, or a weight has other
    uses."""
    if not readers:
        return "no linear layer reads it"
    nodes = {r.node for r in readers}
    for reader in readers:
        weight_node = reader.node.args[2 if reader.transposed else 1]
        if any(user not in nodes for user in weight_node.users):
            return f"the weight {reader.weight} has other uses"
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
            elif shift is not None and bool(torch.any(c != 0)):
                _add_bias(graph_module, reader, c.to(w.dtype))
        if gain is not None:
            matrix = matrix * gain.to(torch.float64)[None, :]
        _replace(graph_module, reader.weight, (matrix.T if reader.transposed else matrix)
                 .to(w.dtype).contiguous())
    if gain is not None:
        _replace(graph_module, weight.target, torch.ones_like(gain))
    if shift is not None:
        _replace(graph_module, bias.target, torch.zeros_like(shift))


def _add_bias(graph_module: fx.GraphModule, reader: Reader, value: torch.Tensor) -> None:
    """Gives a linear layer without a bias one (``<layer>.bias``) to take a norm's shift; the
    key joins the graph's state keys, so annotate-units binds it to the layer's outputs."""
    prefix = reader.weight.rsplit(".", 1)[0] if "." in reader.weight else ""
    key = f"{prefix}.bias" if prefix else "bias"
    state = graph_module.state_dict()
    while key in state:
        key = key + "_folded"
    attach(graph_module, key, value, parameter=True)
    with graph_module.graph.inserting_before(reader.node):
        node = graph_module.graph.get_attr(key)
    node.meta["val"] = reader.node.args[1].meta.get("val").new_empty(value.shape) \
        if "val" in reader.node.args[1].meta else None
    reader.node.args = (reader.node.args[0], reader.node.args[1], node)
    keys = graph_module.meta.get(STATE_KEYS)
    if keys is not None:
        graph_module.meta[STATE_KEYS] = tuple(keys) + (key,)
    graph_module.recompile()


def _tensor(graph_module: fx.GraphModule, key: str) -> torch.Tensor:
    return attribute(graph_module, key).detach()


def _replace(graph_module: fx.GraphModule, key: str, value: torch.Tensor) -> None:
    """A new tensor under ``key`` (the old one may be the user's model's own)."""
    owner, name = owner_of(graph_module, key)
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[name] = value


@dataclass(frozen=True)
class FoldNorms:
    """The fold-norms pass (with ``symmetry="auto"``, for models of one width merged at that
    width): the graphs' norms folded where their readers allow (``state.folds``: per model,
    per norm, what was done or why not)."""

    enabled: bool = True
    outputs: str = "auto"  # which outputs read a norm: annotate-units' outputs option
    name: ClassVar[str] = "fold-norms"

    def applies(self, state: PipelineState) -> bool:
        """Only where match can rotate: both models of one width (an elastic merge permutes
        every space, and folded gains would only change what it averages)."""
        if not self.enabled or len(state.graphs) != 2:
            return self.enabled
        shapes = [{k: t.shape for k, t in graph.state_dict().items()} for graph in state.graphs]
        return one_width(*shapes)

    def run(self, state: PipelineState) -> PipelineState:
        graphs = state.require("graphs", self.name)
        done = [fold_norms(graph, self.matched_outputs(graph)) for graph in graphs]
        folds = tuple(fold for fold, _ in done)
        count = sum(text.startswith("folded") for fold in folds for text in fold.values())
        log.info("fold-norms: %d of %d norms folded", count, sum(len(f) for f in folds))
        return state.evolve(folds=folds, output_affines=tuple(affines for _, affines in done))

    def matched_outputs(self, graph: fx.GraphModule) -> list[int]:
        """The flat outputs a merge matches and maps back (annotate-units' ``outputs``):
        none for ``"fixed"``, the features for ``"auto"``, all for ``"free"``."""
        names = output_names(graph)
        if self.outputs == "fixed":
            return []
        return [index for index, (_, feature) in enumerate(names)
                if feature or self.outputs == "free"]
