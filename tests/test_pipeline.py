"""The pipeline: options validated before any pass, the driver and its callback, stopping after
a pass, the depth path as ordinary passes, and each pass run alone on a hand-built state."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from torch import nn

import mergec
import mergec.passes.trace as trace_module
from mergec import MergeError
from mergec.algorithms.solvers import average
from mergec.inputs import merge_device
from mergec.ir.state import MergeOptions, PipelineState
from mergec.merge import report_of, run_merge
from mergec.passes import PIPELINE
from mergec.passes.align_depth import AlignDepth
from mergec.passes.annotate_units import annotate_units
from mergec.passes.collect_stats import CollectStats
from mergec.passes.match import Match
from mergec.passes.repair import Repair
from mergec.passes.segment import Segment
from mergec.passes.trace import trace
from mergec.passes.zip import Zip
from mergec_lab import zoo


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 3)).eval()


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


def inputs(shape: tuple[int, ...], rows: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn((rows, *shape), generator=torch.Generator().manual_seed(seed))


def hand_built(models: tuple[nn.Module, ...], x: torch.Tensor, **fields) -> PipelineState:
    """A state as trace and annotate-units leave it, built without the driver."""
    example = (x[:4],)
    graphs = tuple(trace(model, example) for model in models)
    specs = tuple(annotate_units(graph) for graph in graphs)
    return PipelineState(options=MergeOptions(progress=False), models=models, example=example,
                         calibration=[(part,) for part in x.split(32)], graphs=graphs,
                         specs=specs, **fields)


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------
BAD_OPTIONS = [
    ({"method": "ties"}, r"unknown method 'ties'"),
    ({"alpha": 1.5}, r"alpha must be in \[0, 1\], got 1\.5"),
    ({"weight_beta": -0.5}, r"weight_beta must be in \[0, 1\]"),
    ({"repair": "fix"}, r"repair must be one of"),
    ({"heads": "both"}, r"heads must be 'average'"),
    ({"width": "widest"}, r"width must be"),
    ({"width": 0}, r"width must be"),
    ({"depth_variant": "block-wise"}, r"depth_variant must be one of"),
    ({"unaligned": "drop"}, r"unaligned must be one of"),  # also for models of one depth
    ({"device": "gpu0"}, r"device 'gpu0' is not a torch device"),
    ({"seed": 1.5}, r"seed must be an int"),
    ({"samples_per_batch": 1}, r"samples_per_batch must be None"),
    ({"repair": "repair", "stop_at": "2"}, r"repair='repair' rescales a fully merged model"),
    ({"repair": "repair", "heads": "separate"}, r"repair='repair' rescales"),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS,
                         ids=["-".join(map(str, o)) for o, _ in BAD_OPTIONS])
def test_a_bad_option_is_refused_before_any_pass_runs(options: dict, message: str) -> None:
    x = inputs((6,))
    ran: list[str] = []
    with pytest.raises(MergeError, match=message):
        mergec.merge(mlp(0), mlp(1), x[:4], [(x,)], progress=False,
                     callback=lambda name, state: ran.append(name), **options)
    assert ran == []


def test_options_are_frozen_and_round_trip() -> None:
    options = MergeOptions(method="permute", width=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.method = "zip"  # type: ignore[misc]
    assert MergeOptions(**options.to_dict()) == options


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------
def test_the_callback_sees_every_pass_with_the_state_it_left() -> None:
    x = inputs((6,))
    seen: dict[str, PipelineState] = {}
    result = mergec.merge(mlp(0), mlp(1), x[:4], [(x,)], method="zip", progress=False,
                          callback=lambda name, state: seen.setdefault(name, state))
    assert tuple(seen) == PIPELINE
    assert len(seen["trace"].graphs) == 2 and not seen["trace"].specs
    assert len(seen["annotate-units"].specs) == 2 and not seen["annotate-units"].moments
    assert seen["segment"].stages == ()  # one depth: nothing to align
    assert seen["collect-stats"].moments and not seen["collect-stats"].plans
    assert seen["match"].plans and seen["match"].merged is None
    assert seen["zip"].merged is result.module
    # align-depth did not apply: it is neither timed nor listed as run
    assert result.report.passes == tuple(p for p in PIPELINE if p != "align-depth")
    assert set(result.report.timings) == set(result.report.passes)


def test_every_pass_that_ran_reports_its_peak_memory() -> None:
    x = inputs((6,))
    report = mergec.merge(mlp(0), mlp(1), x[:4], [(x,)], method="zip", progress=False).report
    assert set(report.peak_memory) == set(report.passes)
    linux = os.path.exists("/proc/self/clear_refs")
    for peak in report.peak_memory.values():
        assert set(peak) == {"host", "cuda"}
        assert (peak["host"] > 10 * 2**20) if linux else peak["host"] is None
    assert json.loads(report.to_json())["peak_memory_bytes"]["zip"]["host"] == (
        report.peak_memory["zip"]["host"])


_PEAK = """
import torch
from mergec.memory import PeakMemory
meter = PeakMemory()
meter.start()
baseline = meter.stop()["host"]
meter.start()
block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
del block
peak = meter.stop()["host"]
print("none" if baseline is None else peak - baseline)
"""


def test_peak_memory_sees_what_a_pass_allocates() -> None:
    """In a fresh process: in a long-lived one the allocation may reuse pages that were freed
    but are still resident, and the resident set need not grow."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PEAK], capture_output=True, text=True,
                         check=True).stdout.strip()
    if out == "none":
        pytest.skip("this system cannot reset the peak resident set")
    assert int(out) >= 60 * 2**20


def test_methods_on_weights_alone_skip_collect_stats() -> None:
    x = inputs((6,))
    state = run_merge(MergeOptions(method="weight-match", progress=False), (mlp(0), mlp(1)),
                      x[:4], [(x,)])
    assert "collect-stats" not in state.completed and not state.moments


def test_the_pipeline_stops_after_the_named_pass() -> None:
    x = inputs((6,))
    state = run_merge(MergeOptions(method="permute", progress=False), (mlp(0), mlp(1)), x[:4],
                      [(x,)], stop_after="match")
    assert state.completed[-1] == "match" and state.plans and state.merged is None
    report = report_of(state).to_dict()
    assert report["passes"][-1] == "match" and report["options"]["widths"]
    with pytest.raises(MergeError, match="no pass is called 'matching'"):
        run_merge(MergeOptions(), (mlp(0), mlp(1)), x[:4], [(x,)], stop_after="matching")


def test_models_of_different_depth_are_traced_once_each(monkeypatch) -> None:
    calls: list[str] = []

    def counting_trace(model, *args, **kwargs):
        calls.append(type(model).__name__)
        return trace(model, *args, **kwargs)

    monkeypatch.setattr(trace_module, "trace", counting_trace)
    torch.manual_seed(0)
    shallow, deep = zoo.resnet20(width=0.25, depth=8), zoo.resnet20(width=0.25, depth=14)
    x = inputs((1, 8, 8), rows=32)
    result = mergec.merge(shallow, deep, x[:4], [(x,)], progress=False)
    assert len(calls) == 2
    assert result.report.depth is not None and "align-depth" in result.report.timings
    assert set(result.module.state_dict()) == set(deep.state_dict())


# ---------------------------------------------------------------------------------------------
# Each pass alone
# ---------------------------------------------------------------------------------------------
def test_segment_leaves_models_of_one_depth_alone_and_cuts_the_others() -> None:
    x = inputs((1, 8, 8), rows=8)
    torch.manual_seed(0)
    same = hand_built((zoo.resnet20(width=0.25, depth=8), zoo.resnet20(width=0.25, depth=8)), x)
    assert Segment().run(same) is same
    different = hand_built((zoo.resnet20(width=0.25, depth=8),
                            zoo.resnet20(width=0.25, depth=14)), x)
    stages = Segment().run(different).stages
    assert [len(stage) for stage in stages[0]] == [1, 1, 1]
    assert [len(stage) for stage in stages[1]] == [2, 2, 2]
    with pytest.raises(MergeError, match="do not correspond"):
        Segment().run(_mismatched_pair())


def _mismatched_pair() -> PipelineState:
    """Two models of as many layers that are not one architecture (tanh against ReLU)."""
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 3)).eval()
    x = inputs((6,), rows=8)
    return hand_built((other, mlp(1)), x)


def test_align_depth_pads_the_shallow_model_into_the_deep_graph() -> None:
    torch.manual_seed(0)
    shallow = zoo.resnet20(width=0.25, depth=8).eval()
    deep = zoo.resnet20(width=0.25, depth=14).eval()
    x = inputs((1, 8, 8), rows=32)
    state = Segment().run(hand_built((deep, shallow), x))  # A is the deep one
    assert AlignDepth().applies(state)
    aligned = AlignDepth().run(state)
    assert aligned.depth is not None and aligned.depth.swapped
    padded, kept = aligned.graphs
    assert kept is state.graphs[0]  # the deep model is B now
    assert set(padded.state_dict()) == set(deep.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(padded(x), shallow(x), rtol=1e-4, atol=1e-5)
    assert aligned.only_b and set(aligned.only_b) <= set(deep.state_dict())


def test_collect_stats_of_a_model_with_itself_correlates_every_live_unit_with_its_twin() -> None:
    x = inputs((6,))
    model = mlp(0)
    state = CollectStats(progress=False).run(hand_built((model, model), x))
    assert state.moments
    for space_id, moments in state.moments.items():
        size = state.spec.spaces[space_id].size
        cross = moments.correlation()[:size, size:].diagonal()
        live = moments.correlation().diagonal()[:size] > 0
        torch.testing.assert_close(cross[live], torch.ones_like(cross[live]), rtol=0, atol=1e-6)


def test_collect_stats_keeps_at_most_the_asked_samples_of_each_batch_and_repeats() -> None:
    x = inputs((1, 6, 6), rows=64)
    model = cnn(0)
    state = hand_built((model, model), x)  # two batches of 32 images, 36 pixels each
    runs = [CollectStats(progress=False, samples_per_batch=100, seed=seed).run(state)
            for seed in (0, 0, 1)]
    moments = runs[0].moments
    assert moments and all(m.count.item() == 200 for m in moments.values())
    for space, accumulator in moments.items():
        assert torch.equal(accumulator.sum_outer, runs[1].moments[space].sum_outer)
        assert not torch.equal(accumulator.sum_outer, runs[2].moments[space].sum_outer)
        # the same pixels of both models: a model with itself still correlates exactly
        correlation = accumulator.correlation()
        size = accumulator.dim_a
        live = correlation.diagonal()[:size] > 0
        torch.testing.assert_close(correlation[:size, size:].diagonal()[live],
                                   torch.ones(int(live.sum()), dtype=torch.float64))


def test_match_alone_recovers_a_permuted_copy_by_weights() -> None:
    x = inputs((6,))
    model = mlp(0)
    twin = mergec.permute(model, x[:4], seed=3)
    state = Match(method="weight-match").run(hand_built((model, twin), x))
    merged = Zip().run(state).merged
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), rtol=1e-4, atol=1e-5)


def test_zip_alone_with_average_plans_averages_every_weight() -> None:
    x = inputs((6,))
    state = hand_built((mlp(0), mlp(1)), x)
    plans = {s: average(space.size) for s, space in state.spec.spaces.items()}
    merged = Zip().run(state.evolve(plans=plans)).merged
    weights_a, weights_b = (graph.state_dict() for graph in state.graphs)
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, (weights_a[key] + weights_b[key]) / 2)


def test_repair_alone_resets_batch_norm_statistics_to_the_calibration_data() -> None:
    x = inputs((1, 6, 6))
    model = cnn(0)
    state = hand_built((model, model), x)
    merged = trace(model, (x[:4],))
    state = Repair(mode="reset").run(state.evolve(merged=merged))
    assert state.repair == {"batch_norms_reset": 1}
    with torch.no_grad():
        features = model[0](x)
    buffers = merged.state_dict()
    mean_key = next(k for k in buffers if k.endswith("running_mean"))
    torch.testing.assert_close(buffers[mean_key], features.mean(dim=(0, 2, 3)),
                               rtol=1e-4, atol=1e-5)


def test_a_pass_run_out_of_order_names_what_it_misses() -> None:
    x = inputs((6,))
    state = hand_built((mlp(0), mlp(1)), x)
    with pytest.raises(MergeError, match="zip: needs the state's plans"):
        Zip().run(state)
    with pytest.raises(MergeError, match="repair: needs the state's merged"):
        Repair().run(state)


# ---------------------------------------------------------------------------------------------
# Calibration data
# ---------------------------------------------------------------------------------------------
class CountingBatches:
    """A re-iterable calibration source that counts how often it is read and is no sequence,
    so a merge can only stream it."""

    def __init__(self, x: torch.Tensor, batch: int) -> None:
        self.x, self.batch, self.reads = x, batch, 0

    def __iter__(self):
        self.reads += 1
        for part in self.x.split(self.batch):
            yield (part,)


def test_calibration_is_streamed_once_per_pass_that_reads_it() -> None:
    x = inputs((1, 6, 6))
    source = CountingBatches(x, 16)
    streamed = mergec.merge(cnn(0), cnn(1), x[:4], source, method="zip", repair="reset",
                            progress=False)
    assert source.reads == 2  # collect-stats and the BatchNorm reset
    listed = mergec.merge(cnn(0), cnn(1), x[:4], [(part,) for part in x.split(16)],
                          method="zip", repair="reset", progress=False)
    for key, value in listed.module.state_dict().items():
        assert torch.equal(streamed.module.state_dict()[key], value), key


def test_a_one_shot_iterator_and_a_loader_give_the_same_merge() -> None:
    x = inputs((6,))
    batches = [(part,) for part in x.split(16)]
    reference = mergec.merge(mlp(0), mlp(1), x[:4], batches, progress=False)
    generator = mergec.merge(mlp(0), mlp(1), x[:4], (batch for batch in batches),
                             progress=False)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, torch.zeros(len(x))), batch_size=16)
    wrapped = mergec.merge(mlp(0), mlp(1), x[:4], mergec.calibration_from_loader(loader),
                           progress=False)
    for result in (generator, wrapped):
        for key, value in reference.module.state_dict().items():
            assert torch.equal(result.module.state_dict()[key], value), key
    with pytest.raises(MergeError, match="one-shot iterator"):
        mergec.calibration_from_loader(iter(loader))


@pytest.mark.parametrize("asked, models, runs_on", [
    (None, torch.device("cpu"), None), (None, None, None), ("cpu", torch.device("cuda:1"), "cpu"),
    (None, torch.device("cuda:1"), "cuda:1"), ("cuda", torch.device("cpu"), "cuda")])
def test_a_merge_runs_where_asked_else_where_the_models_are(asked, models, runs_on) -> None:
    assert merge_device(asked, models) == runs_on
