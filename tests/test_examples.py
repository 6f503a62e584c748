"""Smoke tests of the scripts under examples/: each runs in a fresh interpreter (small settings
where a script has them), exits with status 0 and prints the line a user looks for."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *arguments: str, timeout: float = 300) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *arguments],
                          capture_output=True, text=True, timeout=timeout,
                          cwd=EXAMPLES.parent)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_every_example_has_a_smoke_test() -> None:
    tested = {"merge_cnns_disjoint.py", "merge_transformers.py", "inspect_model.py",
              "read_report.py", "merge_heterogeneous.py"}
    assert {path.name for path in EXAMPLES.glob("*.py")} == tested


@pytest.mark.slow
def test_merge_cnns_disjoint() -> None:
    output = run_example("merge_cnns_disjoint.py", "--epochs", "5", "--width", "8")
    assert "ensemble" in output
    for method in ("average", "permute", "weight-match", "mudsc", "zip"):
        assert f"merged: {method}" in output


@pytest.mark.slow
def test_merge_heterogeneous() -> None:
    output = run_example("merge_heterogeneous.py", "--epochs", "5")
    merged = [line for line in output.splitlines() if line.startswith("merged:")]
    assert len(merged) == 6
    assert "identity layers at" in output
    params = {line.split()[2]: int(line.split()[-1]) for line in merged if "width" in line}
    parents = [int(line.split()[-1]) for line in output.splitlines()
               if line.startswith("width: parent")]
    assert params["max"] == parents[1] and params["min"] == parents[0]


@pytest.mark.slow
def test_merge_transformers() -> None:
    output = run_example("merge_transformers.py", "--epochs", "2", "--dim", "16")
    assert "model A" in output and "model B" in output
    lines = {line.split()[0]: line for line in output.splitlines() if line.strip()}
    assert {"zip", "permute", "average"} <= set(lines)
    assert "attention spaces with head structure: 4" in output  # 2 blocks x (q/k, v)


@pytest.mark.slow
def test_inspect_model(tmp_path: Path) -> None:
    import json

    target = tmp_path / "spec.json"
    output = run_example("inspect_model.py", "--model", "resnet18", "--json", str(target))
    assert "resnet18: ResNet" in output and "coverage" in output
    assert f"wrote spec JSON to {target}" in output
    spec = json.loads(target.read_text())
    assert spec["spaces"] and spec["model"] == "ResNet"


@pytest.mark.slow
def test_read_report(tmp_path: Path) -> None:
    folder = tmp_path / "report"
    output = run_example("read_report.py", str(folder), "--epochs", "1")
    assert "seconds per pass" in output and "coverage" in output
    assert f"to {folder}" in output
    assert (folder / "report.json").is_file()
    assert list(folder.glob("*.png"))
