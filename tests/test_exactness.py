"""Exactness (invariant 2 of the design): merge(A, π(A)) computes A wherever the weights
identify π.

* Weight matching recovers a permuted twin over generated architectures (depthwise and grouped
  convs, concatenations, GroupNorm, attention, ...) and on torchvision models at random
  initialisation, where the coordinate descent started from the identity used to stop in a
  local optimum (mobilenets, efficientnet, regnet, squeezenet: relative logit errors 0.03-1).
* The activation methods recover resnet18's permuted twin although some of its units are dead
  (constant) on the calibration data: correlation cannot tell those apart, their weights do.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import assume, given
from torch import nn

import archgen  # tests/ is on sys.path under pytest's default (prepend) import mode
import mergec
from mergec.algorithms.weight_matching import weight_similarity

torchvision = pytest.importorskip("torchvision")

EXACT = 1e-4  # relative logit error of a recovered model: float32 rounding only






def relative_error(model: nn.Module, twin: nn.Module, example: torch.Tensor,
                   calibration: list[tuple[torch.Tensor]], x: torch.Tensor, method: str,
                   **options: Any) -> float:
    """``||merged(x) - model(x)|| / ||model(x)||`` for the merge of ``model`` and ``twin``."""
    result = mergec.merge(model, twin, example, calibration, method=method, repair=None,
                          progress=False, **options)
    with torch.no_grad():
        want, got = model(x), result.module(x)
    return float((got - want).norm() / want.norm())


def has_uneven_grouped_conv(model: nn.Module) -> bool:
    """A grouped (not depthwise) conv whose input and output widths differ (see
    test_merge.test_grouped_conv_changing_width_merges)."""
    return any(isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels
               and m.in_channels != m.out_channels for m in model.modules())


def assert_weight_matching_recovers(case: archgen.Case) -> None:
    """merge(A, π(A)) with weight matching computes A, for a random π of every free space."""
    assume(not has_uneven_grouped_conv(case.model))
    (example,) = case.inputs
    twin = mergec.permute(case.model, example, seed=1)
    x = archgen.random_like(example, 16, seed=2)
    error = relative_error(case.model, twin, example, [(x,)], x, "weight-match")
    assert error < EXACT, f"{case.name}: relative error {error:.3g}"


@archgen.budget(10)
@given(case=archgen.cases())
def test_weight_matching_recovers_a_permuted_twin_of_any_architecture(case: archgen.Case
                                                                      ) -> None:
    assert_weight_matching_recovers(case)


@archgen.budget(20)
@given(case=archgen.conv_cases(max_blocks=6))
def test_weight_matching_recovers_a_permuted_twin_of_deeper_conv_nets(case: archgen.Case
                                                                      ) -> None:
    """Up to six conv blocks (concatenations, splits, depthwise and grouped convs, GroupNorm,
    squeeze-excitation, ...): deep enough for the descent from the identity to stop in a local
    optimum, as it did on some of these before its first sweep propagated from the inputs."""
    assert_weight_matching_recovers(case)


def torchvision_model(name: str) -> nn.Module:
    """A torchvision classifier at random initialisation (seed 0), in eval mode."""
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


# mobilenet_v3_small, mobilenet_v2, efficientnet_b0 and regnet_x_400mf have depthwise or grouped
# convs; squeezenet1_0 has concatenations (composite spaces); the others were recovered before
@pytest.mark.parametrize("name", [
    "mobilenet_v3_small",
    pytest.param("squeezenet1_0", marks=pytest.mark.slow),
    pytest.param("resnet18", marks=pytest.mark.slow),
    pytest.param("shufflenet_v2_x0_5", marks=pytest.mark.slow),
    pytest.param("mobilenet_v2", marks=pytest.mark.slow),
    pytest.param("efficientnet_b0", marks=pytest.mark.slow),
    pytest.param("regnet_x_400mf", marks=pytest.mark.slow),
    pytest.param("googlenet", marks=pytest.mark.slow),
])
def test_weight_matching_recovers_a_permuted_torchvision_model(name: str) -> None:
    model = torchvision_model(name)
    example = archgen.random_like(torch.zeros(1, 3, 32, 32), 2, seed=0)
    twin = mergec.permute(model, example).eval()
    error = relative_error(model, twin, example, [(example,)], example, "weight-match")
    assert error < EXACT


@pytest.fixture(scope="module")
def resnet18_and_twin() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """resnet18 at random initialisation, a permuted twin, and an example input."""
    model = torchvision_model("resnet18")
    example = archgen.random_like(torch.zeros(1, 3, 64, 64), 2, seed=0)
    return model, mergec.permute(model, example).eval(), example


@pytest.mark.parametrize("method", ["permute", "zip",
                                    pytest.param("mudsc", marks=pytest.mark.slow)])
def test_activation_methods_recover_resnet18_with_dead_units(
        method: str, resnet18_and_twin: tuple[nn.Module, nn.Module, torch.Tensor]) -> None:
    """At random initialisation some of resnet18's units are dead on 64 random images; they
    correlate with nothing, and their weights decide their partners (before: 7% off)."""
    model, twin, example = resnet18_and_twin
    calibration = [(batch,) for batch in archgen.random_like(example, 64, seed=1).split(16)]
    error = relative_error(model, twin, example, calibration, example, method)
    assert error < EXACT


@pytest.mark.parametrize("among", [[1, 6], [0, 2], [5, 7]], ids=["across", "a", "b"])
def test_weight_similarity_among_few_units_agrees_with_the_whole(among: list[int]) -> None:
    """The tie step's similarity between a few units (of one model, or of both) is the whole
    similarity's, restricted to them."""
    generator = torch.Generator().manual_seed(0)
    params_a, params_b = ({"fc.weight": torch.randn(4, 3, generator=generator),
                           "fc.bias": torch.randn(4, generator=generator)} for _ in range(2))
    axes = {"fc.weight": [(0, "h")], "fc.bias": [(0, "h")]}
    units = {"h": [torch.arange(4)]}
    whole = weight_similarity(params_a, params_b, axes, units, {}, 4)
    chosen = torch.tensor(among)
    part = weight_similarity(params_a, params_b, axes, units, {}, 4, chosen)
    torch.testing.assert_close(part[chosen][:, chosen], whole[chosen][:, chosen])
    assert int(part.count_nonzero()) == len(among) ** 2
