"""Reliability report: what a user sees for every bad input of the catalogue, and a fuzz
campaign's counts; both written to docs/reliability.md (between the sections' markers).

The catalogue is tests/faults.py (every entry is also a test in tests/test_reliability.py);
the campaign is tests/fuzzing.py (a CI-sized run is tests/test_fuzz.py).

Usage::

    .venv/bin/python benchmarks/reliability.py                  # 1000 fuzz cases, writes the doc
    .venv/bin/python benchmarks/reliability.py --examples 50 --print-only
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from _doc import ROOT, cpu_name, write_section

sys.path.insert(0, str(ROOT / "tests"))

import faults  # noqa: E402 - tests/ holds the catalogue and the campaign
import fuzzing  # noqa: E402

DOC = ROOT / "docs" / "reliability.md"
TABLE = ("<!-- faults:begin -->", "<!-- faults:end -->")
CAMPAIGN = ("<!-- fuzz:begin -->", "<!-- fuzz:end -->")


def _cell(text: str, limit: int = 400) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def fault_table() -> tuple[str, int]:
    """The catalogue as a markdown table, and how many entries did not meet their error."""
    rows = ["| # | what the user did | through | what they see |", "|---|---|---|---|"]
    wrong = 0
    for number, fault in enumerate(faults.FAULTS, 1):
        if not fault.applies():
            rows.append(f"| {number} | {fault.what} | {'CLI' if fault.cli else 'API'} | "
                        "(not shown on this machine) |")
            continue
        with tempfile.TemporaryDirectory() as folder:
            seen = faults.see(fault, Path(folder))
        expected = "exit 1" if fault.cli else fault.error.__name__
        if seen.kind != expected or seen.traceback:
            wrong += 1
        shown = f"`{seen.kind}`: {_cell(seen.message)}"
        rows.append(f"| {number} | {fault.what} | {'CLI' if fault.cli else 'API'} | {shown} |")
    return "\n".join(rows), wrong


def campaign_section(examples: int, seed: int) -> str:
    start = time.perf_counter()
    outcome = fuzzing.campaign(examples, seed)
    seconds = time.perf_counter() - start
    summary = fuzzing.summary(outcome)
    outcomes = sorted({name for counts in summary["by_corruption"].values() for name in counts})
    rows = ["| corruption | " + " | ".join(outcomes) + " |",
            "|---|" + "---|" * len(outcomes)]
    for corruption, counts in summary["by_corruption"].items():
        rows.append(f"| {corruption} | " + " | ".join(str(counts.get(name, "")) for name in
                                                     outcomes) + " |")
    lines = [f"{summary['cases']} cases (hypothesis seed {seed}) in {seconds:.0f} s on "
             f"{cpu_name()}, torch {torch.__version__}: **{summary['failures']} failures** "
             "(exceptions other than a MergecError, or non-finite outputs of a merge of "
             "uncorrupted inputs).", "", *rows]
    lines += ["", "Why uncorrupted inputs were refused (the options drawn include invalid "
              "values on purpose; numbers and quoted values shown as …):", "",
              "| cases | message |", "|---|---|"]
    lines += [f"| {count} | {_cell(message)} |" for message, count in
              outcome.refusals.most_common()]
    for case, trace in outcome.failures[:5]:
        lines += ["", "```", case[-1500:], trace[-2500:], "```"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="fuzz cases to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-only", action="store_true", help="do not write the doc")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    table, wrong = fault_table()
    print(table)
    print(f"\n{wrong} of {len(faults.FAULTS)} catalogue entries did not meet their error\n")
    section = campaign_section(args.examples, args.seed)
    print(section)
    if not args.print_only:
        write_section(DOC, TABLE[0], TABLE[1], f"{TABLE[0]}\n{table}\n{TABLE[1]}")
        write_section(DOC, CAMPAIGN[0], CAMPAIGN[1], f"{CAMPAIGN[0]}\n{section}\n{CAMPAIGN[1]}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
