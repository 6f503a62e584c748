"""A merge planned to a size budget (mergec.budget): never over it, and the right extremes."""
from __future__ import annotations

import json

import pytest
import torch
from test_merge import calibration_of, cnn

import mergec
from mergec.budget import size_of
from mergec.errors import MergeError


@pytest.fixture(scope="module")
def pair():
    x = torch.randn(192, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return cnn(seed=0), cnn(seed=1), x


def planned(pair, budget: int, **options) -> mergec.MergeResult:
    model_a, model_b, x = pair
    return mergec.merge(model_a, model_b, x[:4], calibration_of(x, 32), progress=False,
                        budget=budget, **options)


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def chosen(result: mergec.MergeResult) -> dict:
    return next(c for c in result.report.budget["candidates"] if c["chosen"])


@pytest.mark.parametrize("share", [1.0, 1.3, 1.7, 2.0])
def test_the_merge_never_exceeds_its_budget(pair, share: float) -> None:
    budget = int(share * parameters(pair[0]))
    result = planned(pair, budget)
    assert parameters(result.module) <= budget
    assert parameters(result.module) == chosen(result)["size"]
    feasible = [c for c in result.report.budget["candidates"] if c["size"] <= budget]
    assert chosen(result)["agreement"] == max(c["agreement"] for c in feasible)


def test_a_budget_of_one_model_is_a_full_merge(pair) -> None:
    result = planned(pair, parameters(pair[0]))
    best = chosen(result)
    assert (best["stop_at"], best["heads"], best["width"]) == (None, "average", "max")
    assert isinstance(result.module(pair[2][:2]), torch.Tensor)


def test_a_budget_of_two_models_agrees_with_the_ensemble_at_least_as_well(pair) -> None:
    result = planned(pair, 2 * parameters(pair[0]))
    candidates = result.report.budget["candidates"]
    whole = next(c for c in candidates if c["whole"])
    assert whole["agreement"] == 1.0  # both models as they are: their ensemble
    assert whole["size"] == 2 * parameters(pair[0])
    assert chosen(result)["agreement"] >= whole["agreement"]
    assert len(candidates) >= 6  # cuts, heads apart, full and elastic widths


def test_a_budget_in_flops(pair) -> None:
    example = (pair[2][:1],)
    flops = size_of(pair[0], "flops", example)
    result = planned(pair, flops, budget_measure="flops")
    assert size_of(result.module, "flops", example) <= flops
    assert result.report.budget["measure"] == "flops"


def test_the_report_holds_and_plots_every_candidate(pair, tmp_path) -> None:
    result = planned(pair, int(1.5 * parameters(pair[0])))
    report = json.loads(result.report.to_json())
    assert report["budget"]["budget"] == int(1.5 * parameters(pair[0]))
    assert sum(c["chosen"] for c in report["budget"]["candidates"]) == 1
    written = result.report.plot(tmp_path)
    assert tmp_path / "budget.png" in written


@pytest.mark.parametrize("budget, options, message", [
    (10, {}, "no merge fits"),
    (0, {}, "positive int"),
    (1.5, {}, "positive int"),
    (10**6, {"stop_at": "3"}, "chooses the stop point"),
    (10**6, {"width": "sum"}, "chooses the stop point"),
    (10**6, {"budget_measure": "bytes"}, "budget_measure"),
])
def test_bad_budgets_are_refused(pair, budget, options: dict, message: str) -> None:
    with pytest.raises(MergeError, match=message):
        planned(pair, budget, **options)


def test_a_budget_needs_two_calibration_batches(pair) -> None:
    model_a, model_b, x = pair
    with pytest.raises(MergeError, match="two calibration batches"):
        mergec.merge(model_a, model_b, x[:4], [(x,)], progress=False, budget=10**6)
