"""Rotation symmetries of transformers: fold-norms, the groups annotate-units records, random
group elements (invariant 1), and merges that undo a rotation (invariant 2).

A pre-norm transformer's residual stream admits every orthogonal map that keeps the all-ones
direction once fold-norms has moved each LayerNorm's gain and shift into the layers that read
it; the inside of each attention head admits one orthogonal map for its queries and keys and
one for its values. ``mergec.permute.transform_model`` applies a random element of every
space's group; ``merge(A, T·A)`` with ``symmetry="auto"`` computes A, where
``symmetry="permutation"`` cannot.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mergec
from mergec.algorithms import solvers
from mergec.passes.annotate_units import annotate_units
from mergec.passes.fold_norms import fold_norms
from mergec.permute import random_orthogonal, transform_model
from mergec_lab.zoo import digits_cnn, small_vit

ATOL = 1e-4


def _vit(depth: int = 2, dim: int = 32, heads: int = 2, mlp: int = 48, seed: int = 0
         ) -> nn.Module:
    """A small ViT whose LayerNorms have random gains and shifts (a trained model's are not
    ones and zeros, and an unfolded gain must show)."""
    torch.manual_seed(seed)
    model = small_vit(depth=depth, dim=dim, heads=heads, mlp_dim=mlp).eval()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0.0, 0.5)
    model.pos_embed.data.normal_(0.0, 0.5)
    return model


def _images(count: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _folded(model: nn.Module, x: torch.Tensor) -> tuple[torch.fx.GraphModule, dict]:
    graph_module = mergec.trace(model, x[:2])
    return graph_module, fold_norms(graph_module)[0]


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# -- fold-norms -----------------------------------------------------------------------------
@settings(max_examples=6, deadline=None)
@given(depth=st.integers(1, 3), heads=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([4, 8]),
       mlp=st.sampled_from([16, 40]), seed=st.integers(0, 1000))
def test_fold_norms_keeps_the_function_of_generated_vits(depth, heads, head_dim, mlp, seed):
    model = _vit(depth, heads * head_dim, heads, mlp, seed)
    x = _images(4, seed)
    graph_module, report = _folded(model, x)
    assert all(text.startswith("folded") for text in report.values()), report
    assert len(report) == 2 * depth + 1
    with torch.no_grad():
        assert _error(graph_module(x), model(x)) < ATOL


def test_fold_norms_sets_the_norms_to_unit_gain_and_leaves_the_user_model_alone():
    model = _vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph_module, _ = _folded(model, _images())
    state = graph_module.state_dict()
    assert torch.equal(state["blocks.0.norm1.weight"], torch.ones(32))
    assert torch.equal(state["norm.bias"], torch.zeros(32))
    assert not torch.equal(state["blocks.0.attn.q.weight"], before["blocks.0.attn.q.weight"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_fold_norms_on_torchvision_vit():
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                              hidden_dim=32, mlp_dim=64, num_classes=10).eval()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0.0, 0.5)
    x = torch.randn(4, 3, 32, 32)
    graph_module, report = _folded(model, x)
    assert sum(text.startswith("folded") for text in report.values()) == 5, report
    with torch.no_grad():
        assert _error(graph_module(x), model(x)) < ATOL
    spec = annotate_units(graph_module)
    stream = [s for s in spec.spaces.values() if s.kind == "flat" and s.group == "orthogonal"]
    assert len(stream) == 1 and stream[0].ones_fixed


def _gpt2(lm_head: bool) -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    cls = transformers.GPT2LMHeadModel if lm_head else transformers.GPT2Model
    model = cls(config).eval()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0.0, 0.5)
    return model


def test_fold_norms_on_gpt2_folds_into_its_addmm_layers():
    model = _gpt2(lm_head=True)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    graph_module, report = _folded(model, tokens)
    assert report["transformer.h.0.ln_1"].startswith("folded into transformer.h.0.attn")
    assert report["transformer.ln_f"] == "folded into lm_head"
    with torch.no_grad():
        expected = model(tokens, use_cache=False).logits
        assert _error(graph_module(tokens)[0], expected) < ATOL


def test_fold_norms_leaves_a_norm_whose_output_is_a_model_output():
    model = _gpt2(lm_head=False)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    _, report = _folded(model, tokens)
    assert report["ln_f"].startswith("left: its output feeds output")
    assert report["h.1.ln_2"].startswith("folded")


def test_fold_norms_takes_a_backbones_last_norm_into_its_output():
    """Where the hidden states are matched (outputs=[0]), the last norm's gain and shift leave
    the graph for the output: the graph returns the gain-free norm, and the recorded affine
    gives the model's output back."""
    model = _gpt2(lm_head=False)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    graph_module = mergec.trace(model, tokens)
    report, affines = fold_norms(graph_module, outputs=[0])
    assert report["ln_f"] == "folded into output 0"
    gain, shift = affines[0].gain, affines[0].shift
    torch.testing.assert_close(gain, model.ln_f.weight.detach())
    torch.testing.assert_close(shift, model.ln_f.bias.detach())
    with torch.no_grad():
        plain = graph_module(tokens)[0]
        expected = model(tokens, use_cache=False).last_hidden_state
    assert _error(plain * gain + shift, expected) < ATOL
    assert _error(plain, expected) > 0.1  # the affine really left the graph


def _gpt2_permuted(model: nn.Module, tokens: torch.Tensor) -> nn.Module:
    """A copy with every free space permuted, the hidden states too (as a merge sees them)."""
    return mergec.permute(model, tokens, seed=1, spec=mergec.discover(model, tokens))


@pytest.mark.parametrize("method", ["permute", "weight-match", "zip"])
def test_a_pre_norm_backbone_merges_with_its_stream_rotated_back(method):
    """A GPT-2 backbone whose norms have gains (as a trained one's): its last norm feeds the
    hidden states, and once that gain is taken into the output the stream is a rotation
    space. Merged with a permuted copy, the merge gives back each model's own features, in
    A's basis and side by side in B's."""
    model = _gpt2(lm_head=False)
    tokens = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(0))
    twin = _gpt2_permuted(model, tokens)
    calibration = [(batch,) for batch in tokens.split(4)]
    result = mergec.merge(model, twin, tokens[:2], calibration, method=method, repair=None,
                          progress=False, outputs="both")
    assert result.report.folds[0]["ln_f"] == "folded into output 0"
    stream = result.report.spec.outputs[0][-1]
    assert result.report.matches[stream]["group"] == "orthogonal"
    with torch.no_grad():
        in_a, in_b = result.module(tokens)
        assert _error(in_a.last_hidden_state, model(tokens).last_hidden_state) < ATOL
        assert _error(in_b.last_hidden_state, twin(tokens).last_hidden_state) < ATOL


def test_a_pre_norm_backbone_merge_keeps_its_architecture():
    """In A's basis alone the rotated stream needs no map at the output, so A's last norm's
    gain and shift go back into the merged norm: the merge loads into GPT2Model."""
    model = _gpt2(lm_head=False)
    tokens = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(0))
    twin = _gpt2_permuted(model, tokens)
    result = mergec.merge(model, twin, tokens[:2], [(tokens,)], method="permute", repair=None,
                          progress=False)
    assert {r["map"] for r in result.report.outputs} == {"identity"}
    with torch.no_grad():
        loaded = result.into(model)(tokens).last_hidden_state
        assert _error(loaded, result.module(tokens).last_hidden_state) < ATOL
        assert _error(loaded, model(tokens).last_hidden_state) < ATOL


def test_a_partial_merge_applies_each_tails_last_norm():
    """Cut inside the network, each model's tail ends in its own last norm, whose gain and
    shift fold-norms took into the output: each tail applies its own."""
    model = _gpt2(lm_head=False)
    tokens = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(0))
    twin = _gpt2_permuted(model, tokens)
    result = mergec.merge(model, twin, tokens[:2], [(tokens,)], method="permute", repair=None,
                          progress=False, stop_at="h.1")
    with torch.no_grad():
        out_a, out_b = result.module(tokens)[:2]
        assert _error(out_a, model(tokens).last_hidden_state) < ATOL
        assert _error(out_b, twin(tokens).last_hidden_state) < ATOL


def test_fold_norms_leaves_post_norm_bert_with_its_reason():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, vocab_size=64,
                                     max_position_embeddings=16)
    model = transformers.BertForSequenceClassification(config).eval()
    for module in model.modules():  # a trained BERT's norms: a post-norm gain pins the stream
        if isinstance(module, nn.LayerNorm):
            module.weight.data.uniform_(0.5, 1.5)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    graph_module, report = _folded(model, tokens)
    attention_norm = report["bert.encoder.layer.0.attention.output.LayerNorm"]
    assert attention_norm.startswith("left: its output feeds add"), attention_norm
    spec = annotate_units(graph_module)
    assert not any(s.group == "orthogonal" and s.kind == "flat" for s in spec.spaces.values())


# -- groups ---------------------------------------------------------------------------------
def test_groups_of_a_folded_vit():
    graph_module, _ = _folded(_vit(), _images())
    spec = annotate_units(graph_module)
    groups = {(s.kind, s.group) for s in spec.spaces.values() if spec.is_free(s.id)}
    stream = next(s for s in spec.spaces.values() if s.kind == "flat" and s.group == "orthogonal")
    assert stream.ones_fixed and len(stream.sites) == 5  # the embedding sum and 4 residual sums
    heads = [s for s in spec.spaces.values() if s.kind == "blocks"]
    assert heads and all(s.group == "orthogonal" for s in heads)
    hidden = [s for s in spec.spaces.values() if s.size == 48]
    assert all(s.group == "permutation" and "gelu" in s.group_reason for s in hidden)
    assert ("flat", "permutation") in groups


def test_an_unfolded_gain_restricts_the_stream_to_permutations():
    model = _vit()
    spec = annotate_units(mergec.trace(model, _images()[:2]))
    stream = next(s for s in spec.spaces.values() if s.kind == "flat" and s.size == 32
                  and spec.is_free(s.id))
    assert stream.group == "permutation"
    assert "layer_norm with a gain" in stream.group_reason


def test_a_cnn_has_no_rotation_space():
    spec = mergec.discover(digits_cnn(width=8).eval(), torch.randn(2, 1, 8, 8))
    assert not any(s.group == "orthogonal" for s in spec.spaces.values())


# -- invariant 1 ----------------------------------------------------------------------------
@settings(max_examples=5, deadline=None)
@given(depth=st.integers(1, 3), heads=st.sampled_from([1, 2]), seed=st.integers(0, 1000))
def test_a_random_group_element_keeps_the_function(depth, heads, seed):
    model = _vit(depth, 16 * heads, heads, 24, seed)
    x = _images(4, seed)
    graph_module, _ = _folded(model, x)
    spec = annotate_units(graph_module)
    twin = transform_model(graph_module, spec, seed=seed + 1)
    with torch.no_grad():
        assert _error(twin(x), model(x)) < ATOL
        rotated = twin.state_dict()["blocks.0.attn.q.weight"]
        original = graph_module.state_dict()["blocks.0.attn.q.weight"]
        # a rotation, not a permutation: the row norms are not those of any reordering
        assert not torch.allclose(rotated.norm(dim=1).sort().values,
                                  original.norm(dim=1).sort().values, atol=1e-3)


def test_random_orthogonal_keeps_the_all_ones_direction():
    q = random_orthogonal(6, torch.Generator().manual_seed(0), ones_fixed=True)
    assert torch.allclose(q @ q.T, torch.eye(6, dtype=torch.float64), atol=1e-12)
    ones = torch.ones(6, dtype=torch.float64)
    assert torch.allclose(q @ ones, ones)


# -- invariant 2 with rotations ---------------------------------------------------------------
@pytest.fixture(scope="module")
def rotated_pair():
    model = _vit()
    x = _images(64)
    graph_module, _ = _folded(model, x)
    spec = annotate_units(graph_module)
    twin = transform_model(graph_module, spec, seed=3)
    calibration = [(batch,) for batch in x.split(16)]
    return model, graph_module, twin, x, calibration


@pytest.mark.parametrize("method", ["permute", "zip", "mudsc"])
def test_merge_undoes_a_rotation(rotated_pair, method):
    model, graph_module, twin, x, calibration = rotated_pair
    result = mergec.merge(graph_module, twin, x[:4], calibration, method=method, repair=None,
                          progress=False)
    with torch.no_grad():
        assert _error(result.module(x[:8]), model(x[:8])) < (ATOL if method != "mudsc" else 1e-2)
    groups = {entry.get("group") for entry in result.report.matches.values()}
    assert "orthogonal" in groups


def test_weight_matching_undoes_a_rotation_approximately(rotated_pair):
    """Weight matching's first sweep solves the stream on the parameters bound to it alone
    (embeddings, norms, biases, the head), which leave some of its directions weakly
    determined; the rotation is recovered to about 1e-2, not exactly."""
    model, graph_module, twin, x, calibration = rotated_pair
    result = mergec.merge(graph_module, twin, x[:4], calibration, method="weight-match",
                          repair=None, progress=False)
    with torch.no_grad():
        assert _error(result.module(x[:8]), model(x[:8])) < 1e-2


def test_permutations_alone_cannot_undo_a_rotation(rotated_pair):
    model, graph_module, twin, x, calibration = rotated_pair
    for method in ("permute", "zip"):
        result = mergec.merge(graph_module, twin, x[:4], calibration, method=method,
                              symmetry="permutation", repair=None, progress=False)
        with torch.no_grad():
            assert _error(result.module(x[:8]), model(x[:8])) > 0.1


def test_merge_of_a_model_with_itself_under_rotations_is_exact_and_loads_into_its_class():
    model = _vit()
    x = _images(32)
    result = mergec.merge(model, model, x[:4], [(x,)], method="zip", repair="repair",
                          progress=False)
    assert result.report.options["symmetry"] == "auto"
    assert any(fold.get("norm", "").startswith("folded") for fold in result.report.folds)
    loaded = result.into(small_vit(depth=2, dim=32, heads=2, mlp_dim=48))
    with torch.no_grad():
        assert _error(result.module(x), model(x)) < ATOL
        assert _error(loaded(x), model(x)) < ATOL


def _logits_std_by_head(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per block and head, the std of ``q·k`` over every pair of a query and a key token of
    the images (those of one image and of two)."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_hook(
        lambda m, i, o, name=name: outputs.__setitem__(name, o.detach()))
        for name, module in model.named_modules() if name.endswith(("attn.q", "attn.k"))]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    stds = []
    for name in sorted(outputs):
        if name.endswith("attn.q"):
            heads = dict(model.named_modules())[name[:-2]].heads
            q, k = (outputs[name[:-1] + part].reshape(-1, heads, outputs[name].shape[-1] // heads)
                    .transpose(0, 1).double() for part in "qk")
            stds.append((q @ k.transpose(1, 2)).reshape(heads, -1).std(1, correction=0))
    return torch.stack(stds)


def test_logit_std_from_moments_is_that_of_every_query_key_pair():
    from mergec.passes.repair import _logit_std
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(50, 6, generator=generator, dtype=torch.float64) + 0.3
    k = torch.randn(50, 6, generator=generator, dtype=torch.float64) @ torch.randn(
        6, 6, generator=generator, dtype=torch.float64)

    def sums(x: torch.Tensor) -> list:
        return [x.sum(0), (x * x).sum(0), torch.tensor(float(len(x))), x.T @ x]

    exact = torch.stack([(q[:, h] @ k[:, h].T).std(correction=0)
                         for h in (slice(0, 3), slice(3, 6))])
    assert torch.allclose(_logit_std(sums(q), sums(k), 2), exact, rtol=1e-10)


def _matched_heads(state, block: int, heads: int) -> torch.Tensor:
    """For each merged head of attention ``block`` (graph order), B's head merged into it:
    read from the plan of the space the block's queries write."""
    from mergec.passes.repair import _query_key_pairs, repair_targets

    targets = repair_targets(state.merged, state.specs[0], frozenset(
        s for s, summary in state.summaries.items() if summary.get("group") == "orthogonal"))
    queries = list(_query_key_pairs(targets).values())[block]
    merge_b = state.plans[targets[queries].space].merge_b.to_dense().abs()
    size = merge_b.shape[0] // heads
    return merge_b.reshape(heads, size, heads, size).sum(dim=(1, 3)).argmax(1)


def test_repair_gives_each_heads_logits_the_parents_mean_std():
    """Averaging the queries and keys of two models shrinks their products (the attention
    flattens); REPAIR rescales each merged head's queries to the mean logit std of the two
    parents' heads merged into it (A's head h and the B head matched to it)."""
    from mergec.ir.state import MergeOptions
    from mergec.merge import run_merge

    a, b = _vit(seed=0), _vit(seed=1)
    attention = b.blocks[0].attn  # B's two heads swapped: head h of B is not A's head h
    swap = torch.cat([torch.arange(16, 32), torch.arange(16)])
    with torch.no_grad():
        for layer in (attention.q, attention.k, attention.v):
            layer.weight.copy_(layer.weight[swap])
            layer.bias.copy_(layer.bias[swap])
        attention.proj.weight.copy_(attention.proj.weight[:, swap])
    x = _images(32)
    calibration = [(x[:16],), (x[16:],)]
    state = run_merge(MergeOptions(method="zip", repair=None, progress=False), (a, b), x[:4],
                      calibration)
    matched = torch.stack([_matched_heads(state, block, 2) for block in range(2)])
    assert matched[0].tolist() == [1, 0]
    wanted = (_logits_std_by_head(a, x) + _logits_std_by_head(b, x).gather(1, matched)) / 2
    found = {}
    for repair in (None, "repair"):
        result = mergec.merge(a, b, x[:4], calibration, method="zip", repair=repair,
                              progress=False)
        found[repair] = _logits_std_by_head(
            result.into(small_vit(depth=2, dim=32, heads=2, mlp_dim=48)), x)
    assert (found[None] < 0.9 * wanted).any()
    assert torch.allclose(found["repair"], wanted, rtol=1e-3)


# -- the solver -----------------------------------------------------------------------------
def test_procrustes_recovers_a_rotation_of_features():
    generator = torch.Generator().manual_seed(0)
    q = random_orthogonal(5, generator)
    x_a = torch.randn(200, 5, generator=generator, dtype=torch.float64)
    x_b = x_a @ q.T  # B's features are Q x_a
    joint = torch.cat([x_a, x_b], dim=1)
    plan = solvers.procrustes(joint.T @ joint, 5, 5)
    assert torch.allclose(2 * plan.merge_b @ x_b.T, x_a.T, atol=1e-8)
    assert torch.allclose(plan.unmerge_b @ x_a.T, x_b.T, atol=1e-8)


def test_llama_rmsnorm_folds_and_its_stream_and_values_rotate():
    """transformers writes Llama's RMSNorm as gain * (x * rsqrt(mean(x²) + eps)); rotary
    embeddings pin the queries' and keys' order inside heads, the values still rotate."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, intermediate_size=48,
                                      vocab_size=64, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.weight.data.uniform_(0.5, 1.5)
    tokens = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    graph_module, report = _folded(model, tokens)
    assert all(text.startswith("folded") for text in report.values()) and len(report) == 5
    with torch.no_grad():
        expected = model(tokens, use_cache=False).logits
        assert _error(graph_module(tokens)[0], expected) < ATOL
    spec = annotate_units(graph_module)
    stream = [s for s in spec.spaces.values() if s.kind == "flat" and s.group == "orthogonal"]
    assert len(stream) == 1 and stream[0].ones_fixed  # the unit gains stay ones
    assert [s.group for s in spec.spaces.values() if s.kind == "blocks"].count("orthogonal") == 2
    twin = transform_model(graph_module, spec, seed=2)
    calibration = [(torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(i)),)
                   for i in range(8)]
    with torch.no_grad():
        assert _error(twin(tokens)[0], expected) < ATOL
        result = mergec.merge(graph_module, twin, tokens[:2], calibration, method="permute",
                              repair=None, progress=False)
        assert _error(result.module(tokens)[0], expected) < ATOL


def test_an_elastic_merge_does_not_fold():
    """Elastic zip (another merged width, or models of different widths) permutes every space:
    fold-norms does not run, and the merge is the permutation merge."""
    model, wider = _vit(), _vit(dim=48, heads=3, mlp=72, seed=1)
    x = _images(32)
    for b, width in ((model, "sum"), (wider, "max")):
        result = mergec.merge(model, b, x[:4], [(x,)], method="zip", width=width,
                              repair=None, progress=False)
        plain = mergec.merge(model, b, x[:4], [(x,)], method="zip", width=width,
                             symmetry="permutation", repair=None, progress=False)
        assert "fold-norms" not in result.report.passes and result.report.folds == []
        with torch.no_grad():
            assert _error(result.module(x), plain.module(x)) == 0.0
