"""Solvers that turn a similarity between two models' features into merge and unmerge matrices.

Every solver returns a :class:`MergePlan`. For a space of width ``d_a`` in model A and ``d_b``
in model B, merged to width ``r``, the merged features are ``z = M_a x_a + M_b x_b`` and the
originals are recovered approximately as ``x_a = U_a z``, ``x_b = U_b z``. A permutation is the
special case where every merged feature averages exactly one feature of each model.

The solvers know nothing of graphs: ``match`` builds the similarity (activation correlation,
weight similarity, or MuDSC's mix of both), picks a solver per space and hands the plan to
``zip``. Note that :func:`zip` shadows the builtin inside this module on purpose: it is the name
of the ZipIt! algorithm.
"""

from __future__ import annotations

import builtins
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from mergec.algorithms.tensors import as_permutation
from mergec.errors import MergeError

logger = logging.getLogger(__name__)

#: A solver of one space given its joint similarity: ``(joint_similarity, d_a, d_b) -> MergePlan``,
#: where ``joint_similarity`` is the ``(d_a + d_b)`` square similarity of ``[x_a; x_b]`` (in
#: :mod:`.blocks`, of one block of A and one block of B). :func:`zip`, :func:`elastic_zip` and
#: :func:`permute_joint` have this signature.
BlockSolver = Callable[[Tensor, int, int], "MergePlan"]


@dataclass(frozen=True)
class MergePlan:
    """How to merge one space: ``z = merge_a @ x_a + merge_b @ x_b``, ``x_a ≈ unmerge_a @ z``.

    Shapes: ``merge_a`` r×d_a, ``merge_b`` r×d_b, ``unmerge_a`` d_a×r, ``unmerge_b`` d_b×r.

    Example:
        >>> plan = average(4)
        >>> plan.width, plan.dim_a, plan.dim_b
        (4, 4, 4)
    """

    merge_a: Tensor
    merge_b: Tensor
    unmerge_a: Tensor
    unmerge_b: Tensor

    def __post_init__(self) -> None:
        """Refuses matrices whose shapes do not make one plan."""
        shapes = [
            tuple(m.shape) for m in (self.merge_a, self.merge_b, self.unmerge_a, self.unmerge_b)
        ]
        if any(len(shape) != 2 for shape in shapes):
            raise MergeError(f"MergePlan: every matrix must be 2-D, got shapes {shapes}")
        width = self.merge_a.shape[0]
        consistent = (
            self.merge_b.shape[0] == width
            and self.unmerge_a.shape == (self.merge_a.shape[1], width)
            and self.unmerge_b.shape == (self.merge_b.shape[1], width)
        )
        if not consistent:
            raise MergeError(
                "MergePlan: expected merge_a r×d_a, merge_b r×d_b, "
                "unmerge_a d_a×r, unmerge_b d_b×r; "
                f"got {shapes}"
            )

    @property
    def width(self) -> int:
        """Merged width r."""
        return self.merge_a.shape[0]

    @property
    def dim_a(self) -> int:
        """Width d_a of A's space."""
        return self.merge_a.shape[1]

    @property
    def dim_b(self) -> int:
        """Width d_b of B's space."""
        return self.merge_b.shape[1]

    @property
    def dims(self) -> tuple[int, int]:
        """Each model's width (d_a, d_b)."""
        return self.dim_a, self.dim_b

    @property
    def merges(self) -> tuple[Tensor, Tensor]:
        """Each model's merge matrix, in model order (as :class:`ManyPlan` has them)."""
        return self.merge_a, self.merge_b

    @property
    def unmerges(self) -> tuple[Tensor, Tensor]:
        """Each model's unmerge matrix, in model order."""
        return self.unmerge_a, self.unmerge_b

    def merge_features(self, x_a: Tensor, x_b: Tensor) -> Tensor:
        """Merged features ``[..., r]`` of feature-last ``x_a [..., d_a]``, ``x_b [..., d_b]``."""
        return x_a @ self.merge_a.T.to(x_a) + x_b @ self.merge_b.T.to(x_b)

    def unmerge_features(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Each model's features recovered from merged features ``z [..., r]``."""
        return z @ self.unmerge_a.T.to(z), z @ self.unmerge_b.T.to(z)


@dataclass(frozen=True)
class ManyPlan:
    """How to merge one space of N models: ``z = Σ_m merges[m] @ x_m``, ``x_m ≈ unmerges[m] @
    z``; ``merges[m]`` is r × d_m and ``unmerges[m]`` d_m × r. :class:`MergePlan` is the
    two-model case, and :meth:`pair` reads one off.

    >>> plan = ManyPlan.average(2, models=3)
    >>> plan.width, plan.dims, plan.merges[2][0, 0].item()
    (2, (2, 2, 2), 0.3333333333333333)
    """

    merges: tuple[Tensor, ...]
    unmerges: tuple[Tensor, ...]

    def __post_init__(self) -> None:
        """Refuses matrices whose shapes do not make one plan."""
        width = self.merges[0].shape[0] if self.merges else 0
        if len(self.merges) < 2 or len(self.merges) != len(self.unmerges) or any(
                m.dim() != 2 or u.dim() != 2 or m.shape[0] != width
                or tuple(u.shape) != (m.shape[1], width)
                for m, u in builtins.zip(self.merges, self.unmerges)):
            shapes = [(tuple(m.shape), tuple(u.shape))
                      for m, u in builtins.zip(self.merges, self.unmerges)]
            raise MergeError("ManyPlan: expected, for each of at least two models, merge r×d "
                             f"and unmerge d×r; got {shapes}")

    @classmethod
    def average(cls, d: int, models: int) -> ManyPlan:
        """Unit i of every model merged with unit i of the others, averaged."""
        identity = torch.eye(d, dtype=torch.float64)
        return cls(tuple(identity / models for _ in range(models)),
                   tuple(identity.clone() for _ in range(models)))

    @property
    def width(self) -> int:
        return self.merges[0].shape[0]

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(m.shape[1] for m in self.merges)

    def pair(self, model: int) -> MergePlan:
        """Model 0's and model ``model``'s matrices as a two-model plan (A = model 0)."""
        return MergePlan(self.merges[0], self.merges[model], self.unmerges[0],
                         self.unmerges[model])

    def in_order_of(self, model: int = 0) -> ManyPlan:
        """The same merge with merged unit i as unit i of ``model`` where every unit of that
        model has a merged unit of its own (see :func:`in_order_of`)."""
        return in_order_of(self, model)


def in_order_of(plan: MergePlan | ManyPlan, model: int = 0) -> MergePlan | ManyPlan:
    """The same merge with its merged units relabelled so that merged unit i is unit i of
    model ``model`` (0: A, 1: B), where every unit of that model has a merged unit of its own
    (its unmerge matrix a permutation): the merged features then come out in its basis. Any
    other plan is returned as it is. A :class:`ManyPlan` gives a ManyPlan.

    >>> swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    >>> in_order_of(MergePlan(swap / 2, swap / 2, swap, swap)).unmerge_a
    tensor([[1., 0.],
            [0., 1.]])
    """
    order = as_permutation(plan.unmerges[model])
    # the model's unit i is merged unit order[i]
    if order is None or torch.equal(order, torch.arange(len(order), device=order.device)):
        return plan
    merges = tuple(m.index_select(0, order) for m in plan.merges)
    unmerges = tuple(u.index_select(1, order) for u in plan.unmerges)
    if isinstance(plan, MergePlan):
        return MergePlan(*merges, *unmerges)
    return ManyPlan(merges, unmerges)


def in_basis_of(plan: MergePlan, model: int = 0) -> MergePlan:
    """The same merge of a rotation space with its merged basis turned into model ``model``'s
    (0: A, 1: B): merged features ``z' = U z`` for that model's orthogonal unmerge matrix
    ``U``, so its unmerge becomes the identity and the merged features come out in its basis.
    The merged space admits every rotation, so the merged model's function is the same. A plan
    whose unmerge is not square and orthogonal is returned as it is (:func:`in_order_of` then
    relabels a permutation).

    >>> turn = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    >>> in_basis_of(MergePlan(turn / 2, turn / 2, turn.T, turn.T), 1).unmerge_b
    tensor([[1., 0.],
            [0., 1.]], dtype=torch.float64)
    """
    unmerge = plan.unmerges[model]
    unmerge = unmerge.to_dense() if unmerge.is_sparse else unmerge
    size = unmerge.shape[0]
    identity = torch.eye(size, dtype=unmerge.dtype, device=unmerge.device)
    if unmerge.shape != (size, size) or torch.equal(unmerge, identity) or \
            not torch.allclose(unmerge @ unmerge.T, identity, atol=1e-5):
        return in_order_of(plan, model)
    turn = unmerge.T  # z = turn z'
    merges = tuple((unmerge @ (m.to_dense() if m.is_sparse else m).to(unmerge.dtype))
                   .to(m.dtype) for m in plan.merges)
    unmerges = tuple(identity.to(u.dtype) if index == model else
                     ((u.to_dense() if u.is_sparse else u).to(unmerge.dtype) @ turn).to(u.dtype)
                     for index, u in enumerate(plan.unmerges))
    return MergePlan(*merges, *unmerges)


def together(plan: MergePlan) -> Tensor:
    """``U_a U_bᵀ`` in float64: for each unit of A and each of B, whether the plan puts them in
    one merged unit. A zip or permutation plan's unmerge matrices hold one 1 per row, so the
    product is taken sparse (exact: sums of ones), in O(d²) where a dense one is O(d³).

    >>> swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    >>> together(MergePlan(swap / 2, swap / 2, swap, torch.eye(2)))
    tensor([[0., 1.],
            [1., 0.]], dtype=torch.float64)
    """
    unmerge_a = plan.unmerge_a.detach().to(torch.float64)
    unmerge_b = plan.unmerge_b.detach().to(torch.float64)
    if not unmerge_a.is_sparse and is_binary(unmerge_a) and is_binary(unmerge_b):
        unmerge_a = unmerge_a.to_sparse()
    return unmerge_a @ unmerge_b.T


def is_binary(matrix: Tensor) -> bool:
    """Whether every entry of ``matrix`` is 0 or 1."""
    return bool(((matrix == 0) | (matrix == 1)).all())

def average(d: int) -> MergePlan:
    """Plain weight averaging: feature i of A merges with feature i of B (no matching).

    >>> average(2).merge_a
    tensor([[0.5000, 0.0000],
            [0.0000, 0.5000]])
    """
    if d < 1:
        raise MergeError(f"average: width must be positive, got {d}")
    identity = torch.eye(d)
    return MergePlan(identity / 2, identity / 2, identity.clone(), identity.clone())


def pairing_plan(partner_of_a: Tensor, device: torch.device | None = None) -> MergePlan:
    """Plan whose merged feature k averages feature k of A with feature ``partner_of_a[k]`` of B.

    ``partner_of_a`` is a permutation: :func:`permute`'s matching of features, or ``match``'s
    pairing of the blocks of a structured space (its block order).

    >>> pairing_plan(torch.tensor([1, 0])).unmerge_b
    tensor([[0., 1.],
            [1., 0.]])
    """
    identity = torch.eye(len(partner_of_a), device=device)
    pairing = identity[partner_of_a.to(identity.device)]  # pairing[k, partner_of_a[k]] = 1
    return MergePlan(identity / 2, pairing / 2, identity.clone(), pairing.T.contiguous())


def hungarian(similarity: Tensor) -> tuple[Tensor, Tensor]:
    """The one-to-one matching of rows to columns with the largest total similarity.

    Returns index pairs ``(rows, columns)`` with ``rows`` ascending; for a square matrix ``rows``
    is ``0 .. n-1`` and ``columns[i]`` is row i's partner. Every similarity mergec matches is a
    correlation or a cosine, at least -1; a -inf entry (a pair that must never merge: a constant
    unit within its own model) counts as -1, the least similar two units can be, so a complete
    matching always exists (``torch.nan_to_num``: NaN would count as 0, +inf as the largest
    float). This is the one Hungarian of mergec: ``permute``, block pairing and the matchings
    inside blocks all use it.

    >>> hungarian(torch.tensor([[0.1, 0.9], [0.8, -math.inf]]))
    (tensor([0, 1]), tensor([1, 0]))
    """
    values = torch.nan_to_num(similarity.detach().to("cpu", torch.float64), neginf=-1.0)
    rows, columns = linear_sum_assignment(values.numpy(), maximize=True)
    return torch.as_tensor(rows), torch.as_tensor(columns)


def permute(similarity_ab: Tensor) -> MergePlan:
    """Best one-to-one matching of A's features to B's (Hungarian), each pair averaged.

    ``similarity_ab[i, j]`` is how alike feature i of A and feature j of B are (activation
    correlation, weight similarity, ...). This is Git Re-Basin's / ZipIt's "permute" baseline.

    >>> plan = permute(torch.tensor([[0.1, 0.9], [0.8, 0.2]]))
    >>> plan.merge_b
    tensor([[0.0000, 0.5000],
            [0.5000, 0.0000]])
    """
    if similarity_ab.dim() != 2 or similarity_ab.shape[0] != similarity_ab.shape[1]:
        raise MergeError(
            "permute: needs a square d_a×d_b similarity (equal widths), "
            f"got {tuple(similarity_ab.shape)}; "
            "use elastic_zip for models of different width"
        )
    if not torch.isfinite(similarity_ab).all():
        raise MergeError("permute: the similarity contains NaN or infinite values")
    _, partner = hungarian(similarity_ab)
    return pairing_plan(partner, similarity_ab.device)


def permute_joint(similarity: Tensor, d_a: int, d_b: int) -> MergePlan:
    """:func:`permute` on the cross-model block of a joint ``(d_a + d_b)`` square similarity.

    It has the :data:`BlockSolver` signature.
    """
    _check_joint(similarity, d_a, d_b, "permute_joint")
    return permute(similarity[:d_a, d_a:])


def orthogonal_alignment(cross: Tensor, ones_fixed: bool = False) -> Tensor:
    """The orthogonal ``Q`` with the largest ``tr(Qᵀ cross)`` (orthogonal Procrustes: ``U Vᵀ``
    from the SVD of ``cross``). For ``cross = E[x_a x_bᵀ]`` it is the rotation that best maps
    B's features onto A's, ``x_a ≈ Q x_b``. With ``ones_fixed`` the maximum is over the maps
    that keep the all-ones direction (``Q 1 = 1``): the rotation is solved on the orthogonal
    complement of 1. Directions no data reaches (``cross`` rank-deficient) are kept: a bonus
    of 1e-10 of the largest singular value on the identity breaks those ties, as the
    permutation solvers give ties to the unit of the same index.

    >>> q = orthogonal_alignment(torch.tensor([[0.0, 2.0], [1.0, 0.0]]))
    >>> q.round(decimals=12) + 0.0  # the SVD may leave ±1e-20 where the swap has zeros
    tensor([[0., 1.],
            [1., 0.]], dtype=torch.float64)
    """
    if cross.dim() != 2 or cross.shape[0] != cross.shape[1]:
        raise MergeError(f"orthogonal_alignment: needs a square cross-similarity, got "
                         f"{tuple(cross.shape)}")
    cross = cross.detach().to(torch.float64)
    d = cross.shape[0]
    # directions the data does not see (a rank-deficient second moment) stay where they are:
    # a bonus of 1e-10 of the largest singular value on the identity breaks those ties
    scale = torch.linalg.matrix_norm(cross, ord=2) if d else cross.new_zeros(())
    cross = cross + 1e-10 * scale * torch.eye(d, dtype=torch.float64, device=cross.device)
    if not ones_fixed or d < 2:
        u, _, vh = torch.linalg.svd(cross)
        return u @ vh
    basis = complement_of_ones(d, cross.device)
    u, _, vh = torch.linalg.svd(basis.T @ cross @ basis)
    return keeping_ones(u @ vh, basis)


def complement_of_ones(d: int, device: torch.device | None = None) -> Tensor:
    """An orthonormal basis (d × (d - 1), float64) of the vectors whose entries sum to zero."""
    seed = torch.cat([torch.ones(d, 1, dtype=torch.float64, device=device),
                      torch.eye(d, dtype=torch.float64, device=device)[:, :d - 1]], dim=1)
    q, _ = torch.linalg.qr(seed)
    return q[:, 1:]


def keeping_ones(rotation: Tensor, basis: Tensor) -> Tensor:
    """The d × d orthogonal map that is ``rotation`` ((d - 1) square) on the vectors whose
    entries sum to zero, in ``basis`` (:func:`complement_of_ones`), and keeps the all-ones
    direction."""
    d = basis.shape[0]
    ones = torch.full((d, d), 1.0 / d, dtype=torch.float64, device=basis.device)
    return basis @ rotation @ basis.T + ones


def procrustes(similarity: Tensor, d_a: int, d_b: int, ones_fixed: bool = False) -> MergePlan:
    """The merge of a rotation space: B's features rotated onto A's by
    :func:`orthogonal_alignment` of the cross-model block, then averaged: ``merge_a = I/2``,
    ``merge_b = Q/2``, ``unmerge_a = I``, ``unmerge_b = Qᵀ``. ``similarity`` is a joint
    ``(d_a + d_b)`` square second moment or weight similarity (:data:`BlockSolver` signature,
    with ``ones_fixed`` bound)."""
    _check_joint(similarity, d_a, d_b, "procrustes")
    if d_a != d_b:
        raise MergeError(f"procrustes: rotates spaces of one width, got d_a={d_a}, d_b={d_b}")
    q = orthogonal_alignment(similarity[:d_a, d_a:], ones_fixed)
    identity = torch.eye(d_a, dtype=torch.float64, device=q.device)
    return MergePlan(identity / 2, q / 2, identity.clone(), q.T.contiguous())


def _check_joint(similarity: Tensor, d_a: int, d_b: int, solver: str) -> None:
    """Refuses a joint similarity of the wrong shape, or with NaN or +inf."""
    if d_a < 1 or d_b < 1:
        raise MergeError(f"{solver}: widths must be positive, got d_a={d_a}, d_b={d_b}")
    size = d_a + d_b
    if tuple(similarity.shape) != (size, size):
        raise MergeError(
            f"{solver}: needs the joint similarity of [x_a; x_b], shape ({size}, {size}) for "
            f"d_a={d_a}, d_b={d_b}; got {tuple(similarity.shape)}"
        )
    if torch.isnan(similarity).any() or (similarity == float("inf")).any():
        raise MergeError(
            f"{solver}: the similarity contains NaN or +inf (-inf is allowed: never merge)"
        )


def _check_target(target: int, d_a: int, d_b: int, solver: str) -> None:
    """Refuses a merged width outside [1, d_a + d_b]."""
    if not 1 <= target <= d_a + d_b:
        raise MergeError(
            f"{solver}: target width must be in [1, d_a + d_b] = [1, {d_a + d_b}], got {target}"
        )


def zip(  # noqa: A001 - the name of the ZipIt! algorithm
    correlation: Tensor,
    d_a: int,
    d_b: int,
    target: int | None = None,
    alpha: float = 0.0,
    beta: float = 0.0,
) -> MergePlan:
    """ZipIt!: greedily merge the most correlated pair of features, within or across models.

    ``correlation`` is the joint ``(d_a + d_b)`` square matrix of ``[x_a; x_b]`` (see
    :meth:`JointMoments.correlation`). Each step merges the most similar pair of current features
    (a current feature is a set of originals); the merged feature's similarity to every other
    becomes ``alpha * min`` of the two rows (ZipIt's decay: alpha=0 makes it look uncorrelated).
    ``beta`` is each model's budget of within-model merges as a fraction of its width; a merge is
    within model m when both sides already contain a feature of m. With ``beta=0`` only
    cross-model merges happen and every feature merges at most once, so with ``target = d_a = d_b``
    the result is a greedy one-to-one matching. Stops at ``target`` features (default
    ``max(d_a, d_b)``). Merged features average their originals (rows of ``[M_a M_b]`` sum to 1);
    ``U`` copies a merged feature back to every original it absorbed.

    Cost: O((d_a + d_b)^2) per merge at worst, usually O(d_a + d_b).

    >>> x = torch.randn(100, 3)
    >>> joint = torch.corrcoef(torch.cat([x, x[:, [2, 0, 1]]], dim=1).T)
    >>> zip(joint, 3, 3).merge_b
    tensor([[0.0000, 0.5000, 0.0000],
            [0.0000, 0.0000, 0.5000],
            [0.5000, 0.0000, 0.0000]])
    """
    _check_joint(correlation, d_a, d_b, "zip")
    target, budgets = _zip_budgets(d_a, d_b, target, alpha, beta)
    labels = _greedy_zip(correlation, (d_a, d_b), target, alpha, budgets)
    return _plan_from_labels(labels, (d_a, d_b), correlation.device).pair(1)


def _zip_budgets(d_a: int, d_b: int, target: int | None, alpha: float, beta: float
                 ) -> tuple[int, tuple[int, int]]:
    """:func:`zip`'s target width and within-model budgets, its arguments checked."""
    target = max(d_a, d_b) if target is None else target
    _check_target(target, d_a, d_b, "zip")
    if not 0.0 <= alpha <= 1.0:
        raise MergeError(f"zip: alpha (similarity decay) must be in [0, 1], got {alpha}")
    if not 0.0 <= beta <= 1.0:
        raise MergeError(f"zip: beta (within-model budget) must be in [0, 1], got {beta}")
    budgets = (math.floor(beta * d_a + 1e-9), math.floor(beta * d_b + 1e-9))
    narrowest = max(d_a - budgets[0], d_b - budgets[1])
    if target < narrowest:
        raise MergeError(
            f"zip: width {target} is out of reach with beta={beta}: within-model budgets "
            f"{budgets} leave at least {narrowest} features for d_a={d_a}, d_b={d_b}; "
            "raise beta or the target"
        )
    return target, budgets


@dataclass(frozen=True)
class ZipSolver:
    """:func:`zip` at fixed ``alpha`` and ``beta`` as a :data:`BlockSolver`. :meth:`batch`
    zips many block pairs of one shape at once, in one greedy run (the plans of separate
    calls, at a fraction of their Python overhead).

    >>> x = torch.randn(100, 3)
    >>> joint = torch.corrcoef(torch.cat([x, x[:, [2, 0, 1]]], dim=1).T)
    >>> plans = ZipSolver(alpha=0.5).batch(torch.stack([joint, joint]), 3, 3)
    >>> all(torch.equal(plan.merge_b, zip(joint, 3, 3, alpha=0.5).merge_b) for plan in plans)
    True
    """

    alpha: float = 0.0
    beta: float = 0.0

    def __call__(self, correlation: Tensor, d_a: int, d_b: int) -> MergePlan:
        return zip(correlation, d_a, d_b, alpha=self.alpha, beta=self.beta)

    def batch(self, correlations: Tensor, d_a: int, d_b: int) -> list[MergePlan]:
        """The plans of ``correlations[p]`` (``[P, d_a + d_b, d_a + d_b]``), each as
        :meth:`__call__` gives it."""
        for correlation in correlations:
            _check_joint(correlation, d_a, d_b, "zip")
        target, budgets = _zip_budgets(d_a, d_b, None, self.alpha, self.beta)
        matrices = correlations.detach().to("cpu", torch.float64).numpy().copy()
        labels = greedy_zips(matrices, (d_a, d_b), target, self.alpha, budgets)
        return [_plan_from_labels(torch.from_numpy(row), (d_a, d_b), correlations.device).pair(1)
                for row in labels]


def elastic_zip(
    correlation: Tensor,
    d_a: int,
    d_b: int,
    target: int | None = None,
    *,
    alpha: float = 0.0,
) -> MergePlan:
    """ZipIt! for models of different width: merge ``[x_a; x_b]`` down to any width ``target``.

    The default ``target`` is ``max(d_a, d_b)``; any ``1 <= target <= d_a + d_b`` works. Each
    model's within-model budget is proportional to its width, ``ceil(d_m * merges / (d_a + d_b))``
    for ``merges = d_a + d_b - target``, which always suffices to reach ``target``. With
    ``target = d_a + d_b`` nothing is merged: the plan is the concatenation ``z = [x_a; x_b]``.

    >>> plan = elastic_zip(torch.eye(6), 2, 4)
    >>> plan.width
    4
    """
    _check_joint(correlation, d_a, d_b, "elastic_zip")
    target = max(d_a, d_b) if target is None else target
    _check_target(target, d_a, d_b, "elastic_zip")
    if not 0.0 <= alpha <= 1.0:
        raise MergeError(f"elastic_zip: alpha (similarity decay) must be in [0, 1], got {alpha}")
    merges = d_a + d_b - target
    budgets = tuple(math.ceil(d * merges / (d_a + d_b)) for d in (d_a, d_b))
    labels = _greedy_zip(correlation, (d_a, d_b), target, alpha, budgets)
    return _plan_from_labels(labels, (d_a, d_b), correlation.device).pair(1)


def zip_many(correlation: Tensor, dims: tuple[int, ...], target: int | None = None, *,
             alpha: float = 0.0, beta: float = 0.0) -> ManyPlan:
    """ZipIt! for N models: greedily merge ``[x_1; ...; x_N]`` (``correlation`` its joint
    square matrix, ``dims`` each model's width) down to ``target`` features (default the widest
    model's width). As in :func:`zip`, each model may merge ``floor(beta * d_m)`` pairs of
    features within itself (where every model has one width and ``target`` is that width);
    otherwise each model's budget is its share of the merges, as in :func:`elastic_zip`. A
    merged feature averages its originals. Two models give :func:`zip`'s and
    :func:`elastic_zip`'s plan.

    >>> x = torch.randn(200, 2)
    >>> joint = torch.corrcoef(torch.cat([x, x.flip(1), x], dim=1).T)
    >>> zip_many(joint, (2, 2, 2), alpha=0.5).merges[1]
    tensor([[0.0000, 0.3333],
            [0.3333, 0.0000]])
    """
    total = sum(dims)
    if len(dims) < 2:
        raise MergeError(f"zip_many: needs at least two models, got widths {dims}")
    _check_joint(correlation, dims[0], total - dims[0], "zip_many")
    target = max(dims) if target is None else target
    if not 1 <= target <= total:
        raise MergeError(f"zip_many: target width must be in [1, {total}], got {target}")
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not 0.0 <= value <= 1.0:
            raise MergeError(f"zip_many: {name} must be in [0, 1], got {value}")
    merges = total - target
    if len(set(dims)) == 1 and target == dims[0]:
        budgets = tuple(math.floor(beta * d + 1e-9) for d in dims)
    else:
        budgets = tuple(math.ceil(d * merges / total) for d in dims)
    extra = 0
    while True:
        try:
            labels = _greedy_zip(correlation, dims, target, alpha,
                                 tuple(b + extra for b in budgets))
            return _plan_from_labels(labels, dims, torch.device("cpu"))
        except MergeError:
            # with three models or more the greedy can leave merged features that cannot
            # join (every two share a model) before the target width: each model may then
            # merge ``extra`` more pairs within itself, the least similar choice of all
            if extra >= max(dims):
                raise
            extra = max(1, 2 * extra)
            correlation = correlation.clamp(min=-2.0)
            logger.info("zip_many: stuck before width %d; within-model budgets raised by %d",
                        target, extra)


def _row_max(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's largest value and the column of its first occurrence (along the last axis)."""
    return matrix.max(axis=-1), matrix.argmax(axis=-1)


class _ZipState:
    """Working state of the greedy zip: similarities between current features, and per row its best.

    Feature ``k`` stands for the set ``labels == k``; a merge of ``k`` and ``gone`` keeps the lower
    index. ``row_best``/``row_best_index`` cache each row's maximum so that a step costs O(n)
    unless a row's best partner was one of the merged pair.

    The state is NumPy: a step is a dozen operations on one row or column, and NumPy's cost per
    operation is a tenth of torch's (the zips inside 12 × 12 pairs of attention heads are 10^4
    -10^5 steps of 64 features), single-threaded, which a row of a few thousand values needs.
    """

    def __init__(self, similarity: Tensor, dims: tuple[int, ...], budgets: tuple[int, ...]
                 ) -> None:
        """Every feature its own merged feature; within-model merges barred where a budget is 0."""
        size = similarity.shape[0]
        self.similarity = similarity.detach().to("cpu", torch.float64).numpy().copy()
        np.fill_diagonal(self.similarity, -np.inf)
        self.labels = np.arange(size)
        self.has_model = np.zeros((size, len(dims)), dtype=bool)
        starts = np.cumsum((0,) + tuple(dims))
        for model in range(len(dims)):
            self.has_model[starts[model]:starts[model + 1], model] = True
        self.budgets = list(budgets)
        for model in range(len(dims)):
            if self.budgets[model] == 0:
                self._forbid_within(model)
        self.row_best, self.row_best_index = _row_max(self.similarity)

    def _forbid_within(self, model: int) -> None:
        """No more merges of two features that both hold a feature of ``model``."""
        members = self.has_model[:, model]
        self.similarity[np.ix_(members, members)] = -np.inf

    def best_pair(self) -> tuple[int, int]:
        """The most similar pair of current features, lower index first."""
        row = int(self.row_best.argmax())
        if self.row_best[row] == -np.inf:
            raise MergeError(
                "zip: no mergeable pair is left before the target width (every similarity is -inf)"
            )
        column = int(self.row_best_index[row])
        return min(row, column), max(row, column)

    def merge(self, keep: int, gone: int, alpha: float) -> None:
        """Merges ``gone`` into ``keep``: decayed similarities, budgets spent, conflicts barred."""
        within = self.has_model[keep] & self.has_model[gone]
        self.labels[self.labels == gone] = keep
        self.has_model[keep] |= self.has_model[gone]
        decayed = np.minimum(self.similarity[keep], self.similarity[gone])
        if within.any() or self.has_model[keep].all():
            # a merged feature decays once it holds a unit of every model (two models: after
            # every merge) or merged within a model; one still missing a model (three models
            # or more) keeps its similarity to the units it lacks
            if alpha > 0.0:  # -inf stays -inf
                decayed *= alpha
            else:
                decayed[np.isfinite(decayed)] = 0.0
        self.similarity[gone, :] = -np.inf
        self.similarity[:, gone] = -np.inf
        newly_exhausted = self._spend_budget(within)
        for model in newly_exhausted:
            self._forbid_within(model)
        # no merge with a feature holding a unit of a model both would then hold twice, once
        # that model's budget is spent
        blocked = self.has_model[keep] & np.array([budget == 0 for budget in self.budgets])
        if blocked.any():
            decayed[self.has_model[:, blocked].any(axis=1)] = -np.inf
        decayed[[keep, gone]] = -np.inf
        self.similarity[keep, :] = decayed
        self.similarity[:, keep] = decayed
        self._refresh_row_best(keep, gone, full=bool(newly_exhausted))

    def _spend_budget(self, within: np.ndarray) -> list[int]:
        """Spends the budgets of the models a merge was within; the models just exhausted."""
        newly_exhausted = []
        for model in range(len(self.budgets)):
            if within[model]:
                self.budgets[model] -= 1
                if self.budgets[model] == 0:
                    newly_exhausted.append(model)
        return newly_exhausted

    def _refresh_row_best(self, keep: int, gone: int, full: bool) -> None:
        """Updates the cached row maxima after a merge (all rows where ``full``)."""
        if full:
            self.row_best, self.row_best_index = _row_max(self.similarity)
            return
        stale = (self.row_best_index == keep) | (self.row_best_index == gone)
        stale[[keep, gone]] = True
        rows = stale.nonzero()[0]
        self.row_best[rows], self.row_best_index[rows] = _row_max(self.similarity[rows])
        column = self.similarity[keep]  # column keep, just written: the rows read it
        improved = (column > self.row_best) & ~stale
        self.row_best[improved] = column[improved]
        self.row_best_index[improved] = keep


class _ZipBatch:
    """Working state of P greedy zips of one shape, run in lockstep: similarities between
    current features, and per row its best.

    Feature ``k`` of problem ``p`` stands for the set ``labels[p] == k``; a merge of ``k`` and
    ``gone`` keeps the lower index. ``row_best``/``row_best_index`` cache each row's maximum so
    that a step costs O(P n) unless a row's best partner was one of the merged pair.

    The state is NumPy, single-threaded: a step is a few dozen operations on one row or column
    of each problem, and NumPy's cost per operation is a tenth of torch's. Problems run
    together so that the many small zips of a structured space (one per pair of attention
    heads: 144 pairs of 64 + 64 features per layer) cost one zip's Python overhead, not 144.
    Its merges are :class:`_ZipState`'s, problem by problem (tested); one problem alone runs
    faster there, with a third of the indexing per step.
    """

    def __init__(self, similarities: np.ndarray, dims: tuple[int, ...],
                 budgets: tuple[int, ...]) -> None:
        """Every feature its own merged feature; within-model merges barred where a budget is 0.
        ``similarities`` is ``[P, n, n]`` float64, owned by the state (it is modified)."""
        count, size = similarities.shape[:2]
        self.similarity = similarities
        diagonal = np.arange(size)
        self.similarity[:, diagonal, diagonal] = -np.inf
        self.problems = np.arange(count)
        self.labels = np.tile(diagonal, (count, 1))
        model_of = np.repeat(np.arange(len(dims)), dims)
        self.has_model = np.tile(model_of[:, None] == np.arange(len(dims)), (count, 1, 1))
        self.budgets = np.tile(np.array(budgets, dtype=np.int64), (count, 1))
        for model in range(len(dims)):
            if budgets[model] == 0:
                for problem in range(count):
                    self._forbid_within(problem, model)
        self.row_best, self.row_best_index = _row_max(self.similarity)

    def _forbid_within(self, problem: int, model: int) -> None:
        """No more merges of two features that both hold a feature of ``model``."""
        members = self.has_model[problem, :, model]
        self.similarity[problem][np.ix_(members, members)] = -np.inf

    def best_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Each problem's most similar pair of current features, lower index first."""
        rows = self.row_best.argmax(axis=1)
        if (self.row_best[self.problems, rows] == -np.inf).any():
            raise MergeError(
                "zip: no mergeable pair is left before the target width (every similarity is -inf)"
            )
        columns = self.row_best_index[self.problems, rows]
        return np.minimum(rows, columns), np.maximum(rows, columns)

    def merge(self, keep: np.ndarray, gone: np.ndarray, alpha: float) -> None:
        """Merges ``gone`` into ``keep`` in each problem: decayed similarities, budgets spent,
        conflicts barred."""
        problems, has_model, similarity = self.problems, self.has_model, self.similarity
        within = has_model[problems, keep] & has_model[problems, gone]
        self.labels = np.where(self.labels == gone[:, None], keep[:, None], self.labels)
        has_model[problems, keep] |= has_model[problems, gone]
        decayed = np.minimum(similarity[problems, keep], similarity[problems, gone])
        # a merged feature decays once it holds a unit of every model (two models: after
        # every merge) or merged within a model; one still missing a model (three models
        # or more) keeps its similarity to the units it lacks
        decays = within.any(axis=1) | has_model[problems, keep].all(axis=1)
        if alpha > 0.0:  # -inf stays -inf
            decayed[decays] *= alpha
        else:
            decayed[decays[:, None] & np.isfinite(decayed)] = 0.0
        similarity[problems, gone, :] = -np.inf
        similarity[problems, :, gone] = -np.inf
        self.budgets -= within
        newly_exhausted = within & (self.budgets == 0)
        for problem, model in builtins.zip(*newly_exhausted.nonzero()):
            self._forbid_within(problem, model)
        blocked = has_model[problems, keep] & (self.budgets == 0)  # see _ZipState.merge
        if blocked.any():
            decayed[(has_model & blocked[:, None, :]).any(axis=2)] = -np.inf
        decayed[problems, keep] = -np.inf
        decayed[problems, gone] = -np.inf
        similarity[problems, keep, :] = decayed
        similarity[problems, :, keep] = decayed
        self._refresh_row_best(keep, gone, full=newly_exhausted.any(axis=1))

    def _refresh_row_best(self, keep: np.ndarray, gone: np.ndarray, full: np.ndarray) -> None:
        """Updates the cached row maxima after a merge (all rows of the ``full`` problems)."""
        problems = self.problems
        for problem in full.nonzero()[0]:
            self.row_best[problem], self.row_best_index[problem] = \
                _row_max(self.similarity[problem])
        stale = (self.row_best_index == keep[:, None]) | (self.row_best_index == gone[:, None])
        stale[problems, keep] = True
        stale[problems, gone] = True
        stale &= ~full[:, None]
        rows = stale.nonzero()
        self.row_best[rows], self.row_best_index[rows] = _row_max(self.similarity[rows])
        column = self.similarity[problems, keep]  # column keep, just written
        improved = (column > self.row_best) & ~stale & ~full[:, None]
        self.row_best[improved] = column[improved]
        self.row_best_index[improved] = np.broadcast_to(keep[:, None], improved.shape)[improved]


def _greedy_zip(similarity: Tensor, dims: tuple[int, ...], target: int, alpha: float,
                budgets: tuple[int, ...]) -> Tensor:
    """Label of the merged feature of every original feature after greedy merging to ``target``."""
    state = _ZipState(similarity, dims, budgets)
    for _ in range(sum(dims) - target):
        keep, gone = state.best_pair()
        state.merge(keep, gone, alpha)
    logger.debug("zip: %s features -> %d, budgets left %s", dims, target, state.budgets)
    return torch.from_numpy(state.labels)


def greedy_zips(similarities: np.ndarray, dims: tuple[int, ...], target: int, alpha: float,
                budgets: tuple[int, ...]) -> np.ndarray:
    """ZipIt!'s greedy on P problems of one shape at once (``similarities`` ``[P, n, n]``
    float64, overwritten): the label of each original feature's merged feature, ``[P, n]``.
    Each problem's labels are those of its own greedy (:func:`zip`, :func:`zip_many`)."""
    if len(similarities) == 1:
        return _greedy_zip(torch.from_numpy(similarities[0]), dims, target, alpha,
                           budgets).numpy()[None]
    state = _ZipBatch(similarities, dims, budgets)
    for _ in range(sum(dims) - target):
        state.merge(*state.best_pairs(), alpha)
    logger.debug("zip: %d × %s features -> %d", len(similarities), dims, target)
    return state.labels


def _plan_from_labels(labels: Tensor, dims: tuple[int, ...], device: torch.device) -> ManyPlan:
    """Averaging merge and copying unmerge for a clustering of the original features."""
    survivors, merged_index = torch.unique(labels, sorted=True, return_inverse=True)
    total = sum(dims)
    unmerge = torch.zeros(total, len(survivors))
    unmerge[torch.arange(total), merged_index] = 1.0
    merge = (unmerge / unmerge.sum(dim=0, keepdim=True)).T.contiguous()
    unmerge, merge = unmerge.to(device), merge.to(device)
    pieces = torch.tensor(dims).cumsum(0).tolist()
    starts = [0] + pieces[:-1]
    bounds = list(builtins.zip(starts, pieces))
    return ManyPlan(tuple(merge[:, a:b].contiguous() for a, b in bounds),
                    tuple(unmerge[a:b].contiguous() for a, b in bounds))
