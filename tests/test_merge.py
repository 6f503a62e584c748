"""Tests of ``mergec.merge`` end to end: invariants 2, 3 and 4 of the design over generated
architectures, the BatchNorm reset, save/load (and running the saved code without mergec), the
errors a user meets, and the digits demo numbers (slow).

The last section holds cases that once failed: a fused qkv cut into heads, a grouped
convolution changing width, units that are constant on the calibration data.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import fx, nn

import archgen  # tests/ is on sys.path under pytest's default (prepend) import mode
import mergec
from mergec import MergeError
from mergec.algorithms import blocks as algorithm_blocks
from mergec.algorithms.solvers import ManyPlan, average
from mergec.ir.spec import Binding
from mergec.passes.zip import merge_entry
from mergec_lab import datasets, training, zoo

RTOL, ATOL = 1e-4, 1e-5
ALL_METHODS = ("average", "permute", "zip", "weight-match", "mudsc")
RECOVERING_METHODS = ("permute", "zip", "weight-match")  # can undo a permutation of A
FAMILIES = ("mlp", "cnn", "residual", "attention", "group_norm")






def calibration_of(x: torch.Tensor, batch: int = 64) -> list[tuple[torch.Tensor]]:
    return [(part,) for part in x.split(batch)]


def outputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x)


def merged(model_a: nn.Module, model_b: nn.Module, example: torch.Tensor,
           calibration: list[tuple[torch.Tensor]], **options: Any) -> mergec.MergeResult:
    """``mergec.merge`` without repair or progress bars; checks invariant 4 on every emitted
    graph: it lints, and every state-dict entry keeps its name and shape."""
    options.setdefault("repair", None)
    result = mergec.merge(model_a, model_b, example, calibration, progress=False, **options)
    assert isinstance(result.module, fx.GraphModule)
    result.module.graph.lint()
    state = result.module.state_dict()
    for key, value in model_a.state_dict().items():
        assert key in state and state[key].shape == value.shape, key
    return result


def assert_computes(module: nn.Module, model: nn.Module, x: torch.Tensor) -> None:
    torch.testing.assert_close(outputs(module, x), outputs(model, x), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# Architectures whose units a correlation matcher can tell apart
# ---------------------------------------------------------------------------------------------
# A matcher that compares activations cannot tell apart units that are constant on the
# calibration data (a ReLU unit dead on every input has correlation 0 with everything, its own
# copy included), nor the two units of a width-2 LayerNorm (always perfectly anti-correlated).
# archgen's widths start at 2 and several of its blocks end in ReLU, so merge(A, π(A)) is only
# checked on the families below: widths >= 6 and activations that are alive on both signs.
# Dead units are pinned separately (test_zip_keeps_constant_units_apart).
SMOOTH = st.sampled_from(["gelu", "tanh", "silu", "leaky_relu"])
WIDE = st.integers(min_value=6, max_value=10)


class SmoothResidualConv(archgen.ResidualConv):
    """x + bn2(conv2(gelu(bn1(conv1(x))))): a ResNet basic block without dead units."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn2(self.conv2(F.gelu(self.bn1(self.conv1(x)))))


class SmoothFlattenHead(nn.Module):
    """flatten (C, H, W) -> Linear -> tanh -> Linear: the first Linear's input is tiled."""

    def __init__(self, width: int, positions: int, hidden: int, classes: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width * positions, hidden), nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(torch.flatten(x, 1))))


def _mlp(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    features, width, out = draw(st.integers(6, 8)), draw(WIDE), draw(WIDE)
    norm = draw(st.sampled_from(["batch", "layer", "none"]))
    blocks: list[nn.Module] = [archgen.LinearAct(features, width, norm, draw(SMOOTH))]
    if draw(st.booleans()):
        blocks.append(archgen.ResidualLinear(width, draw(WIDE), draw(SMOOTH)))
    blocks.append(archgen.LinearAct(width, out, "none", draw(SMOOTH)))
    head = archgen.LinearHead(out, draw(st.integers(3, 5)))
    return archgen.Net(None, blocks, head), torch.zeros(2, features)


def _cnn(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    width, out = draw(WIDE), draw(WIDE)
    stem = archgen.ConvBN(3, width, 3, True, draw(SMOOTH))
    blocks: list[nn.Module] = [archgen.ConvBN(width, out, draw(st.sampled_from([1, 3])), True,
                                              draw(SMOOTH))]
    if draw(st.booleans()):  # DenseNet layer: the stream becomes a concatenation
        growth = draw(st.integers(3, 4))
        blocks.append(archgen.DenseLayer(out, growth))
        out += growth
    size = 6
    if draw(st.booleans()):
        blocks.append(archgen.Pool(draw(st.sampled_from(["max", "avg"]))))
        size = 3
    classes = draw(st.integers(3, 5))
    head = SmoothFlattenHead(out, size * size, draw(WIDE), classes) if draw(st.booleans()) \
        else archgen.PoolHead(out, classes, draw(st.booleans()))
    return archgen.Net(stem, blocks, head), torch.zeros(2, 3, 6, 6)


def _residual(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    width = draw(WIDE)
    stem = archgen.ConvBN(3, width, 3, True, draw(SMOOTH))
    blocks = [SmoothResidualConv(width, draw(WIDE)) for _ in range(draw(st.integers(1, 2)))]
    return archgen.Net(stem, blocks, archgen.PoolHead(width, 3, False)), torch.zeros(2, 3, 6, 6)


def _attention(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    width = draw(st.sampled_from([8, 12]))
    heads = draw(st.sampled_from([h for h in (1, 2, 4) if width // h >= 2]))
    features, tokens = draw(st.integers(4, 6)), draw(st.integers(3, 5))
    class_token = draw(st.booleans())
    stem = archgen.Embed(features, width, tokens, draw(st.booleans()), class_token)
    if draw(st.booleans()):
        # qkv="index" (reshape to (3, heads, head_dim), then select) is left out here: see
        # test_fused_qkv_reshaped_to_heads_recovers_a_permutation
        attention: nn.Module = archgen.AttentionBlock(
            width, heads, draw(st.sampled_from(["separate", "chunk", "split"])),
            draw(st.sampled_from(["sdpa", "explicit"])), draw(st.booleans()),
            draw(st.booleans()))
    else:
        attention = archgen.MultiheadAttentionBlock(width, heads)
    blocks = [attention, archgen.MLPBlock(width, draw(WIDE), draw(SMOOTH), draw(st.booleans()))]
    return archgen.Net(stem, blocks, archgen.TokenHead(width, 3, class_token)), \
        torch.zeros(2, tokens, features)


def _group_norm(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    width, out, groups = draw(WIDE), draw(st.sampled_from([8, 12])), draw(st.sampled_from([2, 4]))
    stem = archgen.ConvBN(3, width, 3, draw(st.booleans()), draw(SMOOTH))
    blocks = [archgen.GroupNormBlock(width, out, groups, draw(SMOOTH))]
    return archgen.Net(stem, blocks, archgen.PoolHead(out, 3, True)), torch.zeros(2, 3, 6, 6)


_BUILDERS = {"mlp": _mlp, "cnn": _cnn, "residual": _residual, "attention": _attention,
             "group_norm": _group_norm}


@st.composite
def distinct_unit_models(draw: st.DrawFn, family: str) -> tuple[nn.Module, torch.Tensor, int]:
    """(model in eval mode with random weights and norm statistics, example input, seed)."""
    model, example = _BUILDERS[family](draw)
    seed = draw(st.integers(0, 2**16))
    archgen.randomize_(model, seed)
    return model.eval(), example, seed


def mlp(width: int = 12, seed: int = 0) -> nn.Module:
    """A fixed MLP with distinct units: 6 inputs, two tanh hidden layers, 4 outputs."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, width), nn.GELU(),
                         nn.Linear(width, 4)).eval()


def cnn(width: int = 8, seed: int = 0) -> nn.Module:
    """A fixed CNN with BatchNorm and distinct units for 8x8 inputs (digits_cnn's layout with
    smooth activations, so no channel is dead), random BatchNorm statistics and affines."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.GELU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
        nn.Tanh(), nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
        nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))
    return archgen.randomize_(model, seed).eval()


# ---------------------------------------------------------------------------------------------
# Invariant 2: merge(A, A) computes A; merge(A, π(A)) computes A
# ---------------------------------------------------------------------------------------------
def has_uneven_grouped_conv(model: nn.Module) -> bool:
    """A grouped (not depthwise) conv whose input and output widths differ: see
    test_grouped_conv_changing_width_merges."""
    return any(isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels
               and m.in_channels != m.out_channels for m in model.modules())


@pytest.mark.parametrize("method", ["average", "weight-match", "mudsc"])
@archgen.budget(5)
@given(case=archgen.cases())
def test_merging_any_architecture_with_itself_computes_it(method: str, case: archgen.Case
                                                          ) -> None:
    """Over every archgen family (dead and constant units included), for the methods that do not
    need activations to tell units apart."""
    assume(not has_uneven_grouped_conv(case.model))
    (example,) = case.inputs
    x = archgen.random_like(example, 96, seed=1)
    result = merged(case.model, case.model, example, calibration_of(x), method=method)
    assert_computes(result.module, case.model, x)


@pytest.mark.parametrize("family", FAMILIES)
@archgen.budget(2)
@given(drawn=st.data())
def test_merge_recovers_a_model_from_itself_and_from_a_permuted_twin(family: str,
                                                                     drawn: st.DataObject) -> None:
    model, example, seed = drawn.draw(distinct_unit_models(family))
    x = archgen.random_like(example, 128, seed=seed)
    x_test = archgen.random_like(example, 32, seed=seed + 1)
    for method in ALL_METHODS:
        result = merged(model, model, example, calibration_of(x), method=method)
        assert_computes(result.module, model, x_test)
    twin = mergec.permute(model, example, seed=seed)
    assert_computes(twin, model, x_test)
    for method in RECOVERING_METHODS:
        result = merged(model, twin, example, calibration_of(x), method=method)
        assert_computes(result.module, model, x_test)


def test_permuted_twin_differs_from_the_model() -> None:
    """The twins above are real permutations: their weights differ from the model's."""
    model = mlp()
    twin = mergec.permute(model, torch.zeros(2, 6), seed=1)
    assert not torch.equal(twin[0].weight, model[0].weight)
    assert_computes(twin, model, torch.randn(16, 6))


# ---------------------------------------------------------------------------------------------
# Invariant 3: merge(A, B) and merge(B, A) compute the same function
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["permute", "zip"])
@pytest.mark.parametrize("architecture", ["mlp", "cnn"])
def test_merge_is_symmetric(architecture: str, method: str) -> None:
    if architecture == "mlp":
        model_a, model_b, example = mlp(seed=0), mlp(seed=1), torch.zeros(2, 6)
    else:
        model_a, model_b, example = cnn(seed=0), cnn(seed=1), torch.zeros(2, 1, 8, 8)
    x = archgen.random_like(example, 256, seed=2)
    x_test = archgen.random_like(example, 64, seed=3)
    forward = merged(model_a, model_b, example, calibration_of(x), method=method)
    backward = merged(model_b, model_a, example, calibration_of(x), method=method)
    torch.testing.assert_close(outputs(forward.module, x_test), outputs(backward.module, x_test),
                               rtol=1e-4, atol=1e-5)
    # and the merge did something: it is neither parent
    assert not torch.allclose(outputs(forward.module, x_test), outputs(model_a, x_test))


def test_symmetric_with_batch_norm_reset() -> None:
    model_a, model_b, example = cnn(seed=0), cnn(seed=1), torch.zeros(2, 1, 8, 8)
    x = archgen.random_like(example, 256, seed=2)
    forward = merged(model_a, model_b, example, calibration_of(x), method="zip", repair="reset")
    backward = merged(model_b, model_a, example, calibration_of(x), method="zip", repair="reset")
    torch.testing.assert_close(outputs(forward.module, x), outputs(backward.module, x),
                               rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Invariant 4: the emitted graph lints, saves, loads and runs without mergec
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@archgen.budget(1)
@given(drawn=st.data())
def test_save_load_round_trip(family: str, drawn: st.DataObject, tmp_path_factory) -> None:
    model_a, example, seed = drawn.draw(distinct_unit_models(family))
    model_b = perturbed(model_a, seed)
    x = archgen.random_like(example, 64, seed=seed)
    result = merged(model_a, model_b, example, calibration_of(x), method="zip", repair="reset")
    folder = result.save(tmp_path_factory.mktemp(family) / "merged")
    assert {p.name for p in folder.iterdir()} >= {"model.py", "weights.safetensors"}
    loaded = mergec.load(folder)
    torch.testing.assert_close(outputs(loaded, x), outputs(result.module, x))


def perturbed(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every float parameter and buffer moved by random noise (variances
    kept positive): a second model of the same architecture."""
    twin = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in list(twin.named_parameters()) + list(twin.named_buffers()):
            if tensor.is_floating_point():
                tensor.add_(0.3 * torch.randn(tensor.shape, generator=generator))
                if name.endswith("running_var"):
                    tensor.abs_().add_(0.1)
    return twin


@pytest.fixture(scope="module")
def saved_cnn(tmp_path_factory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A merged BN CNN saved to disk, with inputs and the merged module's outputs."""
    model_a, model_b, example = cnn(seed=0), cnn(seed=1), torch.zeros(2, 1, 8, 8)
    x = archgen.random_like(example, 128, seed=4)
    result = merged(model_a, model_b, example, calibration_of(x), method="zip", repair="reset")
    folder = result.save(tmp_path_factory.mktemp("saved") / "merged")
    return folder, x, outputs(result.module, x)


def test_saved_model_runs_without_mergec(saved_cnn, tmp_path: Path) -> None:
    """model.py needs torch and safetensors only: run it in a fresh interpreter where
    ``import mergec`` fails, from a folder outside the repository, with no PYTHONPATH."""
    folder, x, expected = saved_cnn
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import importlib.util, sys
        sys.modules["mergec"] = None  # any import of mergec now raises ImportError
        import torch
        spec = importlib.util.spec_from_file_location("merged_model", {str(folder / "model.py")!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        net = module.load()
        with torch.no_grad():
            torch.save(net(torch.load({str(tmp_path / "x.pt")!r})), {str(tmp_path / "y.pt")!r})
        assert not any(name.startswith("mergec") and sys.modules[name] is not None
                       for name in sys.modules), sorted(sys.modules)
        print("ran without mergec")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ran without mergec" in done.stdout
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected)


def test_loaded_model_is_a_plain_module(saved_cnn) -> None:
    folder, x, expected = saved_cnn
    loaded = mergec.load(folder)
    assert isinstance(loaded, nn.Module) and not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(outputs(loaded, x), expected)
    torch.testing.assert_close(outputs(loaded, x[:5]), expected[:5])  # any batch size


def test_merged_module_runs_under_torch_compile() -> None:
    model_a, model_b, example = cnn(seed=0), cnn(seed=1), torch.zeros(2, 1, 8, 8)
    x = archgen.random_like(example, 64, seed=5)
    result = merged(model_a, model_b, example, calibration_of(x), method="zip")
    compiled = torch.compile(result.module, backend="aot_eager")
    torch.testing.assert_close(outputs(compiled, x), outputs(result.module, x))


@pytest.mark.slow
def test_merged_module_runs_under_torch_compile_inductor() -> None:
    model_a, model_b, example = cnn(seed=0), cnn(seed=1), torch.zeros(2, 1, 8, 8)
    x = archgen.random_like(example, 64, seed=5)
    result = merged(model_a, model_b, example, calibration_of(x), method="zip")
    compiled = torch.compile(result.module)
    torch.testing.assert_close(outputs(compiled, x), outputs(result.module, x),
                               rtol=1e-4, atol=1e-5)


def test_report_describes_the_merge(tmp_path: Path) -> None:
    model_a, model_b, example = cnn(seed=0), cnn(seed=1), torch.zeros(2, 1, 8, 8)
    x = archgen.random_like(example, 64, seed=6)
    result = merged(model_a, model_b, example, calibration_of(x), method="permute")
    report = json.loads(result.report.to_json())
    assert report["method"] == "permute"
    assert {"trace", "annotate-units", "collect-stats", "match", "zip"} <= set(
        result.report.timings)
    matched = {space: entry for space, entry in report["spaces"].items() if "width" in entry}
    assert matched and all(entry["width"] == entry["size"] for entry in matched.values())
    written = result.report.plot(tmp_path / "plots")
    assert written and all(Path(path).is_file() for path in written)


# ---------------------------------------------------------------------------------------------
# BatchNorm reset
# ---------------------------------------------------------------------------------------------
def test_batch_norm_reset_gives_the_merged_models_batch_statistics() -> None:
    """After repair="reset" the running statistics of every BatchNorm are what training-mode
    BatchNorm with momentum=None (a plain average over batches) records for the merged weights
    on the calibration data."""
    model_a, model_b, example = cnn(seed=0), cnn(seed=1), torch.zeros(2, 1, 8, 8)
    x = archgen.random_like(example, 192, seed=7)
    calibration = calibration_of(x, batch=64)
    result = merged(model_a, model_b, example, calibration, method="zip", repair="reset")
    state = result.module.state_dict()
    reference = cnn(seed=0)
    reference.load_state_dict({key: state[key] for key in reference.state_dict()})
    norms = [m for m in reference.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    reference.train()
    with torch.no_grad():
        for (batch,) in calibration:
            reference(batch)
    names = [name for name, m in reference.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(names) == 3
    for name, norm in zip(names, norms):
        torch.testing.assert_close(state[f"{name}.running_mean"], norm.running_mean,
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(state[f"{name}.running_var"], norm.running_var,
                                   rtol=1e-4, atol=1e-5)
    # the reset changed something: the merged weights' statistics are not the parents' average
    without = merged(model_a, model_b, example, calibration, method="zip", repair=None)
    assert not torch.allclose(without.module.state_dict()[f"{names[0]}.running_var"],
                              state[f"{names[0]}.running_var"])
    assert result.report.repair.get("batch_norms_reset") == 3


# ---------------------------------------------------------------------------------------------
# Errors a user meets
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair() -> tuple[nn.Module, nn.Module, torch.Tensor, list[tuple[torch.Tensor]]]:
    model_a, model_b, example = cnn(seed=0), cnn(seed=1), torch.zeros(2, 1, 8, 8)
    return model_a, model_b, example, calibration_of(archgen.random_like(example, 64, seed=8))


@pytest.mark.parametrize(("calibration", "message"), [
    ([(torch.randn(8, 1, 9, 9),)], r"calibration batch 0 has shape \(8, 1, 9, 9\)"),
    ([(torch.randn(8, 1, 8, 8, dtype=torch.float64),)], r"dtype torch\.float64"),
    ([(torch.randn(8, 1, 8, 8), torch.zeros(8))], r"batch 0 has 2 inputs, the model takes 1"),
    ([("not a tensor",)], r"is a str, not a tensor"),
    ([], r"calibration data is empty"),
], ids=["shape", "dtype", "arity", "type", "empty"])
def test_bad_calibration_is_refused(pair, calibration: list, message: str) -> None:
    model_a, model_b, example, _ = pair
    with pytest.raises(MergeError, match=message):
        mergec.merge(model_a, model_b, example, calibration, progress=False)


def test_a_bad_batch_after_good_ones_is_named(pair) -> None:
    model_a, model_b, example, calibration = pair
    bad = calibration + [(torch.randn(8, 1, 4, 4),)]
    with pytest.raises(MergeError, match=rf"calibration batch {len(calibration)} "):
        mergec.merge(model_a, model_b, example, bad, progress=False)


@pytest.mark.parametrize(("options", "message"), [
    ({"method": "ties"}, r"unknown method 'ties'"),
    ({"alpha": 1.5}, r"alpha must be in \[0, 1\], got 1\.5"),
    ({"alpha": -0.1}, r"alpha must be in \[0, 1\]"),
    ({"beta": 2.0}, r"beta must be in \[0, 1\]"),
    ({"repair": "fix"}, r"repair must be"),
], ids=["method", "alpha-high", "alpha-low", "beta", "repair"])
def test_bad_options_are_refused(pair, options: dict, message: str) -> None:
    model_a, model_b, example, calibration = pair
    with pytest.raises(MergeError, match=message):
        mergec.merge(model_a, model_b, example, calibration, progress=False, **options)


def test_mlps_of_different_depth_merge_into_the_deeper_one() -> None:
    model_a = zoo.digits_mlp(width=16, depth=2)
    model_b = zoo.digits_mlp(width=16, depth=3)
    x = torch.randn(32, 1, 8, 8)
    result = mergec.merge(model_a, model_b, x[:2], [(x,)], progress=False)
    assert set(result.module.state_dict()) == set(model_b.state_dict())
    assert len(result.report.depth.padded_paths) >= 1


def test_an_mlp_and_a_cnn_do_not_correspond() -> None:
    x = torch.randn(32, 1, 8, 8)
    with pytest.raises(MergeError, match=r"do not correspond"):
        mergec.merge(zoo.digits_mlp(width=16), zoo.digits_cnn(width=4), x[:2], [(x,)],
                     progress=False)


@pytest.mark.parametrize("method", ["permute", "weight-match", "average"])
def test_models_of_different_width_need_zip(method: str) -> None:
    model_a, model_b = zoo.digits_mlp(width=16), zoo.digits_mlp(width=24)
    x = torch.randn(32, 1, 8, 8)
    with pytest.raises(MergeError, match=r"widths differ.*only method 'zip'"):
        mergec.merge(model_a, model_b, x[:2], [(x,)], method=method, progress=False)


def test_saving_into_an_existing_folder_is_refused(saved_cnn) -> None:
    folder, _, _ = saved_cnn
    before = sorted(p.name for p in folder.iterdir())
    model_a, model_b, example = cnn(seed=0), cnn(seed=1), torch.zeros(2, 1, 8, 8)
    result = merged(model_a, model_b, example, [(archgen.random_like(example, 16, seed=9),)],
                    method="average")
    with pytest.raises(MergeError, match=r"already exists"):
        result.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".merged")]


def test_loading_a_folder_that_is_no_saved_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(mergec.CheckpointError, match=r"is not a saved mergec model"):
        mergec.load(tmp_path)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_merge_does_not_modify_its_inputs(pair, method: str) -> None:
    model_a, model_b, example, calibration = pair
    model_b.train()  # a model in training mode stays in training mode
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (model_a, model_b)]
    batches = [tuple(t.clone() for t in batch) for batch in calibration]
    try:
        mergec.merge(model_a, model_b, example, calibration, method=method, progress=False)
    finally:
        training = model_b.training
        model_b.eval()
    assert training and not model_a.training
    for model, state in zip((model_a, model_b), before):
        assert model.state_dict().keys() == state.keys()
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), key
    for batch, kept in zip(calibration, batches):
        assert all(torch.equal(t, c) for t, c in zip(batch, kept))


# ---------------------------------------------------------------------------------------------
# Cases that once failed: fused qkv cut into heads, uneven grouped convs, constant units
# ---------------------------------------------------------------------------------------------
class FusedQKVAttention(nn.Module):
    """timm's ViT attention: one qkv Linear reshaped to (B, N, 3, heads, head_dim), permuted to
    (3, B, heads, N, head_dim) and cut by ``unbind`` or by indexing."""

    def __init__(self, dim: int = 12, heads: int = 4, unbind: bool = True):
        super().__init__()
        self.heads, self.unbind = heads, unbind
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0) if self.unbind else (qkv[0], qkv[1], qkv[2])
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(y)


@pytest.mark.parametrize("method", ["permute", "zip"])
@pytest.mark.parametrize("unbind", [True, False], ids=["unbind", "select"])
def test_fused_qkv_reshaped_to_heads_recovers_a_permutation(unbind: bool, method: str) -> None:
    torch.manual_seed(0)
    model = FusedQKVAttention(unbind=unbind).eval()
    x = torch.randn(128, 4, 12)
    twin = mergec.permute(model, x[:2], seed=1)
    assert_computes(twin, model, x)
    result = merged(model, twin, x[:2], calibration_of(x), method=method)
    assert_computes(result.module, model, x)


def test_fused_qkv_reshaped_to_heads_merges_with_weight_matching() -> None:
    """The same models merge exactly with weight matching too."""
    torch.manual_seed(0)
    model = FusedQKVAttention(unbind=True).eval()
    x = torch.randn(128, 4, 12)
    twin = mergec.permute(model, x[:2], seed=1)
    result = merged(model, twin, x[:2], calibration_of(x), method="weight-match")
    assert_computes(result.module, model, x)


@pytest.mark.parametrize("method", ["permute", "zip", "weight-match", "mudsc"])
def test_grouped_conv_changing_width_merges(method: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.Tanh(), nn.Conv2d(6, 4, 3, padding=1, groups=2),
                          nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    x = torch.randn(32, 3, 6, 6)
    result = merged(model, model, x[:2], [(x,)], method=method)
    assert_computes(result.module, model, x)


def test_zip_keeps_constant_units_apart() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():  # units 0-3 are constant: 0, 0 (dead), 1 and 2
        model[0].weight[:4] = 0
        model[0].bias[:4] = torch.tensor([-1.0, -2.0, 1.0, 2.0])
    x = torch.randn(256, 4)
    result = merged(model, model, x[:2], [(x,)], method="zip")
    assert_computes(result.module, model, x)


# ---------------------------------------------------------------------------------------------
# The digits demo numbers
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_matching_beats_averaging_on_disjoint_digit_tasks() -> None:
    """Two digits CNNs trained on classes 0-4 and 5-9: zip and permute merges beat plain
    averaging on joint accuracy (argmax over all 10 logits, whole test set)."""
    x, y = datasets.digits("train")
    x_test, y_test = datasets.digits("test")
    models = []
    for index, classes in enumerate((range(0, 5), range(5, 10))):
        x_task, y_task = datasets.class_subset(x, y, classes)
        torch.manual_seed(index)
        models.append(training.train(zoo.digits_cnn(width=16), x_task, y_task, epochs=20,
                                     seed=index, device="cpu", progress=False))
    model_a, model_b = models
    for model, classes in zip(models, (range(0, 5), range(5, 10))):
        assert training.evaluate(model, *datasets.class_subset(x_test, y_test, classes)) > 0.9
    calibration = [(batch,) for batch in x.split(128)]
    joint = {}
    for method in ("average", "permute", "zip"):
        result = mergec.merge(model_a, model_b, x[:8], calibration, method=method,
                              progress=False)
        predictions = outputs(result.module, x_test).argmax(-1)
        joint[method] = (predictions == y_test).float().mean().item()
    assert joint["zip"] > joint["average"] + 0.1, joint
    assert joint["permute"] > joint["average"] + 0.1, joint


@pytest.mark.parametrize("method", ["zip", "weight-match", "mudsc"])
def test_a_plan_too_large_to_be_dense_merges_as_the_dense_one(method: str, monkeypatch) -> None:
    """vgg's flatten into a 25,088-wide classifier is a tiled space whose dense plan would be
    5 GB per matrix; above blocks.SPARSE_PLAN_ENTRIES the plan is sparse, with the same
    merge."""
    torch.manual_seed(0)
    model_a, model_b = (nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 3),
                                      nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 12),
                                      nn.ReLU(), nn.Linear(12, 4)).eval() for _ in range(2))
    example = torch.zeros(2, 1, 8, 8)
    x = archgen.random_like(example, 64, seed=3)
    dense = merged(model_a, model_b, example, calibration_of(x), method=method, repair=None)
    monkeypatch.setattr(algorithm_blocks, "SPARSE_PLAN_ENTRIES", 100)
    sparse = merged(model_a, model_b, example, calibration_of(x), method=method, repair=None)
    for key, value in dense.module.state_dict().items():
        torch.testing.assert_close(sparse.module.state_dict()[key], value, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(sparse.module(x), dense.module(x))


@pytest.mark.parametrize("width", ["min", "max", "sum"])
def test_the_batch_norm_reset_follows_the_merged_width(width: str) -> None:
    model_a, model_b = cnn(width=4, seed=0), cnn(width=8, seed=1)
    example = torch.zeros(2, 1, 8, 8)
    x = archgen.random_like(example, 128, seed=5)
    result = mergec.merge(model_a, model_b, example, calibration_of(x), method="zip",
                          width=width, repair="reset", progress=False)
    expected = {"min": 4, "max": 8, "sum": 12}[width]
    state = result.module.state_dict()
    assert state["1.running_mean"].shape == (expected,)
    assert result.report.repair["batch_norms_reset"] == 3
    features = F.conv2d(x, state["0.weight"], padding=1)  # what the first BatchNorm sees
    torch.testing.assert_close(state["1.running_mean"], features.mean(dim=(0, 2, 3)),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("models", [2, 3])
def test_an_entry_bound_along_several_output_axes_is_averaged_once(models: int) -> None:
    """A mixture of experts' (experts, out, in) weight is bound along all three axes, none of
    them consumed: the merge averages it once, not once per axis (which left a quarter of the
    weight, and Mixtral merged with itself computed another function)."""
    weight = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(0))
    bindings = [Binding("w", 0, "experts", "elementwise"), Binding("w", 1, "out", "produces"),
                Binding("w", 2, "in", "elementwise")]
    sizes = {"experts": 4, "out": 6, "in": 5}
    plans = {space: average(n) if models == 2 else ManyPlan.average(n, models)
             for space, n in sizes.items()}
    tensors = tuple(weight * (m + 1) for m in range(models))
    expected = weight * (models + 1) / 2
    torch.testing.assert_close(merge_entry(tensors, bindings, plans), expected)


def test_a_merged_transformer_moves_with_to(tmp_path: Path) -> None:
    """The merged graph's tensor factories read the device of its weights when it runs: the
    module, and the saved code loaded back, run wherever ``.to(device)`` puts them."""
    import transformers

    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=50,
                                     max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(1))
    twin = mergec.permute(model, (ids[:2],), seed=1)
    result = mergec.merge(model, twin, (ids[:2],), [(ids,)], method="permute", repair=None,
                          progress=False)
    assert_computes(lambda x: result.module(x).last_hidden_state, lambda x: model(x)[0], ids)
    result.save(tmp_path / "merged")
    for module in (copy.deepcopy(result.module), mergec.load(tmp_path / "merged")):
        output = module.to("meta")(ids.to("meta"))
        assert output[0].device.type == "meta" and output[0].shape == (4, 8, 32)
