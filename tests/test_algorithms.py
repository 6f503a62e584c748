"""Tests of the graph-free algorithms: statistics, solvers, the Hungarian, block matching,
weight similarity, CKA, alignment."""

from __future__ import annotations

import doctest
import functools
import importlib
import itertools
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from mergec.algorithms import blocks, cka, solvers
from mergec.algorithms.alignment import align_depth
from mergec.algorithms.blocks import Placement, match_blocks, place
from mergec.algorithms.cka import LinearCKA, linear_cka
from mergec.algorithms.covariance import (
    DEAD_UNIT_RELATIVE_VARIANCE,
    JointMoments,
    feature_rows,
    feature_view,
)
from mergec.algorithms.solvers import (
    BlockSolver,
    MergePlan,
    average,
    elastic_zip,
    permute,
    permute_joint,
)
from mergec.algorithms.tensors import apply_along
from mergec.algorithms.weight_matching import weight_similarity
from mergec.errors import MergeError

FAST = settings(max_examples=100, deadline=None)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def random_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "name", ["alignment", "blocks", "cka", "covariance", "solvers", "tensors", "weight_matching"]
)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(f"mergec.algorithms.{name}")
    torch.manual_seed(0)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


# ----------------------------------------------------------------------------- covariance


def test_feature_rows_makes_every_pixel_a_sample() -> None:
    x = torch.randn(2, 3, 4, 5)
    rows = feature_rows(x, axis=1)
    assert rows.shape == (2 * 4 * 5, 3)
    assert torch.equal(rows[1 * 20 + 2 * 5 + 3], x[1, :, 2, 3])
    assert torch.equal(feature_rows(x, axis=-1), x.reshape(-1, 5))


def test_feature_rows_rejects_a_bad_axis() -> None:
    with pytest.raises(MergeError, match="axis 4 is out of range"):
        feature_rows(torch.zeros(2, 3), axis=4)


@FAST
@given(
    seed=seeds,
    dim_a=st.integers(1, 5),
    dim_b=st.integers(1, 5),
    chunks=st.lists(st.integers(1, 30), min_size=1, max_size=5),
)
def test_streaming_moments_equal_the_moments_of_all_data(
    seed: int, dim_a: int, dim_b: int, chunks: list[int]
) -> None:
    generator = random_generator(seed)
    data = (
        torch.randn(sum(chunks) + 2, dim_a + dim_b, generator=generator, dtype=torch.float64) * 3
        + 1
    )
    first, second = JointMoments(dim_a, dim_b), JointMoments(dim_a, dim_b)
    for index, batch in enumerate(torch.split(data, chunks + [2])):
        (first if index % 2 == 0 else second).update(batch[:, :dim_a], batch[:, dim_a:])
    first.merge(second)
    assert first.count.item() == len(data)
    torch.testing.assert_close(first.mean, data.mean(dim=0))
    torch.testing.assert_close(first.covariance(), torch.cov(data.T, correction=0))
    torch.testing.assert_close(first.correlation(), torch.corrcoef(data.T))


def test_dead_units_correlate_zero_never_nan() -> None:
    data = torch.randn(500, 4, dtype=torch.float64)
    data[:, 1] = 0.0
    data[:, 3] = 1234.5  # constant but large: E[x^2] - E[x]^2 is rounding noise, not 0
    moments = JointMoments(2, 2)
    moments.update(data[:, :2], data[:, 2:])
    correlation = moments.correlation()
    assert torch.isfinite(correlation).all()
    for dead in (1, 3):
        assert torch.all(correlation[dead] == 0) and torch.all(correlation[:, dead] == 0)
    assert correlation[0, 0] == pytest.approx(1.0)
    assert correlation[0, 2] == pytest.approx(torch.corrcoef(data[:, [0, 2]].T)[0, 1].item())


def test_float32_moments_agree_with_a_float64_reference_to_a_millionth_of_the_variance(
) -> None:
    # the hard case for a one-pass second moment: a mean 100 times the spread, 2e5 samples
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(8, 6, 50, 500, generator=generator) * torch.rand(
        6, 1, 1, generator=generator) + 100 * torch.randn(6, 1, 1, generator=generator)
    reference = JointMoments(3, 3)
    rows = feature_rows(features.double(), axis=1)
    reference.update(rows[:, :3], rows[:, 3:])
    observed = JointMoments(3, 3)
    view = feature_view(features, axis=1)
    observed.update(view[:, :3], view[:, 3:])
    assert observed.count.item() == reference.count.item() == 8 * 50 * 500
    torch.testing.assert_close(observed.mean, reference.mean, rtol=1e-7, atol=0)  # float32
    scale = reference.covariance().diagonal().max()
    error = (observed.covariance() - reference.covariance()).abs().max()
    assert error <= 2e-6 * scale
    assert (observed.correlation() - reference.correlation()).abs().max() <= 1e-5


def test_a_constant_unit_stays_exactly_constant_in_float32() -> None:
    features = torch.randn(4, 3, 10, 10)
    features[:, 1] = 0.1  # not a power of two: a mean computed in float32 would round
    moments = JointMoments(2, 1)
    view = feature_view(features, axis=1)
    moments.update(view[:, :2], view[:, 2:])
    assert moments.covariance()[1].abs().max() < 1e-12 * 0.01
    assert torch.all(moments.correlation()[1] == 0)


def test_feature_view_is_a_view_of_samples_units_positions() -> None:
    x = torch.randn(2, 3, 4, 5)
    view = feature_view(x, axis=1)
    assert view.shape == (2, 3, 20) and view.data_ptr() == x.data_ptr()
    assert feature_view(x, axis=-1).shape == (24, 5, 1)
    with pytest.raises(MergeError, match="out of range"):
        feature_view(x, axis=4)


def test_joint_moments_reject_mismatched_batches() -> None:
    moments = JointMoments(3, 2)
    with pytest.raises(MergeError, match="x_b must be"):
        moments.update(torch.zeros(4, 3), torch.zeros(4, 3))
    with pytest.raises(MergeError, match="same inputs"):
        moments.update(torch.zeros(4, 3), torch.zeros(5, 2))
    with pytest.raises(MergeError, match="no samples"):
        moments.correlation()


def test_all_reduce_is_a_no_op_without_torch_distributed() -> None:
    moments = JointMoments(2, 1)
    moments.update(torch.ones(3, 2), torch.ones(3, 1))
    moments.all_reduce()
    assert moments.count.item() == 3
    assert torch.equal(moments.sum, torch.full((3,), 3.0, dtype=torch.float64))


def _distributed_worker(rank: int, init_file: str, data: torch.Tensor, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        moments = JointMoments(2, 1)
        half = data[rank::2]
        moments.update(half[:, :2], half[:, 2:])
        moments.all_reduce()
        statistics = LinearCKA(1, 1)
        statistics.update([data[rank * 8 : rank * 8 + 8]], [data[rank * 8 : rank * 8 + 8, :1]])
        statistics.all_reduce()
        results[rank] = (moments.count.item(), moments.covariance(), statistics.matrix())
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_two_processes_equals_one_process() -> None:
    data = torch.randn(16, 3, generator=random_generator(1), dtype=torch.float64)
    with tempfile.TemporaryDirectory() as directory, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(
            _distributed_worker, args=(os.path.join(directory, "init"), data, results), nprocs=2
        )
        results = dict(results)
    expected_cka = LinearCKA(1, 1)
    for rank in (0, 1):
        expected_cka.update([data[rank * 8 : rank * 8 + 8]], [data[rank * 8 : rank * 8 + 8, :1]])
    for rank in (0, 1):
        count, covariance_matrix, cka_matrix = results[rank]
        assert count == 16
        torch.testing.assert_close(covariance_matrix, torch.cov(data.T, correction=0))
        torch.testing.assert_close(cka_matrix, expected_cka.matrix())


# ----------------------------------------------------------------------------- solvers


def assert_averaging_plan(plan: MergePlan, dim_a: int, dim_b: int, width: int) -> None:
    """Every original feature goes to exactly one merged feature, which averages its members."""
    assert (plan.dim_a, plan.dim_b, plan.width) == (dim_a, dim_b, width)
    unmerge = torch.cat([plan.unmerge_a, plan.unmerge_b])
    merge = torch.cat([plan.merge_a, plan.merge_b], dim=1)
    assert set(unmerge.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(unmerge.sum(dim=1) == 1)
    torch.testing.assert_close(merge.sum(dim=1), torch.ones(width, dtype=merge.dtype))
    torch.testing.assert_close(merge @ unmerge, torch.eye(width, dtype=merge.dtype))
    torch.testing.assert_close(merge, (unmerge / unmerge.sum(dim=0)).T)


def members(plan: MergePlan) -> list[frozenset[int]]:
    """Original features (A first, then B) of every merged feature."""
    unmerge = torch.cat([plan.unmerge_a, plan.unmerge_b])
    return [frozenset(unmerge[:, k].nonzero().flatten().tolist()) for k in range(plan.width)]


def correlation_of_permuted_copy(dim: int, permutation: torch.Tensor, seed: int) -> torch.Tensor:
    """Joint correlation of features x (model A) and x[:, permutation] (model B)."""
    x = torch.randn(20 * dim + 20, dim, generator=random_generator(seed), dtype=torch.float64)
    moments = JointMoments(dim, dim)
    moments.update(x, x[:, permutation])
    return moments.correlation()


def random_symmetric(size: int, seed: int) -> torch.Tensor:
    values = torch.rand(size, size, generator=random_generator(seed), dtype=torch.float64) * 2 - 1
    return (values + values.T) / 2


def test_average_is_identity_averaging() -> None:
    plan = average(3)
    assert_averaging_plan(plan, 3, 3, 3)
    assert members(plan) == [frozenset({0, 3}), frozenset({1, 4}), frozenset({2, 5})]


def test_merge_plan_rejects_inconsistent_shapes() -> None:
    with pytest.raises(MergeError, match="merge_a r×d_a"):
        MergePlan(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, 2), torch.zeros(2, 3))


@FAST
@given(seed=seeds, dim=st.integers(1, 5))
def test_permute_is_the_optimal_assignment(seed: int, dim: int) -> None:
    similarity = torch.rand(dim, dim, generator=random_generator(seed), dtype=torch.float64)
    plan = permute(similarity)
    assert_averaging_plan(plan, dim, dim, dim)
    partner = plan.unmerge_b.argmax(dim=0)  # B feature merged with A feature k
    achieved = similarity[torch.arange(dim), partner].sum().item()
    best = max(
        similarity[torch.arange(dim), list(p)].sum().item()
        for p in itertools.permutations(range(dim))
    )
    assert achieved == pytest.approx(best)


def test_permute_recovers_a_permuted_copy_and_rejects_rectangles() -> None:
    permutation = torch.randperm(12, generator=random_generator(3))
    joint = correlation_of_permuted_copy(12, permutation, seed=4)
    plan = permute(joint[:12, 12:])
    x = torch.randn(5, 12)
    merged = plan.merge_features(x, x[:, permutation])
    torch.testing.assert_close(merged, x)
    with pytest.raises(MergeError, match="square"):
        permute(torch.zeros(3, 4))


def naive_zip(
    similarity: torch.Tensor, dim_a: int, target: int, alpha: float, budgets: list[int]
) -> list[frozenset[int]]:
    """ZipIt! written the obvious O(n^3)-per-step way, as the reference for :func:`solvers.zip`."""
    clusters = {i: {i} for i in range(len(similarity))}
    value = {(i, j): similarity[i, j].item() for i in clusters for j in clusters if i != j}
    budgets = list(budgets)

    def models(label: int) -> set[int]:
        return {0 if feature < dim_a else 1 for feature in clusters[label]}

    while len(clusters) > target:
        candidates = [
            (value[i, j], i, j)
            for i, j in itertools.combinations(sorted(clusters), 2)
            if all(budgets[m] > 0 for m in models(i) & models(j)) and value[i, j] > -math.inf
        ]
        _, keep, gone = max(candidates, key=lambda candidate: candidate[0])
        for model in models(keep) & models(gone):
            budgets[model] -= 1
        clusters[keep] |= clusters.pop(gone)
        for other in clusters:
            if other != keep:
                value[keep, other] = value[other, keep] = alpha * min(
                    value[keep, other], value[gone, other]
                )
    return sorted((frozenset(c) for c in clusters.values()), key=min)


@FAST
@given(
    seed=seeds,
    dim_a=st.integers(1, 6),
    dim_b=st.integers(1, 6),
    alpha=st.floats(0.05, 1.0),
    beta=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    data=st.data(),
)
def test_zip_agrees_with_the_naive_algorithm(
    seed: int, dim_a: int, dim_b: int, alpha: float, beta: float, data
) -> None:
    budgets = [math.floor(beta * dim_a + 1e-9), math.floor(beta * dim_b + 1e-9)]
    narrowest = max(dim_a - budgets[0], dim_b - budgets[1])
    target = data.draw(st.integers(max(1, narrowest), dim_a + dim_b), label="target")
    similarity = random_symmetric(dim_a + dim_b, seed)
    original = similarity.clone()
    plan = solvers.zip(similarity, dim_a, dim_b, target=target, alpha=alpha, beta=beta)
    assert torch.equal(similarity, original)  # the caller's matrix is left alone
    assert_averaging_plan(plan, dim_a, dim_b, target)
    assert members(plan) == naive_zip(similarity, dim_a, target, alpha, budgets)


@pytest.mark.parametrize("seed", range(3))
def test_zip_agrees_with_the_naive_algorithm_on_wider_spaces(seed: int) -> None:
    similarity = random_symmetric(27, seed)
    plan = solvers.zip(similarity, 15, 12, target=14, alpha=0.5, beta=0.5)
    assert members(plan) == naive_zip(similarity, 15, 14, 0.5, [7, 6])


@FAST
@given(
    seed=seeds,
    dim_a=st.integers(1, 8),
    dim_b=st.integers(1, 8),
    beta=st.floats(0.0, 1.0),
    alpha=st.floats(0.0, 1.0),
)
def test_zip_respects_the_within_model_budgets(
    seed: int, dim_a: int, dim_b: int, beta: float, alpha: float
) -> None:
    budgets = [math.floor(beta * dim_a + 1e-9), math.floor(beta * dim_b + 1e-9)]
    target = max(dim_a - budgets[0], dim_b - budgets[1], math.ceil((dim_a + dim_b) / 2))
    plan = solvers.zip(
        random_symmetric(dim_a + dim_b, seed), dim_a, dim_b, target=target, alpha=alpha, beta=beta
    )
    assert_averaging_plan(plan, dim_a, dim_b, target)
    # within-model merges spent by model m = d_m - (merged features containing a feature of m)
    assert dim_a - int((plan.unmerge_a.sum(dim=0) > 0).sum()) <= budgets[0]
    assert dim_b - int((plan.unmerge_b.sum(dim=0) > 0).sum()) <= budgets[1]


@FAST
@given(seed=seeds, dim=st.integers(1, 10))
def test_zip_without_budget_recovers_a_permuted_copy(seed: int, dim: int) -> None:
    permutation = torch.randperm(dim, generator=random_generator(seed))
    plan = solvers.zip(correlation_of_permuted_copy(dim, permutation, seed), dim, dim)
    assert_averaging_plan(plan, dim, dim, dim)
    assert members(plan) == [
        frozenset({k, dim + int(permutation.argsort()[k])}) for k in range(dim)
    ]


def test_zip_merges_within_a_model_when_the_budget_allows() -> None:
    x = torch.randn(400, 2, generator=random_generator(0), dtype=torch.float64)
    # A has two copies of feature 0; B has feature 0 and an unrelated feature 1
    features = torch.stack([x[:, 0], x[:, 0], x[:, 0] + 0.5 * x[:, 1], x[:, 1]], dim=1)
    joint = torch.corrcoef(features.T)
    assert frozenset({0, 1}) in members(solvers.zip(joint, 2, 2, target=3, beta=0.5))
    assert frozenset({0, 1}) not in members(solvers.zip(joint, 2, 2, target=2, beta=0.0))


def test_zip_reports_an_unreachable_width_and_bad_options() -> None:
    joint = torch.eye(6)
    with pytest.raises(MergeError, match="out of reach with beta=0.0"):
        solvers.zip(joint, 3, 3, target=2)
    with pytest.raises(MergeError, match="alpha"):
        solvers.zip(joint, 3, 3, alpha=2.0)
    with pytest.raises(MergeError, match=r"shape \(6, 6\)"):
        solvers.zip(torch.eye(5), 3, 3)
    with pytest.raises(MergeError, match="NaN"):
        solvers.zip(torch.full((6, 6), math.nan), 3, 3)


@FAST
@given(seed=seeds, dim_a=st.integers(1, 8), dim_b=st.integers(1, 8), data=st.data())
def test_elastic_zip_reaches_any_width(seed: int, dim_a: int, dim_b: int, data) -> None:
    target = data.draw(st.integers(1, dim_a + dim_b), label="target")
    plan = elastic_zip(random_symmetric(dim_a + dim_b, seed), dim_a, dim_b, target=target)
    assert_averaging_plan(plan, dim_a, dim_b, target)
    assert elastic_zip(random_symmetric(dim_a + dim_b, seed), dim_a, dim_b).width == max(
        dim_a, dim_b
    )


@FAST
@given(seed=seeds, dim_a=st.integers(1, 8), dim_b=st.integers(1, 8))
def test_elastic_zip_to_the_full_width_is_the_concatenation(
    seed: int, dim_a: int, dim_b: int
) -> None:
    plan = elastic_zip(random_symmetric(dim_a + dim_b, seed), dim_a, dim_b, target=dim_a + dim_b)
    identity = torch.eye(dim_a + dim_b)
    assert torch.equal(plan.merge_a, identity[:, :dim_a]) and torch.equal(
        plan.merge_b, identity[:, dim_a:]
    )
    assert torch.equal(plan.unmerge_a, identity[:dim_a]) and torch.equal(
        plan.unmerge_b, identity[dim_a:]
    )


def heads_permuted_copy(heads: int, head_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint correlation of A's features and B = A with heads and within-head units permuted."""
    generator = random_generator(seed)
    head_order = torch.randperm(heads, generator=generator)
    permutation = torch.cat(
        [h * head_dim + torch.randperm(head_dim, generator=generator) for h in head_order]
    )
    return correlation_of_permuted_copy(heads * head_dim, permutation, seed), permutation


# ----------------------------------------------------------------------------- Hungarian


@FAST
@given(seed=seeds, rows=st.integers(1, 5), extra=st.integers(0, 2))
def test_hungarian_is_the_optimal_assignment(seed: int, rows: int, extra: int) -> None:
    similarity = torch.rand(rows, rows + extra, generator=random_generator(seed))
    matched_rows, columns = solvers.hungarian(similarity)
    assert matched_rows.tolist() == list(range(rows))
    assert len(set(columns.tolist())) == rows
    best = max(
        similarity[torch.arange(rows), list(p)].sum().item()
        for p in itertools.permutations(range(rows + extra), rows)
    )
    assert similarity[matched_rows, columns].sum().item() == pytest.approx(best)


def test_hungarian_counts_minus_infinity_as_minus_one() -> None:
    # row 0 may never merge: still matched (a complete matching), at the cost of -1
    similarity = torch.tensor([[-math.inf, -math.inf], [0.5, 0.2]], dtype=torch.float64)
    assert solvers.hungarian(similarity)[1].tolist() == [1, 0]
    # -inf is exactly -1: here it ties with an anti-correlated pair, and the answers agree
    similarity = torch.tensor([[-math.inf, 0.3, 0.0], [0.2, 0.1, -1.0], [0.4, -1.0, 0.6]])
    as_minus_one = torch.where(similarity == -math.inf, -1.0, similarity)
    assert torch.equal(solvers.hungarian(similarity)[1], solvers.hungarian(as_minus_one)[1])


def test_pairing_plan_averages_each_feature_with_its_partner() -> None:
    plan = solvers.pairing_plan(torch.tensor([2, 0, 1]))
    assert_averaging_plan(plan, 3, 3, 3)
    assert members(plan) == [frozenset({0, 5}), frozenset({1, 3}), frozenset({2, 4})]


# ----------------------------------------------------------------------------- blocks


def test_place_writes_each_part_at_its_positions_and_zero_elsewhere() -> None:
    swap = permute(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    placements = [
        Placement(swap, torch.tensor([0, 2]), torch.tensor([2, 0]), torch.tensor([1, 2])),
        Placement(average(1), torch.tensor([1]), torch.tensor([1]), torch.tensor([0])),
    ]
    plan = place(placements, 3, 3, 3)
    assert plan.merge_a.dtype == torch.float64
    assert_averaging_plan(plan, 3, 3, 3)
    for part, merged, units_a, units_b in placements:
        assert torch.equal(plan.merge_a[merged][:, units_a], part.merge_a.double())
        assert torch.equal(plan.merge_b[merged][:, units_b], part.merge_b.double())
        assert torch.equal(plan.unmerge_a[units_a][:, merged], part.unmerge_a.double())
        assert torch.equal(plan.unmerge_b[units_b][:, merged], part.unmerge_b.double())
    assert members(plan) == [frozenset({2, 5}), frozenset({1, 3}), frozenset({0, 4})]


@pytest.mark.parametrize("order", [[0, 1, 2], [0, 2, 1]], ids=["in-order", "reordered"])
def test_place_of_one_part_covering_the_space(order: list[int]) -> None:
    """In order, a leaf's own plan comes back as float64 CPU matrices of the same values;
    reordered, it is placed as any part is."""
    part = solvers.zip(torch.corrcoef(torch.randn(6, 40, generator=torch.Generator()
                                                  .manual_seed(0))).float(), 3, 3)
    index = torch.tensor(order)
    plan = place([Placement(part, torch.arange(3), index, torch.arange(3))], 3, 3, 3)
    assert plan.merge_a.dtype == torch.float64
    assert torch.equal(plan.merge_a[:, index], part.merge_a.double())
    assert torch.equal(plan.unmerge_a[index], part.unmerge_a.double())
    assert torch.equal(plan.merge_b, part.merge_b.double())


def one_space(joint: torch.Tensor, width: int, solve: BlockSolver) -> blocks.BlockSpace:
    return blocks.BlockSpace(joint, width, width, solve, blocks.plan_score(solve))


@pytest.mark.parametrize("within_solver", [permute_joint, solvers.zip], ids=["permute", "zip"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_match_blocks_recovers_permuted_heads(within_solver: BlockSolver, seed: int) -> None:
    heads, head_dim = 4, 3
    dim = heads * head_dim
    joint, permutation = heads_permuted_copy(heads, head_dim, seed)
    for space in (one_space(joint, head_dim, within_solver),
                  blocks.BlockSpace(joint, head_dim, head_dim, within_solver,
                                    blocks.matching_score)):
        pairing, (plan,) = match_blocks([space], heads)
        assert_averaging_plan(plan, dim, dim, dim)
        assert torch.equal(pairing, (permutation[::head_dim] // head_dim).argsort())
        x = torch.randn(6, dim, dtype=torch.float64)
        torch.testing.assert_close(plan.merge_features(x, x[:, permutation]), x)


@FAST
@given(
    seed=seeds, heads=st.integers(1, 3), head_dim_a=st.integers(1, 3), head_dim_b=st.integers(1, 3)
)
def test_match_blocks_keeps_merged_features_inside_one_block_pair(
    seed: int, heads: int, head_dim_a: int, head_dim_b: int
) -> None:
    dim_a, dim_b = heads * head_dim_a, heads * head_dim_b
    space = blocks.BlockSpace(random_symmetric(dim_a + dim_b, seed), head_dim_a, head_dim_b,
                              elastic_zip, blocks.matching_score)
    pairing, (plan,) = match_blocks([space], heads)
    merged_per_pair = max(head_dim_a, head_dim_b)
    assert_averaging_plan(plan, dim_a, dim_b, heads * merged_per_pair)
    partners = []
    for pair in range(heads):
        rows = slice(pair * merged_per_pair, (pair + 1) * merged_per_pair)
        blocks_a = (plan.merge_a[rows].reshape(merged_per_pair, heads, head_dim_a) != 0)
        blocks_b = (plan.merge_b[rows].reshape(merged_per_pair, heads, head_dim_b) != 0)
        assert blocks_a.any(dim=2).any(dim=0).nonzero().flatten().tolist() == [pair]
        partners += blocks_b.any(dim=2).any(dim=0).nonzero().flatten().tolist()
    assert partners == pairing.tolist() and sorted(partners) == list(range(heads))


def test_match_blocks_adds_the_scores_of_spaces_sharing_the_block_order() -> None:
    qk, _ = heads_permuted_copy(3, 2, seed=0)
    v = random_symmetric(12, seed=1)
    spaces = [one_space(qk, 2, permute_joint), one_space(v, 2, solvers.zip)]
    torch.testing.assert_close(
        blocks.block_scores(spaces, 3),
        blocks.block_scores(spaces[:1], 3) + blocks.block_scores(spaces[1:], 3),
    )
    pairing, plans = match_blocks(spaces, 3)
    assert torch.equal(pairing, solvers.hungarian(blocks.block_scores(spaces, 3))[1])
    assert len(plans) == 2


def test_match_blocks_without_pairing_keeps_block_i_with_block_i() -> None:
    joint, _ = heads_permuted_copy(3, 2, seed=0)
    pairing, (plan,) = match_blocks([one_space(joint, 2, permute_joint)], 3, pair=False)
    assert pairing.tolist() == [0, 1, 2]
    for block in range(3):
        units = slice(2 * block, 2 * block + 2)
        assert plan.merge_b[units, units].sum() == 1.0  # two merged units, half of B each


def test_match_blocks_refuses_a_similarity_of_the_wrong_shape() -> None:
    with pytest.raises(MergeError, match=r"need a \(12, 12\) joint similarity, got \(10, 10\)"):
        match_blocks([one_space(torch.eye(10), 3, permute_joint)], 2)


def test_zip_paired_blocks_zips_each_pair_and_scales_the_merges() -> None:
    count, widths = 2, (2, 3, 3)
    joint = random_symmetric(count * 5, seed=0)
    pairing, (plan,) = blocks.zip_paired_blocks([joint], count, [widths], [(1.0, 1.0)])
    _, (scaled,) = blocks.zip_paired_blocks([joint], count, [widths], [(2.0, 0.5)])
    assert_averaging_plan(plan, 4, 6, 6)
    assert sorted(pairing.tolist()) == [0, 1]
    assert torch.equal(scaled.merge_a, 2.0 * plan.merge_a)
    assert torch.equal(scaled.merge_b, 0.5 * plan.merge_b)
    assert torch.equal(scaled.unmerge_a, plan.unmerge_a)
    for block_a in range(count):  # merged head k: A's head k and B's paired head only
        rows = slice(3 * block_a, 3 * block_a + 3)
        used_a = (plan.merge_a[rows].reshape(3, count, 2) != 0).any(dim=2).any(dim=0)
        used_b = (plan.merge_b[rows].reshape(3, count, 3) != 0).any(dim=2).any(dim=0)
        assert used_a.nonzero().flatten().tolist() == [block_a]
        assert used_b.nonzero().flatten().tolist() == [int(pairing[block_a])]


def duplicated_heads(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features of A (2 heads of 2) and B (3 heads: A's head 1, A's head 0, A's head 1 again,
    each permuted inside), and their joint correlation."""
    generator = random_generator(seed)
    x_a = torch.randn(400, 4, generator=generator, dtype=torch.float64)
    inside = [torch.randperm(2, generator=generator) for _ in range(3)]
    x_b = torch.cat([x_a[:, 2 * head + order] for head, order in zip((1, 0, 1), inside)], dim=1)
    moments = JointMoments(4, 6)
    moments.update(x_a, x_b)
    return x_a, x_b, moments.correlation()


@pytest.mark.parametrize("seed", range(3))
def test_zip_blocks_merges_copies_of_a_head_into_it(seed: int) -> None:
    x_a, x_b, joint = duplicated_heads(seed)
    block_plan, (plan,) = blocks.zip_blocks([joint], (2, 3), [2], [False], target=2, alpha=1.0)
    assert blocks.merged_blocks(block_plan) == [[0, 3], [1, 2, 4]]  # B's blocks are 2, 3, 4
    assert_averaging_plan(plan, 4, 6, 4)
    torch.testing.assert_close(plan.merge_features(x_a, x_b), x_a)
    torch.testing.assert_close(plan.unmerge_features(x_a)[1], x_b)


def test_zip_blocks_keeps_a_pinned_order_and_can_merge_nothing() -> None:
    _, _, joint = duplicated_heads(seed=0)
    block_plan, (plan,) = blocks.zip_blocks([joint], (2, 3), [2], [True], target=2, alpha=1.0)
    for k, contributors in enumerate(blocks.merged_blocks(block_plan)):
        for x in contributors:  # unit i of every contributing block goes to merged unit i
            merge = plan.merge_a if x < 2 else plan.merge_b
            block = x if x < 2 else x - 2
            square = merge[2 * k:2 * k + 2, 2 * block:2 * block + 2]
            assert torch.equal(square != 0, torch.eye(2, dtype=torch.bool))
    block_plan, _ = blocks.zip_blocks([joint], (2, 3), [2], [False], target=5)
    assert blocks.merged_blocks(block_plan) == [[0], [1], [2], [3], [4]]


# ----------------------------------------------------------------------------- weight similarity


def mlp_spec() -> dict[str, list[tuple[int, str]]]:
    """A conv, a linear layer and a head: spaces "conv" (8 channels) and "hidden" (6 units)."""
    return {
        "conv.weight": [(0, "conv")],
        "conv.bias": [(0, "conv")],
        "fc.weight": [(0, "hidden"), (1, "conv")],
        "fc.bias": [(0, "hidden")],
        "head.weight": [(1, "hidden")],
    }


def random_mlp(seed: int) -> dict[str, torch.Tensor]:
    generator = random_generator(seed)
    shapes = {
        "conv.weight": (8, 3, 3, 3),
        "conv.bias": (8,),
        "fc.weight": (6, 8),
        "fc.bias": (6,),
        "head.weight": (4, 6),
    }
    return {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}


def cosine(vectors: torch.Tensor) -> torch.Tensor:
    norms = vectors.norm(dim=1)
    return vectors @ vectors.T / norms[:, None] / norms[None, :]


def test_weight_similarity_is_the_cosine_of_every_bound_slice() -> None:
    params_a, params_b = random_mlp(0), random_mlp(1)
    conv_order = torch.eye(8, dtype=torch.float64)[torch.randperm(8, generator=random_generator(2))]
    similarity = weight_similarity(params_a, params_b, mlp_spec(), {"hidden": [torch.arange(6)]},
                                   {"conv": conv_order, "hidden": torch.eye(6)}, 6)

    def vectors(params: dict[str, torch.Tensor], fc_weight: torch.Tensor) -> torch.Tensor:
        return torch.cat([fc_weight, params["fc.bias"][:, None], params["head.weight"].T], dim=1)

    params_a = {key: value.double() for key, value in params_a.items()}
    params_b = {key: value.double() for key, value in params_b.items()}
    expected = cosine(torch.cat([vectors(params_a, params_a["fc.weight"]),
                                 vectors(params_b, params_b["fc.weight"] @ conv_order.T)]))
    torch.testing.assert_close(similarity, expected)


def test_weight_similarity_finds_a_permuted_copy_and_adds_every_place() -> None:
    params = random_mlp(0)
    hidden = torch.randperm(6, generator=random_generator(1))
    twin = {**params, "fc.weight": params["fc.weight"][hidden],
            "fc.bias": params["fc.bias"][hidden], "head.weight": params["head.weight"][:, hidden]}
    identity = {"conv": torch.eye(8), "hidden": torch.eye(6)}
    similarity = weight_similarity(params, twin, mlp_spec(), {"hidden": [torch.arange(6)]},
                                   identity, 6)
    assert torch.equal(similarity[:6, 6:].argmax(dim=1), hidden.argsort())
    # the conv's channels in two places of 4 along "conv": their slices add up
    halves = {"conv": [torch.arange(4), torch.arange(4, 8)]}
    axes = {"conv.bias": [(0, "conv")]}
    bias = params["conv.bias"].double()
    expected = cosine(torch.cat([torch.stack([bias[:4], bias[4:]], dim=1)] * 2))
    torch.testing.assert_close(weight_similarity(params, params, axes, halves, identity, 4),
                               expected)


def test_cross_only_weight_similarity_is_the_cross_block_alone() -> None:
    params_a, params_b = random_mlp(0), random_mlp(1)
    conv_order = torch.eye(8, dtype=torch.float64)[torch.randperm(8, generator=random_generator(2))]
    arguments = (params_a, params_b, mlp_spec(), {"hidden": [torch.arange(6)]},
                 {"conv": conv_order, "hidden": torch.eye(6)}, 6)
    full = weight_similarity(*arguments)
    cross = weight_similarity(*arguments, cross_only=True)
    torch.testing.assert_close(cross[:6, 6:], full[:6, 6:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cross[6:, :6], full[6:, :6], rtol=1e-12, atol=1e-12)
    for block in (cross[:6, :6], cross[6:, 6:]):  # within a model: nothing but the diagonal
        torch.testing.assert_close(block, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)
        assert not block.fill_diagonal_(0).any()
    some = torch.tensor([1, 4, 7, 9])
    torch.testing.assert_close(weight_similarity(*arguments, some, cross_only=True)[1, 7],
                               full[1, 7], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- CKA


def u_statistic_hsic(x: torch.Tensor, y: torch.Tensor) -> float:
    """Song et al.'s unbiased HSIC as a U-statistic over distinct 4-tuples (independent check)."""
    gram_x, gram_y = x @ x.T, y @ y.T
    n = len(x)
    total = 0.0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += (gram_x[i, j] * gram_y[i, j] + gram_x[i, j] * gram_y[q, r]
                  - 2 * gram_x[i, j] * gram_y[i, q]).item()
    return total / math.perm(n, 4)


def test_unbiased_hsic_matches_the_u_statistic() -> None:
    generator = random_generator(0)
    x = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    grams = [cka._gram_without_diagonal(f)[None] for f in (x, y)]
    assert cka._unbiased_hsic(*grams).item() == pytest.approx(
        u_statistic_hsic(x, y), rel=1e-9, abs=1e-12
    )


@FAST
@given(
    seed=seeds,
    samples=st.integers(4, 40),
    width_x=st.integers(1, 8),
    width_y=st.integers(1, 8),
    scale=st.floats(1e-3, 1e3),
)
def test_linear_cka_invariances(
    seed: int, samples: int, width_x: int, width_y: int, scale: float
) -> None:
    generator = random_generator(seed)
    x = torch.randn(samples, width_x, generator=generator, dtype=torch.float64)
    y = x @ torch.randn(width_x, width_y, generator=generator, dtype=torch.float64)
    y = y + torch.randn(samples, width_y, generator=generator, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(
        torch.randn(width_x, width_x, generator=generator, dtype=torch.float64)
    )
    assert linear_cka(x, x) == pytest.approx(1.0)
    value = linear_cka(x, y)
    assert linear_cka(y, x) == pytest.approx(value, abs=1e-9)
    assert linear_cka(x @ rotation, y) == pytest.approx(value, abs=1e-9)
    assert linear_cka(scale * x, y) == pytest.approx(value, abs=1e-9)


def test_linear_cka_is_low_for_independent_features_and_zero_for_constant_ones() -> None:
    generator = random_generator(0)
    x = torch.randn(512, 8, generator=generator)
    assert abs(linear_cka(x, torch.randn(512, 8, generator=generator))) < 0.1
    assert linear_cka(x, torch.ones(512, 3)) == 0.0


def test_minibatch_cka_accumulates_a_layer_matrix() -> None:
    generator = random_generator(1)
    batches = [torch.randn(16, 4, 2, 2, generator=generator) for _ in range(3)]
    whole, first, rest = LinearCKA(2, 3), LinearCKA(2, 3), LinearCKA(2, 3)
    for index, x in enumerate(batches):
        feats_a = [x, x.relu()]
        feats_b = [x.flatten(1) * 2, -x, torch.randn(16, 5, generator=generator)]
        whole.update(feats_a, feats_b)
        (first if index == 0 else rest).update(feats_a, feats_b)
    first.merge(rest)
    matrix = whole.matrix()
    assert matrix.shape == (2, 3)
    torch.testing.assert_close(first.matrix(), matrix)
    assert matrix[0, 0].item() == pytest.approx(1.0) and matrix[0, 1].item() == pytest.approx(1.0)
    assert matrix[0, 2].item() < matrix[1, 0].item()
    single = LinearCKA(1, 1)
    single.update([batches[0]], [batches[0].relu()])
    assert single.matrix().item() == pytest.approx(linear_cka(batches[0], batches[0].relu()))


def test_linear_cka_rejects_small_or_mismatched_batches() -> None:
    with pytest.raises(MergeError, match="at least 4 samples"):
        linear_cka(torch.randn(3, 2), torch.randn(3, 2))
    with pytest.raises(MergeError, match="model A saw 5 samples but model B saw 6"):
        linear_cka(torch.randn(5, 2), torch.randn(6, 2))


# ----------------------------------------------------------------------------- depth alignment


def brute_force_alignment(similarity: torch.Tensor, variant: str, last_to_last: bool,
                          allowed: torch.Tensor | None = None) -> float:
    num_shallow, num_deep = similarity.shape
    best = -math.inf
    for rest in itertools.combinations(range(1, num_deep), num_shallow - 1):
        mapping = (0,) + rest
        if last_to_last and mapping[-1] != num_deep - 1:
            continue
        if allowed is not None and not all(allowed[i, j] for i, j in enumerate(mapping)):
            continue
        best = max(best, alignment_score(similarity, mapping, variant))
    return best


def alignment_score(similarity: torch.Tensor, mapping: tuple[int, ...], variant: str) -> float:
    starts = (0,) + tuple(end + 1 for end in mapping[:-1])
    if variant == "segment-wise":
        return sum(similarity[i, end].item() for i, end in enumerate(mapping))
    return sum(
        similarity[i, start : end + 1].mean().item()
        for i, (start, end) in enumerate(zip(starts, mapping))
    )


@FAST
@given(
    seed=seeds,
    num_shallow=st.integers(1, 5),
    extra=st.integers(0, 4),
    variant=st.sampled_from(["segment-wise", "layer-wise"]),
    last_to_last=st.booleans(),
)
def test_depth_alignment_is_optimal(
    seed: int, num_shallow: int, extra: int, variant: str, last_to_last: bool
) -> None:
    num_deep = num_shallow + extra
    if last_to_last and num_shallow == 1 and num_deep > 1:
        last_to_last = False
    similarity = torch.rand(
        num_shallow, num_deep, generator=random_generator(seed), dtype=torch.float64
    )
    result = align_depth(similarity, variant, last_to_last=last_to_last)
    mapping = result.mapping
    assert mapping[0] == 0 and all(a < b for a, b in zip(mapping, mapping[1:]))
    assert not last_to_last or mapping[-1] == num_deep - 1
    assert result.score == pytest.approx(alignment_score(similarity, mapping, variant))
    assert result.score == pytest.approx(brute_force_alignment(similarity, variant, last_to_last))
    assert [segment[-1] for segment in result.segments] == list(mapping)
    covered = [block for segment in result.segments for block in segment]
    assert covered == list(range(mapping[-1] + 1))
    assert set(result.padding) == set(range(num_deep)) - set(mapping)


@FAST
@given(seed=seeds, num_shallow=st.integers(1, 4), extra=st.integers(0, 3),
       variant=st.sampled_from(["segment-wise", "layer-wise"]))
def test_depth_alignment_keeps_to_the_allowed_pairs(seed: int, num_shallow: int, extra: int,
                                                    variant: str) -> None:
    generator = random_generator(seed)
    num_deep = num_shallow + extra
    similarity = torch.rand(num_shallow, num_deep, generator=generator, dtype=torch.float64)
    allowed = torch.rand(num_shallow, num_deep, generator=generator) < 0.7
    best = brute_force_alignment(similarity, variant, False, allowed)
    if best == -math.inf:
        with pytest.raises(MergeError, match="no monotone alignment"):
            align_depth(similarity, variant, allowed=allowed)
        return
    result = align_depth(similarity, variant, allowed=allowed)
    assert all(allowed[i, j] for i, j in enumerate(result.mapping))
    assert result.score == pytest.approx(best)


def test_layer_wise_alignment_scores_the_blocks_before_the_aligned_one() -> None:
    # shallow block 1 resembles deep blocks 1 and 2 (its segment), not block 3 after it
    similarity = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.9, 0.1, 0.6]])
    assert align_depth(similarity, "layer-wise").mapping == (0, 1)
    assert align_depth(similarity, "layer-wise", last_to_last=True).segments == (
        range(0, 1),
        range(1, 4),
    )
    assert align_depth(similarity, "segment-wise", last_to_last=True).padding == (1, 2)


def test_depth_alignment_rejects_a_deeper_shallow_model() -> None:
    with pytest.raises(MergeError, match="3 shallow blocks cannot map into 2 deep blocks"):
        align_depth(torch.zeros(3, 2))
    with pytest.raises(MergeError, match="variant"):
        align_depth(torch.zeros(2, 2), "blockwise")


@given(st.integers(0, 2**31 - 1))
@settings(max_examples=50, deadline=None)
def test_zip_row_maxima_equal_tensor_max_with_ties_and_exhausted_rows(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randint(0, 3, (7, 7), generator=generator).double()  # many ties
    matrix[torch.rand(7, 7, generator=generator) < 0.3] = -math.inf
    matrix[seed % 7] = -math.inf  # a row with nothing left to merge
    values, columns = solvers._row_max(matrix.numpy())
    expected_values, expected_columns = matrix.max(dim=1)
    assert torch.equal(torch.from_numpy(values), expected_values)
    assert torch.equal(torch.from_numpy(columns), expected_columns)


@pytest.mark.parametrize("shape, axis", [((6, 4, 9), 1), ((6, 9, 4), 2), ((3, 2, 5, 4), 1),
                                         ((40, 4), 1)])
def test_moments_of_a_view_equal_the_moments_of_its_rows(shape, axis) -> None:
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randn(*shape, dtype=torch.float64) + x
    from_rows, from_view = JointMoments(shape[axis], shape[axis]), JointMoments(shape[axis],
                                                                              shape[axis])
    from_rows.update(feature_rows(x, axis), feature_rows(y, axis))
    from_view.update(feature_view(x, axis), feature_view(y, axis))
    assert from_view.count.item() == from_rows.count.item()
    torch.testing.assert_close(from_view.sum_outer, from_rows.sum_outer)
    torch.testing.assert_close(from_view.sum, from_rows.sum)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_apply_along_a_sparse_matrix_equals_the_dense_product(axis: int) -> None:
    generator = torch.Generator().manual_seed(3)
    tensor = torch.randn(40, 36, 3, generator=generator, dtype=torch.float64)
    size = tensor.shape[axis]
    permutation = torch.eye(size, dtype=torch.float64)[torch.randperm(size, generator=generator)]
    averaging = permutation.clone()
    averaging[0, :2] = 0.5  # a merged unit: the mean of two
    for matrix in (permutation, averaging, torch.randn(size, size, dtype=torch.float64)):
        dense = (tensor.movedim(axis, -1) @ matrix.T).movedim(-1, axis)
        torch.testing.assert_close(apply_along(tensor, axis, matrix), dense, rtol=0, atol=1e-12)
    assert torch.equal(apply_along(tensor, axis, permutation),
                       tensor.index_select(axis % 3, permutation.argmax(dim=1)))


@FAST
@given(seed=seeds, width=st.integers(1, 6), problems=st.integers(1, 5),
       alpha=st.sampled_from([0.0, 0.5, 1.0]), beta=st.sampled_from([0.0, 0.5, 1.0]),
       rounded=st.booleans())
def test_batched_zip_gives_each_problem_its_own_plan(seed: int, width: int, problems: int,
                                                    alpha: float, beta: float,
                                                    rounded: bool) -> None:
    # rounded similarities tie often: the batched greedy must break ties as each zip does
    joints = torch.stack([random_symmetric(2 * width, seed + p) for p in range(problems)])
    if rounded:
        joints = joints.round(decimals=1)
    original = joints.clone()
    plans = solvers.ZipSolver(alpha, beta).batch(joints, width, width)
    assert torch.equal(joints, original)
    for joint, plan in zip(joints, plans):
        alone = solvers.zip(joint, width, width, alpha=alpha, beta=beta)
        for name in ("merge_a", "merge_b", "unmerge_a", "unmerge_b"):
            assert torch.equal(getattr(plan, name), getattr(alone, name))


def test_batched_block_scores_equal_pair_by_pair_scores() -> None:
    x = torch.randn(300, 12, dtype=torch.float64)
    joint = torch.corrcoef(torch.cat([x, x[:, torch.randperm(12)] + 0.3 * torch.randn(300, 12)],
                                     dim=1).T)
    solve = solvers.ZipSolver(alpha=0.5, beta=0.5)
    space = blocks.BlockSpace(joint, 3, 3, solve, blocks.plan_score(solve))
    scores = blocks.block_scores([space], 4)
    for a, b in itertools.product(range(4), repeat=2):
        pair = space.pair(a, b, 4)
        assert scores[a, b].item() == blocks.plan_score(functools.partial(
            solvers.zip, alpha=0.5, beta=0.5))(pair, 3, 3)


def test_correlation_in_place_equals_the_textbook_formula() -> None:
    moments = JointMoments(6, 5, 4)
    xs = [torch.randn(200, d, dtype=torch.float64) * 3 + 1 for d in (6, 5, 4)]
    xs[0][:, 2] = 2.0  # a dead unit in A and one in the third model
    xs[2][:, 0] = -1.0
    moments.update(*xs)
    mean = moments.mean
    covariance = moments.sum_outer / moments.count - torch.outer(mean, mean)
    covariance = (covariance + covariance.T) / 2
    variance = covariance.diagonal()
    alive = variance > DEAD_UNIT_RELATIVE_VARIANCE * moments.sum_outer.diagonal() / moments.count
    std = torch.where(alive, variance.sqrt(), torch.ones_like(variance))
    expected = (covariance / torch.outer(std, std) * torch.outer(alive, alive)).clamp(-1, 1)
    assert torch.equal(moments.covariance(), covariance)
    assert torch.equal(moments.correlation(), expected)
    for first, second in itertools.permutations(range(3), 2):
        rows = slice(moments.offsets[first], moments.offsets[first] + moments.dims[first])
        columns = slice(moments.offsets[second], moments.offsets[second] + moments.dims[second])
        assert torch.equal(moments.cross_correlation(first, second), expected[rows, columns])


def test_collinear_units_are_tied_and_the_weights_order_them():
    """On few samples, two units after a ReLU that are nonzero on the same sample correlate
    equally with everything: activations alone leave their match to the index; ``tied``
    (their weight similarity) orders them."""
    from mergec.algorithms.covariance import JointMoments, activation_similarity
    base = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [2.0, 1.0, 0.0]])
    x_a = base[:, [0, 0, 1]] * torch.tensor([1.0, 2.0, 1.0])  # units 0 and 1 collinear
    x_b = x_a[:, [1, 0, 2]]  # B swaps them
    moments = JointMoments(3, 3)
    moments.update(x_a, x_b)
    weights = torch.zeros(6, 6)
    weights[0, 4] = weights[4, 0] = weights[1, 3] = weights[3, 1] = 1.0  # the true partners
    plain = activation_similarity(moments, 3)
    broken = activation_similarity(moments, 3, tied=lambda units: weights)
    assert plain[0, 3] > plain[0, 4]  # the index decides, wrongly
    assert broken[0, 4] > broken[0, 3] and broken[1, 3] > broken[1, 4]
    assert torch.equal(broken[2], plain[2])  # a unit that is not tied is left alone


def test_an_empty_batch_adds_nothing_to_the_moments() -> None:
    data = torch.randn(20, 4, dtype=torch.float64)
    moments, reference = JointMoments(2, 2), JointMoments(2, 2)
    moments.update(data[:0, :2], data[:0, 2:])
    for accumulator in (moments, reference):
        accumulator.update(data[:, :2], data[:, 2:])
    assert torch.equal(moments.sum_outer, reference.sum_outer)
    assert moments.count.item() == 20


def test_moments_merged_into_an_empty_accumulator_keep_accumulating() -> None:
    """An accumulator that has a completed matrix but no origin yet (merged into, or set)
    takes its origin from the next batch and moves the matrix there before adding to it."""
    data = torch.randn(90, 5, dtype=torch.float64) * 2 + 3
    parts = data.split(30)
    first = JointMoments(2, 3)
    first.update(parts[0][:, :2], parts[0][:, 2:])
    merged, restored = JointMoments(2, 3), JointMoments(2, 3)
    merged.merge(first)
    restored.count, restored.sum = first.count.clone(), first.sum.clone()
    restored.sum_outer = first.sum_outer.clone()
    for accumulator in (merged, restored):
        for part in parts[1:]:
            accumulator.update(part[:, :2], part[:, 2:])
        torch.testing.assert_close(accumulator.sum_outer, data.T @ data)
        torch.testing.assert_close(accumulator.covariance(), torch.cov(data.T, correction=0))
