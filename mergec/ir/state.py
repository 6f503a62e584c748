"""What the passes hand on: the merge options and the pipeline state.

:class:`MergeOptions` holds every option of a merge, validated completely when it is made, so
that a bad value is a :class:`~mergec.errors.MergeError` before any pass runs.
:class:`PipelineState` holds what the passes have produced so far; every pass takes a state
and returns a new one (:meth:`PipelineState.evolve`); it never rebinds a field of the state it
was given. The graph modules belong to the pipeline (trace copies the caller's models): repair
updates the merged module's statistics in place, and device moves happen in place.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch
from torch import fx, nn

from mergec.errors import MergeError
from mergec.ir.blocks import DepthPlan, Stages
from mergec.ir.spec import UnitSpec

if TYPE_CHECKING:  # the algorithms layer sits above the IR: its types only
    from mergec.algorithms.covariance import JointMoments
    from mergec.algorithms.solvers import MergePlan

METHODS = ("average", "permute", "zip", "weight-match", "mudsc")
REPAIR_MODES = ("reset", "repair", None)
HEADS = ("average", "separate")
DEPTH_VARIANTS = ("segment-wise", "layer-wise")
UNALIGNED = ("average", "keep")
SYMMETRIES = ("auto", "permutation")
NAMED_WIDTHS = ("max", "min", "a", "b", "sum")
#: Which model outputs a spec keeps in order: labels only ("auto"), all, none.
SPEC_OUTPUTS = ("auto", "fixed", "free")
#: How a merge treats outputs: features matched and returned in A's basis ("auto"), every
#: output kept in order ("fixed"), every output matched and returned in A's basis ("a"), or
#: in A's and in B's, side by side ("both").
OUTPUTS = ("auto", "fixed", "a", "both")


@dataclass(frozen=True)
class MergeOptions:
    """Every option of a merge (see :func:`mergec.merge` for what each does).

    Example::

        options = mergec.MergeOptions(method="permute", repair=None)
        result = mergec.merge(model_a, model_b, x[:8], batches, **options.to_dict())
    """

    method: str = "zip"
    alpha: float = 0.5
    beta: float = 0.5
    weight_beta: float = 0.5
    heads: str = "average"
    stop_at: str | None = None
    width: Any = "max"
    repair: str | None = "reset"
    device: str | None = None
    seed: int = 0
    progress: bool = True
    depth_variant: str = "segment-wise"
    unaligned: str = "average"
    samples_per_batch: int | None = None
    symmetry: str = "auto"
    outputs: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MergeError(f"merge: unknown method {self.method!r}; choose one of "
                             f"{', '.join(METHODS)}")
        for name in ("alpha", "beta", "weight_beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0.0 <= value <= 1.0:
                raise MergeError(f"merge: {name} must be in [0, 1], got {value!r}")
        _choose("repair", self.repair, REPAIR_MODES)
        if self.heads not in HEADS:
            raise MergeError(f"merge: heads must be 'average' (one shared output layer) or "
                             f"'separate' (both models' output layers kept), got {self.heads!r}")
        if self.stop_at is not None and not isinstance(self.stop_at, str):
            raise MergeError(f"merge: stop_at must be a node name or module path, got "
                             f"{self.stop_at!r}")
        _check_width(self.width)
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as error:
                raise MergeError(f"merge: device {self.device!r} is not a torch device "
                                 "('cpu', 'cuda', 'cuda:1', ...)") from error
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise MergeError(f"merge: seed must be an int, got {self.seed!r}")
        if self.samples_per_batch is not None and (
                isinstance(self.samples_per_batch, bool)
                or not isinstance(self.samples_per_batch, int) or self.samples_per_batch < 2):
            raise MergeError(f"merge: samples_per_batch must be None (every pixel or token) or "
                             f"an int >= 2, got {self.samples_per_batch!r}")
        _choose("depth_variant", self.depth_variant, DEPTH_VARIANTS)
        _choose("unaligned", self.unaligned, UNALIGNED)
        _choose("symmetry", self.symmetry, SYMMETRIES)
        _choose("outputs", self.outputs, OUTPUTS)
        if self.outputs == "both" and self.partial:
            raise MergeError("merge: outputs='both' maps a full merge's outputs into both "
                             "bases; with stop_at or heads='separate' each tail already "
                             "returns its own model's outputs")
        if self.repair == "repair" and self.partial:
            raise MergeError("merge: repair='repair' rescales a fully merged model; with stop_at "
                             "or heads='separate' use repair='reset'")

    @property
    def partial(self) -> bool:
        """Only the trunk is merged: the result runs both models' tails."""
        return self.stop_at is not None or self.heads == "separate"

    @property
    def spec_outputs(self) -> str:
        """The outputs annotate-units keeps in order for this merge (see SPEC_OUTPUTS)."""
        return {"auto": "auto", "fixed": "fixed"}.get(self.outputs, "free")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choose(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        named = ", ".join(repr(choice) for choice in choices)
        raise MergeError(f"merge: {name} must be one of {named}, got {value!r}")


def _check_width(width: Any) -> None:
    if width in NAMED_WIDTHS and isinstance(width, str):
        return
    if isinstance(width, float) and 0 < width <= 1:
        return
    if isinstance(width, int) and not isinstance(width, bool) and width >= 1:
        return
    raise MergeError(f"merge: width must be 'max', 'min', 'a', 'b', 'sum', a fraction "
                     f"in (0, 1] or a positive int, got {width!r}")


@dataclass(frozen=True)
class OutputAffine:
    """A norm's gain and shift that fold-norms took out of a graph into a model output
    (either may be None); ``norm``: the norm's weight and bias keys where nothing but outputs
    reads it, so that zip can put them back where the output needs no map."""

    gain: torch.Tensor | None
    shift: torch.Tensor | None
    norm: tuple[str | None, str | None] | None = None


@dataclass(frozen=True)
class PipelineState:
    """What the passes have found and built so far, for models A and B (``models[0]``,
    ``models[1]``). Fields a pass has not produced yet are empty.

    - ``graphs``, ``specs``: trace's graph module and annotate-units' spec of each model;
      ``folds``: fold-norms' record, per model, of each LayerNorm (folded into which layers,
      or why it was left); ``output_affines``: per model, the gain and shift of a norm taken
      into a flat output (by index), which zip applies where the merged module returns it;
      align-depth replaces them by the padded shallow model's and the deep model's.
    - ``stages``: segment's blocks of each model, when the models differ in depth.
    - ``depth``: align-depth's plan; ``only_b``: state-dict keys that come from B alone (blocks
      only the deep model has) with their factor; ``unaligned_spaces``: spaces inside them.
    - ``moments``: collect-stats' joint statistics per space.
    - ``plans``, ``summaries``: match's merge plan and report entry per space.
    - ``merged``: zip's merged module; ``output_maps``: how zip mapped each output axis in a
      free space back into a model's basis; ``repair``: what repair did.
    - ``many``: what :func:`mergec.merge_many` decided for N models (empty for a pair).
    - ``timings``: wall seconds of every pass that ran, in the order they ran.
    - ``peak_memory``: per pass that ran, its peak host (resident set) and CUDA bytes, None
      where the system cannot say (:mod:`mergec.memory`).
    """

    options: MergeOptions
    models: tuple[nn.Module, ...]
    example: tuple
    calibration: Iterable[Any] = ()  # re-iterable: each pass that needs data reads it once
    graphs: tuple[fx.GraphModule, ...] = ()
    specs: tuple[UnitSpec, ...] = ()
    folds: tuple[Mapping[str, str], ...] = ()
    output_affines: tuple[Mapping[int, OutputAffine], ...] = ()
    stages: tuple[Stages, ...] = ()
    depth: DepthPlan | None = None
    only_b: Mapping[str, float] = field(default_factory=dict)
    unaligned_spaces: frozenset[str] = frozenset()
    moments: Mapping[str, JointMoments] = field(default_factory=dict)
    plans: Mapping[str, MergePlan] = field(default_factory=dict)
    summaries: Mapping[str, dict] = field(default_factory=dict)
    merged: fx.GraphModule | None = None
    output_maps: tuple[Mapping[str, str], ...] = ()
    repair: Mapping[str, Any] = field(default_factory=dict)
    many: Mapping[str, Any] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)
    peak_memory: Mapping[str, Mapping[str, int | None]] = field(default_factory=dict)

    def evolve(self, **changes: Any) -> PipelineState:
        """A copy of the state with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    @property
    def completed(self) -> tuple[str, ...]:
        """The passes that ran, in order."""
        return tuple(self.timings)

    @property
    def spec(self) -> UnitSpec:
        """Model A's spec: the merged model's spaces (B's may differ in size only)."""
        if not self.specs:
            raise MergeError("pipeline: no spec yet; annotate-units has not run")
        return self.specs[0]

    def require(self, field_name: str, pass_name: str) -> Any:
        """The value of ``field_name``, which ``pass_name`` needs; an error if it is empty."""
        value = getattr(self, field_name)
        if value is None or (isinstance(value, (tuple, list, Mapping)) and not value):
            raise MergeError(f"{pass_name}: needs the state's {field_name}, which no earlier "
                             "pass has produced; run the pipeline in order")
        return value
