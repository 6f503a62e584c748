"""The passes of the mergec pipeline, one module each, in pipeline order.

    trace → annotate-units → segment → align-depth → collect-stats → match → zip → repair

segment and align-depth run only when the two models differ in depth.

``REGISTRY`` maps each pass's kebab-case name to its class (``trace`` is a function: the
frontend has no options worth a class).
"""
from mergec.passes.align_depth import AlignDepth
from mergec.passes.annotate_units import AnnotateUnits
from mergec.passes.collect_stats import CollectStats
from mergec.passes.match import Match
from mergec.passes.repair import Repair
from mergec.passes.segment import Segment
from mergec.passes.trace import TraceOptions, trace
from mergec.passes.zip import Zip

REGISTRY = {
    "annotate-units": AnnotateUnits,
    "segment": Segment,
    "align-depth": AlignDepth,
    "collect-stats": CollectStats,
    "match": Match,
    "zip": Zip,
    "repair": Repair,
}

PIPELINE = ("trace", "annotate-units", "segment", "align-depth", "collect-stats", "match",
            "zip", "repair")

__all__ = ["REGISTRY", "PIPELINE", "trace", "TraceOptions", "AnnotateUnits", "Segment",
           "AlignDepth", "CollectStats", "Match", "Zip", "Repair"]
