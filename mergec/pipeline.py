"""The pipeline driver: the registered passes run in order over one state.

    trace → fold-norms → annotate-units → segment → align-depth → collect-stats → match
    → zip → repair

Every pass takes a :class:`~mergec.ir.state.PipelineState` and returns the next one. A pass
with an ``applies(state)`` method that answers False is skipped (align-depth for models of one
depth, collect-stats for methods that match on weights alone); the others are timed into
``state.timings`` and their peak memory measured into ``state.peak_memory``. After each pass
the driver calls ``callback(pass_name, state)``: timing, progress, dumps. ``stop_after`` ends
the run after the named pass.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, ClassVar, Iterable, Protocol

from mergec.errors import MergeError
from mergec.ir.state import MergeOptions, PipelineState
from mergec.memory import PeakMemory
from mergec.passes import PIPELINE, REGISTRY
from mergec.passes.align_depth import AlignDepth
from mergec.passes.annotate_units import AnnotateUnits
from mergec.passes.collect_stats import CollectStats
from mergec.passes.fold_norms import FoldNorms
from mergec.passes.match import Match
from mergec.passes.repair import Repair
from mergec.passes.segment import Segment
from mergec.passes.trace import Trace
from mergec.passes.zip import Zip

log = logging.getLogger(__name__)

#: The methods that match on activation statistics (collect-stats runs only for them).
STATISTICS_METHODS = ("zip", "permute", "mudsc")

Callback = Callable[[str, PipelineState], None]

#: The merged widths that keep two models of one width at that width (the others are elastic).
SAME_WIDTH = ("max", "min", "a", "b")


class Pass(Protocol):
    """What the driver runs: a name and one entry point from state to state."""

    name: ClassVar[str]

    def run(self, state: PipelineState) -> PipelineState: ...


def build_passes(options: MergeOptions) -> list[Pass]:
    """The pipeline's passes, in order, configured from the merge options."""
    # rotations need one merged width: "max", "min", "a", "b" keep two models of one width
    rotations = options.symmetry == "auto" and options.width in SAME_WIDTH
    passes: list[Pass] = [
        Trace(),
        FoldNorms(enabled=rotations, outputs=options.spec_outputs),
        AnnotateUnits(outputs=options.spec_outputs),
        Segment(),
        AlignDepth(variant=options.depth_variant, unaligned=options.unaligned,
                   device=options.device),
        CollectStats(device=options.device, progress=options.progress,
                     needed=options.method in STATISTICS_METHODS,
                     samples_per_batch=options.samples_per_batch, seed=options.seed,
                     rotations=rotations),
        Match(method=options.method, alpha=options.alpha, beta=options.beta,
              weight_beta=options.weight_beta, seed=options.seed, width=options.width,
              symmetry=options.symmetry),
        Zip(stop_at=options.stop_at, heads=options.heads, outputs=options.outputs),
        Repair(mode=options.repair, device=options.device, progress=options.progress),
    ]
    assert tuple(p.name for p in passes) == PIPELINE, "build_passes out of step with PIPELINE"
    return passes


def check_pass_name(name: str | None) -> None:
    """An error naming the passes when ``name`` (a ``stop_after``) is none of them."""
    if name is not None and name not in REGISTRY:
        raise MergeError(f"pipeline: no pass is called {name!r}; the passes are "
                         f"{', '.join(PIPELINE)}")


def run_pipeline(state: PipelineState, passes: Iterable[Pass], *,
                 callback: Callback | None = None, stop_after: str | None = None
                 ) -> PipelineState:
    """Runs ``passes`` in order over ``state`` and returns the final state.

    Example::

        state = run_pipeline(state, build_passes(options), stop_after="match",
                             callback=lambda name, state: print(name, state.timings.get(name)))
    """
    check_pass_name(stop_after)
    meter = PeakMemory()
    for current in passes:
        applies = getattr(current, "applies", None)
        if applies is None or applies(state):
            meter.start()
            start = time.perf_counter()
            state = current.run(state)
            peak = meter.stop()  # waits for the GPU's queued work: it counts in the pass's time
            seconds = time.perf_counter() - start
            log.info("%s: %.2fs", current.name, seconds)
            state = state.evolve(timings={**state.timings, current.name: seconds},
                                 peak_memory={**state.peak_memory, current.name: peak})
        if callback is not None:
            callback(current.name, state)
        if current.name == stop_after:
            break
    return state
