"""The main job: two small CNNs trained on scikit-learn's digits (classes 0–4 and 5–9),
merged with every method, with the accuracy table printed. No download; about a minute on CPU.
"""
from __future__ import annotations

import logging
import time

import torch

from mergec.merge import merge
from mergec_lab.datasets import class_subset, digits
from mergec_lab.training import predict_logits, train
from mergec_lab.zoo import digits_cnn

log = logging.getLogger(__name__)
METHODS = ("average", "permute", "weight-match", "mudsc", "zip")


def run_demo(width: int = 16, epochs: int = 20, seed: int = 0, progress: bool = True
             ) -> list[tuple[str, float, float, float]]:
    """Trains A on digits 0–4 and B on 5–9, merges them with each method and returns rows of
    (name, joint accuracy, accuracy on A's task, accuracy on B's task)."""
    x, y = digits("train")
    x_test, y_test = digits("test")
    tasks = (range(0, 5), range(5, 10))
    models = []
    for index, classes in enumerate(tasks):
        x_task, y_task = class_subset(x, y, classes)
        torch.manual_seed(seed + index)
        models.append(train(digits_cnn(width=width), x_task, y_task, epochs=epochs,
                            seed=seed + index, progress=progress))
    model_a, model_b = models

    def row(name: str, logits: torch.Tensor) -> tuple[str, float, float, float]:
        predictions = logits.argmax(-1)
        joint = (predictions == y_test).float().mean().item()
        per_task = [(predictions[mask] == y_test[mask]).float().mean().item()
                    for mask in (y_test < 5, y_test >= 5)]
        return (name, joint, *per_task)

    logits_a, logits_b = predict_logits(model_a, x_test), predict_logits(model_b, x_test)
    rows = [row("model A (0-4)", logits_a), row("model B (5-9)", logits_b),
            row("ensemble", logits_a.softmax(-1) + logits_b.softmax(-1))]
    calibration = [(batch,) for batch in x.split(128)]
    for method in METHODS:
        start = time.perf_counter()
        result = merge(model_a, model_b, x[:8], calibration, method=method, progress=False)
        log.info("merged with %s in %.2fs", method, time.perf_counter() - start)
        with torch.no_grad():
            rows.append(row(f"merged: {method}", result.module(x_test)))
    return rows


def format_table(rows: list[tuple[str, float, float, float]]) -> str:
    ensemble = next(r[1] for r in rows if r[0] == "ensemble")
    lines = [f"{'model':22s} {'joint':>7s} {'task 0-4':>9s} {'task 5-9':>9s} {'/ensemble':>10s}"]
    for name, joint, task_a, task_b in rows:
        lines.append(f"{name:22s} {joint:7.3f} {task_a:9.3f} {task_b:9.3f} "
                     f"{joint / ensemble:10.3f}")
    return "\n".join(lines)
