"""Merge models of different width and of different depth.

Two pairs on scikit-learn's 8x8 digits (no download), each trained on all ten classes from
different seeds:

* width: a digits CNN with 8 channels (A) and one with 16 (B), merged by elastic zip at every
  ``width`` option: "max" (B's widths), "min" (A's), "sum" (nothing merged: the logit
  ensemble) and 0.75 of d_a + d_b;
* depth: an MLP with 2 hidden layers (A) and one with 4 (B), a plain chain. align-depth
  compares the layers by linear CKA, pads A with identity layers where B has layers A lacks,
  and the merged model has B's architecture.

The table gives each model's test accuracy, its ratio to the mean of the two parents', and
its parameter count.

    python examples/merge_heterogeneous.py               # about 20 s on a laptop CPU
    python examples/merge_heterogeneous.py --epochs 40
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import mergec
from mergec_lab import datasets, training, zoo


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int,
          epochs: int) -> nn.Module:
    return training.train(model, x, y, epochs=epochs, seed=seed, device="cpu", progress=False)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    logits = training.predict_logits(model, x, device="cpu")
    return (logits.argmax(-1) == y).float().mean().item()


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="training epochs per parent")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    x, y = datasets.digits("train")
    x_test, y_test = datasets.digits("test")
    calibration = [(batch,) for batch in x.split(128)]
    pairs = {
        "width": (zoo.digits_cnn(width=8), zoo.digits_cnn(width=16),
                  [("width max", {"width": "max"}), ("width min", {"width": "min"}),
                   ("width sum", {"width": "sum"}), ("width 0.75", {"width": 0.75})]),
        "depth": (zoo.digits_mlp(width=64, depth=2), zoo.digits_mlp(width=64, depth=4),
                  [("depth, unaligned average", {}),
                   ("depth, unaligned keep", {"unaligned": "keep"})]),
    }
    print(f"{'model':32s} {'accuracy':>9s} {'/parents':>9s} {'params':>8s}")
    for name, (model_a, model_b, merges) in pairs.items():
        model_a = train(model_a, x, y, args.seed, args.epochs)
        model_b = train(model_b, x, y, args.seed + 1, args.epochs)
        accuracies = accuracy(model_a, x_test, y_test), accuracy(model_b, x_test, y_test)
        mean = sum(accuracies) / 2
        for label, model, value in (("A", model_a, accuracies[0]), ("B", model_b, accuracies[1])):
            print(f"{name + ': parent ' + label:32s} {value:9.3f} {value / mean:9.3f} "
                  f"{parameters(model):8d}")
        for label, options in merges:
            result = mergec.merge(model_a, model_b, x[:8], calibration, progress=False,
                                  **options)
            value = accuracy(result.module, x_test, y_test)
            print(f"{'merged: ' + label:32s} {value:9.3f} {value / mean:9.3f} "
                  f"{parameters(result.module):8d}")
            if result.report.depth is not None and not options:
                stages = [stage["mapping"] for stage in result.report.depth.stages]
                print(f"  A's layers stand for B's layers {stages}; identity layers at "
                      f"{', '.join(result.report.depth.padded_paths)}")


if __name__ == "__main__":
    main()
