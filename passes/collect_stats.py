"""collect-stats: joint feature statistics of the models at every space's probe node.

A rotation space (a residual stream) is observed at each of its ``sites``, every residual sum,
pooled into one accumulator with each site's features scaled to unit mean square per batch:
one rotation serves the stream at every depth, and every depth weighs alike.

Calibration batches run once through both models on the chosen device, as generated code that
returns the probe nodes' values (:class:`~mergec.ir.fx.Probes`). For every free space with a
probe node, the features of A and B at that node (every other axis a sample: each pixel of a
conv feature map counts) feed a streaming :class:`~mergec.algorithms.covariance.JointMoments`:
products per space and batch in the models' precision, summed in float64. No activation
outlives its batch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Sequence

import torch
from torch import fx
from tqdm.auto import tqdm

from mergec.algorithms.covariance import JointMoments, Scratch, feature_rows, feature_view
from mergec.algorithms.distributed import total_batches
from mergec.errors import MergeError
from mergec.ir.fx import Probes, check_batch, to_device
from mergec.ir.groups import one_width
from mergec.ir.spec import UnitSpec
from mergec.ir.state import PipelineState

log = logging.getLogger(__name__)


def probe_features(value: torch.Tensor, space, axis: int | None = None) -> torch.Tensor:
    """The units of ``space`` at its probe (or on ``axis`` of another site) as ``[samples,
    units, positions]`` (see :func:`~mergec.algorithms.covariance.feature_view`). A space
    seen as (blocks, inside blocks) axes is flattened block-major, which is its unit order."""
    if axis is not None:
        return feature_view(value, axis)
    if space.probe_within_axis is None:
        return feature_view(value, space.probe_axis)
    moved = value.movedim((space.probe_axis, space.probe_within_axis), (-2, -1))
    return moved.reshape(-1, moved.shape[-2] * moved.shape[-1])


def _unit_energy(features: torch.Tensor) -> torch.Tensor:
    """A site's features divided by their root mean square over the batch: a stream grows with
    depth, and each site should weigh alike in the one rotation that serves them all (a
    rotation keeps the norm, so a rotated copy is still recovered exactly)."""
    return features / features.detach().double().pow(2).mean().sqrt().clamp_min(1e-30).to(
        features.dtype)


def _subsample(features: list[torch.Tensor], count: int, draw: torch.Generator
               ) -> list[torch.Tensor]:
    """At most ``count`` of the batch's samples (the same ones in every model), as rows."""
    samples = features[0].numel() // features[0].shape[1]
    if samples <= count:
        return features
    keep = torch.randperm(samples, generator=draw)[:count].to(features[0].device)
    return [feature_rows(f, 1).index_select(0, keep) for f in features]


def _check_finite(moments: dict[str, JointMoments], wanted: list[str], spec: UnitSpec,
                  index: int) -> None:
    """An error naming the space, its probe node and the model whose activations in batch
    ``index`` were NaN or infinite (they reach the running sums, which are checked: one
    vector per space, not the activations again)."""
    if not wanted or bool(torch.stack([moments[s].sum.isfinite().all() for s in wanted]).all()):
        return
    for space_id in wanted:
        accumulator = moments[space_id]
        if bool(accumulator.sum.isfinite().all()):
            continue
        model = next(index for index, start in enumerate(accumulator.offsets)
                     if not bool(accumulator.sum[start:start + accumulator.dims[index]]
                                 .isfinite().all()))
        model = "AB"[model] if len(accumulator.dims) == 2 else str(model)
        raise MergeError(f"collect-stats: model {model}'s activations at node "
                         f"{spec.spaces[space_id].probe!r} (space {space_id!r}) are NaN or "
                         f"infinite on calibration batch {index}; check that batch's inputs "
                         "and the model's weights (a float16 model may overflow: merge it in "
                         "float32)")


def joint_moments(modules: Sequence[fx.GraphModule], specs: Sequence[UnitSpec],
                  calibration: Iterable[Any], example: tuple, device: str | None = None,
                  progress: bool = True, samples_per_batch: int | None = None, seed: int = 0,
                  rotations: bool = True) -> dict[str, JointMoments]:
    """Joint moments of the models' features (A's and B's, or N models') in every free space
    with a probe (``specs``: each model's spec, for its widths), over one pass of the
    calibration data through every model. With ``samples_per_batch``, each batch contributes
    at most that many samples (pixels, tokens) to each space, drawn with ``seed``: the cost of
    a wide space's statistics is then bounded by the number of batches, not by their size.
    With ``rotations`` (``symmetry="auto"``), a rotation space is observed at its ``sites``."""
    device = torch.device(device) if device else torch.device("cpu")
    spec = specs[0]
    # a block order (the heads of an attention) is matched through its blocks' units
    orders = {space.block_space for space in spec.spaces.values() if space.block_space}
    wanted = [s for s in spec.spaces
              if spec.spaces[s].probe is not None and spec.is_free(s) and s not in orders]
    probes = {spec.spaces[s].probe for s in wanted}
    if rotations:
        probes |= {node for s in wanted for node, _ in spec.spaces[s].sites}
    moments = {s: JointMoments(*(other.spaces[s].size for other in specs), device=device)
               for s in wanted}
    observers = [Probes(to_device(module, device), probes) for module in modules]
    batches, scratch = 0, Scratch()  # one product buffer for every space and batch
    with torch.no_grad():
        for index, batch in enumerate(tqdm(calibration, desc="collect-stats",
                                           disable=not progress, leave=False)):
            inputs = tuple(t.to(device) for t in check_batch(batch, example, index))
            values = [observe(*inputs) for observe in observers]
            draw = torch.Generator().manual_seed(seed * 1_000_003 + index)
            for space_id in wanted:
                space = spec.spaces[space_id]
                sites = space.sites if rotations else ()
                for node, axis in sites or ((space.probe, None),):
                    features = [probe_features(value[node], space, axis) for value in values]
                    if sites:
                        features = [_unit_energy(f) for f in features]
                    if samples_per_batch is not None:
                        features = _subsample(features, samples_per_batch, draw)
                    moments[space_id].update(*features, scratch=scratch)
            _check_finite(moments, wanted, spec, index)
            batches += 1
    if total_batches(batches, device) == 0:
        raise MergeError("collect-stats: the calibration data is empty; pass at least one "
                         "batch")
    for accumulator in moments.values():
        accumulator.all_reduce()
    log.info("collect-stats: %d batches, %d spaces", batches, len(moments))
    return moments


@dataclass(frozen=True)
class CollectStats:
    """The collect-stats pass: joint moments per space (``moments``)."""

    device: str | None = None
    progress: bool = True
    needed: bool = True  # only the methods that match on activations need statistics
    samples_per_batch: int | None = None
    seed: int = 0
    rotations: bool = True  # False: every space at its probe alone (no rotation merge)
    name: ClassVar[str] = "collect-stats"

    def applies(self, state: PipelineState) -> bool:
        return self.needed

    def run(self, state: PipelineState) -> PipelineState:
        graphs, specs = state.require("graphs", self.name), state.require("specs", self.name)
        moments = joint_moments(graphs, specs, state.calibration, state.example, self.device,
                                self.progress, self.samples_per_batch, self.seed,
                                rotations=self.rotations and all(
                                    one_width(specs[0].shapes, spec.shapes) for spec in specs))
        return state.evolve(moments=moments)
