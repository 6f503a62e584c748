"""The public entry points of mergec."""
from __future__ import annotations

from typing import Any

from torch import fx, nn

from mergec.passes.annotate_units import AnnotateUnits
from mergec.passes.trace import STATE_KEYS, trace
from mergec.permute import permute_model
from mergec.spec import UnitSpec


def discover(model: nn.Module | fx.GraphModule, example_inputs: Any = None, *,
             fix_outputs: bool = True) -> UnitSpec:
    """Derives the unit spec of a model: its permutation-equivalent spaces and, per state-dict
    entry, which axis belongs to which space.

    ``fix_outputs=False`` treats the model's outputs as features (a backbone returning hidden
    states): the residual stream is then a free space and outputs come out permuted.

    Example::

        spec = mergec.discover(torchvision.models.resnet18(), torch.randn(2, 3, 64, 64))
        print(spec.coverage())
    """
    if isinstance(model, fx.GraphModule) and STATE_KEYS in model.meta:
        graph_module = model
    else:
        graph_module = trace(model, example_inputs)
    keys = graph_module.meta[STATE_KEYS]
    spec, _ = AnnotateUnits(fix_outputs=fix_outputs)(graph_module, keys, type(model).__name__)
    return spec


def permute(model: nn.Module, example_inputs: Any, seed: int = 0, *,
            spec: UnitSpec | None = None) -> nn.Module:
    """A deep copy of ``model`` (same class, keys and shapes) with every free space randomly
    permuted: heads and groups as blocks and within. It computes the same function.

    Example::

        twin = mergec.permute(model, x, seed=1)
        torch.testing.assert_close(twin(x), model(x))
    """
    spec = spec if spec is not None else discover(model, example_inputs)
    return permute_model(model, spec, seed)
