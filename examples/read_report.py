"""Read what a merge decided: the JSON report and its plots.

Every pass of ``mergec.merge`` records what it found. ``result.report.to_json()`` holds the
options, the time of each pass, the coverage (the fraction of parameter elements with an axis
in a permutable space) and, per space, its size and structure, the probe node where its
features were observed, why it is fixed if it is, and for matched spaces the merged width, how
many unit pairs across the models were merged and their mean correlation against that of the
identity pairing (unit i of A with unit i of B). ``result.report.plot(folder)`` draws the
cross-model correlation of every matched space as a heatmap and the matched-versus-identity
similarities as bars.

The script trains two small digit CNNs from different initialisations (a few seconds), merges
them with ZipIt!, prints a summary of the report and writes the full JSON and the plots.

    python examples/read_report.py                          # plots into a temporary folder
    python examples/read_report.py /tmp/merge-report --method permute
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import mergec
from mergec_lab import datasets, training, zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, nargs="?", default=None,
                        help="where to write report.json and the plots (default: a new "
                             "temporary folder)")
    parser.add_argument("--method", default="zip",
                        choices=["zip", "permute", "weight-match", "mudsc", "average"])
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="mergec-report-"))

    x, y = datasets.digits("train")
    parents = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        parents.append(training.train(zoo.digits_cnn(width=8), x, y, epochs=args.epochs,
                                      seed=seed, device="cpu", progress=False))
    calibration = [(batch,) for batch in x.split(128)]
    result = mergec.merge(parents[0], parents[1], x[:4], calibration, method=args.method,
                          progress=False)

    report = json.loads(result.report.to_json())
    print(f"method {report['method']}, options {report['options']}")
    print("seconds per pass: " + ", ".join(f"{name} {seconds:.2f}"
                                           for name, seconds in report["timings_s"].items()))
    print(f"coverage {report['coverage']:.3f}")
    print(f"{'space':6s} {'size':>5s} {'kind':10s} {'probe':12s} {'matched':>8s} "
          f"{'identity':>8s}  fixed because")
    for space_id, space in report["spaces"].items():
        matched = space.get("matched_similarity")
        identity = space.get("identity_similarity")
        print(f"{space_id:6s} {space['size']:5d} {space['kind']:10s} {space['probe'] or '-':12s} "
              f"{'' if matched is None else f'{matched:8.3f}':>8s} "
              f"{'' if identity is None else f'{identity:8.3f}':>8s}  "
              f"{(space['fixed'] or '-')[:60]}")
    print(f"batch norms reset: {report['repair']}")

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(result.report.to_json())
    plots = result.report.plot(folder)
    print(f"wrote report.json and {len(plots)} plots to {folder}")


if __name__ == "__main__":
    main()
