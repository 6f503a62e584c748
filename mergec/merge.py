"""``mergec.merge``: two trained models in, one merged ``GraphModule`` out.

``merge`` validates its options (:class:`~mergec.ir.state.MergeOptions`), puts the models in a
:class:`~mergec.ir.state.PipelineState` and runs the pipeline (:mod:`mergec.pipeline`):

    trace → fold-norms → annotate-units → segment → align-depth → collect-stats → match
    → zip → repair
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import fx, nn

from mergec.errors import MergeError
from mergec.inputs import check_calibration, check_device, check_models, merge_device
from mergec.ir.blocks import DepthPlan
from mergec.ir.fx import as_args, follow_weights_device
from mergec.ir.spec import UnitSpec
from mergec.ir.state import MergeOptions, PipelineState
from mergec.pipeline import Callback, build_passes, run_pipeline

log = logging.getLogger(__name__)


@dataclass
class MergeReport:
    """What every pass decided: spaces, per-space match summaries, timings and peak memory."""

    method: str
    spec: UnitSpec | None
    matches: dict[str, dict] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory: dict[str, dict[str, int | None]] = field(default_factory=dict)
    repair: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    similarities: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    depth: DepthPlan | None = None  # align-depth's plan when the models differ in depth
    passes: tuple[str, ...] = ()  # the passes that ran, in order
    versions: dict[str, str] = field(default_factory=dict)  # mergec, torch, python, ...
    notes: list[str] = field(default_factory=list)  # what the user should know of the inputs
    inputs: dict[str, Any] = field(default_factory=dict)  # the CLI's models, data and hashes
    folds: list[dict[str, str]] = field(default_factory=list)  # fold-norms, per model
    outputs: list[dict[str, str]] = field(default_factory=list)  # zip's maps at the outputs
    many: dict[str, Any] = field(default_factory=dict)  # merge_many's N-way decisions
    budget: dict[str, Any] = field(default_factory=dict)  # the size planner's candidates

    def to_dict(self) -> dict:
        spaces = self.spec.spaces.values() if self.spec is not None else ()
        return {
            "method": self.method,
            "options": self.options,
            "versions": self.versions,
            "notes": self.notes,
            "inputs": self.inputs,
            "passes": list(self.passes),
            "timings_s": self.timings,
            "peak_memory_bytes": self.peak_memory,
            "coverage": self.spec.coverage() if self.spec is not None else None,
            "spaces": {
                space.id: {"size": space.size, "kind": space.kind, "fixed": space.fixed,
                           "group": space.group, "probe": space.probe,
                           **self.matches.get(space.id, {})}
                for space in spaces
            },
            "repair": self.repair,
            "fold_norms": self.folds,
            "outputs": self.outputs,
            "many": self.many,
            "budget": self.budget,
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

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Writes the result to a new ``folder`` (an existing one is refused unless
        ``overwrite``; it is then replaced whole, once the new result is written)."""
        from mergec.export import save_module
        return save_module(self.module, Path(folder), report=self.report.to_json(),
                           overwrite=overwrite)

    def into(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` (model A, say) holding the merged weights: it returns what
        ``model`` returns and saves as ``model`` saves (``save_pretrained`` for transformers).
        Needs the merge to keep ``model``'s architecture and widths."""
        from mergec.pretrained import into
        return into(self.module, model)

    def __call__(self, *args: Any) -> Any:
        return self.module(*args)


def merge(model_a: nn.Module, model_b: nn.Module, example_inputs: Any,
          calibration: Iterable[Any], *, method: str = "zip", alpha: float = 0.5,
          beta: float = 0.5, weight_beta: float = 0.5, heads: str = "average",
          stop_at: str | None = None, width: Any = "max",
          repair: str | None = "reset", device: str | None = None, seed: int = 0,
          progress: bool = True, depth_variant: str = "segment-wise",
          unaligned: str = "average", samples_per_batch: int | None = None,
          symmetry: str = "auto", outputs: str = "auto", budget: int | None = None,
          budget_measure: str = "parameters", callback: Callback | None = None
          ) -> MergeResult:
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
    identity (``unaligned="average"``, the paper) or kept as they are (``"keep"``).
    ``repair="reset"`` recomputes BatchNorm statistics on the calibration data; ``"repair"``
    also applies REPAIR (merged units rescaled to the interpolated parents' statistics).
    ``samples_per_batch`` caps the pixels or tokens each batch adds to a space's moments
    (the same ones in both models, drawn with ``seed``). Under ``torch.distributed``, give
    each process its shard of the calibration data: statistics are summed and every process
    gets the same merge. ``symmetry="auto"`` merges every space under
    the largest group the graph allows (a pre-norm transformer's residual stream by a rotation,
    once fold-norms has moved the LayerNorms' gains into their readers); ``"permutation"``
    under permutations only, as the papers do. ``outputs="auto"`` keeps labels (logits, plain
    tensors) in order and matches the features a transformers backbone returns, returned in
    A's basis; ``"fixed"`` keeps every output in order, ``"a"`` matches every output, ``"both"``
    returns A's and B's bases side by side. ``budget`` (of ``budget_measure``: ``"parameters"``
    or ``"flops"``) chooses the stop point and the width that agree best with the ensemble
    within it (:mod:`mergec.budget`). ``device``: where it runs (default: the models'). The
    inputs are not modified. ``callback(pass_name, state)`` runs after each pass.

    Example::

        result = mergec.merge(model_a, model_b, x[:8], [(b,) for b in x.split(256)])
        logits = result.module(x)
    """
    options = MergeOptions(method=method, alpha=alpha, beta=beta, weight_beta=weight_beta,
                           heads=heads, stop_at=stop_at, width=width, repair=repair,
                           device=device, seed=seed, progress=progress,
                           depth_variant=depth_variant, unaligned=unaligned,
                           samples_per_batch=samples_per_batch, symmetry=symmetry, outputs=outputs)
    if budget is not None:
        return _to_budget(options, (model_a, model_b), example_inputs, calibration, budget,
                          budget_measure)
    state = run_merge(options, (model_a, model_b), example_inputs, calibration,
                      callback=callback)
    return MergeResult(module=state.merged, report=report_of(state))


def _to_budget(options: MergeOptions, models: tuple[nn.Module, ...], example_inputs: Any,
               calibration: Iterable[Any], budget: int, measure: str) -> MergeResult:
    """The merge the size planner chooses, with every candidate in ``report.budget``."""
    from mergec.budget import plan_merge

    state, planned = plan_merge(options, models, example_inputs, calibration, budget, measure)
    report = report_of(state)
    report.budget = planned
    return MergeResult(module=state.merged, report=report)


def run_merge(options: MergeOptions, models: tuple[nn.Module, ...], example_inputs: Any,
              calibration: Iterable[Any], *, stop_after: str | None = None,
              callback: Callback | None = None) -> PipelineState:
    """Runs the merge pipeline over ``models`` (two: merging N is not supported yet) and
    returns its last state; ``stop_after`` names the last pass to run. ``calibration`` is read
    once by each pass that needs data; any re-iterable (a list, a DataLoader wrapped by
    :func:`calibration_from_loader`) is streamed, a one-shot iterator is held in a list."""
    if len(models) != 2 or not all(isinstance(m, nn.Module) for m in models):
        raise MergeError(f"merge: needs two torch.nn.Module models, got "
                         f"{', '.join(type(m).__name__ for m in models)}")
    example = as_args(example_inputs)
    options = replace(options, device=merge_device(options.device, check_models(models, example)))
    check_device(options.device)
    calibration = check_calibration(calibration)
    if isinstance(calibration, Iterator):
        # a one-shot iterator (a generator) cannot be read again by the next pass: keep it
        log.info("merge: the calibration data is a one-shot iterator; it is held in memory")
        calibration = list(calibration)
    state = PipelineState(options=options, models=tuple(models),
                          example=example, calibration=calibration)
    state = run_pipeline(state, build_passes(options), callback=callback, stop_after=stop_after)
    if isinstance(state.merged, fx.GraphModule):
        follow_weights_device(state.merged)  # the result moves with .to(device)
    return state


def report_of(state: PipelineState) -> MergeReport:
    """The report of what the passes that ran so far decided."""
    spec = state.specs[0] if state.specs else None
    similarities = {s: m.cross_correlation().cpu() for s, m in state.moments.items()} \
        if spec is not None else {}
    options = state.options
    return MergeReport(
        method=options.method, spec=spec, matches=dict(state.summaries),
        timings=dict(state.timings), peak_memory={k: dict(v) for k, v in state.peak_memory.items()},
        repair=dict(state.repair), similarities=similarities,
        depth=state.depth, passes=state.completed, versions=versions(),
        folds=[dict(fold) for fold in state.folds],
        outputs=[dict(record) for record in state.output_maps], many=dict(state.many),
        notes=_notes(state.models),
        options={**options.to_dict(), "widths": {s: p.width for s, p in state.plans.items()}})


def versions() -> dict[str, str]:
    """The versions a merge ran with (a rerun with others may differ in the last bits)."""
    import platform

    import numpy
    import scipy

    from mergec import __version__
    return {"mergec": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "scipy": scipy.__version__, "python": platform.python_version()}


def _notes(models: tuple[nn.Module, ...]) -> list[str]:
    names = "AB" if len(models) == 2 else [str(index) for index in range(len(models))]
    return [f"model {name} was in training mode; it was merged in eval semantics (BatchNorm "
            "running statistics, no dropout) and left in training mode"
            for name, model in zip(names, models) if model.training]


@dataclass(frozen=True)
class LoaderCalibration:
    """The inputs of a DataLoader of ``(inputs, labels)`` (at most ``batches`` batches), read
    from the loader each time a pass iterates: nothing is held in memory beyond a batch. A
    shuffling loader gives each pass other batches of the same data."""

    loader: Iterable[Any]
    batches: int | None = None

    def __iter__(self) -> Iterator[tuple]:
        for index, batch in enumerate(self.loader):
            if self.batches is not None and index >= self.batches:
                return
            yield (batch[0] if isinstance(batch, (tuple, list)) else batch,)


def calibration_from_loader(loader: Iterable[Any], batches: int | None = None
                            ) -> LoaderCalibration:
    """Calibration batches from a DataLoader of ``(inputs, labels)``: keeps the inputs, read
    lazily each time a pass needs them (the loader must be iterable more than once, as a
    DataLoader is)."""
    if isinstance(loader, Iterator):
        raise MergeError("calibration_from_loader: the loader is a one-shot iterator; pass the "
                         "DataLoader itself, which every pass that needs data reads again")
    return LoaderCalibration(loader, batches)
