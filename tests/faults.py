"""A catalogue of the bad inputs a user can hand mergec, with the error each must meet.

Every :class:`Fault` is one thing a user does wrong, through the Python API or the command
line, and the :class:`~mergec.MergecError` subclass and message it must get. tests/
test_reliability.py checks every entry; benchmarks/reliability.py runs them all and writes the
table of what the user sees to docs/reliability.md.
"""
from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from torch import nn

import mergec
from mergec.checkpoints import calibration_batches, load_checkpoint
from mergec.cli import main
from mergec_lab import zoo

MARKER = "code-ran.txt"  # what the malicious pickle would write if it were ever unpickled


@dataclass(frozen=True)
class Fault:
    """``act(folder)`` does the wrong thing in a scratch ``folder``: through the API it raises;
    through the CLI (``cli=True``) it returns the argument list for ``mergec``."""

    name: str
    what: str  # what the user did, in a few words
    act: Callable[[Path], Any]
    error: type[mergec.MergecError]
    message: str  # a regex the message must contain
    cli: bool = False
    applies: Callable[[], bool] = lambda: True  # False where this machine cannot show it


@dataclass(frozen=True)
class Seen:
    """What a user saw: the error's class (or ``"exit N"`` from the CLI) and its message."""

    kind: str
    message: str
    traceback: bool = False


def see(fault: Fault, folder: Path) -> Seen:
    """Runs ``fault`` and returns what the user saw; an unexpected exception propagates."""
    if not fault.cli:
        try:
            fault.act(folder)
        except mergec.MergecError as error:
            return Seen(type(error).__name__, str(error))
        return Seen("no error", "")
    argv = fault.act(folder)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    text = err.getvalue().strip()
    return Seen(f"exit {code}", text.removeprefix("mergec: error: "), "Traceback" in text)


# -- models and data ----------------------------------------------------------------------------
def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return zoo.digits_cnn(width=4).eval()


X = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
EXAMPLE = X[:2]
CALIBRATION = [(X[:32],), (X[32:],)]


def _merge(model_a: nn.Module | None = None, model_b: nn.Module | None = None,
           example: Any = EXAMPLE, calibration: Any = CALIBRATION, **options: Any) -> Any:
    model_a = _cnn(0) if model_a is None else model_a
    model_b = _cnn(1) if model_b is None else model_b
    options.setdefault("repair", None)
    return mergec.merge(model_a, model_b, example, calibration, progress=False, **options)


class Branching(nn.Module):
    """A forward that branches on the data: torch.export cannot follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x.flatten(1))
        return y if x.sum() > 0 else -y


class RunsCode:
    """Unpickling it runs code (writes MARKER into a folder)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __reduce__(self):
        return (Path.write_text, (self.folder / MARKER, "unpickled"))


def malicious_checkpoint(folder: Path) -> Path:
    """A ``.pt`` file that runs code when an unrestricted ``torch.load`` reads it."""
    path = folder / "evil.pt"
    torch.save({"weight": RunsCode(folder)}, path)
    return path


def _with_nan(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    return model


def _truncated(folder: Path, suffix: str) -> Path:
    path = folder / f"cut{suffix}"
    state = _cnn(0).state_dict()
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _checkpoints(folder: Path) -> tuple[str, str, str]:
    """Checkpoints of two CNNs and a calibration file, for the CLI."""
    paths = folder / "a.safetensors", folder / "b.safetensors", folder / "x.safetensors"
    for seed, path in enumerate(paths[:2]):
        save_file(_cnn(seed).state_dict(), str(path))
    save_file({"inputs": X}, str(paths[2]))
    return tuple(str(p) for p in paths)


def _cli(folder: Path, *extra: str, a: str | None = None, calibration: str | None = None
         ) -> list[str]:
    path_a, path_b, inputs = _checkpoints(folder)
    return ["merge", a or path_a, path_b, "--model", "mergec_lab.zoo:digits_cnn",
            "--kwargs", '{"width": 4}', "--calibration", calibration or inputs, "--quiet",
            "--repair", "none", *extra]


def _existing_output(folder: Path) -> list[str]:
    (folder / "out").mkdir()
    (folder / "out" / "mine.txt").write_text("keep me")
    return _cli(folder, "-o", str(folder / "out"))


def _force_over_a_foreign_folder(folder: Path) -> list[str]:
    (folder / "out").mkdir()
    (folder / "out" / "mine.txt").write_text("keep me")
    return _cli(folder, "--force", "-o", str(folder / "out"))


def _changed_since_report(folder: Path) -> list[str]:
    argv = _cli(folder, "--dump", str(folder / "report.json"), "--stop-after", "match")
    assert main(argv) == 0
    save_file(_cnn(5).state_dict(), str(folder / "a.safetensors"))
    return ["merge", "--from-report", str(folder / "report.json"), "-o", str(folder / "out")]


def _corrupt_result(folder: Path) -> Any:
    result = _merge(method="average")
    result.save(folder / "merged")
    weights = folder / "merged" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return mergec.load(folder / "merged")


def _stop_around(folder: Path) -> Any:
    net = zoo.resnet20(width=0.5, depth=8)
    x = torch.randn(8, 1, 28, 28)
    return mergec.merge(net, copy.deepcopy(net), x[:2], [(x,)], stop_at="layer1.0.conv1",
                        progress=False, repair=None)


def _meta(model: nn.Module) -> nn.Module:
    return model.to("meta")


def _fault(name: str, what: str, act: Callable[[Path], Any], error: type, message: str,
           cli: bool = False, applies: Callable[[], bool] = lambda: True) -> Fault:
    return Fault(name, what, act, error, message, cli, applies)


TE, ME, CE = mergec.TraceError, mergec.MergeError, mergec.CheckpointError
FAULTS: tuple[Fault, ...] = (
    # models
    _fault("untraceable", "a model whose forward branches on the data",
           lambda f: _merge(Branching(), Branching(), calibration=[(X,)]), TE,
           r"could not export Branching.*data-dependent"),
    _fault("not-a-module", "a state dict passed as model B",
           lambda f: _merge(model_b=_cnn(1).state_dict()), ME, r"needs two torch.nn.Module"),
    _fault("no-correspondence", "an MLP and a CNN",
           lambda f: _merge(model_b=zoo.digits_mlp(width=16)), ME, r"do not correspond"),
    _fault("nan-weight", "a NaN in model B's first weight",
           lambda f: _merge(model_b=_with_nan(_cnn(1))), ME, r"model B's weight '0.weight'"),
    _fault("dtypes-differ", "model A in float32, model B in float64",
           lambda f: _merge(model_b=_cnn(1).double()), ME, r"float32 and model B's "
           r"torch.float64"),
    _fault("meta-weights", "model B built on the meta device, never loaded",
           lambda f: _merge(model_b=_meta(_cnn(1))), ME, r"meta device"),
    # example inputs
    _fault("example-shape", "example inputs with 3 channels for a 1-channel model",
           lambda f: _merge(example=torch.zeros(2, 3, 8, 8)), TE, r"expected input.*3 "
           r"channels.*example inputs"),
    _fault("example-dtype", "integer example inputs",
           lambda f: _merge(example=torch.zeros(2, 1, 8, 8, dtype=torch.long)), TE,
           r"Got: torch.int64"),
    _fault("example-device", "example inputs on another device than the models",
           lambda f: _merge(example=torch.zeros(2, 1, 8, 8, device="meta")), ME,
           r"example input 0 is on meta"),
    # calibration data
    _fault("calibration-empty", "an empty list of batches",
           lambda f: _merge(calibration=[]), ME, r"calibration data is empty"),
    _fault("calibration-tensor", "one tensor instead of batches",
           lambda f: _merge(calibration=X), ME, r"calibration is one tensor"),
    _fault("calibration-none", "None as calibration",
           lambda f: _merge(calibration=None), ME,
           r"must be an iterable of batches .*got NoneType"),
    _fault("calibration-shape", "a batch of 9×9 images for an 8×8 model",
           lambda f: _merge(calibration=[(torch.randn(8, 1, 9, 9),)]), ME,
           r"calibration batch 0 has shape \(8, 1, 9, 9\)"),
    _fault("calibration-dtype", "a float64 batch for a float32 model",
           lambda f: _merge(calibration=[(X.double(),)]), ME, r"dtype torch.float64"),
    _fault("calibration-arity", "(inputs, labels) batches",
           lambda f: _merge(calibration=[(X, torch.zeros(64))]), ME,
           r"has 2 inputs, the model takes 1"),
    _fault("calibration-nan", "a batch holding NaN",
           lambda f: _merge(calibration=[(X,), (X * float("nan"),)]), ME,
           r"activations at node .* are NaN or infinite on calibration batch 1"),
    _fault("calibration-device", "a batch on the meta device",
           lambda f: _merge(calibration=[(X.to("meta"),)]), ME, r"batch 0 is on the meta"),
    # options
    _fault("method", "method='ties'", lambda f: _merge(method="ties"), ME,
           r"unknown method 'ties'"),
    _fault("alpha", "alpha=1.5", lambda f: _merge(alpha=1.5), ME, r"alpha must be in \[0, 1\]"),
    _fault("width", "width='huge'", lambda f: _merge(width="huge"), ME, r"width must be"),
    _fault("repair", "repair='fix'", lambda f: _merge(repair="fix"), ME, r"repair must be one of"),
    _fault("seed", "seed='0'", lambda f: _merge(seed="0"), ME, r"seed must be an int"),
    _fault("samples", "samples_per_batch=1", lambda f: _merge(samples_per_batch=1), ME,
           r"samples_per_batch must be"),
    _fault("device-unknown", "device='tpu'", lambda f: _merge(device="tpu"), ME,
           r"not a torch device"),
    _fault("stop-at-unknown", "stop_at naming no node",
           lambda f: _merge(stop_at="nowhere"), ME, r"names no node and no module path"),
    _fault("stop-at-around", "stop_at inside a residual branch", _stop_around, ME,
           r"not every path .* crosses stop_at"),
    # files
    _fault("pickle-runs-code", "a .pt checkpoint whose unpickling would run code",
           lambda f: load_checkpoint(malicious_checkpoint(f)), CE,
           r"cannot be read: it is a pickle of more than tensors"),
    _fault("pickle-calibration", "a calibration .pt file whose unpickling would run code",
           lambda f: calibration_batches(str(malicious_checkpoint(f))), CE,
           r"cannot be read: it is a pickle of more than tensors"),
    _fault("truncated-safetensors", "a safetensors checkpoint cut in half",
           lambda f: load_checkpoint(_truncated(f, ".safetensors")), CE, r"cannot be read"),
    _fault("truncated-pt", "a torch.save checkpoint cut in half",
           lambda f: load_checkpoint(_truncated(f, ".pt")), CE, r"cannot be read"),
    _fault("missing-checkpoint", "a checkpoint path that does not exist",
           lambda f: load_checkpoint(f / "nope.safetensors"), CE, r"does not exist"),
    _fault("corrupt-result", "loading a saved result whose weights file was cut",
           _corrupt_result, CE, r"cannot load"),
    _fault("result-not-saved", "loading a folder that holds no result",
           lambda f: mergec.load(f), CE, r"is not a saved mergec model"),
    # the command line
    _fault("cli-existing-output", "mergec merge -o into a folder that exists",
           _existing_output, ME, r"already exists; choose a new one, or pass --force",
           cli=True),
    _fault("cli-force-foreign", "mergec merge --force over a folder that is no result",
           _force_over_a_foreign_folder, ME, r"not a saved mergec model, so it is not "
           r"replaced", cli=True),
    _fault("cli-evil-checkpoint", "mergec merge with a checkpoint that would run code",
           lambda f: _cli(f, "-o", str(f / "out"), a=str(malicious_checkpoint(f))), CE,
           r"pickle of more than tensors .*, which could run code", cli=True),
    _fault("cli-wrong-checkpoint", "mergec merge with a checkpoint of another width",
           lambda f: _cli(f, "--kwargs", '{"width": 8}', "-o", str(f / "out")), CE,
           r"does not fit --model .*: size mismatch for 0.weight", cli=True),
    _fault("cli-empty-calibration", "mergec merge --calibration of a file with no inputs",
           lambda f: (save_file({"x": torch.zeros(0, 1, 8, 8)}, str(f / "empty.safetensors")),
                      _cli(f, "-o", str(f / "out"), calibration=str(f / "empty.safetensors")))[1],
           CE, r"holds no inputs", cli=True),
    _fault("calibration-zero-batch", "a batch of zero samples",
           lambda f: _merge(calibration=[(X[:0],)]), ME, r"holds no samples"),
    _fault("reset-nan", "weight matching (no statistics) with a NaN batch for the reset",
           lambda f: _merge(method="weight-match", repair="reset",
                            calibration=[(X,), (X * float("nan"),)]), ME,
           r"BatchNorm node .* NaN or infinite"),
    _fault("cli-missing-model", "mergec merge without --model",
           lambda f: ["merge", "a.pt", "b.pt", "--calibration", "digits"], ME,
           r"missing --model", cli=True),
    _fault("cli-changed-since-report", "mergec merge --from-report after a checkpoint changed",
           _changed_since_report, ME, r"changed since the report", cli=True),
    _fault("cli-device", "mergec merge --device cuda on a machine without CUDA",
           lambda f: _cli(f, "--device", "cuda", "-o", str(f / "out")), ME,
           r"no usable CUDA device", cli=True, applies=lambda: not torch.cuda.is_available()),
)
