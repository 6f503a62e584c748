"""The zoo run's results file (benchmarks/coverage.py --part zoo): rows survive a run, the
doc is rendered from every stored row, and --resume skips what the file holds."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def coverage():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("coverage")
    finally:
        sys.path.remove(str(BENCHMARKS))


def _run(coverage, monkeypatch, tmp_path: Path, *flags: str) -> list[str]:
    argv = ["coverage.py", "--part", "zoo", "--only", "squeezenet1_1", "--methods", "permute",
            "--results", str(tmp_path / "zoo.json"), "--out", str(tmp_path / "zoo.md"),
            "--memory-limit", "0", *flags]
    monkeypatch.setattr(sys, "argv", argv)
    coverage.main()
    return [row["name"] for row in json.loads((tmp_path / "zoo.json").read_text())["models"]]


def test_rows_are_stored_rendered_and_resumed(coverage, monkeypatch, tmp_path, capsys) -> None:
    assert _run(coverage, monkeypatch, tmp_path) == ["squeezenet1_1"]
    row = coverage.load_results(tmp_path / "zoo.json")["squeezenet1_1"]
    assert row.passed("trace") and row.passed("invariant") and row.passed("merge permute")
    assert row.coverage > 0.9 and row.free <= row.spaces and row.commit
    doc = (tmp_path / "zoo.md").read_text()
    assert "| squeezenet1_1 |" in doc and "Not measured yet" in doc
    capsys.readouterr()
    _run(coverage, monkeypatch, tmp_path, "--resume")
    assert "squeezenet1_1" not in capsys.readouterr().out  # nothing measured again
    row.merge_errors["permute"] = 1.0  # a stored row is rendered as stored
    coverage.save_results(tmp_path / "zoo.json", {"squeezenet1_1": row})
    _run(coverage, monkeypatch, tmp_path, "--resume")
    assert "permute merge: merged outputs differ by 1.0e+00" in (tmp_path / "zoo.md").read_text()
