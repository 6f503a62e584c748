"""Linear CKA between layers of two models, accumulated over minibatches.

``align-depth`` compares every block output of the shallow model with every block output of
the deep one. Full-dataset CKA needs all activations at once; the minibatch estimator of
Nguyen et al. ("Do Wide and Deep Networks Learn the Same Things?", ICLR 2021) instead averages
the unbiased HSIC_1 of Song et al. (JMLR 2012) over batches:

    CKA = mean_b HSIC_1(K_b, L_b) / sqrt(mean_b HSIC_1(K_b, K_b) · mean_b HSIC_1(L_b, L_b))

with linear kernels ``K = X Xᵀ`` of the features flattened per sample. Because the estimator
is unbiased, averaging over batches converges to the population value and does not depend on
the batch size. Only three small arrays of sums are kept, never activations.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from mergec.algorithms.distributed import all_reduce_sum_
from mergec.errors import MergeError

logger = logging.getLogger(__name__)

MIN_BATCH = 4  # HSIC_1 divides by n (n - 3)


def _gram_without_diagonal(features: Tensor) -> Tensor:
    """Linear kernel of the features flattened per sample, float64, diagonal set to zero (K̃)."""
    flat = features.detach().reshape(features.shape[0], -1).to(torch.float64)
    gram = flat @ flat.T
    gram.fill_diagonal_(0.0)
    return gram


def _unbiased_hsic(grams_x: Tensor, grams_y: Tensor) -> Tensor:
    """HSIC_1 of every pair, ``[p, n, n] × [q, n, n] -> [p, q]``, grams with zero diagonals.

    HSIC_1 = [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1 / ((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3)).
    """
    n = grams_x.shape[-1]
    trace_term = grams_x.reshape(len(grams_x), -1) @ grams_y.reshape(len(grams_y), -1).T
    row_sums_x, row_sums_y = grams_x.sum(dim=-1), grams_y.sum(dim=-1)  # K̃1, L̃1
    totals_term = torch.outer(row_sums_x.sum(-1), row_sums_y.sum(-1)) / ((n - 1) * (n - 2))
    cross_term = row_sums_x @ row_sums_y.T * (2.0 / (n - 2))
    return (trace_term + totals_term - cross_term) / (n * (n - 3))


def _check_batch(features: Sequence[Tensor], expected: int, name: str) -> int:
    if len(features) != expected:
        raise MergeError(
            f"LinearCKA.update: expected {expected} feature tensors for {name}, got {len(features)}"
        )
    sizes = {feature.shape[0] for feature in features}
    if len(sizes) != 1:
        raise MergeError(
            f"LinearCKA.update: the tensors of {name} have different batch sizes {sorted(sizes)}"
        )
    return sizes.pop()


class LinearCKA:
    """Minibatch linear CKA for every (layer of A, layer of B) pair.

    Example:
        >>> cka = LinearCKA(num_layers_a=2, num_layers_b=1)
        >>> x = torch.randn(16, 8)
        >>> cka.update([x, torch.randn(16, 3, 2)], [2 * x])
        >>> round(cka.matrix()[0, 0].item(), 6)
        1.0
    """

    def __init__(
        self, num_layers_a: int, num_layers_b: int, device: torch.device | str | None = None
    ) -> None:
        if num_layers_a < 1 or num_layers_b < 1:
            raise MergeError(
                "LinearCKA: needs at least one layer per model, "
                f"got {num_layers_a} and {num_layers_b}"
            )
        self.num_layers_a = num_layers_a
        self.num_layers_b = num_layers_b
        self.batches = torch.zeros((), dtype=torch.float64, device=device)
        self.hsic_ab = torch.zeros(num_layers_a, num_layers_b, dtype=torch.float64, device=device)
        self.hsic_aa = torch.zeros(num_layers_a, dtype=torch.float64, device=device)
        self.hsic_bb = torch.zeros(num_layers_b, dtype=torch.float64, device=device)

    def update(self, feats_a: Sequence[Tensor], feats_b: Sequence[Tensor]) -> None:
        """Add one minibatch: the output of every layer of A and of B for the same inputs.

        Each tensor is ``[batch, ...]``; everything after the batch axis is flattened.
        """
        batch_a = _check_batch(feats_a, self.num_layers_a, "model A")
        batch_b = _check_batch(feats_b, self.num_layers_b, "model B")
        if batch_a != batch_b:
            raise MergeError(
                f"LinearCKA.update: model A saw {batch_a} samples but model B saw {batch_b}"
            )
        if batch_a < MIN_BATCH:
            raise MergeError(
                f"LinearCKA.update: the unbiased estimator needs at least {MIN_BATCH} samples "
                f"per batch, got {batch_a}"
            )
        device = self.hsic_ab.device
        grams_a = torch.stack([_gram_without_diagonal(f.to(device)) for f in feats_a])
        grams_b = torch.stack([_gram_without_diagonal(f.to(device)) for f in feats_b])
        self.hsic_ab += _unbiased_hsic(grams_a, grams_b)
        self.hsic_aa += torch.stack(
            [_unbiased_hsic(gram[None], gram[None])[0, 0] for gram in grams_a]
        )
        self.hsic_bb += torch.stack(
            [_unbiased_hsic(gram[None], gram[None])[0, 0] for gram in grams_b]
        )
        self.batches += 1

    def merge(self, other: LinearCKA) -> None:
        """Add ``other``'s batches into this accumulator."""
        if (other.num_layers_a, other.num_layers_b) != (self.num_layers_a, self.num_layers_b):
            raise MergeError(
                "LinearCKA.merge: the accumulators compare different numbers of layers"
            )
        for mine, theirs in (
            (self.batches, other.batches),
            (self.hsic_ab, other.hsic_ab),
            (self.hsic_aa, other.hsic_aa),
            (self.hsic_bb, other.hsic_bb),
        ):
            mine += theirs.to(mine.device)

    def all_reduce(self) -> None:
        """Sum the accumulators over all processes if torch.distributed is initialised."""
        all_reduce_sum_([self.batches, self.hsic_ab, self.hsic_aa, self.hsic_bb])

    def matrix(self) -> Tensor:
        """CKA ``[num_layers_a, num_layers_b]`` (float64); a constant layer has CKA 0 with all."""
        if self.batches.item() == 0:
            raise MergeError(
                "LinearCKA.matrix: no batch was accumulated; run calibration data first"
            )
        denominator = torch.outer(self.hsic_aa, self.hsic_bb)
        defined = denominator > 0
        if not defined.all():
            logger.warning(
                "LinearCKA: %d layer pairs involve a constant layer; their CKA is set to 0",
                int((~defined).sum()),
            )
        return torch.where(
            defined,
            self.hsic_ab / denominator.clamp(min=1e-300).sqrt(),
            torch.zeros_like(denominator),
        )


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of two feature batches ``[n, ...]`` (same n >= 4), unbiased HSIC estimator.

    >>> x = torch.randn(32, 10)
    >>> round(linear_cka(x, 3 * x), 6)
    1.0
    """
    cka = LinearCKA(1, 1, device=x.device)
    cka.update([x], [y])
    return float(cka.matrix()[0, 0])
