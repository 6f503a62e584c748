"""``mergec.merge``: two trained models in, one merged ``GraphModule`` out.

The pipeline is a fixed sequence of passes, each timed and recorded in the report:

    trace ×2 → annotate-units → collect-stats → match → zip → repair
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import fx, nn

from mergec.errors import MergeError
from mergec.passes.annotate_units import AnnotateUnits
from mergec.passes.collect_stats import CollectStats
from mergec.passes.match import METHODS, Match
from mergec.passes.repair import Repair
from mergec.passes.trace import STATE_KEYS, aten_name, as_args, trace
from mergec.passes.zip import Zip
from mergec.spec import UnitSpec

log = logging.getLogger(__name__)


@dataclass
class MergeReport:
    """What every pass decided: spaces, per-space match summaries, timings."""

    method: str
    spec: UnitSpec
    matches: dict[str, dict] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    repair: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    similarities: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    depth: Any = None  # align-depth's DepthPlan when the models differ in depth

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "options": self.options,
            "timings_s": self.timings,
            "coverage": self.spec.coverage(),
            "spaces": {
                space.id: {"size": space.size, "kind": space.kind, "fixed": space.fixed,
                           "probe": space.probe, **self.matches.get(space.id, {})}
                for space in self.spec.spaces.values()
            },
            "repair": self.repair,
            "depth": self.depth.to_dict() if self.depth is not None else None,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def plot(self, folder: str | Path) -> list[Path]:
        """Writes PNG heatmaps of the cross-model similarity of every matched space and a
        per-space plot of the matched against the unmatched (identity) similarity."""
        from mergec.plots import plot_report
        return plot_report(self, Path(folder))


@dataclass
class MergeResult:
    """The merged module and the report. ``save(folder)`` writes self-contained code and
    safetensors weights that :func:`mergec.load` (or plain torch) runs."""

    module: fx.GraphModule
    report: MergeReport

    def save(self, folder: str | Path) -> Path:
        from mergec.export import save_module
        return save_module(self.module, Path(folder), report=self.report.to_json())

    def __call__(self, *args: Any) -> Any:
        return self.module(*args)


def _validate_options(method: str, alpha: float, beta: float, repair: str | None,
                      heads: str) -> None:
    if method not in METHODS:
        raise MergeError(f"merge: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not 0.0 <= alpha <= 1.0:
        raise MergeError(f"merge: alpha must be in [0, 1], got {alpha}")
    if not 0.0 <= beta <= 1.0:
        raise MergeError(f"merge: beta must be in [0, 1], got {beta}")
    if repair not in ("reset", "repair", None):
        raise MergeError(f"merge: repair must be 'reset', 'repair' or None, got {repair!r}")
    if heads not in ("average", "separate"):
        raise MergeError(f"merge: heads must be 'average' (one shared output layer) or "
                         f"'separate' (both models' output layers kept), got {heads!r}")


def correspond(spec_a: UnitSpec, spec_b: UnitSpec, module_a: fx.GraphModule,
               module_b: fx.GraphModule) -> bool:
    """Checks that two graphs have one topology and their specs one structure; returns whether
    their widths differ. Raises a MergeError naming the first node where they part ways."""
    nodes_a = [n for n in module_a.graph.nodes if n.op != "output"]
    nodes_b = [n for n in module_b.graph.nodes if n.op != "output"]
    for node_a, node_b in zip(nodes_a, nodes_b):
        rank_a, rank_b = (len(n.meta["val"].shape) if isinstance(n.meta.get("val"), torch.Tensor)
                          else None for n in (node_a, node_b))
        if node_a.target != node_b.target or rank_a != rank_b:
            raise MergeError(
                "merge: the two models do not correspond. They part ways at A's "
                f"{node_a.format_node()} and B's {node_b.format_node()}. mergec merges models "
                "of one architecture, also at different widths, and residual networks or plain "
                "chains of one family at different depths.")
    if len(nodes_a) != len(nodes_b):
        raise MergeError(f"merge: the two models do not correspond: A's graph has {len(nodes_a)} "
                         f"nodes, B's {len(nodes_b)}")
    if set(spec_a.shapes) != set(spec_b.shapes):
        missing = sorted(set(spec_a.shapes) ^ set(spec_b.shapes))[:5]
        raise MergeError(f"merge: the models' state dicts differ in keys, e.g. {missing}")
    bindings_a = {(b.key, b.axis): b.space for b in spec_a.bindings}
    bindings_b = {(b.key, b.axis): b.space for b in spec_b.bindings}
    if bindings_a != bindings_b or spec_a.spaces.keys() != spec_b.spaces.keys():
        first = next((k for k in sorted(bindings_a) if bindings_a.get(k) != bindings_b.get(k)),
                     None)
        raise MergeError(f"merge: the two models' units do not correspond (first at {first}): "
                         "their graphs share a topology but not their spaces")
    for space_id, space_a in spec_a.spaces.items():
        space_b = spec_b.spaces[space_id]
        if (space_a.kind, space_a.fixed is None) != (space_b.kind, space_b.fixed is None):
            raise MergeError(f"merge: space {space_id} ({space_a.origin}) is {space_a.kind} in "
                             f"A and {space_b.kind} in B")
    return spec_a.shapes != spec_b.shapes


def target_widths(spec_a: UnitSpec, spec_b: UnitSpec, width: Any) -> dict[str, int]:
    """The merged width of every free flat space: ``"max"`` (default), ``"min"``, ``"a"``,
    ``"b"``, ``"sum"`` (d_a + d_b: nothing merged), a fraction of d_a + d_b, or an int."""
    widths = {}
    for space_id, space in spec_a.spaces.items():
        other = spec_b.spaces[space_id]
        if space.kind == "blocks" and not space.parts and space.size != other.size \
                and space.block_count == other.block_count:
            widths[space_id] = space.block_count * _head_size(space, other, width)
            continue
        if space.kind != "flat" or not spec_a.is_free(space_id):
            continue
        d_a, d_b = space.size, other.size
        if width == "max":
            target = max(d_a, d_b)
        elif width == "min":
            target = min(d_a, d_b)
        elif width == "a":
            target = d_a
        elif width == "b":
            target = d_b
        elif width == "sum":
            target = d_a + d_b
        elif isinstance(width, float) and 0 < width <= 1:
            target = max(1, round(width * (d_a + d_b)))
        elif isinstance(width, int) and not isinstance(width, bool) and width >= 1:
            target = min(width, d_a + d_b)
        else:
            raise MergeError(f"merge: width must be 'max', 'min', 'a', 'b', 'sum', a fraction "
                             f"in (0, 1] or a positive int, got {width!r}")
        widths[space_id] = target
    return widths


def _head_size(space_a: Any, space_b: Any, width: Any) -> int:
    """The merged size of heads (or groups) whose count agrees and size differs."""
    sizes = {"max": max(space_a.block_size, space_b.block_size),
             "min": min(space_a.block_size, space_b.block_size),
             "a": space_a.block_size, "b": space_b.block_size}
    if width not in sizes:
        raise MergeError(f"merge: the heads of {space_a.origin} have sizes {space_a.block_size} "
                         f"and {space_b.block_size}; heads of different sizes merge at width "
                         f"'max', 'min', 'a' or 'b', not {width!r}")
    return sizes[width]


def merge(model_a: nn.Module, model_b: nn.Module, example_inputs: Any,
          calibration: Iterable[Any], *, method: str = "zip", alpha: float = 0.5,
          beta: float = 0.5, weight_beta: float = 0.5, heads: str = "average",
          stop_at: str | None = None, width: Any = "max",
          repair: str | None = "reset", device: str | None = None, seed: int = 0,
          progress: bool = True, depth_variant: str = "segment-wise",
          unaligned: str = "average",
          callback: Callable[[str, float], None] | None = None,
          _depth: Any = None) -> MergeResult:
    """Merges two trained models of the same architecture without training.

    ``calibration`` is an iterable of batches, each the tuple of positional inputs of
    ``forward`` (a bare tensor is one input); see :func:`calibration_from_loader`. ``method``
    is ``zip`` (ZipIt!, α = similarity decay, β = within-model budget), ``permute`` (Hungarian
    on activation correlation), ``weight-match`` (Git Re-Basin), ``mudsc`` (dual-space, with
    ``weight_beta`` the weight share) or ``average``. ``stop_at`` (a node name or module path
    that every path crosses) merges only the trunk before it; the result then returns both
    models' outputs, computed by their own tails on the unmerged features. ``heads="separate"``
    stops at the input of the output layer (models with different label sets). Models of one
    architecture at different widths are merged by elastic zip (``method="zip"``); ``width``
    sets every merged layer's width: ``"max"`` (default), ``"min"``, ``"a"``, ``"b"``,
    ``"sum"`` (nothing merged: the logit ensemble), a fraction of d_a + d_b, or an int.
    Models of one family at different depths (residual networks, or plain chains such as VGG)
    are aligned block by block, or layer by layer (linear CKA, ``depth_variant`` "segment-wise"
    or "layer-wise"); the shallow model is padded with identity blocks or layers and the merged
    model has the deep one's architecture. Blocks only the deep model has are averaged with the
    identity (``unaligned="average"``, the paper) or kept as they are (``"keep"``). When the
    models were swapped (A the deeper), the merged outputs are the same. ``repair="reset"``
    recomputes BatchNorm statistics on the calibration data; ``repair="repair"`` also applies
    REPAIR (each merged channel after a normalisation rescaled to the interpolated parents'
    mean and std). The input models are not modified.

    Example::

        result = mergec.merge(model_a, model_b, x[:8], [(b,) for b in x.split(256)])
        logits = result.module(x)
    """
    _validate_options(method, alpha, beta, repair, heads)
    example = as_args(example_inputs)
    calibration = list(calibration) if not isinstance(calibration, (list, tuple)) else calibration
    timings: dict[str, float] = {}

    def timed(name: str, function: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        value = function()
        timings[name] = time.perf_counter() - start
        log.info("%s: %.2fs", name, timings[name])
        if callback is not None:
            callback(name, timings[name])
        return value

    module_a = timed("trace", lambda: trace(model_a, example))
    module_b = trace(model_b, example)
    annotate = AnnotateUnits()
    spec_a, _ = timed("annotate-units",
                      lambda: annotate(module_a, module_a.meta[STATE_KEYS], type(model_a).__name__))
    spec_b, _ = annotate(module_b, module_b.meta[STATE_KEYS], type(model_b).__name__)
    try:
        heterogeneous = correspond(spec_a, spec_b, module_a, module_b)
    except MergeError as error:
        if _depth is not None:
            raise
        depth = _align_depth(model_a, model_b, module_a, module_b, calibration, example,
                             depth_variant, device, error, timed)
        padded, deep, plan = depth
        result = merge(padded, deep, example, calibration,
                       method=method, alpha=alpha, beta=beta, weight_beta=weight_beta,
                       heads=heads, stop_at=stop_at, width=width, repair=repair, device=device,
                       seed=seed, progress=progress, callback=callback,
                       _depth=(plan, unaligned))
        result.report.timings = {**timings, **result.report.timings}
        return result
    spec = spec_a
    widths = target_widths(spec_a, spec_b, width)
    resizing = heterogeneous or any(widths[s] != spec.spaces[s].size for s in widths)
    needs_stats = method in ("zip", "permute", "mudsc")
    moments = timed("collect-stats", lambda: CollectStats(device=device, progress=progress)(
        module_a, module_b, spec, calibration, example, spec_b=spec_b)) if needs_stats else {}
    only_b, exclude = _depth_overrides(_depth, spec, module_a)
    matcher = Match(method=method, alpha=alpha, beta=beta, weight_beta=weight_beta, seed=seed,
                    attention=tuple(sorted(attention_roles(module_a, spec).items())))
    plans, summaries = timed("match", lambda: matcher(
        spec, moments, dict(module_a.named_parameters()), dict(module_b.named_parameters()),
        spec_b=spec_b, widths=widths if resizing else None, exclude=exclude))
    merged = timed("zip", lambda: Zip(stop_at=stop_at, heads=heads,
                                      only_b=tuple(sorted(only_b.items())))(
        module_a, module_b, spec, plans))
    if repair == "repair" and (stop_at is not None or heads == "separate"):
        raise MergeError("merge: repair='repair' rescales a fully merged model; with stop_at "
                         "or heads='separate' use repair='reset'")
    repaired = timed("repair", lambda: Repair(mode=repair, device=device, progress=progress)(
        merged, calibration, example, parents=(module_a, module_b), plans=plans))
    if device:
        merged.to(device)
    similarities = {s: m.correlation()[: spec.spaces[s].size, spec.spaces[s].size:].cpu()
                    for s, m in moments.items()}
    if resizing:
        _check_runs(merged, example, device)
    report = MergeReport(method=method, spec=spec, matches=summaries, timings=timings,
                         repair=repaired, similarities=similarities,
                         options={"alpha": alpha, "beta": beta, "weight_beta": weight_beta,
                                  "heads": heads, "stop_at": stop_at, "repair": repair,
                                  "seed": seed, "width": width,
                                  "widths": {s: p.width for s, p in plans.items()}})
    if _depth is not None:
        report.depth = _depth[0]
    return MergeResult(module=merged, report=report)


def attention_roles(module: fx.GraphModule, spec: UnitSpec) -> dict[str, str]:
    """The heads spaces read by ``scaled_dot_product_attention`` with its default scale
    (1/sqrt(head size)): "qk" for query and key, "v" for value. A space also read by another
    attention (one with a given scale) gets no role."""
    roles: dict[str, str] = {}
    refused: set[str] = set()
    for node in module.graph.nodes:
        if aten_name(node) != "scaled_dot_product_attention":
            continue
        default = node.kwargs.get("scale") is None
        for position, role in ((0, "qk"), (1, "qk"), (2, "v")):
            space = _heads_space(node.args[position], spec)
            if space is None:
                continue
            if not default or roles.get(space, role) != role:
                refused.add(space)
            roles[space] = role
    return {space: role for space, role in roles.items() if space not in refused}


def _heads_space(node: Any, spec: UnitSpec) -> str | None:
    """The blocks space whose heads ``node`` (an attention operand) carries: the nearest
    producer upstream, through reshapes, transposes and cuts, whose axes include one."""
    for _ in range(16):
        if not isinstance(node, fx.Node):
            return None
        units = node.meta.get("mergec")
        for space_id in (units.spaces or ()) if units is not None else ():
            if space_id is not None and spec.spaces[space_id].kind == "blocks":
                return space_id
        inputs = [a for a in node.all_input_nodes
                  if a.op != "get_attr" and isinstance(a.meta.get("val"), torch.Tensor)]
        if len(inputs) != 1:
            return None
        node = inputs[0]
    return None


def _align_depth(model_a: nn.Module, model_b: nn.Module, module_a: fx.GraphModule,
                 module_b: fx.GraphModule, calibration: list, example: tuple, variant: str,
                 device: str | None, error: MergeError, timed: Callable) -> tuple:
    """Models of one family at different depths: segment both, align the shallow one's blocks
    to the deep one's and pad it with identity blocks. Re-raises ``error`` when the models are
    not residual networks of one family."""
    from mergec.passes.align_depth import AlignDepth
    from mergec.passes.segment import Segment

    try:
        stages_a, stages_b = Segment()(module_a), Segment()(module_b)
    except MergeError:
        raise error from None
    blocks_a = sum(len(stage) for stage in stages_a)
    blocks_b = sum(len(stage) for stage in stages_b)
    if not stages_a or len(stages_a) != len(stages_b) or blocks_a == blocks_b:
        raise error
    swapped = blocks_a > blocks_b
    shallow, deep = (model_b, model_a) if swapped else (model_a, model_b)
    modules = (module_b, module_a) if swapped else (module_a, module_b)
    stages = (stages_b, stages_a) if swapped else (stages_a, stages_b)
    padded, plan = timed("align-depth", lambda: AlignDepth(variant=variant, device=device)(
        shallow, deep, modules[0], modules[1], stages[0], stages[1], calibration, example))
    plan.swapped = swapped
    with torch.no_grad():  # the traced shallow model: eval mode, the caller's model untouched
        expected, got = modules[0](*example), padded(*example)
    expected, got = (_tensor_leaves(value) for value in (expected, got))
    if len(expected) != len(got) or not all(
            a.shape == b.shape and torch.allclose(a, b, rtol=1e-3, atol=1e-4)
            for a, b in zip(expected, got)):
        raise MergeError("align-depth: the padded shallow model does not compute the shallow "
                         "model's function; its blocks cannot be made identities")
    return padded, deep, plan


def _tensor_leaves(value: Any) -> list[torch.Tensor]:
    """The tensors in a model's output (a tensor, a tuple, a dict, a transformers output)."""
    from torch.utils import _pytree as pytree

    if hasattr(value, "to_tuple"):  # transformers' ModelOutput
        value = value.to_tuple()
    return [leaf for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def _depth_overrides(depth: Any, spec: UnitSpec, module: fx.GraphModule
                     ) -> tuple[dict[str, float], frozenset[str]]:
    """Entries of blocks only the deep model has, and the spaces inside them."""
    if depth is None:
        return {}, frozenset()
    plan, unaligned = depth
    if unaligned not in ("average", "keep"):
        raise MergeError(f"merge: unaligned must be 'average' or 'keep', got {unaligned!r}")
    # The padded shallow model is A, the deep model B. A residual block only B has: its
    # zeroed producers averaged with B's (factor 1: the paper's average with the identity)
    # and the rest of it B's alone (factor 2). A plain layer only B has: averaged with A's
    # identity layer by the ordinary merge, or B's alone with unaligned="keep".
    factors = {}
    for key in plan.unaligned_keys(spec.shapes):
        if unaligned == "keep":
            factors[key] = 2.0
        elif key in plan.zeroed:
            factors[key] = 1.0
        elif key not in plan.identity:
            factors[key] = 2.0
    inside = frozenset(s for s in spec.spaces
                       if (bound := {b.key for b in spec.bindings if b.space == s})
                       and bound <= factors.keys())
    return factors, inside


def _check_runs(module: fx.GraphModule, example: tuple, device: str | None) -> None:
    """A merged model of new widths must run: a size the graph fixes elsewhere would not."""
    try:
        with torch.no_grad():
            module(*(t.to(device) if device else t for t in example))
    except Exception as error:  # noqa: BLE001 - reported with what the user can do
        raise MergeError(f"zip: the merged model at its new widths does not run ({error}); a "
                         "size in the graph is fixed by something mergec does not rewrite. "
                         "Merge at the models' own width (width='a').") from error


def calibration_from_loader(loader: Iterable[Any], batches: int | None = None) -> list[tuple]:
    """Calibration batches from a DataLoader of ``(inputs, labels)``: keeps the inputs."""
    result = []
    for index, batch in enumerate(loader):
        if batches is not None and index >= batches:
            break
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        result.append((inputs,))
    return result
