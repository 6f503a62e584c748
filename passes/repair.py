"""repair: statistics repair of a merged model.

``reset`` recomputes every BatchNorm's running statistics on the calibration data, the way
``model.train()`` with ``momentum=None`` would: during the pass each BatchNorm normalises with
its batch statistics, and the running mean and (unbiased) variance become the average of the
batch statistics over all batches.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import fx
from tqdm.auto import tqdm

from mergec.errors import MergeError
from mergec.passes.collect_stats import check_batch

log = logging.getLogger(__name__)

_BATCH_NORMS = {"batch_norm", "_native_batch_norm_legit_no_training"}


def _is_batch_norm(node: fx.Node) -> bool:
    packet = getattr(node.target, "_overloadpacket", None)
    return node.op == "call_function" and packet is not None and packet.__name__ in _BATCH_NORMS


class _ResetInterpreter(fx.Interpreter):
    """Runs the graph with batch statistics in every BatchNorm and averages them."""

    def __init__(self, graph_module: fx.GraphModule):
        super().__init__(graph_module, garbage_collect_values=True)
        self.sums: dict[str, list[torch.Tensor]] = {}
        self.batches = 0

    def run_node(self, node: fx.Node) -> Any:
        if node.op == "call_module" and node.target == "_guards_fn":
            return None
        if not _is_batch_norm(node):
            return super().run_node(node)
        x, weight, bias = (self.env[a] if isinstance(a, fx.Node) else a for a in node.args[:3])
        eps = node.args[7] if node.target.__name__.startswith("batch_norm") else node.args[6]
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dim=dims)
        variance = x.var(dim=dims, unbiased=False)
        shape = [1, -1] + [1] * (x.dim() - 2)
        out = (x - mean.view(shape)) / torch.sqrt(variance.view(shape) + eps)
        if weight is not None:
            out = out * weight.view(shape)
        if bias is not None:
            out = out + bias.view(shape)
        count = x.numel() // x.shape[1]
        unbiased = variance * count / max(count - 1, 1)
        key = node.name
        stats = self.sums.setdefault(key, [torch.zeros_like(mean), torch.zeros_like(mean)])
        stats[0] += mean
        stats[1] += unbiased
        if node.target.__name__.startswith("batch_norm"):
            return out
        return (out, mean.new_zeros(0), mean.new_zeros(0))


@dataclass(frozen=True)
class Repair:
    """The repair pass: ``mode`` is "reset" (BatchNorm statistics) or None (nothing)."""

    mode: str | None = "reset"
    device: str | None = None
    progress: bool = True
    name: str = "repair"

    def __post_init__(self) -> None:
        if self.mode not in ("reset", None):
            raise MergeError(f"repair: unknown mode {self.mode!r}; choose 'reset' or None")

    def __call__(self, module: fx.GraphModule, calibration: Iterable[Any], example: tuple
                 ) -> dict[str, int]:
        norms = [n for n in module.graph.nodes if _is_batch_norm(n)]
        if self.mode is None or not norms:
            return {"batch_norms_reset": 0}
        device = torch.device(self.device) if self.device else torch.device("cpu")
        module.to(device)
        interpreter = _ResetInterpreter(module)
        batches = 0
        with torch.no_grad():
            for index, batch in enumerate(tqdm(calibration, desc="repair", leave=False,
                                               disable=not self.progress)):
                inputs = tuple(t.to(device) for t in check_batch(batch, example, index))
                interpreter.run(*inputs)
                batches += 1
        if batches == 0:
            raise MergeError("repair: the calibration data is empty")
        for node in norms:
            mean_node, var_node = node.args[3], node.args[4]
            if not (isinstance(mean_node, fx.Node) and mean_node.op == "get_attr"):
                continue
            sums = interpreter.sums[node.name]
            _set_buffer(module, mean_node.target, sums[0] / batches)
            _set_buffer(module, var_node.target, sums[1] / batches)
        log.info("repair: reset %d BatchNorms on %d batches", len(norms), batches)
        return {"batch_norms_reset": len(norms)}


def _set_buffer(module: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    owner_path, _, name = target.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    getattr(owner, name).copy_(value.to(getattr(owner, name).dtype))
