"""The match pass's spec-specific parts: leaf occurrences and full plans, the plain data it hands
to the graph-free weight similarity, attention roles, merged widths, and two-level matching of
heads through the pass."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import mergec
from mergec import MergeError
from mergec.algorithms.solvers import MergePlan, average, permute
from mergec.algorithms.tensors import as_permutation
from mergec.algorithms.weight_matching import weight_similarity
from mergec.ir.state import MergeOptions, PipelineState
from mergec.passes.annotate_units import annotate_units
from mergec.passes.collect_stats import CollectStats
from mergec.passes.match import (
    Match,
    WeightSimilarities,
    attention_roles,
    full_plan,
    leaf_weight_similarity,
    occurrences,
    target_widths,
)
from mergec.passes.trace import trace


def space_of(spec: mergec.UnitSpec, key: str, axis: int) -> str:
    return next(b.space for b in spec.bindings if b.key == key and b.axis == axis)


def a_permutation(size: int, seed: int) -> MergePlan:
    return permute(torch.rand(size, size, generator=torch.Generator().manual_seed(seed)))


def test_a_tiled_space_repeats_its_channel_plan_at_every_pixel() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 2))
    spec = mergec.discover(model.eval(), torch.randn(2, 1, 6, 6))
    channels, tiled = space_of(spec, "0.weight", 0), space_of(spec, "3.weight", 1)
    assert len(occurrences(spec, tiled)) == 16  # one per pixel
    plan = a_permutation(3, seed=0)
    full = full_plan(spec, tiled, {channels: plan, space_of(spec, "3.weight", 0): average(2)})
    pixels = torch.eye(16, dtype=torch.float64)
    for placed, leaf in zip((full.merge_a, full.merge_b, full.unmerge_a, full.unmerge_b),
                            (plan.merge_a, plan.merge_b, plan.unmerge_a, plan.unmerge_b)):
        assert torch.equal(placed, torch.kron(leaf.double(), pixels))


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left, self.right, self.head = nn.Linear(3, 2), nn.Linear(3, 4), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(torch.cat([self.left(x), self.right(x)], dim=-1)))


def test_a_composite_space_holds_its_parts_side_by_side() -> None:
    spec = mergec.discover(TwoBranches().eval(), torch.randn(2, 3))
    left, right = space_of(spec, "left.weight", 0), space_of(spec, "right.weight", 0)
    joined = space_of(spec, "head.weight", 1)
    plans = {left: a_permutation(2, seed=1), right: a_permutation(4, seed=2)}
    full = full_plan(spec, joined, plans)
    assert torch.equal(full.merge_b, torch.block_diag(plans[left].merge_b.double(),
                                                      plans[right].merge_b.double()))
    assert torch.equal(full.unmerge_a, torch.block_diag(plans[left].unmerge_a.double(),
                                                        plans[right].unmerge_a.double()))


def test_weight_similarity_of_a_leaf_reads_every_slice_bound_to_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    hidden = torch.randperm(5)
    twin = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    twin.load_state_dict({"0.weight": model[0].weight[hidden], "0.bias": model[0].bias[hidden],
                          "2.weight": model[2].weight[:, hidden], "2.bias": model[2].bias})
    spec = mergec.discover(model, torch.randn(2, 3))
    leaf = space_of(spec, "0.weight", 0)
    plans = {s: full_plan(spec, s, {t: average(spec.spaces[t].size) for t in spec.spaces})
             for s in spec.spaces}
    similarity = leaf_weight_similarity(spec, leaf, dict(model.named_parameters()),
                                        dict(twin.named_parameters()), plans)

    def vectors(net: nn.Sequential) -> torch.Tensor:
        return torch.cat([net[0].weight, net[0].bias[:, None], net[2].weight.T], dim=1).double()

    stacked = torch.cat([vectors(model), vectors(twin)]).detach()
    norms = stacked.norm(dim=1)
    torch.testing.assert_close(similarity, stacked @ stacked.T / norms[:, None] / norms[None, :])
    assert torch.equal(similarity[:5, 5:].argmax(dim=1), hidden.argsort())


class DenseBlock(nn.Module):
    """A concatenation (a composite space, normalised), a flatten (a tiled space) and a
    residual sum: every kind of space the weight similarity reads along."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.grow = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)
        self.norm, self.mix = nn.BatchNorm2d(7), nn.Conv2d(7, 4, 1)
        self.head = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = torch.relu(self.stem(x))
        joined = self.norm(torch.cat([stem, torch.relu(self.grow(stem))], dim=1))
        mixed = torch.relu(self.mix(joined)) + stem
        return self.head(torch.flatten(F.adaptive_avg_pool2d(mixed, 2), 1))


def test_incremental_weight_similarities_equal_the_computation_from_scratch() -> None:
    """What the pass solves on (kept alignments and similarities, permutations applied as
    indices) is bit for bit the similarity from the full plans, while plans change one at a
    time: permutations (the index path) and a plan that is none (the matrix path)."""
    torch.manual_seed(0)
    model, twin = DenseBlock().eval(), DenseBlock().eval()
    spec = mergec.discover(model, torch.randn(2, 2, 6, 6))
    params_a, params_b = dict(model.named_parameters()), dict(twin.named_parameters())
    leaves = [s for s in spec.spaces if spec.spaces[s].kind == "flat" and spec.is_free(s)]
    plans = {s: average(spec.spaces[s].size) for s in spec.spaces
             if spec.spaces[s].kind == "flat" or spec.spaces[s].fixed is not None}
    weights = WeightSimilarities(spec, params_a, params_b, plans)
    generator = torch.Generator().manual_seed(1)
    for step in range(12):
        leaf = leaves[step % len(leaves)]
        size = spec.spaces[leaf].size
        old, plans[leaf] = plans[leaf], a_permutation(size, seed=step) if step != 11 else \
            MergePlan(torch.eye(size) / 2, torch.rand(size, size, generator=generator) / 2,
                      torch.eye(size), torch.eye(size))
        weights.replaced(leaf, old)
        full = Match._full(spec, plans)
        for other in leaves:
            expected = leaf_weight_similarity(spec, other, params_a, params_b, full)
            assert torch.equal(weights(other), expected), (step, other)
    assert any(alignment.dim() == 1 for alignment in weights.alignments.values())
    assert any(alignment.dim() == 2 for alignment in weights.alignments.values())
    assert weights(leaves[0]) is weights(leaves[0])  # kept while no alignment it reads changes


def test_a_leafs_weight_similarity_converts_only_the_parameters_along_its_spaces() -> None:
    """The parameters become float64 when first read: one leaf's similarity (breaking one
    leaf's ties) converts those bound along the spaces it occurs in, not the whole model."""
    torch.manual_seed(0)
    model, twin = DenseBlock().eval(), DenseBlock().eval()
    spec = mergec.discover(model, torch.randn(2, 2, 6, 6))
    params_a, params_b = dict(model.named_parameters()), dict(twin.named_parameters())
    plans = {s: average(spec.spaces[s].size) for s in spec.spaces
             if spec.spaces[s].kind == "flat" or spec.spaces[s].fixed is not None}
    weights = WeightSimilarities(spec, params_a, params_b, plans)
    leaf = next(s for s in spec.spaces if spec.spaces[s].kind == "flat" and spec.is_free(s))
    weights(leaf)
    assert 0 < len(weights.params_a.converted) < len(weights.params_a)
    for key, tensor in weights.params_a.converted.items():
        assert tensor.dtype == torch.float64 and torch.equal(tensor, params_a[key].double())


def test_a_permutation_matrix_and_its_index_align_weights_alike() -> None:
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(0))
    matrix = torch.eye(5, dtype=torch.float64)[perm]
    assert torch.equal(as_permutation(matrix), perm)
    assert torch.equal(as_permutation(matrix.to_sparse()), perm)
    assert as_permutation((matrix * 0.5).to_sparse()) is None
    for not_one in (matrix * 0.5, matrix[[0, 0, 1, 2, 3]], matrix + 1e-9,
                    torch.full((5, 5), 0.2, dtype=torch.float64)):
        assert as_permutation(not_one) is None
    params_a = {"w": torch.randn(4, 5), "v": torch.randn(5, 3)}
    params_b = {"w": torch.randn(4, 5), "v": torch.randn(5, 3)}
    axes = {"w": [(0, "h"), (1, "x")], "v": [(0, "x")]}
    units = {"h": [torch.arange(4)]}
    by_matrix = weight_similarity(params_a, params_b, axes, units, {"x": matrix}, 4)
    by_index = weight_similarity(params_a, params_b, axes, units, {"x": perm}, 4)
    assert torch.equal(by_matrix, by_index)


class Heads(nn.Module):
    """q, k, v projections split into 2 heads; ``scale`` is handed to sdpa."""

    def __init__(self, scale: float | None = None) -> None:
        super().__init__()
        self.scale = scale
        self.embed, self.out = nn.Linear(3, 8), nn.Linear(8, 2)
        self.q, self.k, self.v = (nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        batch, tokens, _ = h.shape
        q, k, v = (layer(h).view(batch, tokens, 2, 4).transpose(1, 2)
                   for layer in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out(y.transpose(1, 2).reshape(batch, tokens, 8)).mean(dim=1)


def traced(model: nn.Module, x: torch.Tensor) -> tuple[fx.GraphModule, mergec.UnitSpec]:
    graph = trace(model.eval(), (x,))
    return graph, annotate_units(graph)


def test_attention_roles_follow_the_default_scale_only() -> None:
    x = torch.randn(2, 5, 3)
    graph, spec = traced(Heads(), x)
    roles = attention_roles(graph, spec)
    assert {space_of(spec, f"{name}.weight", 0): role
            for name, role in (("q", "qk"), ("k", "qk"), ("v", "v"))}.items() <= roles.items()
    assert attention_roles(*traced(Heads(scale=0.3), x)) == {}


def with_heads_swapped(model: Heads) -> Heads:
    """The same function with the two heads (of q, k, v and out's input) exchanged."""
    twin = Heads().eval()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    rows = torch.cat([torch.arange(4, 8), torch.arange(4)])
    for name in ("q", "k", "v"):
        state[f"{name}.weight"], state[f"{name}.bias"] = (state[f"{name}.weight"][rows],
                                                          state[f"{name}.bias"][rows])
    state["out.weight"] = state["out.weight"][:, rows]
    twin.load_state_dict(state)
    return twin


@pytest.mark.parametrize("symmetry", ["permutation", "auto"])
@pytest.mark.parametrize("method", ["permute", "zip"])
def test_the_pass_pairs_swapped_heads_by_two_level_matching(method: str, symmetry: str) -> None:
    torch.manual_seed(0)
    model = Heads().eval()
    twin = with_heads_swapped(model)
    x = torch.randn(64, 5, 3)
    graphs = tuple(trace(m, (x[:2],)) for m in (model, twin))
    state = PipelineState(options=MergeOptions(progress=False), models=(model, twin),
                          example=(x[:2],), calibration=[(x,)], graphs=graphs,
                          specs=tuple(annotate_units(g) for g in graphs))
    state = Match(method=method, symmetry=symmetry).run(CollectStats().run(state))
    heads = state.spec.spaces[space_of(state.spec, "q.weight", 0)]
    order = state.plans[heads.block_space]
    assert torch.equal(order.merge_b, torch.tensor([[0.0, 0.5], [0.5, 0.0]], dtype=torch.float64))
    q = state.plans[space_of(state.spec, "q.weight", 0)]
    if symmetry == "permutation":
        assert torch.equal(q.merge_b[:4, 4:] != 0, torch.eye(4, dtype=torch.bool))  # 0 ← B's 1
    else:  # heads rotate inside: head 0 ← B's head 1 by the rotation that undoes the swap
        assert heads.group == "orthogonal"
        eye = torch.eye(4, dtype=torch.float64)
        assert torch.allclose(2 * q.merge_b[:4, 4:].to(torch.float64), eye, atol=1e-6)
        assert torch.allclose(q.merge_b[:4, :4].to(torch.float64), 0 * eye, atol=1e-6)


def test_merged_widths_of_flat_spaces_and_of_heads() -> None:
    def spec(hidden: int) -> mergec.UnitSpec:
        model = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        return mergec.discover(model.eval(), torch.randn(2, 3))

    narrow, wide = spec(4), spec(6)
    hidden = space_of(narrow, "0.weight", 0)
    for width, expected in (("max", 6), ("min", 4), ("sum", 10), (0.5, 5), (7, 7), (20, 10)):
        assert target_widths(narrow, wide, width) == {hidden: expected}
    with pytest.raises(MergeError, match="width must be 'max', 'min'"):
        target_widths(narrow, wide, "widest")


class _PositionBias(nn.Module):
    """A layer plus a bias computed by an MLP from a constant table (Swin v2's continuous
    position bias): the MLP's hidden units and its 2-wide input carry no activation that
    depends on the data."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 6)
        self.bias_mlp = nn.Sequential(nn.Linear(2, 48), nn.ReLU(), nn.Linear(48, 6, bias=False))
        self.register_buffer("table", torch.randn(5, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)[:, None, :] + self.bias_mlp(self.table)[None]


@pytest.mark.parametrize("seed", range(4))
def test_spaces_no_activation_observes_are_matched_from_the_known_ones(seed: int) -> None:
    torch.manual_seed(seed)
    model, x = _PositionBias().eval(), torch.randn(4, 8)
    spec = mergec.discover(mergec.trace(model, x))
    moved = mergec.permute(model, x, seed=seed, spec=spec)
    calibration = [(torch.randn(4, 8),) for _ in range(3)]
    merged = mergec.merge(model, moved, x, calibration, method="permute", repair=None,
                          progress=False)
    with torch.no_grad():
        torch.testing.assert_close(merged.module(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_small_similarity_cache_changes_no_plan(monkeypatch) -> None:
    """WeightSimilarities drops its oldest similarities past its byte budget; recomputed, they
    are the same numbers, so weight matching ends where it does with every one kept."""
    import mergec.passes.match as match_module
    from mergec_lab.zoo import digits_cnn

    torch.manual_seed(0)
    a, b = digits_cnn(width=8).eval(), digits_cnn(width=8).eval()
    x = torch.randn(4, 1, 8, 8)
    merged = {}
    for budget in (match_module.SIMILARITY_CACHE_BYTES, 1):
        monkeypatch.setattr(match_module, "SIMILARITY_CACHE_BYTES", budget)
        merged[budget] = mergec.merge(a, b, x, [(x,)], method="weight-match", repair=None,
                                      progress=False).module.state_dict()
    first, second = merged.values()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
