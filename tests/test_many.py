"""merge_many: N models merged at once (ZipIt!'s N-way zip, MergeMany-style alignment)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from test_merge import ATOL, RTOL, calibration_of, cnn, mlp, outputs
from torch import nn

import mergec
from mergec.algorithms.covariance import JointMoments
from mergec.algorithms.solvers import ManyPlan, zip, zip_many
from mergec.errors import MergeError


def twins(model: nn.Module, x: torch.Tensor, count: int) -> list[nn.Module]:
    """``model`` and ``count - 1`` permuted copies of it."""
    return [model] + [mergec.permute(model, x[:4], seed=seed) for seed in range(1, count)]


def perturbed(model: nn.Module, seed: int, scale: float = 0.3) -> nn.Module:
    """A copy of ``model`` with noise on every floating weight: another model of its shape."""
    generator = torch.Generator().manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for tensor in other.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(scale * tensor.std().nan_to_num() * torch.randn(
                    tensor.shape, generator=generator))
    return other


def inputs(seed: int = 0, shape: tuple = (256, 6)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["permute", "weight-match", "zip", "mudsc"])
@pytest.mark.parametrize("family", ["mlp", "cnn"])
def test_a_model_and_its_permuted_copies_merge_into_it(method: str, family: str) -> None:
    model, x = (mlp(), inputs()) if family == "mlp" else (cnn(), inputs(shape=(128, 1, 8, 8)))
    result = mergec.merge_many(twins(model, x, 3), x[:4], calibration_of(x), method=method,
                               beta=0.0, repair=None, progress=False)
    torch.testing.assert_close(outputs(result.module, x), outputs(model, x), rtol=RTOL,
                               atol=ATOL)
    assert result.report.many["models"] == 3


@pytest.mark.parametrize("method", ["average", "permute", "weight-match", "zip", "mudsc"])
def test_two_models_merge_as_merge_merges_them(method: str) -> None:
    x = inputs()
    model_a, model_b = mlp(seed=0), mlp(seed=1)
    options = dict(method=method, alpha=0.5, beta=0.5, repair=None, progress=False)
    pair = mergec.merge(model_a, model_b, x[:4], calibration_of(x), **options)
    many = mergec.merge_many([model_a, model_b], x[:4], calibration_of(x), **options)
    assert many.report.many["models"] == 2  # the N-way code ran, not merge()
    expected, got = pair.module.state_dict(), many.module.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)


def test_width_sum_is_the_logit_ensemble_of_n_models() -> None:
    x = inputs()
    models = [mlp(seed=seed) for seed in range(3)]
    result = mergec.merge_many(models, x[:4], calibration_of(x), method="zip", width="sum",
                               repair=None, progress=False)
    ensemble = sum(outputs(model, x) for model in models) / 3
    torch.testing.assert_close(outputs(result.module, x), ensemble, rtol=RTOL, atol=ATOL)
    hidden = result.module.state_dict()["0.weight"].shape[0]
    assert hidden == 3 * models[0][0].out_features


def test_merging_n_models_with_batch_norm_resets_it() -> None:
    x = inputs(shape=(128, 1, 8, 8))
    models = [cnn(seed=seed) for seed in range(3)]
    result = mergec.merge_many(models, x[:4], calibration_of(x), method="permute",
                               progress=False)
    assert result.report.repair["batch_norms_reset"] == 3
    rounds = result.report.many["refinement"]
    assert 1 <= len(rounds) <= 5 and all(set(r["spaces_changed"]) == {0, 1, 2} for r in rounds)
    assert torch.isfinite(outputs(result.module, x)).all()


def test_refinement_moves_every_model_but_labels_the_merge_in_model_0s_order() -> None:
    """MergeMany's rounds match model 0 to the others like any model; the result is then
    relabelled so that the transports of model 0 are the identity."""
    x = inputs()
    models = [perturbed(mlp(), seed) for seed in range(4)]
    result = mergec.merge_many(models, x[:4], calibration_of(x), method="weight-match",
                               repair=None, progress=False)
    for space, summary in result.report.matches.items():
        assert summary["moved_units"][0] == 0, space
    assert result.report.to_dict()["many"]["models"] == 4


def test_n_way_zip_of_one_model_three_times_keeps_it_exactly() -> None:
    x = torch.randn(300, 4)
    orders = ([0, 1, 2, 3], [1, 2, 3, 0], [3, 2, 1, 0])  # model m's unit j is feature order[j]
    joint = torch.corrcoef(torch.cat([x[:, order] for order in orders], dim=1).T)
    plan = zip_many(joint, (4, 4, 4), alpha=0.5, beta=0.0)
    merged_of = [unmerge.argmax(dim=1) for unmerge in plan.unmerges]  # each unit's merged unit
    for model, order in enumerate(orders):
        assert torch.equal(merged_of[model], merged_of[0][torch.tensor(order)]), model
        assert torch.equal(plan.unmerges[model].sum(dim=1), torch.ones(4))
    assert plan.width == 4


def test_n_way_zip_of_two_models_is_zip() -> None:
    x = torch.randn(200, 6)
    y = torch.cat([x[:, [2, 0, 1, 5, 3, 4]] + 0.3 * torch.randn(200, 6)], dim=1)
    joint = torch.corrcoef(torch.cat([x, y], dim=1).T)
    pair = zip(joint, 6, 6, alpha=0.5, beta=0.5)
    many = zip_many(joint, (6, 6), alpha=0.5, beta=0.5).pair(1)
    for got, want in ((many.merge_a, pair.merge_a), (many.merge_b, pair.merge_b),
                      (many.unmerge_a, pair.unmerge_a), (many.unmerge_b, pair.unmerge_b)):
        assert torch.equal(got, want)


def test_a_joint_accumulator_holds_every_pair() -> None:
    x = torch.randn(50, 3)
    joint = JointMoments(3, 2, 3)
    joint.update(x, x[:, :2] * 2, -x)
    pair = JointMoments(3, 3)
    pair.update(x, -x)
    torch.testing.assert_close(joint.pair(0, 2).covariance(), pair.covariance())
    assert joint.pair(0, 2).count == pair.count


def test_many_plan_refuses_inconsistent_shapes() -> None:
    with pytest.raises(MergeError, match="ManyPlan"):
        ManyPlan((torch.eye(2),), (torch.eye(2),))
    with pytest.raises(MergeError, match="ManyPlan"):
        ManyPlan((torch.eye(2), torch.eye(3)), (torch.eye(2), torch.eye(3)))


@pytest.mark.parametrize("models, options, message", [
    (1, {}, "at least two"),
    (3, {"method": "mudsc", "width": 0.75}, "zip option"),
    (3, {"stop_at": "2", "outputs": "both"}, "outputs='both'"),
    (3, {"method": "permute", "width": "sum"}, "zip option"),
    (3, {"rounds": -1}, "rounds"),
    (3, {"colour": "red"}, "unknown option"),
])
def test_what_n_models_cannot_do_is_refused(models: int, options: dict, message: str) -> None:
    x = inputs()
    with pytest.raises(MergeError, match=message):
        mergec.merge_many([mlp(seed=s) for s in range(models)], x[:4], calibration_of(x),
                          progress=False, **options)


def test_two_models_the_n_way_code_does_not_cover_go_to_merge() -> None:
    from mergec_lab import zoo

    x = torch.randn(32, 1, 8, 8)
    shallow, deep = zoo.digits_mlp(width=16, depth=2), zoo.digits_mlp(width=16, depth=3)
    result = mergec.merge_many([shallow, deep], x[:2], [(x,)], repair=None, progress=False)
    assert result.report.depth is not None and result.report.many == {}


def test_models_of_different_architectures_are_refused() -> None:
    x = inputs()
    wide = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).eval()
    with pytest.raises(MergeError):
        mergec.merge_many([mlp(), mlp(seed=1), wide], x[:4], calibration_of(x),
                          method="permute", progress=False)


def wide_mlp(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, width), nn.GELU(),
                         nn.Linear(width, 4)).eval()


@pytest.mark.parametrize("width, expected", [("max", 12), ("min", 8), ("sum", 30), (16, 16)])
def test_models_of_different_widths_zip_to_any_width(width, expected: int) -> None:
    x = inputs()
    models = [wide_mlp(w, seed) for seed, w in enumerate((12, 8, 10))]
    result = mergec.merge_many(models, x[:4], calibration_of(x), method="zip", width=width,
                               repair=None, progress=False)
    assert result.module.state_dict()["0.weight"].shape[0] == expected
    merged = outputs(result.module, x)
    if width == "sum":
        ensemble = sum(outputs(model, x) for model in models) / 3
        torch.testing.assert_close(merged, ensemble, rtol=RTOL, atol=ATOL)
    assert torch.isfinite(merged).all()


@pytest.mark.parametrize("method", ["zip", "permute"])
def test_the_report_of_n_models_is_json_and_plots(method: str, tmp_path) -> None:
    x = inputs()
    result = mergec.merge_many([mlp(seed=s) for s in range(3)], x[:4], calibration_of(x),
                               method=method, repair=None, progress=False)
    report = json.loads(result.report.to_json())
    assert report["many"]["models"] == 3 and report["method"] == method
    assert set(report["spaces"]) == set(result.report.spec.spaces)
    written = result.report.plot(tmp_path)
    assert any(path.name.startswith("similarity_") for path in written)


@pytest.mark.parametrize("cut", [{"stop_at": "3"}, {"heads": "separate"}])
def test_partial_zipping_of_n_models_returns_n_outputs(cut: dict) -> None:
    model, x = cnn(), inputs(shape=(128, 1, 8, 8))
    result = mergec.merge_many(twins(model, x, 3), x[:4], calibration_of(x), method="zip",
                               beta=0.0, repair=None, progress=False, **cut)
    merged = outputs(result.module, x)
    assert isinstance(merged, tuple) and len(merged) == 3
    for output in merged:  # each tail is its own model's, on the trunk's unmerged features
        torch.testing.assert_close(output, outputs(model, x), rtol=RTOL, atol=ATOL)


def transformer(seed: int = 0, qkv: str = "separate") -> nn.Module:
    """A pre-norm transformer block of 2 heads of 4 on 6 features over 5 tokens."""
    import archgen

    torch.manual_seed(seed)
    return archgen.Net(archgen.Embed(6, 8, 5, True, False),
                       [archgen.AttentionBlock(8, 2, qkv, "sdpa", True, False),
                        archgen.MLPBlock(8, 12, "gelu", False)],
                       archgen.TokenHead(8, 3, False)).eval()


def group_norm_cnn(seed: int = 0) -> nn.Module:
    """A convolution, GroupNorm over 4 groups of 3 channels, and a pooled head."""
    import archgen

    torch.manual_seed(seed)
    return archgen.Net(archgen.ConvBN(1, 8, 3, True, "gelu"),
                       [archgen.GroupNormBlock(8, 12, 4, "gelu")],
                       archgen.PoolHead(12, 3, True)).eval()


BLOCK_FAMILIES = {"attention": (transformer, (256, 5, 6)),
                  "group_norm": (group_norm_cnn, (128, 1, 8, 8))}


@pytest.mark.parametrize("method", ["zip", "mudsc"])
@pytest.mark.parametrize("family", sorted(BLOCK_FAMILIES))
def test_n_way_zip_of_permuted_copies_with_heads_or_groups_gives_the_model(family: str,
                                                                           method: str) -> None:
    """Blocks permuted and units permuted inside them: the N-way zip pairs the blocks and
    zips inside, and recovers the model."""
    build, shape = BLOCK_FAMILIES[family]
    model, x = build(), inputs(shape=shape)
    copies = twins(model, x, 3)
    spec = mergec.discover(model, x[:4])
    assert any(space.kind == "blocks" and spec.is_free(s) for s, space in spec.spaces.items())
    for twin in copies[1:]:  # every copy is permuted
        assert any(not torch.equal(tensor, model.state_dict()[key])
                   for key, tensor in twin.state_dict().items())
    result = mergec.merge_many(copies, x[:4], calibration_of(x), method=method, beta=0.0,
                               repair=None, progress=False)
    assert result.report.many["models"] == 3
    torch.testing.assert_close(outputs(result.module, x), outputs(model, x), rtol=RTOL,
                               atol=ATOL)


@pytest.mark.parametrize("method", ["zip", "mudsc"])
@pytest.mark.parametrize("family", sorted(BLOCK_FAMILIES))
def test_n_way_zip_of_two_models_with_heads_or_groups_is_merge(family: str, method: str) -> None:
    build, shape = BLOCK_FAMILIES[family]
    x = inputs(shape=shape)
    options = dict(method=method, alpha=0.5, beta=0.5, repair=None, progress=False,
                   symmetry="permutation")
    pair = mergec.merge(build(0), build(1), x[:4], calibration_of(x), **options)
    many = mergec.merge_many([build(0), build(1)], x[:4], calibration_of(x), **options)
    assert many.report.many["models"] == 2
    expected, got = pair.module.state_dict(), many.module.state_dict()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)


REPAIRED = {"cnn": (cnn, (128, 1, 8, 8), "zip"),
            "transformer": (transformer, (128, 5, 6), "permute")}


@pytest.mark.parametrize("family", sorted(REPAIRED))
def test_repair_of_n_permuted_copies_keeps_the_model(family: str) -> None:
    """REPAIR's targets are the parents' interpolated statistics: for copies of one model,
    merged exactly, every target already has them (BatchNorms; under rotations the heads'
    queries, keys and values and the MLP's pre-activations)."""
    build, shape, method = REPAIRED[family]
    model, x = build(), inputs(shape=shape)
    result = mergec.merge_many(twins(model, x, 3), x[:4], calibration_of(x), method=method,
                               beta=0.0, repair="repair", progress=False)
    assert result.report.repair["normalisations_repaired"] > 0
    torch.testing.assert_close(outputs(result.module, x), outputs(model, x), rtol=RTOL,
                               atol=ATOL)


@pytest.mark.parametrize("family", sorted(REPAIRED))
def test_repair_of_two_models_is_merges_repair(family: str) -> None:
    build, shape, method = REPAIRED[family]
    x = inputs(shape=shape)
    options = dict(method=method, repair="repair", progress=False)
    pair = mergec.merge(build(seed=0), build(seed=1), x[:4], calibration_of(x), **options)
    many = mergec.merge_many([build(seed=0), build(seed=1)], x[:4], calibration_of(x),
                             **options)
    assert many.report.many["models"] == 2
    assert many.report.repair == pair.report.repair
    expected, got = pair.module.state_dict(), many.module.state_dict()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
