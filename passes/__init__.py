"""The passes of the mergec pipeline, one module each, in pipeline order.

    trace → fold-norms → annotate-units → segment → align-depth → collect-stats → match
    → zip → repair

Each pass is a frozen dataclass with its options as fields and one entry point,
``run(state) -> state`` (``mergec.ir.state.PipelineState``); fold-norms, align-depth and
collect-stats also say whether they apply (``applies(state)``). ``REGISTRY`` maps each pass's
kebab-case name to its class; ``PIPELINE`` is the order in which ``mergec.pipeline`` runs them.
"""
from mergec.passes.align_depth import AlignDepth
from mergec.passes.annotate_units import AnnotateUnits
from mergec.passes.collect_stats import CollectStats
from mergec.passes.fold_norms import FoldNorms
from mergec.passes.match import Match
from mergec.passes.repair import Repair
from mergec.passes.segment import Segment
from mergec.passes.trace import Trace
from mergec.passes.zip import Zip

REGISTRY = {
    "trace": Trace,
    "fold-norms": FoldNorms,
    "annotate-units": AnnotateUnits,
    "segment": Segment,
    "align-depth": AlignDepth,
    "collect-stats": CollectStats,
    "match": Match,
    "zip": Zip,
    "repair": Repair,
}

PIPELINE = tuple(REGISTRY)

__all__ = ["REGISTRY", "PIPELINE", "Trace", "FoldNorms", "AnnotateUnits", "Segment", "AlignDepth",
           "CollectStats", "Match", "Zip", "Repair"]
