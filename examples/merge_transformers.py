"""Merge two small vision transformers trained from different initialisations.

Two ``mergec_lab.zoo.small_vit`` models (2 pre-norm blocks, 4 heads, a class token) are trained
briefly on scikit-learn's 8x8 digits (2x2 patches: 16 tokens plus the class token) from
different random initialisations, then merged. mergec finds the transformer's symmetries from
the graph alone: the residual stream, the MLP hidden units, and inside attention the heads (one
permutation shared by q, k and v), the query/key dimensions within a head and the value/output
dimensions within a head. The script prints the accuracy of the parents and of each merge,
and how often the merged model agrees with each parent's prediction.

    python examples/merge_transformers.py                  # about 30 s on a laptop CPU
    python examples/merge_transformers.py --epochs 30 --dim 64 --methods zip permute average
"""
from __future__ import annotations

import argparse
import time

import torch

import mergec
from mergec_lab import datasets, training, zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=32, help="width of the residual stream")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--depth", type=int, default=2, help="transformer blocks")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=["zip", "permute", "average"],
                        choices=["zip", "permute", "weight-match", "mudsc", "average"])
    args = parser.parse_args()

    x, y = datasets.digits("train")
    x_test, y_test = datasets.digits("test")
    parents = []
    for index in range(2):
        torch.manual_seed(args.seed + index)
        model = zoo.small_vit(depth=args.depth, dim=args.dim, heads=args.heads,
                              mlp_dim=2 * args.dim, patch=2, image_size=8, num_classes=10)
        parents.append(training.train(model, x, y, epochs=args.epochs, batch_size=64, lr=2e-3,
                                      optimizer="adam", weight_decay=0.05,
                                      seed=args.seed + index, device="cpu", progress=False))

    def predictions(model: torch.nn.Module) -> torch.Tensor:
        return training.predict_logits(model, x_test, device="cpu").argmax(-1)

    parent_predictions = [predictions(model) for model in parents]
    for name, predicted in zip(("model A", "model B"), parent_predictions):
        print(f"{name:16s} accuracy {(predicted == y_test).float().mean():.3f}")

    calibration = [(batch,) for batch in x.split(128)]
    print(f"{'merge':16s} {'accuracy':>8s} {'agrees A':>8s} {'agrees B':>8s} {'seconds':>8s}")
    for method in args.methods:
        start = time.perf_counter()
        result = mergec.merge(parents[0], parents[1], x[:4], calibration, method=method,
                              progress=False)
        seconds = time.perf_counter() - start
        predicted = predictions(result.module)
        accuracy = (predicted == y_test).float().mean()
        agree = [(predicted == other).float().mean() for other in parent_predictions]
        print(f"{method:16s} {accuracy:8.3f} {agree[0]:8.3f} {agree[1]:8.3f} {seconds:8.2f}")
    heads = [s for s in result.report.spec.spaces.values() if s.kind == "blocks"]
    print(f"attention spaces with head structure: {len(heads)}; "
          f"coverage {result.report.spec.coverage():.3f}")


if __name__ == "__main__":
    main()
