"""repair: statistics repair of a merged model.

``reset`` recomputes every BatchNorm's running statistics on the calibration data, the way
``model.train()`` with ``momentum=None`` would: during the pass each BatchNorm normalises with
its batch statistics, and the running mean and (unbiased) variance become the average of the
batch statistics over all batches.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from tqdm.auto import tqdm

from mergec.algorithms.distributed import all_reduce_sum_, total_batches
from mergec.errors import MergeError
from mergec.ir.fx import (
    GraphRunner,
    aten_name,
    attribute,
    check_batch,
    module_device,
    runnable_copy,
    to_device,
)
from mergec.ir.groups import ORTHOGONAL
from mergec.ir.spec import UnitSpec
from mergec.ir.state import PipelineState

log = logging.getLogger(__name__)

_BATCH_NORMS = {"batch_norm", "_native_batch_norm_legit_no_training"}


def _is_batch_norm(node: fx.Node) -> bool:
    return aten_name(node) in _BATCH_NORMS


class _BatchStatistics(nn.Module):
    """Stands in for one BatchNorm: normalises with the batch's statistics and adds them to
    running sums (float64). One fused kernel does both (``F.batch_norm`` in training mode with
    momentum 1 leaves exactly the batch's mean and unbiased variance in the running buffers)."""

    def __init__(self, channels: int, eps: float, returns_tuple: bool, device: torch.device):
        super().__init__()
        self.eps, self.returns_tuple = eps, returns_tuple
        self.mean_sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.variance_sum = torch.zeros(channels, dtype=torch.float64, device=device)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
                ) -> Any:
        mean = x.new_zeros(x.shape[1])
        variance = x.new_ones(x.shape[1])
        out = F.batch_norm(x, mean, variance, weight, bias, training=True, momentum=1.0,
                           eps=self.eps)
        self.mean_sum += mean
        self.variance_sum += variance
        return (out, mean.new_zeros(0), mean.new_zeros(0)) if self.returns_tuple else out


def _observed(module: fx.GraphModule, norms: list[fx.Node]
              ) -> tuple[fx.GraphModule, dict[str, _BatchStatistics]]:
    """A copy of ``module`` whose BatchNorms run on batch statistics and record them, by
    BatchNorm node name."""
    observed = runnable_copy(module)
    nodes = {node.name: node for node in observed.graph.nodes}
    device = module_device(module)
    recorders = {}
    for index, norm in enumerate(norms):
        node = nodes[norm.name]
        legit = not node.target.__name__.startswith("batch_norm")
        # the merged module's own buffer: its width may differ from the traced model's
        channels = attribute(observed, node.args[3].target).shape[0] \
            if isinstance(node.args[3], fx.Node) and node.args[3].op == "get_attr" \
            else norm.args[0].meta["val"].shape[1]
        recorder = _BatchStatistics(int(channels), node.args[6] if legit else node.args[7],
                                    legit, device)
        observed.add_submodule(f"_batch_statistics_{index}", recorder)
        with observed.graph.inserting_before(node):
            replacement = observed.graph.call_module(f"_batch_statistics_{index}",
                                                     tuple(node.args[:3]))
        node.replace_all_uses_with(replacement)
        observed.graph.erase_node(node)
        recorders[norm.name] = recorder
    observed.recompile()
    return observed, recorders


def _rotated(state: PipelineState) -> frozenset[str]:
    """The spaces match aligned by a rotation (their summaries say so)."""
    return frozenset(space for space, summary in state.summaries.items()
                     if summary.get("group") == ORTHOGONAL)


@dataclass(frozen=True)
class Repair:
    """The repair pass: ``mode`` is "reset" (BatchNorm statistics), "repair" (reset, then
    REPAIR's per-channel rescaling, see :func:`repair_statistics`) or None (nothing)."""

    mode: str | None = "reset"
    device: str | None = None
    progress: bool = True
    name: ClassVar[str] = "repair"

    def __post_init__(self) -> None:
        if self.mode not in ("reset", "repair", None):
            raise MergeError(f"repair: unknown mode {self.mode!r}; choose 'reset', 'repair' "
                             "or None")

    def run(self, state: PipelineState) -> PipelineState:
        merged = state.require("merged", self.name)
        result = self._reset(merged, state.calibration, state.example)
        if self.mode == "repair":
            graphs = state.require("graphs", self.name)
            result["normalisations_repaired"] = repair_statistics(
                merged, graphs, state.plans, state.calibration, self.device,
                state.specs[0] if state.specs else None, _rotated(state))
        if self.device:
            to_device(merged, self.device)
        return state.evolve(repair={**state.repair, **result})

    def _reset(self, module: fx.GraphModule, calibration: Iterable[Any], example: tuple
              ) -> dict[str, int]:
        if self.mode is None:
            return {"batch_norms_reset": 0}
        count = reset_batch_norms(module, calibration, example, self.device, self.progress)
        return {"batch_norms_reset": count}


def reset_batch_norms(module: fx.GraphModule, calibration: Iterable[Any], example: tuple,
                      device: str | None = None, progress: bool = True,
                      description: str = "repair") -> int:
    """Sets every BatchNorm's running statistics of ``module`` to the mean over the
    calibration batches of the batch statistics (summed over the processes of a
    ``torch.distributed`` group); returns how many BatchNorms there were."""
    norms = [n for n in module.graph.nodes if _is_batch_norm(n)]
    if not norms:
        return 0
    device = torch.device(device) if device else torch.device("cpu")
    to_device(module, device)
    observed, recorders = _observed(module, norms)
    batches = 0
    with torch.no_grad():
        for index, batch in enumerate(tqdm(calibration, desc=description, leave=False,
                                           disable=not progress)):
            observed(*(t.to(device) for t in check_batch(batch, example, index)))
            batches += 1
    batches = total_batches(batches, device)
    if batches == 0:
        raise MergeError(f"{description}: the calibration data is empty")
    all_reduce_sum_([tensor for recorder in recorders.values()
                     for tensor in (recorder.mean_sum, recorder.variance_sum)])
    _check_finite(recorders, description)
    for node in norms:
        mean_node, var_node = node.args[3], node.args[4]
        if not (isinstance(mean_node, fx.Node) and mean_node.op == "get_attr"):
            continue
        recorder = recorders[node.name]
        _set_buffer(module, mean_node.target, recorder.mean_sum / batches)
        _set_buffer(module, var_node.target, recorder.variance_sum / batches)
    log.info("%s: reset %d BatchNorms on %d batches", description, len(norms), batches)
    return len(norms)


def _check_finite(recorders: dict[str, _BatchStatistics], description: str) -> None:
    for name, recorder in recorders.items():
        if not bool(recorder.mean_sum.isfinite().all() & recorder.variance_sum.isfinite().all()):
            raise MergeError(f"{description}: the activations at BatchNorm node {name!r} are "
                             "NaN or infinite on the calibration data; check its inputs (and "
                             "the models' weights)")


def _set_buffer(module: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    buffer = attribute(module, target)
    buffer.copy_(value.to(buffer.dtype))


_NORMS = _BATCH_NORMS | {"layer_norm", "group_norm", "native_layer_norm", "native_group_norm"}
_ACTIVATIONS = {"relu", "gelu", "silu", "sigmoid", "tanh", "hardswish", "mish", "elu"}


class _Reached(Exception):
    """Raised by :class:`_ChannelStats` once every wanted node has been computed."""


class _ChannelStats(GraphRunner):
    """Per-channel sum and sum of squares at the outputs of chosen nodes. With
    ``stop_early`` the run ends at the last of them."""

    def __init__(self, graph_module: fx.GraphModule, axes: dict[str, int],
                 stop_early: bool = False, outer: frozenset[str] = frozenset()):
        super().__init__(graph_module)
        self.axes, self.outer = axes, outer
        self.sums: dict[str, list[torch.Tensor]] = {}
        self.stop_early = stop_early
        self.seen: set[str] = set()

    def collect(self, calibration: Iterable[Any], device: torch.device) -> dict[str, list]:
        for batch in calibration:
            inputs = batch if isinstance(batch, (tuple, list)) else (batch,)
            self.seen = set()
            try:
                self.run(*(t.to(device) for t in inputs))
            except _Reached:
                pass
        for name in sorted(self.axes):  # one order on every process
            all_reduce_sum_(self.sums[name])
        return self.sums

    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        if node.name in self.axes:
            out = value[0] if isinstance(value, (tuple, list)) else value
            axis = self.axes[node.name]
            rows = out.movedim(axis, -1).reshape(-1, out.shape[axis])
            rows = rows.to(torch.float64)
            stats = self.sums.setdefault(node.name, [0, 0, torch.zeros((), dtype=rows.dtype)])
            stats[0] += rows.sum(0)
            stats[1] += (rows * rows).sum(0)
            stats[2] += rows.shape[0]
            if node.name in self.outer:
                if len(stats) == 3:
                    stats.append(0)
                stats[3] += rows.T @ rows
            self.seen.add(node.name)
            if self.stop_early and len(self.seen) == len(self.axes):
                raise _Reached
        return value


def _mean_std(sums: list) -> tuple[torch.Tensor, torch.Tensor]:
    mean = sums[0] / sums[2]
    variance = (sums[1] / sums[2] - mean * mean).clamp_min(0)
    return mean, variance.sqrt()


class Target(NamedTuple):
    """One place REPAIR corrects: a node, the axis and space of its units, the parameters the
    correction is folded into (an affine's gain and shift, or a linear layer's weight rows and
    bias) and how: ``units`` (each unit's mean and std, after a normalisation or before an
    MLP's nonlinearity) or ``rotated`` (heads that rotate inside: each merged unit's mean and
    std against those of the parents' features mapped into the merged basis, which need the
    parents' covariances: a rotation mixes units, so their own statistics do not interpolate)."""

    axis: int
    space: str
    weight: fx.Node
    bias: fx.Node | None
    kind: str


def repair_targets(merged: fx.GraphModule, spec: UnitSpec | None = None,
                   rotated: frozenset[str] = frozenset()) -> dict[str, Target]:
    """REPAIR's targets in graph order: every normalisation with affine parameters over a
    space that was not ``rotated`` (match's rotation spaces); and, where some were (a
    transformer merged under ``symmetry="auto"``), the linear layers writing rotated heads'
    queries, keys and values and those feeding an MLP's nonlinearity (averaged q·k products
    shrink and flatten the attention; an averaged MLP's pre-activations lose variance)."""
    targets: dict[str, Target] = {}
    for node in merged.graph.nodes:
        name = aten_name(node)
        units = node.meta.get("mergec")
        if units is None or units.spaces is None:
            continue
        spaced = [(axis, space) for axis, space in enumerate(units.spaces) if space is not None]
        if len(spaced) != 1:
            continue
        axis, space = spaced[0]
        if name in _NORMS and space not in rotated:
            weight, bias = node.args[1:3] if name in _BATCH_NORMS else node.args[2:4]
            if isinstance(weight, fx.Node) and isinstance(bias, fx.Node):
                targets[node.name] = Target(axis, space, weight, bias, "units")
        elif name == "linear" and rotated and spec is not None \
                and isinstance(node.args[1], fx.Node):
            bias = node.args[2] if len(node.args) > 2 else None
            if spec.spaces[space].kind == "blocks" and space in rotated:
                targets[node.name] = Target(axis, space, node.args[1], bias, "rotated")
            elif space not in rotated and isinstance(bias, fx.Node) \
                    and any(aten_name(user) in _ACTIVATIONS for user in node.users):
                targets[node.name] = Target(axis, space, node.args[1], bias, "units")
    return targets


def repair_statistics(merged: fx.GraphModule, parents: Sequence[fx.GraphModule], plans: dict,
                      calibration: Iterable[Any], device: str | None,
                      spec: UnitSpec | None = None, rotated: frozenset[str] = frozenset()
                      ) -> int:
    """REPAIR: rescales the merged units at every target (:func:`repair_targets`) so that their
    statistics match the interpolation of the ``parents``' (Σ_m M_m·stat_m over two models or
    more, ``plans`` the spaces' :class:`~mergec.algorithms.solvers.MergePlan` or
    :class:`~mergec.algorithms.solvers.ManyPlan`), folding the correction into the target's
    parameters; each target is measured after the ones before it are repaired. Returns the
    number of targets repaired."""
    targets = repair_targets(merged, spec, rotated)
    if not targets:
        return 0
    axes = {name: target.axis for name, target in targets.items()}
    device = torch.device(device) if device else torch.device("cpu")
    with torch.no_grad():
        outer = frozenset(name for name, t in targets.items() if t.kind == "rotated")
        sums = [_ChannelStats(to_device(module, device), axes, outer=outer)
                .collect(calibration, device) for module in parents]
        to_device(merged, device)
        pairs = _query_key_pairs(targets)
        for name, target in targets.items():
            measured = _ChannelStats(merged, {name: target.axis}, stop_early=True).collect(
                calibration, device)
            plan = plans[target.space]
            correct = _rotated_correction if target.kind == "rotated" else _unit_correction
            scale, shift = correct(plan, [p[name] for p in sums], measured[name])
            _fold_correction(merged, target, scale, shift)
            if name in pairs:
                _repair_temperature(merged, targets, (name, pairs[name]), sums, plan,
                                    spec.spaces[target.space].block_count, calibration, device)
    log.info("repair: rescaled %d targets (REPAIR), %d heads' attention temperatures",
             len(targets), len(pairs))
    return len(targets)


def _query_key_pairs(targets: dict[str, Target]) -> dict[str, str]:
    """The rotated heads' query and key projections, as ``{keys' node: queries' node}``: the
    two targets that write one rotated heads space (the logits ``qᵀk`` read both; a values
    space has one writer). The second in graph order is the key."""
    writers: dict[str, list[str]] = {}
    for name, target in targets.items():
        if target.kind == "rotated":
            writers.setdefault(target.space, []).append(name)
    return {names[1]: names[0] for names in writers.values() if len(names) == 2}


def _logit_std(sums_q: list, sums_k: list, heads: int) -> torch.Tensor:
    """Per head, the std of the attention logits ``q·k`` over pairs of a query and a key drawn
    independently from the calibration data, from the two projections' first and second
    moments: ``tr(E[q qᵀ] E[k kᵀ]) − (E[q]·E[k])²`` within each head. (Pairs of one sequence
    are not independent; on small ViTs the ratio of merged to parents' stds it gives is that
    of the exact logits to 3 decimals.) Unchanged by a rotation inside a head."""
    def blocks(sums: list) -> tuple[torch.Tensor, torch.Tensor]:
        n = sums[0].shape[0]
        size = n // heads
        second = (sums[3] / sums[2]).reshape(heads, size, heads, size).diagonal(
            dim1=0, dim2=2).permute(2, 0, 1)
        return second, (sums[0] / sums[2]).reshape(heads, size)

    (second_q, mean_q), (second_k, mean_k) = blocks(sums_q), blocks(sums_k)
    variance = torch.einsum("hij,hji->h", second_q, second_k) - (mean_q * mean_k).sum(1) ** 2
    return variance.clamp_min(0).sqrt()


def _repair_temperature(merged: fx.GraphModule, targets: dict[str, Target],
                        pair: tuple[str, str], parents: list[dict], plan: Any, heads: int,
                        calibration: Iterable[Any], device: torch.device) -> None:
    """After REPAIR of a head's keys (``pair``: keys, queries), the attention's temperature:
    averaged queries and keys of two models whose heads' features are not one another's
    correlate less than either parent's, so their logits shrink and the attention flattens
    even where every feature has its parents' std. Each merged head's queries are rescaled so
    that its logits' std (:func:`_logit_std`) is the mean of the parents' heads merged into it
    (their features mapped by ``plan``, the heads space's: matched heads, rotated inside)."""
    keys, queries = pair
    axes = {queries: targets[queries].axis, keys: targets[keys].axis}
    measured = _ChannelStats(merged, axes, stop_early=True, outer=frozenset(axes)).collect(
        calibration, device)
    count = len(parents)
    wanted = sum(_logit_std(_mapped(p[queries], merge, count), _mapped(p[keys], merge, count),
                            heads)
                 for p, merge in zip(parents, plan.merges)) / count
    got = _logit_std(measured[queries], measured[keys], heads)
    scale = _std_ratio(wanted, got)
    size = measured[queries][0].shape[0] // heads
    _fold_correction(merged, targets[queries], scale.repeat_interleave(size), None)


def _mapped(sums: list, merge: torch.Tensor, count: int) -> list:
    """A parent's feature sums (``[sum, sum of squares, count, sum of outer products]``) in
    the merged basis of a rotation space: its features as ``N M x`` (N = ``count`` models),
    as in :func:`_rotated_correction`."""
    mapped = count * (merge.to_dense() if merge.is_sparse else merge).to(sums[0])
    second = mapped @ sums[3] @ mapped.T
    return [mapped @ sums[0], second.diagonal(), sums[2], second]


def _std_ratio(wanted: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    """``wanted / got`` per unit, 1 where ``got`` is (about) 0: a constant unit keeps its
    scale."""
    return torch.where(got > 1e-8, wanted / got.clamp_min(1e-8), torch.ones_like(got))


def _unit_correction(plan: Any, parents: list[list], sums_z: list
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per merged unit, the scale and shift that give it the interpolated parents' mean and
    std (``parents``: each parent's sums at the target)."""
    target_mean, target_std = 0, 0
    for sums, merge in zip(parents, plan.merges):
        mean, std = _mean_std(sums)
        merge = merge.to(mean)
        target_mean, target_std = target_mean + merge @ mean, target_std + merge @ std
    mean_z, std_z = _mean_std(sums_z)
    scale = _std_ratio(target_std, std_z)
    return scale, target_mean - scale * mean_z


def _rotated_correction(plan: Any, parents: list[list], sums_z: list
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """REPAIR in the merged basis of a rotation space: each of the N parents' features mapped
    there (``N M x``: model 0's as they are, the others rotated), the target per merged unit
    the mean of the mapped features' means and stds (from the parents' covariances)."""
    targets = []
    for sums, merge in zip(parents, plan.merges):
        mean = sums[0] / sums[2]
        covariance = sums[3] / sums[2] - torch.outer(mean, mean)
        mapped = len(parents) * merge.to(mean)
        targets.append((mapped @ mean, torch.einsum("ij,jk,ik->i", mapped, covariance, mapped)
                        .clamp_min(0).sqrt()))
    target_mean = sum(t[0] for t in targets) / len(parents)
    target_std = sum(t[1] for t in targets) / len(parents)
    mean_z, std_z = _mean_std(sums_z)
    scale = _std_ratio(target_std, std_z)
    return scale, target_mean - scale * mean_z


def _fold_correction(merged: fx.GraphModule, target: Target, scale: torch.Tensor,
                     shift: torch.Tensor | None) -> None:
    """``x -> scale·x + shift`` per unit, folded into the target's parameters: an affine's
    gain and shift, or a linear layer's weight rows and bias."""
    weight = attribute(merged, target.weight.target)
    view = (-1,) + (1,) * (weight.dim() - 1)
    weight.copy_((weight.to(torch.float64) * scale.view(view)).to(weight.dtype))
    if target.bias is None:
        return
    bias = attribute(merged, target.bias.target)
    new_bias = bias.to(torch.float64) * scale
    if shift is not None:
        new_bias = new_bias + shift
    bias.copy_(new_bias.to(bias.dtype))
