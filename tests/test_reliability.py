"""Trust: every bad input of the catalogue (tests/faults.py) meets its error, and nothing the
user hands mergec is changed or lost; merges repeat exactly; checkpoints never run code;
float16 and bfloat16 models merge in their own dtype."""
from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import archgen
import faults
import mergec
from mergec.cli import main
from mergec_lab import zoo

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("fault", faults.FAULTS, ids=lambda fault: fault.name)
def test_a_bad_input_meets_its_error(fault: faults.Fault, tmp_path: Path) -> None:
    if not fault.applies():
        pytest.skip("this machine cannot show it")
    if fault.cli:
        seen = faults.see(fault, tmp_path)
        assert seen.kind == "exit 1" and not seen.traceback, seen
        assert seen.message and re.search(fault.message, seen.message), seen
    else:
        with pytest.raises(fault.error, match=fault.message):
            fault.act(tmp_path)
    assert not (tmp_path / faults.MARKER).exists(), "a checkpoint ran code"


def test_the_malicious_pickle_would_run_code(tmp_path: Path) -> None:
    """The catalogue's malicious checkpoint is real: an unrestricted load runs its code."""
    path = faults.malicious_checkpoint(tmp_path)
    torch.load(path, weights_only=False)
    assert (tmp_path / faults.MARKER).read_text() == "unpickled"


def test_a_folder_the_user_owns_survives_a_refused_force(tmp_path: Path) -> None:
    fault = next(f for f in faults.FAULTS if f.name == "cli-force-foreign")
    faults.see(fault, tmp_path)
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"


def _merge_twice(**options) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model_a, model_b = zoo.resnet20(width=0.5, depth=8), zoo.resnet20(width=0.5, depth=8)
    x = torch.randn(96, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    calibration = [(part,) for part in x.split(32)]
    results = [mergec.merge(model_a, model_b, x[:2], calibration, progress=False, **options)
               for _ in range(2)]
    return tuple(r.module.state_dict() for r in results)


@pytest.mark.parametrize(("method", "extra"), [
    ("zip", {"samples_per_batch": 50}), ("permute", {}), ("mudsc", {}),
    ("weight-match", {}), ("zip", {"repair": "repair"})], ids=["zip-sampled", "permute", "mudsc",
                                                               "weight-match", "zip-repair"])
def test_the_same_merge_twice_gives_bit_identical_weights(method: str, extra: dict) -> None:
    first, second = _merge_twice(method=method, **extra)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_a_merge_reruns_from_its_report(tmp_path: Path) -> None:
    path_a, path_b, inputs = faults._checkpoints(tmp_path)
    argv = ["merge", path_a, path_b, "--model", "mergec_lab.zoo:digits_cnn", "--kwargs",
            '{"width": 4}', "--calibration", inputs, "--batch-size", "16", "--quiet",
            "--samples-per-batch", "40", "--seed", "3", "-o", str(tmp_path / "first")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "first" / "report.json").read_text())
    assert report["options"]["seed"] == 3 and report["versions"]["torch"] == torch.__version__
    assert report["inputs"]["arguments"]["batch_size"] == 16
    os.chdir(tmp_path.parent)  # the recorded paths are absolute
    assert main(["merge", "--from-report", str(tmp_path / "first" / "report.json"), "--quiet",
                 "-o", str(tmp_path / "again")]) == 0
    first, again = (load_file(str(tmp_path / name / "weights.safetensors"))
                    for name in ("first", "again"))
    assert first.keys() == again.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)


def test_from_report_takes_no_other_merge_arguments(tmp_path: Path, capsys) -> None:
    (tmp_path / "r.json").write_text("{}")
    assert main(["merge", "--from-report", str(tmp_path / "r.json"), "--method", "permute",
                 "-o", str(tmp_path / "out")]) == 1
    assert "drop --method" in capsys.readouterr().err


def test_force_replaces_a_saved_result(tmp_path: Path) -> None:
    path_a, path_b, inputs = faults._checkpoints(tmp_path)
    base = ["merge", path_a, path_b, "--model", "mergec_lab.zoo:digits_cnn", "--kwargs",
            '{"width": 4}', "--calibration", inputs, "--quiet", "-o", str(tmp_path / "out")]
    assert main([*base, "--method", "average"]) == 0
    assert main([*base, "--method", "permute", "--force"]) == 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["method"] == "permute"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


_SLOW_SAVE = textwrap.dedent("""
    import sys, time
    import torch, safetensors.torch
    import mergec
    from mergec_lab import zoo
    write = safetensors.torch.save_file
    def slow(*args, **kwargs):
        write(*args, **kwargs)
        print("writing", flush=True)
        time.sleep(60)
    safetensors.torch.save_file = slow
    import mergec.export
    mergec.export.save_file = slow
    torch.manual_seed(0)
    a, b = zoo.digits_cnn(width=4), zoo.digits_cnn(width=4)
    x = torch.randn(32, 1, 8, 8)
    result = mergec.merge(a, b, x[:2], [(x,)], progress=False, repair=None)
    result.save(sys.argv[1], overwrite=True)
""")


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
def test_a_save_killed_halfway_leaves_no_half_written_result(tmp_path: Path,
                                                             existing: bool) -> None:
    output = tmp_path / "merged"
    if existing:
        torch.manual_seed(1)
        model = zoo.digits_cnn(width=4)
        x = torch.randn(16, 1, 8, 8)
        mergec.merge(model, copy.deepcopy(model), x[:2], [(x,)], progress=False,
                     method="average", repair=None).save(output)
        before = load_file(str(output / "weights.safetensors"))
    child = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(output)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        time.sleep(0.2)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    if existing:  # the old result is whole and unchanged
        after = load_file(str(output / "weights.safetensors"))
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert mergec.load(output) is not None
    else:
        assert not output.exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", ["zip", "permute", "weight-match", "mudsc"])
def test_half_precision_models_merge_in_their_dtype(dtype: torch.dtype, method: str) -> None:
    """Statistics in float64, the result in the parents' dtype; merging a model with a
    permuted twin gives the model back, up to the dtype's rounding."""
    torch.manual_seed(0)
    x = torch.randn(64, 1, 28, 28)
    model = archgen.randomize_(zoo.resnet20(width=0.5, depth=8), 0).eval()
    twin = mergec.permute(model, x[:2])
    model, twin = model.to(dtype), twin.to(dtype)
    seen = []
    result = mergec.merge(model, twin, x[:2].to(dtype), [(x.to(dtype),)], method=method,
                          repair=None, progress=False,
                          callback=lambda name, state: seen.append(state.moments))
    assert all(m.sum.dtype == torch.float64 for m in seen[-1].values())
    floating = [v for v in result.module.state_dict().values() if v.is_floating_point()]
    assert floating and all(v.dtype == dtype for v in floating)
    with torch.no_grad():
        reference, merged = model(x.to(dtype)).float(), result.module(x.to(dtype)).float()
    error = (merged - reference).norm() / reference.norm()
    assert error < (0.01 if dtype == torch.float16 else 0.05), float(error)


def test_a_model_in_training_mode_is_merged_in_eval_semantics() -> None:
    torch.manual_seed(0)
    model_a, model_b = zoo.resnet20(width=0.5, depth=8), zoo.resnet20(width=0.5, depth=8)
    x = torch.randn(64, 1, 28, 28)
    evaluated = mergec.merge(model_a.eval(), model_b.eval(), x[:2], [(x,)], progress=False)
    model_b.train()
    trained = mergec.merge(model_a, model_b, x[:2], [(x,)], progress=False)
    assert model_b.training and not model_a.training
    assert trained.report.notes and "model B was in training mode" in trained.report.notes[0]
    assert not evaluated.report.notes
    for key, value in evaluated.module.state_dict().items():
        assert torch.equal(value, trained.module.state_dict()[key]), key


@pytest.mark.parametrize("method", ["zip", "weight-match"])
def test_a_failed_merge_leaves_the_models_as_they_were(method: str) -> None:
    torch.manual_seed(0)
    model_a = zoo.resnet20(width=0.5, depth=8).train()
    model_b = zoo.resnet20(width=0.5, depth=8).eval()
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (model_a, model_b)]
    x = torch.randn(16, 1, 28, 28)
    bad = [(x,), (x * float("nan"),)]
    with pytest.raises(mergec.MergecError):
        mergec.merge(model_a, model_b, x[:2], bad, method=method, progress=False,
                     repair="reset")
    assert model_a.training and not model_b.training
    for model, state in zip((model_a, model_b), before):
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), key


def test_modules_that_read_state_dict_versions_permute_and_load(tmp_path: Path) -> None:
    """torchvision's MNASNet refuses a state dict without its version metadata, which
    safetensors and plain dicts do not carry: mergec supplies the model's own."""
    torchvision = pytest.importorskip("torchvision")
    from safetensors.torch import save_file

    from mergec.checkpoints import load_checkpoint, with_metadata

    torch.manual_seed(0)
    model = torchvision.models.mnasnet0_5().eval()
    x = torch.randn(2, 3, 64, 64)
    twin = mergec.permute(model, x)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=1e-4, atol=1e-5)
    save_file(twin.state_dict(), str(tmp_path / "twin.safetensors"))
    state = load_checkpoint(tmp_path / "twin.safetensors")
    with pytest.raises(ValueError, match="version should be set"):
        torchvision.models.mnasnet0_5().load_state_dict(state)
    fresh = torchvision.models.mnasnet0_5().eval()
    fresh.load_state_dict(with_metadata(state, fresh))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=1e-4, atol=1e-5)


def test_loading_a_result_never_unpickles(tmp_path: Path, monkeypatch) -> None:
    import pickle

    torch.manual_seed(0)
    model_a, model_b = zoo.digits_cnn(width=4), zoo.digits_cnn(width=4)
    x = torch.randn(16, 1, 8, 8)
    result = mergec.merge(model_a, model_b, x[:2], [(x,)], progress=False, repair=None)
    result.save(tmp_path / "merged")

    def refuse(*args, **kwargs):
        raise AssertionError("a result was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = mergec.load(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.module(x))
