"""mergec: a graph-rewriting compiler over torch.fx that merges trained networks without
training.

    import mergec
    spec = mergec.discover(model, example_inputs)   # which units can be permuted
    twin = mergec.permute(model, example_inputs)    # same function, units shuffled
"""
from mergec.api import discover, permute  # noqa: F401
from mergec.errors import CheckpointError, MergecError, MergeError, SpecError, TraceError  # noqa: F401
from mergec.ir.spec import Binding, Space, UnitSpec  # noqa: F401
from mergec.passes.trace import trace  # noqa: F401

__version__ = "0.1.0"
from mergec.export import load  # noqa: F401,E402
from mergec.ir.state import MergeOptions, PipelineState  # noqa: F401,E402
from mergec.merge import MergeReport, MergeResult, calibration_from_loader, merge  # noqa: F401,E402
