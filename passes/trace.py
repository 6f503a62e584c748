"""trace: the frontend. Exports a model to an aten-level fx ``GraphModule``.

The canonical IR of mergec is the graph of ``torch.export.export(model.eval(), args,
strict=False)``, unlifted (``ExportedProgram.module()``): parameters and buffers are ``get_attr``
nodes whose targets are the model's state-dict keys, every node carries a fake tensor in
``meta["val"]`` and call nodes carry ``meta["nn_module_stack"]``. One op vocabulary serves
torchvision, transformers and user models alike.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import re
import sys
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch
from torch import nn
from torch.export import Dim

from mergec.errors import TraceError
from mergec.ir.fx import STATE_KEYS, as_args, attach, is_guard, module_path
from mergec.ir.state import PipelineState

log = logging.getLogger(__name__)


def untie(graph_module: torch.fx.GraphModule, model: nn.Module) -> None:
    """A parameter the model holds under several names (an embedding tied to the output layer)
    is read by the graph under one of them. Each use is given its own copy, under the name
    that belongs to the module using it, so that every use is bound, and merged, by its own
    role; the graph computes the same function."""
    names_of: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(tensor), []).append(name)
    aliases = {name: names for names in names_of.values() if len(names) > 1 for name in names}
    graph = graph_module.graph
    changed = False
    for node in list(graph.nodes):
        if node.op != "get_attr" or node.target not in aliases or len(node.users) < 2:
            continue
        value = graph_module.get_parameter(node.target)
        for user in list(node.users):
            path = module_path(user)
            alias = next((name for name in aliases[node.target]
                          if path and name.rsplit(".", 1)[0] == path), None)
            if alias is None or alias == node.target:
                continue
            attach(graph_module, alias, value.detach().clone(), parameter=True)
            with graph.inserting_before(user):
                copy_node = graph.get_attr(alias)
            copy_node.meta = dict(node.meta)
            user.replace_input_with(node, copy_node)
            changed = True
    if changed:
        graph.lint()
        graph_module.recompile()


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """Keyword arguments that make a model exportable as a user loads it.

    transformers decoders return cache objects (``DynamicCache``) that are no pytree; asking
    for no cache gives plain tensors and the same hidden states.
    """
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    config = getattr(model, "config", None)
    if "use_cache" in parameters and config is not None:
        return {"use_cache": False}
    return {}


def _failing_construct(error: BaseException) -> str:
    """The first line of an export error, with the user code location it names."""
    text = str(error).strip()
    first = text.splitlines()[0][:300] if text else type(error).__name__
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', text)
    user = [frame for frame in frames if "site-packages/torch" not in frame[0]]
    if user:
        file, line, function = user[-1]
        return f"{first} (at {file}:{line}, in {function})"
    return first


def _module_path(error: BaseException, model: nn.Module) -> str:
    """The module path (``layer1.0.conv1``) whose forward raised, if the traceback shows one."""
    modules = {id(module): name for name, module in model.named_modules()}
    traceback = error.__traceback__
    path = ""
    while traceback is not None:
        frame_self = traceback.tb_frame.f_locals.get("self")
        if isinstance(frame_self, nn.Module) and id(frame_self) in modules:
            path = modules[id(frame_self)] or "<root>"
        traceback = traceback.tb_next
    return path


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """On failure torch.export prints the partial graph to stderr and its symbolic-shapes
    logger warns with the whole graph; the TraceError says what failed. What export writes to
    stderr is held back and written out only if it succeeds (or logged, when mergec logs
    verbosely); the shapes logger is quiet unless mergec logs verbosely."""
    verbose = log.isEnabledFor(logging.INFO)
    shapes = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = shapes.level
    if not verbose:
        shapes.setLevel(logging.ERROR)
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except BaseException:
        log.info("trace: torch.export wrote:\n%s", held.getvalue())
        raise
    else:
        sys.stderr.write(held.getvalue())
    finally:
        shapes.setLevel(level)


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic_batch: bool):
    if dynamic_batch:
        # torch.export specialises a batch of 1 silently: trace with the batch doubled
        args = tuple(torch.cat([a, a]) if isinstance(a, torch.Tensor) and a.dim() > 0
                     and a.shape[0] == 1 else a for a in args)
        dynamic = tuple({0: Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() > 0 else None
                        for a in args)
        if kwargs:
            names = list(inspect.signature(model.forward).parameters)
            dynamic = {**dict(zip(names, dynamic)), **{k: None for k in kwargs}}
        try:
            return torch.export.export(model, args, kwargs or None, strict=False,
                                       dynamic_shapes=dynamic)
        except Exception as error:  # noqa: BLE001 - retried statically, then reported
            log.info("trace: dynamic batch failed (%s); exporting with static shapes",
                     _failing_construct(error))
    return torch.export.export(model, args, kwargs or None, strict=False)


def trace(model: nn.Module, example_inputs: Any, *, dynamic_batch: bool = True
          ) -> torch.fx.GraphModule:
    """Exports ``model`` to an aten-level ``torch.fx.GraphModule``.

    The model is deep-copied and put in eval mode; the caller's model is not touched. The batch
    dimension is dynamic where the model allows it. Raises :class:`TraceError` naming the failing
    construct and module path, with the export error chained.

    Example::

        gm = mergec.trace(torchvision.models.resnet18(), torch.randn(2, 3, 64, 64))
        gm(torch.randn(5, 3, 64, 64))
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"trace: expected a torch.nn.Module, got {type(model).__name__}")
    args = as_args(example_inputs)
    model = copy.deepcopy(model).eval()
    kwargs = _forward_kwargs(model)
    try:
        with torch.no_grad(), _quiet_export():
            program = _export(model, args, kwargs, dynamic_batch)
    except Exception as error:  # noqa: BLE001 - every export failure becomes a TraceError
        where = _module_path(error, model)
        raise TraceError(
            f"trace: torch.export could not export {type(model).__name__}"
            f"{f' (in module {where!r})' if where else ''}: {_failing_construct(error)}. "
            "Make the construct traceable (no data-dependent Python control flow, no "
            "unsupported outputs) or pass example inputs that the model accepts."
        ) from error
    graph_module = program.module()
    if kwargs:
        _drop_injected_kwargs(graph_module, args, kwargs)
    untie(graph_module, model)
    graph_module.meta[STATE_KEYS] = tuple(model.state_dict().keys())
    return graph_module


def _drop_injected_kwargs(graph_module: torch.fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """The keyword arguments trace adds (``use_cache=False``) are constants of the graph: the
    module is called like the model, with the positional inputs alone."""
    injected = [n for n in graph_module.graph.nodes if n.op == "placeholder" and n.name in kwargs]
    guards = [n for n in graph_module.graph.nodes if is_guard(n)]
    if any(user not in guards for node in injected for user in node.users):
        return  # the graph reads it: keep the module's signature as exported
    for node in guards:  # export's shape guards take every input, the constants too
        graph_module.graph.erase_node(node)
        if hasattr(graph_module, "_guards_fn"):
            delattr(graph_module, "_guards_fn")
    for node in list(graph_module.graph.nodes):
        if node.op == "placeholder" and node.name in kwargs:
            graph_module.graph.erase_node(node)
    in_spec = torch.utils._pytree.tree_flatten((args, {}))[1]
    codegen = graph_module.graph._codegen
    kept = [name for name in codegen.pytree_info.orig_args if name not in kwargs]
    codegen.pytree_info = codegen.pytree_info._replace(in_spec=in_spec, orig_args=kept)
    graph_module._in_spec = in_spec
    graph_module.recompile()


@dataclass(frozen=True)
class Trace:
    """The trace pass: every model of the state exported to a graph module (``graphs``)."""

    dynamic_batch: bool = True
    name: ClassVar[str] = "trace"

    def run(self, state: PipelineState) -> PipelineState:
        graphs = tuple(trace(model, state.example, dynamic_batch=self.dynamic_batch)
                       for model in state.models)
        return state.evolve(graphs=graphs)
