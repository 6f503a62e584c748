"""The fuzz campaign: generated architectures × random options × corrupted inputs.

One case draws an architecture from :mod:`archgen` (model A, and B as A with other random
weights), merge options (valid and invalid) and at most one corruption of the inputs (the
calibration's shape, dtype or values, the weights, an empty or zero-sample calibration, a
checkpoint file cut short or overwritten with noise). It then merges, or loads the corrupted
checkpoint. A :class:`~mergec.MergecError` is a correct answer to a bad input; so is a merge
that succeeds, if its outputs are finite wherever the inputs were not corrupted. Any other
exception is a failure.

tests/test_fuzz.py runs a CI-sized campaign; ``benchmarks/reliability.py --examples N`` a
longer one, with its counts written to docs/reliability.md.
"""
from __future__ import annotations

import copy
import re
import tempfile
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import archgen
import mergec
from mergec.checkpoints import load_checkpoint

CORRUPTIONS = ("none", "none", "none", "shape", "dtype", "nan-input", "inf-input",
               "nan-weight", "empty", "zero-batch", "not-a-tensor", "truncated-file",
               "noise-file")
#: Options a user may pass, each with values that are valid and values that are not.
OPTIONS = {
    "method": st.sampled_from(["zip", "permute", "weight-match", "mudsc", "average", "ties"]),
    "alpha": st.one_of(st.floats(0, 1), st.sampled_from([-0.5, 1.5, float("nan")])),
    "beta": st.one_of(st.floats(0, 1), st.sampled_from([2.0, float("inf")])),
    "width": st.sampled_from(["max", "min", "a", "b", "sum", 0.5, 0.75, 3, 0, -1, "wide"]),
    "repair": st.sampled_from(["reset", "repair", None, "fix"]),
    "samples_per_batch": st.sampled_from([None, None, 2, 7, 1, 0]),
    "heads": st.sampled_from(["average", "average", "separate", "both"]),
    "seed": st.sampled_from([0, 1, 12345, "0"]),
}


@dataclass
class Outcome:
    """The counts of one campaign, and the failures (case, traceback) it found."""

    counts: Counter = field(default_factory=Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)
    refusals: Counter = field(default_factory=Counter)  # of uncorrupted inputs, by message

    @property
    def cases(self) -> int:
        return sum(self.counts.values())


def _calibration(case: archgen.Case, corruption: str, seed: int) -> list[tuple]:
    generator = torch.Generator().manual_seed(seed)
    x = case.inputs[0]
    batches = [(torch.randn((16, *x.shape[1:]), generator=generator),) for _ in range(2)]
    if corruption == "shape":
        batches[1] = (torch.randn((16, *x.shape[1:-1], x.shape[-1] + 1)),)
    elif corruption == "dtype":
        batches[0] = (batches[0][0].double(),)
    elif corruption in ("nan-input", "inf-input"):
        batches[1][0].view(-1)[0] = float("nan") if corruption == "nan-input" else float("inf")
    elif corruption == "empty":
        batches = []
    elif corruption == "zero-batch":
        batches.append((batches[0][0][:0],))
    elif corruption == "not-a-tensor":
        batches[1] = (batches[1][0].tolist(),)
    return batches


def _checkpoint_case(case: archgen.Case, corruption: str, seed: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        save_file({k: v.contiguous() for k, v in case.model.state_dict().items()}, str(path))
        data = bytearray(path.read_bytes())
        generator = torch.Generator().manual_seed(seed)
        if corruption == "truncated-file":
            cut = int(torch.randint(0, len(data), (1,), generator=generator))
            path.write_bytes(bytes(data[:cut]))
        else:  # noise over a random stretch, header included
            start = int(torch.randint(0, max(1, len(data) // 2), (1,), generator=generator))
            noise = torch.randint(0, 256, (min(64, len(data) - start),), generator=generator)
            data[start:start + len(noise)] = bytes(noise.tolist())
            path.write_bytes(bytes(data))
        state = load_checkpoint(path)
        case.model.load_state_dict(state)  # noise inside a tensor's bytes is no format error


def _merge_case(case: archgen.Case, options: dict, corruption: str, seed: int) -> str:
    model_a = case.model.eval()
    model_b = archgen.randomize_(copy.deepcopy(model_a), seed + 1)
    with torch.no_grad():
        for parameter in model_b.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        if corruption == "nan-weight":
            next(model_b.parameters()).view(-1)[0] = float("nan")
    result = mergec.merge(model_a, model_b, case.inputs, _calibration(case, corruption, seed),
                          progress=False, **options)
    if corruption == "none":
        with torch.no_grad():
            flat = torch.utils._pytree.tree_leaves(result.module(*case.inputs))
        if not all(bool(t.isfinite().all()) for t in flat if isinstance(t, torch.Tensor)):
            raise AssertionError("a sound merge gave non-finite outputs")
    return "merged"


def run_case(case: archgen.Case, options: dict, corruption: str, seed: int,
             outcome: Outcome | None = None) -> str:
    """One case; returns its outcome's name. Without ``outcome`` a failure raises; with it,
    the failure is recorded and the campaign goes on."""
    try:
        if corruption in ("truncated-file", "noise-file"):
            _checkpoint_case(case, corruption, seed)
            name = "loaded"
        else:
            name = _merge_case(case, options, corruption, seed)
    except mergec.MergecError as error:
        name = f"refused: {type(error).__name__}"
        if outcome is not None and corruption == "none":
            outcome.refusals[re.sub(r"-?[\d.]+|'[^']*'", "…", str(error))[:110]] += 1
    except Exception as error:  # noqa: BLE001 - the failures the campaign looks for
        if outcome is None:
            raise
        outcome.failures.append((f"{case!r}\noptions={options} corruption={corruption}",
                                 "".join(traceback.format_exception(error))))
        name = f"FAILED: {type(error).__name__}"
    if outcome is not None:
        outcome.counts[(corruption, name)] += 1
    return name


@st.composite
def draws(draw: st.DrawFn) -> tuple[archgen.Case, dict, str, int]:
    """A case of the campaign: architecture, options (each drawn or left default), corruption
    and a seed."""
    case = draw(archgen.cases())
    options = {name: draw(values) for name, values in OPTIONS.items() if draw(st.booleans())}
    return case, options, draw(st.sampled_from(CORRUPTIONS)), draw(st.integers(0, 2**16))


def campaign(examples: int, seed: int = 0) -> Outcome:
    """Runs ``examples`` cases (drawn reproducibly from ``seed``) and counts their outcomes."""
    outcome = Outcome()

    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(drawn=draws())
    def body(drawn: tuple[archgen.Case, dict, str, int]) -> None:
        run_case(*drawn, outcome=outcome)

    body._hypothesis_internal_use_seed = seed  # noqa: SLF001 - a reproducible campaign
    body()
    return outcome


def summary(outcome: Outcome) -> dict[str, Any]:
    by_corruption: dict[str, Counter] = {}
    for (corruption, name), count in outcome.counts.items():
        by_corruption.setdefault(corruption, Counter())[name] += count
    return {"cases": outcome.cases, "failures": len(outcome.failures),
            "by_corruption": {k: dict(v) for k, v in sorted(by_corruption.items())}}
