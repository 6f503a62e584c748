"""The generated sections of docs/benchmarks.md: each benchmark rewrites the text between its
own begin and end markers and keeps everything else."""
from __future__ import annotations

import logging
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent

HEADER = ("# Merge benchmarks\n\n"
          "Measured by the scripts in `benchmarks/` (run them from the repository root with the "
          "project's virtual environment; parents are cached in `benchmarks/checkpoints/`, which "
          "is not committed).\n\n")


def write_section(path: Path, begin: str, end: str, section: str) -> None:
    """Replaces the text from ``begin`` to ``end`` in ``path`` by ``section`` (which starts
    with ``begin`` and ends with ``end``); a section not in the document yet goes at its end."""
    text = path.read_text() if path.is_file() else HEADER
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        content = before + section + rest.split(end, 1)[1]
    else:
        content = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    log.info("wrote %s", path)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown CPU" where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def git_commit() -> str:
    """HEAD's short hash, and whether the library's tracked files (``mergec/``, ``passes/``)
    differ from it, taken at the start of the run. Run the benchmark from a clean checkout
    (e.g. ``git clone --shared``) when others edit the working tree."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "mergec", "passes"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout
        commit += (" (plus uncommitted changes to mergec/ or passes/ in the working tree)"
                   if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return commit
