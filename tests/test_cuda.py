"""The merge on a GPU: every pass runs on ``device="cuda"`` and gives the merge the CPU gives.

Every test here skips on a machine without CUDA. TF32 is switched off for the module (cuDNN
convolutions use it by default), so that the GPU's statistics differ from the CPU's by float32
rounding only and every matching decision is the same; the merged weights are then compared
with the CPU merge's at float32 tolerances.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import mergec
from mergec_lab import zoo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

METHODS = ("average", "permute", "zip", "weight-match", "mudsc")


@pytest.fixture(autouse=True)
def exact_float32():
    """No TF32 in matrix products and convolutions while a test runs."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _resnets() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    pair = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        pair.append(zoo.resnet20(1).eval())
    x = torch.randn(96, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    return pair[0], pair[1], x


def _batches(x: torch.Tensor, size: int = 32) -> list[tuple[torch.Tensor]]:
    return [(part,) for part in x.split(size)]


def _on_cuda(module: nn.Module) -> bool:
    return all(t.device.type == "cuda" for t in module.state_dict().values())


def _assert_same_weights(gpu: nn.Module, cpu: nn.Module) -> None:
    expected = cpu.state_dict()
    for key, value in gpu.state_dict().items():
        torch.testing.assert_close(value.cpu(), expected[key], rtol=1e-4, atol=1e-5,
                                   msg=lambda text, key=key: f"{key}: {text}")


@pytest.mark.parametrize("method", METHODS)
def test_a_merge_on_the_gpu_gives_the_cpu_merge(method: str) -> None:
    model_a, model_b, x = _resnets()
    options = dict(method=method, repair="reset", progress=False)
    cpu = mergec.merge(model_a, model_b, x[:2], _batches(x), **options)
    gpu = mergec.merge(model_a, model_b, x[:2], _batches(x), device="cuda", **options)
    assert _on_cuda(gpu.module)
    _assert_same_weights(gpu.module, cpu.module)
    assert gpu.report.options["device"] == "cuda"
    with torch.no_grad():
        torch.testing.assert_close(gpu.module(x.cuda()).cpu(), cpu.module(x),
                                   rtol=1e-3, atol=1e-4)


def test_models_on_the_gpu_are_merged_there_and_stay_where_they_were() -> None:
    model_a, model_b, x = _resnets()
    cpu = mergec.merge(model_a, model_b, x[:2], _batches(x), repair="repair", progress=False)
    model_a, model_b = model_a.cuda(), model_b.cuda()
    before = copy.deepcopy(model_a.state_dict())
    batches = _batches(x.cuda())
    gpu = mergec.merge(model_a, model_b, x[:2].cuda(), batches, repair="repair", progress=False)
    assert gpu.report.options["device"] == "cuda:0"
    assert _on_cuda(gpu.module) and _on_cuda(model_a) and _on_cuda(model_b)
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, before[key]), key
    _assert_same_weights(gpu.module, cpu.module)


def test_a_permuted_transformer_is_recovered_on_the_gpu() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=100,
                                     max_position_embeddings=64, initializer_range=0.2)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (32, 16), generator=torch.Generator().manual_seed(1))
    twin = mergec.permute(model, (ids[:2],), seed=3)
    for method in ("permute", "weight-match", "zip"):
        result = mergec.merge(model, twin, (ids[:2],), _batches(ids, 8), method=method,
                              repair=None, device="cuda", progress=False)
        assert _on_cuda(result.module)
        with torch.no_grad():
            got = result.module(ids.cuda())
            want = model(ids).last_hidden_state
        got = got["last_hidden_state"] if isinstance(got, dict) else got.last_hidden_state
        torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-3, msg=method)


def test_merge_many_and_a_depth_merge_run_on_the_gpu() -> None:
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(zoo.resnet20(1).eval())
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    cpu = mergec.merge_many(models, x[:2], _batches(x), progress=False)
    gpu = mergec.merge_many(models, x[:2], _batches(x), device="cuda", progress=False)
    assert _on_cuda(gpu.module)
    _assert_same_weights(gpu.module, cpu.module)
    torch.manual_seed(5)
    deeper = zoo.resnet20(1, depth=32).eval()
    result = mergec.merge(models[0], deeper, x[:2], _batches(x), device="cuda", progress=False)
    assert _on_cuda(result.module)
    with torch.no_grad():
        assert torch.isfinite(result.module(x.cuda())).all()


def test_the_command_line_merges_on_the_gpu(tmp_path: Path, capsys) -> None:
    from mergec.cli import main

    model_a, model_b, x = _resnets()
    paths = [tmp_path / "a.pt", tmp_path / "b.pt"]
    for model, path in zip((model_a, model_b), paths):
        torch.save(model.state_dict(), path)
    torch.save(x, tmp_path / "x.pt")
    code = main(["merge", *map(str, paths), "--model", "mergec_lab.zoo:resnet20",
                 "--calibration", str(tmp_path / "x.pt"), "--batch-size", "32",
                 "--device", "cuda", "--quiet", "-o", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["options"]["device"].startswith("cuda")
    merged = mergec.load(tmp_path / "out")
    with torch.no_grad():
        assert merged(x[:4]).shape == (4, 10)
