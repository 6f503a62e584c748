"""Golden files: checked-in expectations of printed or emitted text, and one flag to rewrite them.

A golden test renders something (a space table, a merged module's code, a depth plan) and calls
the ``golden`` fixture of ``conftest.py``; ``pytest --update-golden`` writes the expectation
under ``tests/golden/`` instead of comparing with it, so an intended change is one command and a
reviewed diff (xDSL's filecheck tests, tinygrad's process replay).

Example::

    def test_table(golden):
        golden.check("resnet.txt", mergec.report.space_table(spec))
        golden.check("plan.json", as_json(plan.to_dict()))
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

GOLDEN_FOLDER = Path(__file__).parent / "golden"
UPDATE_COMMAND = "pytest tests/test_golden.py --update-golden"


def normalize(text: str) -> str:
    """``text`` without trailing spaces or surrounding blank lines, ending in one newline, so
    that an editor that strips whitespace does not make a golden file differ."""
    lines = [line.rstrip() for line in text.strip("\n").splitlines()]
    return "\n".join(lines).strip("\n") + "\n"


def rounded(value: Any, digits: int = 3) -> Any:
    """``value`` with every float rounded to ``digits`` decimals (and -0.0 written as 0.0),
    tuples as lists: float noise in the last bits must not change a golden file."""
    if isinstance(value, float):
        return round(value, digits) + 0.0
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item, digits) for item in value]
    return value


def as_json(value: Any, digits: int = 3) -> str:
    """Stable JSON of ``value``: floats rounded, keys sorted, indented."""
    return json.dumps(rounded(value, digits), indent=2, sort_keys=True) + "\n"


@dataclass(frozen=True)
class Golden:
    """Compares text with ``folder/name``, or writes it there when ``update`` is set."""

    folder: Path
    update: bool = False

    def check(self, name: str, actual: str) -> None:
        path = self.folder / name
        actual = normalize(actual)
        if self.update:
            if not path.exists() or path.read_text(encoding="utf-8") != actual:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(actual, encoding="utf-8")
            return
        if not path.exists():
            pytest.fail(f"golden file {path} does not exist; run `{UPDATE_COMMAND}` to write "
                        "it, then review and commit it", pytrace=False)
        expected = path.read_text(encoding="utf-8")
        if expected != actual:
            diff = "".join(difflib.unified_diff(
                expected.splitlines(keepends=True), actual.splitlines(keepends=True),
                fromfile=f"{path} (expected)", tofile=f"{name} (actual)"))
            pytest.fail(f"output differs from golden file {path}:\n{diff}\nIf the change is "
                        f"intended, run `{UPDATE_COMMAND}` and review the diff.", pytrace=False)
