"""Merge two CNNs trained on disjoint tasks: digits 0-4 (model A) and 5-9 (model B).

This is the ZipIt!/MuDSC protocol on scikit-learn's 8x8 digits (no download): each parent only
knows its own five classes, the merged model has to answer all ten. The script trains both
parents, merges them with every method mergec has, and prints a table of

* joint accuracy: argmax over all 10 logits on the whole test set,
* per-task accuracy: the same argmax, on the test images of each task,
* joint accuracy relative to the ensemble of the two parents (their averaged softmax).

    python examples/merge_cnns_disjoint.py                 # about 15 s on a laptop CPU
    python examples/merge_cnns_disjoint.py --width 32 --epochs 30 --methods zip permute
"""
from __future__ import annotations

import argparse
import time

import torch

import mergec
from mergec_lab import datasets, training, zoo

METHODS = ("average", "permute", "weight-match", "mudsc", "zip")
TASKS = (range(0, 5), range(5, 10))


def accuracies(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float]:
    """Joint accuracy and the accuracy on the test images of task A and of task B."""
    predictions = logits.argmax(-1)
    correct = (predictions == labels).float()
    return (correct.mean().item(), correct[labels < 5].mean().item(),
            correct[labels >= 5].mean().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16, help="channels of the first conv")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs per parent")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parser.parse_args()

    x, y = datasets.digits("train")
    x_test, y_test = datasets.digits("test")
    parents = []
    for index, classes in enumerate(TASKS):
        x_task, y_task = datasets.class_subset(x, y, classes)
        torch.manual_seed(args.seed + index)  # different initialisations
        model = zoo.digits_cnn(width=args.width)
        parents.append(training.train(model, x_task, y_task, epochs=args.epochs,
                                      seed=args.seed + index, device="cpu", progress=False))
    model_a, model_b = parents

    rows: list[tuple[str, tuple[float, float, float], float]] = []
    logits_a = training.predict_logits(model_a, x_test, device="cpu")
    logits_b = training.predict_logits(model_b, x_test, device="cpu")
    rows.append(("model A (0-4)", accuracies(logits_a, y_test), 0.0))
    rows.append(("model B (5-9)", accuracies(logits_b, y_test), 0.0))
    rows.append(("ensemble", accuracies(logits_a.softmax(-1) + logits_b.softmax(-1), y_test), 0.0))

    # Calibration data: unlabeled training images of both tasks, as tuples of forward's inputs.
    calibration = [(batch,) for batch in x.split(128)]
    for method in args.methods:
        start = time.perf_counter()
        result = mergec.merge(model_a, model_b, x[:8], calibration, method=method,
                              progress=False)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            rows.append((f"merged: {method}", accuracies(result.module(x_test), y_test), seconds))

    ensemble = rows[2][1][0]
    print(f"{'model':20s} {'joint':>6s} {'0-4':>6s} {'5-9':>6s} {'/ens.':>6s} {'merge s':>8s}")
    for name, (joint, task_a, task_b), seconds in rows:
        timing = f"{seconds:8.2f}" if seconds else f"{'':8s}"
        print(f"{name:20s} {joint:6.3f} {task_a:6.3f} {task_b:6.3f} {joint / ensemble:6.3f} "
              f"{timing}")


if __name__ == "__main__":
    main()
