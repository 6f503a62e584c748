"""The ``mergec`` command line: inspect and merge as a user runs them, and its errors."""
import json

import pytest
import torch
from safetensors.torch import save_file

import mergec
from mergec.cli import main
from mergec_lab import zoo

VGG = "mergec_lab.zoo:vgg"


@pytest.fixture
def vgg_checkpoints(tmp_path):
    """VGG-11 and VGG-16 (width 4) checkpoints and a file of calibration inputs."""
    torch.manual_seed(0)
    shallow, deep = zoo.vgg("11", width=4).eval(), zoo.vgg("16", width=4).eval()
    paths = tmp_path / "vgg11.safetensors", tmp_path / "vgg16.pt"
    save_file(shallow.state_dict(), str(paths[0]))
    torch.save(deep.state_dict(), paths[1])
    inputs = tmp_path / "inputs.pt"
    torch.save(torch.randn(96, 1, 28, 28), inputs)
    return shallow, deep, paths, inputs


def test_inspect_prints_the_spaces_as_json(capsys):
    assert main(["inspect", VGG, "--kwargs", '{"cfg": "11", "width": 4}',
                 "--input-shape", "2,1,28,28", "--json"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert any(space["origin"] == "features.0.weight" for space in spec["spaces"])


def test_merge_of_different_depths_writes_a_model_that_loads(vgg_checkpoints, tmp_path, capsys):
    shallow, deep, (path_a, path_b), inputs = vgg_checkpoints
    output = tmp_path / "merged"
    code = main(["merge", str(path_a), str(path_b), "--model", VGG,
                 "--kwargs", '{"cfg": "11", "width": 4}',
                 "--kwargs-b", '{"cfg": "16", "width": 4}',
                 "--calibration", str(inputs), "--batch-size", "32", "--unaligned", "keep",
                 "--plots", "--quiet", "-o", str(output)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((output / "report.json").read_text())
    assert report["depth"]["padded"]  # the shallow model was padded with identity layers
    assert any(path.name.startswith("cka_stage") for path in (output / "plots").iterdir())
    merged = mergec.load(output)
    x = torch.randn(8, 1, 28, 28)
    assert merged(x).shape == (8, 10)
    assert set(merged.state_dict()) == set(deep.state_dict())


def test_merge_of_different_widths_at_the_narrower_width(tmp_path, capsys):
    torch.manual_seed(0)
    paths = []
    for width in (4, 6):
        path = tmp_path / f"cnn{width}.safetensors"
        save_file(zoo.digits_cnn(width=width).state_dict(), str(path))
        paths.append(str(path))
    output = tmp_path / "merged"
    code = main(["merge", *paths, "--model", "mergec_lab.zoo:digits_cnn",
                 "--kwargs", '{"width": 4}', "--kwargs-b", '{"width": 6}',
                 "--calibration", "digits", "--batches", "2", "--width", "min", "--quiet",
                 "-o", str(output)])
    assert code == 0, capsys.readouterr().err
    state = mergec.load(output).state_dict()
    first = next(v for k, v in state.items() if k.endswith("weight") and v.dim() == 4)
    assert first.shape[0] == 4  # width "min"


def test_merge_errors_are_reported_not_raised(vgg_checkpoints, tmp_path, capsys):
    _, _, (path_a, _), inputs = vgg_checkpoints
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a checkpoint")
    arguments = ["--model", VGG, "--kwargs", '{"cfg": "11", "width": 4}',
                 "--calibration", str(inputs), "--quiet"]
    assert main(["merge", str(path_a), str(corrupt), *arguments,
                 "-o", str(tmp_path / "a")]) == 1
    assert "mergec: error:" in capsys.readouterr().err
    existing = tmp_path / "exists"
    existing.mkdir()
    assert main(["merge", str(path_a), str(path_a), *arguments, "-o", str(existing)]) == 1
    assert "already exists" in capsys.readouterr().err
    # a checkpoint of another architecture than --model
    assert main(["merge", str(path_a), str(path_a), "--model", VGG,
                 "--kwargs", '{"cfg": "16", "width": 4}', "--calibration", str(inputs),
                 "--quiet", "-o", str(tmp_path / "b")]) == 1
    assert "does not fit --model" in capsys.readouterr().err


def test_merge_stops_after_a_pass_and_dumps_its_report(vgg_checkpoints, tmp_path, capsys):
    _, _, (path_a, path_b), inputs = vgg_checkpoints
    dump = tmp_path / "after-align-depth.json"
    code = main(["merge", str(path_a), str(path_b), "--model", VGG,
                 "--kwargs", '{"cfg": "11", "width": 4}',
                 "--kwargs-b", '{"cfg": "16", "width": 4}', "--calibration", str(inputs),
                 "--batch-size", "32", "--quiet", "--stop-after", "align-depth",
                 "--dump", str(dump)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(dump.read_text())
    assert report["passes"] == ["trace", "annotate-units", "segment", "align-depth"]
    assert report["depth"]["padded"] and report["spaces"]
    assert not any("width" in entry for entry in report["spaces"].values())  # match never ran


def test_merge_refuses_an_unknown_pass_and_a_missing_output(vgg_checkpoints, capsys):
    _, _, (path_a, _), inputs = vgg_checkpoints
    arguments = ["merge", str(path_a), str(path_a), "--model", VGG,
                 "--kwargs", '{"cfg": "11", "width": 4}', "--calibration", str(inputs),
                 "--quiet"]
    assert main([*arguments, "--stop-after", "zipp"]) == 1
    assert "no pass is called 'zipp'" in capsys.readouterr().err
    assert main(arguments) == 1
    assert "-o FOLDER" in capsys.readouterr().err
    assert main([*arguments, "--stop-after", "match", "-o", "unused"]) == 1
    assert "no merged model after match" in capsys.readouterr().err


def digits_checkpoints(folder, count: int) -> list[str]:
    """``count`` digits CNNs of width 4 (seeds 0, 1, ...) saved as safetensors in ``folder``."""
    paths = []
    for seed in range(count):
        torch.manual_seed(seed)
        path = folder / f"cnn{seed}.safetensors"
        save_file(zoo.digits_cnn(width=4).state_dict(), str(path))
        paths.append(str(path))
    return paths


def test_merge_of_three_checkpoints_merges_them_at_once(tmp_path, capsys):
    paths = digits_checkpoints(tmp_path, 3)
    output = tmp_path / "merged"
    code = main(["merge", *paths, "--model", "mergec_lab.zoo:digits_cnn",
                 "--kwargs", '{"width": 4}', "--calibration", "digits", "--batches", "2",
                 "--method", "zip", "--quiet", "-o", str(output)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((output / "report.json").read_text())
    assert report["many"]["models"] == 3
    assert report["inputs"]["arguments"]["more"] == [str(tmp_path / "cnn2.safetensors")]
    assert mergec.load(output)(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    code = main(["merge", *paths, "--model", "mergec_lab.zoo:digits_cnn",
                 "--kwargs", '{"width": 4}', "--calibration", "digits", "--batches", "2",
                 "--stop-after", "match", "--quiet"])
    assert code != 0 and "--stop-after" in capsys.readouterr().err


def test_three_checkpoints_merge_with_mudsc_and_repair(tmp_path, capsys):
    paths = digits_checkpoints(tmp_path, 3)
    output = tmp_path / "merged"
    code = main(["merge", *paths, "--model", "mergec_lab.zoo:digits_cnn",
                 "--kwargs", '{"width": 4}', "--calibration", "digits", "--batches", "2",
                 "--method", "mudsc", "--repair", "repair", "--quiet", "-o", str(output)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((output / "report.json").read_text())
    assert report["many"]["models"] == 3 and report["many"]["weight_beta"] == 0.5
    assert report["repair"]["normalisations_repaired"] > 0
    assert mergec.load(output)(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_merge_to_a_budget_from_the_command_line(tmp_path, capsys):
    paths = digits_checkpoints(tmp_path, 2)
    size = sum(p.numel() for p in zoo.digits_cnn(width=4).parameters())
    output = tmp_path / "merged"
    code = main(["merge", *paths, "--model", "mergec_lab.zoo:digits_cnn",
                 "--kwargs", '{"width": 4}', "--calibration", "digits", "--batches", "4",
                 "--batch-size", "64", "--budget", str(int(1.5 * size)), "--quiet",
                 "-o", str(output)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((output / "report.json").read_text())
    chosen = next(c for c in report["budget"]["candidates"] if c["chosen"])
    assert chosen["size"] <= 1.5 * size
    assert report["inputs"]["arguments"]["budget"] == int(1.5 * size)
