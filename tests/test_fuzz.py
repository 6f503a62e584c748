"""A CI-sized run of the fuzz campaign (tests/fuzzing.py): generated architectures × random
options × corrupted inputs; any exception other than a MergecError fails. The longer campaign
is ``python benchmarks/reliability.py --examples N``."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings

import archgen
import fuzzing


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(drawn=fuzzing.draws())
def test_every_outcome_is_a_merge_or_a_mergec_error(drawn) -> None:
    fuzzing.run_case(*drawn)


@pytest.mark.parametrize("corruption", [c for c in fuzzing.CORRUPTIONS if c != "none"])
def test_each_corruption_is_refused_or_survived(corruption: str) -> None:
    """Every corruption once, on one small CNN, whatever hypothesis draws."""
    torch.manual_seed(0)
    model = archgen.Net(archgen.ConvBN(3, 4, 3, True, "relu"), [],
                        archgen.PoolHead(4, 3, False))
    case = archgen.Case("cnn", model, (torch.zeros(2, 3, 6, 6),), ())
    outcome = fuzzing.Outcome()
    name = fuzzing.run_case(case, {"method": "zip"}, corruption, seed=1, outcome=outcome)
    assert not outcome.failures, outcome.failures[0][1]
    expected = {"nan-input", "inf-input", "nan-weight", "empty", "zero-batch", "shape",
                "dtype", "not-a-tensor", "truncated-file"}
    if corruption in expected:
        assert name.startswith("refused"), name
