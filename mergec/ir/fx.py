"""Helpers over mergec's fx graphs: what a node runs, where it was traced, how to read its
arguments, and how to run a graph on calibration data.

The graphs are those of ``passes/trace.py``: aten-level, parameters and buffers as ``get_attr``
nodes named by their state-dict keys, a fake tensor in every node's ``meta["val"]``.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from mergec.errors import MergeError, TraceError

#: ``meta`` key of the graph module under which the traced model's state-dict keys are kept.
STATE_KEYS = "mergec_state_keys"


def is_guard(node: fx.Node) -> bool:
    """Export's shape-guard call: skipped when running a graph on other shapes, dropped when
    emitting code."""
    return node.op == "call_module" and node.target == "_guards_fn"


def module_path(node: fx.Node) -> str:
    """The innermost module (``layer1.0.conv1``) a node was traced in; "" at the root."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def aten_name(node: fx.Node) -> str:
    """The aten op a call node runs, in-place variants by their out-of-place name ("relu" for
    ``relu_``); "" for anything else."""
    packet = getattr(node.target, "_overloadpacket", None)
    if node.op != "call_function" or packet is None:
        return ""
    name = packet.__name__
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def call_arguments(node: fx.Node) -> dict[str, Any]:
    """The call's arguments by schema name, defaults filled in (aten overloads only)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return dict(node.kwargs)
    result = {}
    for index, argument in enumerate(schema.arguments):
        if index < len(node.args):
            result[argument.name] = node.args[index]
        elif argument.name in node.kwargs:
            result[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            result[argument.name] = argument.default_value
    return result


def tensor_ancestors(node: fx.Node) -> set[fx.Node]:
    """The tensors ``node`` depends on, itself included (shapes alone, ``x.size(0)``, do not
    count)."""
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(a for a in current.all_input_nodes
                         if isinstance(a.meta.get("val"), torch.Tensor) or a.op == "get_attr")
    return seen


def owner_of(root: nn.Module, key: str) -> tuple[nn.Module, str]:
    """The module holding the dotted state-dict ``key`` under ``root``, and the attribute's
    name there (AttributeError where a module on the path is missing)."""
    path, _, name = key.rpartition(".")
    return (root.get_submodule(path) if path else root), name


def attribute(root: nn.Module, key: str) -> torch.Tensor:
    """The tensor the dotted ``key`` (a get_attr node's target) names under ``root``."""
    owner, name = owner_of(root, key)
    return getattr(owner, name)


def attach(root: nn.Module, key: str, value: torch.Tensor, parameter: bool) -> None:
    """Registers ``value`` on ``root`` under the dotted state-dict ``key``, creating empty
    modules along the path."""
    *path, name = key.split(".")
    owner = root
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    if parameter:
        owner.register_parameter(name, nn.Parameter(value, requires_grad=False))
    else:
        owner.register_buffer(name, value)


def as_args(example_inputs: Any) -> tuple:
    """Normalises example inputs: a bare tensor is one positional input."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise TraceError(
            f"trace: example inputs must be a tensor or a tuple of positional inputs, "
            f"got {type(example_inputs).__name__}"
        )
    return example_inputs


def module_device(module: nn.Module) -> torch.device:
    """The device a module's state is on (the CPU for a module without state)."""
    return next((t.device for t in module.state_dict().values()), torch.device("cpu"))


def same_device(first: torch.device, second: torch.device) -> bool:
    """Whether two devices are one: ``cuda`` is ``cuda:0`` where one of them names no index."""
    return first.type == second.type and (first.index is None or second.index is None
                                          or first.index == second.index)


def _factories(module: fx.GraphModule, on: torch.device) -> list[fx.Node]:
    """The nodes that create tensors on ``on`` (``aten.arange(..., device=cpu)``)."""
    return [node for node in module.graph.nodes
            if isinstance(node.kwargs.get("device"), torch.device)
            and same_device(node.kwargs["device"], on)]


def to_device(module: nn.Module, device: torch.device | str) -> nn.Module:
    """``module.to(device)``, in place. A graph module's tensor factories carry the device
    they were traced on (``aten.arange(..., device=cpu)``): those on the weights' device move
    with them (a tensor the model puts on another device on purpose stays there)."""
    place = torch.device(device)
    moved = _factories(module, module_device(module)) \
        if isinstance(module, fx.GraphModule) else []
    module.to(place)
    moved = [node for node in moved if node.kwargs["device"] != place]
    for node in moved:
        node.update_kwarg("device", place)
    if moved:
        module.recompile()
    return module


def follow_weights_device(module: fx.GraphModule) -> fx.GraphModule:
    """In place: every tensor factory of the graph on its weights' device creates its tensor on
    the device of the module's first weight, read when the module runs, so that
    ``module.to(device)`` moves the whole computation (the graph as traced names the device it
    was traced on). A graph with no weights is left as it is."""
    weights = set(dict(module.named_parameters())) | set(dict(module.named_buffers()))
    graph = module.graph
    reference = next((n for n in graph.nodes if n.op == "get_attr" and n.target in weights),
                     None)
    factories = _factories(module, module_device(module))
    if reference is None or not factories:
        return module
    with graph.inserting_after(reference):
        device = graph.call_function(getattr, (reference, "device"))
    for node in factories:
        node.update_kwarg("device", device)
    graph.lint()
    module.recompile()
    return module


def tensor_leaves(value: Any) -> list[torch.Tensor]:
    """The tensors in a model's output (a tensor, a tuple, a dict, a transformers output)."""
    if hasattr(value, "to_tuple"):  # transformers' ModelOutput
        value = value.to_tuple()
    return [leaf for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor)]


#: Prefix of the buffers of a merged module that map its outputs into a model's basis.
OUTPUT_MAP = "mergec_output_map"
#: Words in a transformers output's field names that mark the outputs as labels (class or
#: vocabulary scores, whose order both models share), not features.
LABEL_WORDS = ("logits", "loss", "scores")


def output_names(graph_module: fx.GraphModule) -> list[tuple[str, bool]]:
    """Per flat output of a traced graph (in the order of its output node): the output's name
    (``last_hidden_state``; "" where the output is a bare tensor or a tuple) and whether it is
    a feature. A feature is a field of a transformers ``ModelOutput`` whose name says no
    labels (hidden states, pooled features, embeddings); logits, plain tensors and tuples are
    labels, whose units mean the same in every model."""
    out_spec = getattr(graph_module, "_out_spec", None)
    output = graph_module.graph.find_nodes(op="output")[0].args[0]
    count = len(output) if isinstance(output, (tuple, list)) else 1
    if out_spec is None or out_spec.num_leaves != count:
        return [("", False)] * count
    return list(_named_leaves(out_spec, "", False))


def _named_leaves(spec: pytree.TreeSpec, name: str, in_output: bool):
    if spec.is_leaf():
        yield name, in_output and not any(word in name for word in LABEL_WORDS)
        return
    model_output = any(c.__name__ == "ModelOutput" and c.__module__.startswith("transformers")
                       for c in getattr(spec.type, "__mro__", ()))
    keys = spec.context if isinstance(spec.context, (list, tuple)) else None
    for index, child in enumerate(spec.children()):
        key = str(keys[index]) if keys is not None and index < len(keys) else str(index)
        yield from _named_leaves(child, f"{name}.{key}" if name else key,
                                 in_output or model_output)


class GraphRunner(fx.Interpreter):
    """Runs a traced graph module on data of any batch size: export's shape guards are
    skipped, intermediate values freed as soon as they are used."""

    def __init__(self, graph_module: fx.GraphModule):
        super().__init__(graph_module, garbage_collect_values=True)

    def run_node(self, node: fx.Node) -> Any:
        return None if is_guard(node) else super().run_node(node)


def runnable_copy(graph_module: fx.GraphModule) -> fx.GraphModule:
    """A new module with a copy of ``graph_module``'s graph, sharing its parameters and
    buffers, that runs on any batch size: export's shape guards are dropped and positional
    tensors are its inputs. Passes rewrite the copy (new outputs, observers) and recompile it;
    the original graph is never touched."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(graph_module.graph, {}))
    for node in [node for node in graph.nodes if is_guard(node)]:
        graph.erase_node(node)
    return fx.GraphModule(graph_module, graph)


class Probes:
    """The values of chosen nodes, computed by generated code rather than an interpreter.

    The graph is copied (:func:`runnable_copy`) with its output replaced by the wanted nodes,
    so every node after the last probe is dropped too.

    >>> probes = Probes(graph_module, ["relu", "add_3"])  # doctest: +SKIP
    >>> probes(x)["relu"].shape  # doctest: +SKIP
    """

    def __init__(self, graph_module: fx.GraphModule, wanted: Iterable[str]):
        self.names = sorted(set(wanted))
        self.module = runnable_copy(graph_module)
        graph = self.module.graph
        nodes = {node.name: node for node in graph.nodes}
        unknown = [name for name in self.names if name not in nodes]
        if unknown:
            raise MergeError(f"probes: the graph has no node {unknown[0]!r}")
        output = next(node for node in graph.nodes if node.op == "output")
        graph.erase_node(output)
        graph.output(tuple(nodes[name] for name in self.names))
        graph.eliminate_dead_code()
        self.module.recompile()

    def __call__(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.module(*inputs)))


def check_batch(batch: Any, example: tuple, index: int) -> tuple:
    """A calibration batch as a tuple of positional inputs, checked against the example."""
    inputs = batch if isinstance(batch, (tuple, list)) else (batch,)
    inputs = tuple(inputs)
    if len(inputs) != len(example):
        raise MergeError(
            f"collect-stats: calibration batch {index} has {len(inputs)} inputs, the model takes "
            f"{len(example)}. Pass batches as tuples of forward's positional inputs "
            "(use mergec.calibration_from_loader for (inputs, labels) loaders).")
    for position, (value, reference) in enumerate(zip(inputs, example)):
        if not isinstance(value, torch.Tensor):
            raise MergeError(f"collect-stats: input {position} of calibration batch {index} is "
                             f"a {type(value).__name__}, not a tensor")
        if value.dim() > 0 and value.shape[0] == 0:
            raise MergeError(f"collect-stats: input {position} of calibration batch {index} "
                             "holds no samples (batch size 0)")
        if value.device.type == "meta":
            raise MergeError(f"collect-stats: input {position} of calibration batch {index} is "
                             "on the meta device (no data); pass real tensors")
        if value.dtype != reference.dtype or tuple(value.shape[1:]) != tuple(reference.shape[1:]):
            raise MergeError(
                f"collect-stats: input {position} of calibration batch {index} has shape "
                f"{tuple(value.shape)} and dtype {value.dtype}; the model was traced with "
                f"{tuple(reference.shape)} {reference.dtype} (only the batch size may differ)")
    return inputs
