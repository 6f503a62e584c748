"""The public entry points of mergec."""
from __future__ import annotations

from typing import Any

from torch import fx, nn

from mergec.ir.fx import STATE_KEYS, as_args
from mergec.ir.spec import UnitSpec
from mergec.ir.state import MergeOptions, PipelineState
from mergec.passes.annotate_units import AnnotateUnits
from mergec.passes.trace import Trace
from mergec.permute import permute_model
from mergec.pipeline import run_pipeline


def discover(model: nn.Module | fx.GraphModule, example_inputs: Any = None, *,
             outputs: str = "auto") -> UnitSpec:
    """Derives the unit spec of a model: its permutation-equivalent spaces and, per state-dict
    entry, which axis belongs to which space.

    ``outputs`` says which model outputs keep their order. ``"auto"`` (what a merge aligns):
    logits and plain tensors do, the hidden states a transformers backbone returns do not, so
    its residual stream is free and a merge maps it back at the output. ``"fixed"``: every
    output (permuting the free spaces then computes the same function, as
    :func:`permute` does). ``"free"``: none (a feature extractor returning a plain tensor).

    Example::

        spec = mergec.discover(torchvision.models.resnet18(), torch.randn(2, 3, 64, 64))
        print(spec.coverage())
    """
    traced = isinstance(model, fx.GraphModule) and STATE_KEYS in model.meta
    state = PipelineState(options=MergeOptions(), models=(model,),
                          example=() if traced else as_args(example_inputs),
                          graphs=(model,) if traced else ())
    passes = ([] if traced else [Trace()]) + [AnnotateUnits(outputs=outputs)]
    return run_pipeline(state, passes).specs[0]


def permute(model: nn.Module, example_inputs: Any, seed: int = 0, *,
            spec: UnitSpec | None = None) -> nn.Module:
    """A deep copy of ``model`` (same class, keys and shapes) with every free space randomly
    permuted: heads and groups as blocks and within. It computes the same function.

    Example::

        twin = mergec.permute(model, x, seed=1)
        torch.testing.assert_close(twin(x), model(x))
    """
    spec = spec if spec is not None else discover(model, example_inputs, outputs="fixed")
    return permute_model(model, spec, seed)
