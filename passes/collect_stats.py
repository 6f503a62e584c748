"""collect-stats: joint feature statistics of the two models at every space's probe node.

Calibration batches run once through both traced graphs on the chosen device. For every free
space with a probe node, the features of A and B at that node (the space's axis moved last,
every other axis a sample: each pixel of a conv feature map counts) feed a streaming
:class:`~mergec.algorithms.covariance.JointMoments` in float64. No activation is kept.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import fx
from tqdm.auto import tqdm

from mergec.algorithms.covariance import JointMoments, feature_rows
from mergec.errors import MergeError
from mergec.passes.trace import is_guard
from mergec.spec import UnitSpec

log = logging.getLogger(__name__)


class GraphRunner(fx.Interpreter):
    """Runs a traced graph module on data of any batch size: export's shape guards are
    skipped, intermediate values freed as soon as they are used."""

    def __init__(self, graph_module: fx.GraphModule):
        super().__init__(graph_module, garbage_collect_values=True)

    def run_node(self, node: fx.Node) -> Any:
        return None if is_guard(node) else super().run_node(node)


class ProbeInterpreter(GraphRunner):
    """Runs a graph module and keeps the values of the named nodes."""

    def __init__(self, graph_module: fx.GraphModule, wanted: Iterable[str]):
        super().__init__(graph_module)
        self.wanted = set(wanted)
        self.captured: dict[str, torch.Tensor] = {}

    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        if node.name in self.wanted:
            self.captured[node.name] = value
        return value


def probe_rows(value: torch.Tensor, space) -> torch.Tensor:
    """Samples × units of ``space`` at its probe. A space seen as (blocks, inside blocks) axes
    is flattened block-major, which is its unit order."""
    if space.probe_within_axis is None:
        return feature_rows(value, space.probe_axis)
    moved = value.movedim((space.probe_axis, space.probe_within_axis), (-2, -1))
    return moved.reshape(-1, moved.shape[-2] * moved.shape[-1])


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
        if value.dtype != reference.dtype or tuple(value.shape[1:]) != tuple(reference.shape[1:]):
            raise MergeError(
                f"collect-stats: input {position} of calibration batch {index} has shape "
                f"{tuple(value.shape)} and dtype {value.dtype}; the model was traced with "
                f"{tuple(reference.shape)} {reference.dtype} (only the batch size may differ)")
    return inputs


@dataclass(frozen=True)
class CollectStats:
    """The collect-stats pass."""

    device: str | None = None
    progress: bool = True
    name: str = "collect-stats"

    def __call__(self, module_a: fx.GraphModule, module_b: fx.GraphModule, spec: UnitSpec,
                 calibration: Iterable[Any], example: tuple,
                 spaces: Iterable[str] | None = None, spec_b: UnitSpec | None = None
                 ) -> dict[str, JointMoments]:
        """``spec_b`` gives B's widths where they differ from A's."""
        spec_b = spec_b or spec
        device = torch.device(self.device) if self.device else torch.device("cpu")
        # a block order (the heads of an attention) is matched through its blocks' units
        orders = {space.block_space for space in spec.spaces.values() if space.block_space}
        wanted = [s for s in (spaces if spaces is not None else spec.spaces)
                  if spec.spaces[s].probe is not None and spec.is_free(s) and s not in orders]
        probes = {spec.spaces[s].probe for s in wanted}
        moments = {s: JointMoments(spec.spaces[s].size, spec_b.spaces[s].size, device=device)
                   for s in wanted}
        module_a, module_b = module_a.to(device), module_b.to(device)
        batches = 0
        with torch.no_grad():
            for index, batch in enumerate(tqdm(calibration, desc="collect-stats",
                                               disable=not self.progress, leave=False)):
                inputs = tuple(t.to(device) for t in check_batch(batch, example, index))
                run_a, run_b = ProbeInterpreter(module_a, probes), ProbeInterpreter(module_b, probes)
                run_a.run(*inputs)
                run_b.run(*inputs)
                for space_id in wanted:
                    space = spec.spaces[space_id]
                    rows_a = probe_rows(run_a.captured[space.probe], space)
                    rows_b = probe_rows(run_b.captured[space.probe], space)
                    moments[space_id].update(rows_a, rows_b)
                batches += 1
        if batches == 0:
            raise MergeError("collect-stats: the calibration data is empty; pass at least one "
                             "batch")
        for accumulator in moments.values():
            accumulator.all_reduce()
        log.info("collect-stats: %d batches, %d spaces", batches, len(moments))
        return moments
