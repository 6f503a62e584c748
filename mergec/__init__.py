"""mergec: a graph-rewriting compiler over torch.fx that merges trained networks without
training.

    import mergec
    spec = mergec.discover(model, example_inputs)   # which units can be permuted
    twin = mergec.permute(model, example_inputs)    # same function, units shuffled
    result = mergec.merge(model_a, model_b, example_inputs, calibration)
    result = mergec.merge_many([model_1, model_2, model_3], example_inputs, calibration)
"""
from mergec.api import discover, permute
from mergec.errors import CheckpointError, MergecError, MergeError, SpecError, TraceError
from mergec.export import load
from mergec.ir.spec import Binding, Space, UnitSpec
from mergec.ir.state import MergeOptions, PipelineState
from mergec.many import merge_many
from mergec.merge import MergeReport, MergeResult, calibration_from_loader, merge
from mergec.passes.trace import trace

__version__ = "0.1.0"

__all__ = [
    "Binding",
    "CheckpointError",
    "MergeError",
    "MergeOptions",
    "MergeReport",
    "MergeResult",
    "MergecError",
    "PipelineState",
    "Space",
    "SpecError",
    "TraceError",
    "UnitSpec",
    "calibration_from_loader",
    "discover",
    "load",
    "merge",
    "merge_many",
    "permute",
    "trace",
]
