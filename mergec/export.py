"""Saving a merged module as self-contained code plus safetensors weights, and loading it.

A saved folder holds ``model.py`` (a ``torch.nn.Module`` whose ``forward`` is the emitted fx
code; it needs only torch and safetensors), ``weights.safetensors``, ``report.json`` and
``meta.json``. It is written into a temporary folder renamed into place, so a crash leaves no
half-written result.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import textwrap
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file
from torch import fx, nn

from mergec.errors import CheckpointError, MergeError
from mergec.ir.fx import attribute, is_guard

_HEADER = '''"""A model merged by mergec. Runs with torch and safetensors alone:

    from model import load
    net = load()          # reads weights.safetensors beside this file
"""
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import device

inf, nan = math.inf, math.nan
PARAMETERS = {parameters!r}


def _attach(root: torch.nn.Module, key: str, value: torch.Tensor, parameter: bool) -> None:
    *path, name = key.split(".")
    owner = root
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    if parameter:
        owner.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
    else:
        owner.register_buffer(name, value)


class MergedModel(torch.nn.Module):
    def __init__(self, weights=None):
        super().__init__()
        path = Path(weights) if weights else Path(__file__).with_name("weights.safetensors")
        for key, value in load_file(str(path)).items():
            _attach(self, key, value, key in PARAMETERS)
'''

_FOOTER = '''

def load(weights=None) -> MergedModel:
    return MergedModel(weights).eval()
'''


def plain_graph_module(module: fx.GraphModule) -> fx.GraphModule:
    """The module with export's pytree plumbing and shape guards removed: ``forward`` takes
    the flat inputs and returns a tensor (one output) or a tuple of tensors."""
    graph = fx.Graph()
    values: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(module.graph, values)
    for node in list(graph.nodes):
        if is_guard(node):
            graph.erase_node(node)
    flat = output if isinstance(output, (tuple, list)) else (output,)
    graph.output(flat[0] if len(flat) == 1 else tuple(flat))
    plain = fx.GraphModule(module, graph)
    plain.graph.lint()
    plain.recompile()
    return plain


def module_source(module: fx.GraphModule) -> str:
    plain = plain_graph_module(module)
    parameters = sorted(name for name, _ in plain.named_parameters())
    code = textwrap.indent(plain.code.strip("\n"), "    ")
    return _HEADER.format(parameters=parameters) + "\n" + code + "\n" + _FOOTER


def save_module(module: fx.GraphModule, folder: Path, report: str | None = None,
                overwrite: bool = False) -> Path:
    """Writes ``module`` to ``folder``, which must not exist unless ``overwrite``. The files
    are written into a hidden staging folder beside it and renamed into place: an interrupted
    save leaves no ``folder`` (an existing one is replaced only once the new one is whole)."""
    folder = Path(folder)
    with staged(folder, overwrite, _is_saved(folder), "a saved mergec model") as staging:
        _write(module, staging, report)
    return folder


@contextlib.contextmanager
def staged(folder: Path, overwrite: bool, replaceable: bool, kind: str) -> Iterator[Path]:
    """A hidden staging folder beside ``folder`` to write a result into; renamed into place
    when the block ends (:func:`put_in_place`), removed if it raises. An existing ``folder``
    is refused unless ``overwrite`` and it is ``replaceable`` (it holds ``kind``)."""
    if folder.exists() and not (overwrite and replaceable):
        advice = (f"it is not {kind}, so it is not replaced" if overwrite
                  else "choose a new folder, remove it, or overwrite it")
        raise MergeError(f"save: {str(folder)!r} already exists; {advice}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=STAGING, dir=folder.parent))
    try:
        yield staging
        put_in_place(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def put_in_place(staging: Path, folder: Path) -> None:
    """Renames a whole ``staging`` folder to ``folder``; an existing ``folder`` is moved aside
    first and removed only after, so that one of the two is in place at every moment."""
    if not folder.exists():
        os.rename(staging, folder)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=STAGING,
                                    dir=folder.parent))
    os.rename(folder, retired / folder.name)
    os.rename(staging, folder)
    shutil.rmtree(retired, ignore_errors=True)


STAGING = ".partial"  # the suffix of a save's staging folders (left behind only by a kill)


def _is_saved(folder: Path) -> bool:
    return (folder / "model.py").is_file() and (folder / "weights.safetensors").is_file()


def _write(module: fx.GraphModule, staging: Path, report: str | None) -> None:
    (staging / "model.py").write_text(module_source(module))
    state = {key: value.detach().cpu().clone().contiguous()
             for key, value in _graph_tensors(module).items()}
    save_file(state, str(staging / "weights.safetensors"))
    (staging / "meta.json").write_text(json.dumps({"format": "mergec-1",
                                                   "torch": torch.__version__}))
    if report is not None:
        (staging / "report.json").write_text(report)


def _graph_tensors(module: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The state dict and every other tensor the graph reads: buffers that are not persistent
    (transformers' ``position_ids``) and tensor constants are not in the state dict."""
    tensors = dict(module.state_dict())
    for node in module.graph.nodes:
        if node.op == "get_attr" and node.target not in tensors:
            value = attribute(module, node.target)
            if isinstance(value, torch.Tensor):
                tensors[node.target] = value
    return tensors


def load(folder: str | Path) -> nn.Module:
    """Loads a merged model saved by :meth:`MergeResult.save` (in eval mode)."""
    folder = Path(folder)
    source, weights = folder / "model.py", folder / "weights.safetensors"
    if not source.is_file() or not weights.is_file():
        raise CheckpointError(f"load: {str(folder)!r} is not a saved mergec model (expected "
                              "model.py and weights.safetensors)")
    spec = importlib.util.spec_from_file_location(f"mergec_saved_{abs(hash(folder))}", source)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        return module.load(weights)
    except Exception as error:  # noqa: BLE001 - a corrupt folder of any kind
        raise CheckpointError(f"load: cannot load {str(folder)!r}: {error}") from error
