"""annotate-units and permute on real architectures (torchvision, transformers), random weights.

Invariant 1 of the design on models users merge: permuting every free space of a model by a
random allowed permutation leaves its outputs unchanged (or, for a backbone whose outputs are
features, permutes them exactly as ``spec.outputs`` says), the permutation really moves weights,
and enough of the model is free to be worth merging (coverage).

Weights are random, and chosen so that a wrong binding shows in the outputs: every parameter
that initialisation leaves constant or negligible (norm affines, zero biases, class tokens,
ConvNeXt's 1e-6 layer scale, torchvision ViT's zero head and 1e-6 MLP biases) is randomised (a
constant tensor is the same under every permutation), BatchNorm running statistics are measured
on random inputs (keeps deep mobile networks from saturating), and transformers weights are
drawn with std 0.2 rather than 0.02 (attention far from uniform). With these, dropping any one
binding of a moved space from the spec makes the function check fail (checked by hand on a
sample of ~18 bindings per model; the only survivor is a key bias, which softmax cancels).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torchvision
import transformers
from torch import nn
from torch.utils import _pytree as pytree

import mergec
from mergec.ir.spec import UnitSpec
from mergec.permute import random_permutations

pytestmark = pytest.mark.slow

SEED = 1
RTOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_thread_and_cleanup():
    """Runs these models on one thread: on a loaded 2-core machine, more threads than free cores
    made forward passes many times slower (OpenMP synchronisation), and one is fast enough.
    Afterwards frees the cached models (about 2 GB) for the rest of the session."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torchvision_case.cache_clear()
    transformers_case.cache_clear()


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def randomise_constants(model: nn.Module, example: Any, seed: int = 0) -> nn.Module:
    """Replaces every constant or negligible (|x| < 1e-4) floating-point parameter: zeros by
    small normal noise, other constants by uniform values in [0.5, 1.5] (positive: scales).
    BatchNorm running statistics are then measured on random inputs shaped like ``example`` (an
    image batch; models without BatchNorm never look at it), so that activations stay well
    scaled through deep networks and every unit affects the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.parameters():
            if not tensor.is_floating_point() or tensor.numel() < 2:
                continue
            if tensor.min() != tensor.max() and tensor.abs().max() >= 1e-4:
                continue
            if tensor.abs().max() < 1e-4:
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
            else:
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
        _calibrate_batch_norms(model, example, generator)
    return model.eval()


def _calibrate_batch_norms(model: nn.Module, example: torch.Tensor,
                           generator: torch.Generator) -> None:
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the calibration batches
    model.train()
    model(torch.randn((8,) + tuple(example.shape[1:]), generator=generator))
    for norm in norms:
        norm.momentum = 0.1


def _image(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _tokens(batch: int = 2, length: int = 12, vocab: int = 100) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def _padded_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and an attention mask whose first sequence is padded at the end."""
    ids = _tokens()
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    return ids, mask


tv = torchvision.models

#: name -> (factory, example input). Standard constructors at 64x64; torchvision's ViT checks
#: the image size, so vit_b_16 is built for 64x64 (same layers, 16 patches).
TORCHVISION: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "resnet18": (tv.resnet18, lambda: _image(64)),
    "resnet50": (tv.resnet50, lambda: _image(64)),
    "vgg11_bn": (tv.vgg11_bn, lambda: _image(64)),
    "densenet121": (tv.densenet121, lambda: _image(64)),
    "mobilenet_v3_small": (tv.mobilenet_v3_small, lambda: _image(64)),
    "efficientnet_b0": (tv.efficientnet_b0, lambda: _image(64)),
    "convnext_tiny": (tv.convnext_tiny, lambda: _image(64)),
    "vit_b_16": (lambda: tv.vit_b_16(image_size=64), lambda: _image(64)),
    "swin_t": (tv.swin_t, lambda: _image(64)),
}

#: Small configs. Weights drawn 10x wider than the default initialiser (std 0.02), so that
#: attention is far from uniform and every head and bias shows in the hidden states.
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             vocab_size=100, initializer_range=0.2)


def _bert() -> nn.Module:
    return transformers.BertModel(transformers.BertConfig(**SMALL, max_position_embeddings=64))


def _vit() -> nn.Module:
    config = transformers.ViTConfig(**{k: v for k, v in SMALL.items() if k != "vocab_size"},
                                    image_size=32, patch_size=8)
    return transformers.ViTModel(config)


def _gpt2() -> nn.Module:
    return transformers.GPT2Model(transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, n_inner=128, vocab_size=100, n_positions=64,
        initializer_range=0.2, bos_token_id=0, eos_token_id=0))


def _llama(kv_heads: int = 4) -> nn.Module:
    return transformers.LlamaModel(transformers.LlamaConfig(
        **SMALL, num_key_value_heads=kv_heads, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0))


#: name -> (factory, example input (a tensor or a tuple of positional inputs: input_ids and
#: attention_mask), keyword arguments of the eager call that match the trace).
TRANSFORMERS: dict[str, tuple[Callable[[], nn.Module], Callable[[], Any], dict]] = {
    "bert": (_bert, _tokens, {}),
    "bert_padded": (_bert, _padded_tokens, {}),
    "hf_vit": (_vit, lambda: _image(32), {}),
    "gpt2": (_gpt2, _tokens, {"use_cache": False}),
    "llama": (_llama, _tokens, {"use_cache": False}),
    "llama_gqa": (lambda: _llama(kv_heads=2), _tokens, {"use_cache": False}),
    "llama_padded": (_llama, _padded_tokens, {"use_cache": False}),
}


@dataclass(frozen=True)
class Case:
    model: nn.Module
    example: Any  # a tensor or a tuple of positional inputs
    call_kwargs: dict[str, Any]
    spec: UnitSpec


@functools.cache
def torchvision_case(name: str) -> Case:
    factory, example = TORCHVISION[name]
    torch.manual_seed(0)
    x = example()
    model = randomise_constants(factory(), x)
    return Case(model, x, {}, mergec.discover(model, x))


@functools.cache
def transformers_case(name: str, fix_outputs: bool) -> Case:
    factory, example, call_kwargs = TRANSFORMERS[name]
    torch.manual_seed(0)
    x = example()
    model = randomise_constants(factory(), x)
    spec = mergec.discover(model, x, outputs="fixed" if fix_outputs else "free")
    return Case(model, x, call_kwargs, spec)


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------
def outputs(model: nn.Module, example: Any, call_kwargs: dict) -> list[torch.Tensor]:
    """The model's output tensors, flattened in pytree order (the order of ``spec.outputs``)."""
    args = example if isinstance(example, tuple) else (example,)
    with torch.no_grad():
        result = model(*args, **call_kwargs)
    return [leaf for leaf in pytree.tree_leaves(result) if isinstance(leaf, torch.Tensor)]


def assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        atol = RTOL * float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=RTOL, atol=atol)


def gathered(expected: list[torch.Tensor], spec: UnitSpec, perms: dict[str, torch.Tensor]
             ) -> list[torch.Tensor]:
    """The original outputs permuted as ``spec.outputs`` says the permuted model's come out."""
    assert len(spec.outputs) == len(expected)
    result = []
    for tensor, axes in zip(expected, spec.outputs):
        assert len(axes) == tensor.dim()
        for axis, space in enumerate(axes):
            if space is not None:
                tensor = tensor.index_select(axis, perms[space])
        result.append(tensor)
    return result


def moved_fraction(model: nn.Module, permuted: nn.Module) -> float:
    """Fraction of parameter elements that live in a tensor the permutation changed."""
    original = dict(model.named_parameters())
    total = changed = 0
    for key, tensor in permuted.named_parameters():
        total += tensor.numel()
        changed += tensor.numel() if not torch.equal(tensor, original[key]) else 0
    return changed / total


def bound_space(spec: UnitSpec, key: str, axis: int) -> str:
    [binding] = [b for b in spec.bindings_of(key) if b.axis == axis]
    return binding.space


def check_permutation_keeps_function(case: Case) -> None:
    permuted = mergec.permute(case.model, case.example, seed=SEED, spec=case.spec)
    expected = outputs(case.model, case.example, case.call_kwargs)
    perms = random_permutations(case.spec, SEED)
    assert_close(outputs(permuted, case.example, case.call_kwargs),
                 gathered(expected, case.spec, perms))
    assert moved_fraction(case.model, permuted) >= 0.9 * case.spec.coverage()


# ---------------------------------------------------------------------------------------------
# torchvision
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_permutation_keeps_function(name: str) -> None:
    case = torchvision_case(name)
    assert all(space is None or not case.spec.is_free(space)
               for axes in case.spec.outputs for space in axes)
    check_permutation_keeps_function(case)


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_coverage(name: str) -> None:
    spec = torchvision_case(name).spec
    assert spec.coverage() >= 0.9
    assert len(spec.free_spaces()) >= 0.5 * len(spec.spaces)


def head_spaces(spec: UnitSpec) -> list:
    """The within-head spaces of attention (blocks spaces not split into q/k/v parts)."""
    return [s for s in spec.spaces.values() if s.kind == "blocks" and not s.parts]


@pytest.mark.parametrize(("name", "layers", "head_counts"),
                         [("vit_b_16", 12, {12}), ("swin_t", 12, {3, 6, 12, 24})])
def test_torchvision_attention_heads_are_free(name: str, layers: int, head_counts: set) -> None:
    """Every attention layer has one free head permutation, shared by its q·k and v spaces,
    and both permute freely inside heads (fused qkv in_proj / qkv split into parts)."""
    spec = torchvision_case(name).spec
    heads = head_spaces(spec)
    assert len(heads) == 2 * layers
    assert len({s.block_space for s in heads}) == layers
    assert {s.block_count for s in heads} == head_counts
    assert all(spec.is_free(s.block_space) and s.within_fixed is None for s in heads)


# ---------------------------------------------------------------------------------------------
# transformers base models: they return hidden states
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_transformers_fixed_outputs_keep_function(name: str) -> None:
    """fix_outputs=True: the residual stream reaches the output, so it is fixed; what stays free
    (MLP hidden units, heads) permutes without changing the hidden states."""
    case = transformers_case(name, fix_outputs=True)
    hidden = case.spec.outputs[0][-1]
    assert hidden is not None and not case.spec.is_free(hidden)
    assert "reaches a model output" in case.spec.spaces[hidden].fixed
    check_permutation_keeps_function(case)


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_transformers_free_outputs_come_out_permuted(name: str) -> None:
    """fix_outputs=False: the residual stream is free and the hidden states come out permuted
    along it, exactly as ``spec.outputs`` says."""
    case = transformers_case(name, fix_outputs=False)
    hidden = case.spec.outputs[0][-1]
    assert hidden is not None and case.spec.is_free(hidden)
    perm = random_permutations(case.spec, SEED)[hidden]
    assert not torch.equal(perm, torch.arange(len(perm)))  # the comparison is not vacuous
    check_permutation_keeps_function(case)


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_transformers_coverage(name: str) -> None:
    fixed = transformers_case(name, fix_outputs=True).spec.coverage()
    free = transformers_case(name, fix_outputs=False).spec.coverage()
    assert free >= 0.9
    assert fixed < free


@pytest.mark.parametrize("name", ["bert", "hf_vit", "gpt2", "llama"])
def test_transformers_attention_heads_are_free(name: str) -> None:
    spec = transformers_case(name, fix_outputs=False).spec
    heads = head_spaces(spec)
    assert {s.block_count for s in heads} == {SMALL["num_attention_heads"]}
    assert len({s.block_space for s in heads}) == SMALL["num_hidden_layers"]
    assert all(spec.is_free(s.block_space) for s in heads)
    if name != "llama":  # rotary embeddings pin q/k inside heads: see the next test
        assert all(s.within_fixed is None for s in heads)


def test_llama_rotary_pins_query_key_within_heads_only() -> None:
    """Rotary embeddings pin the q/k order inside a head; heads and v stay free."""
    spec = transformers_case("llama", fix_outputs=False).spec
    query = spec.spaces[bound_space(spec, "layers.0.self_attn.q_proj.weight", 0)]
    value = spec.spaces[bound_space(spec, "layers.0.self_attn.v_proj.weight", 0)]
    assert query.kind == value.kind == "blocks"
    assert query.within_fixed is not None and spec.is_free(query.block_space)
    assert value.within_fixed is None


def test_llama_gqa_query_heads_are_free() -> None:
    """Each key/value head serves a group of query heads: query heads move with their group,
    value insides are shared by the query heads of one group."""
    spec = transformers_case("llama_gqa", fix_outputs=False).spec
    query = spec.spaces[bound_space(spec, "layers.0.self_attn.q_proj.weight", 0)]
    key = spec.spaces[bound_space(spec, "layers.0.self_attn.k_proj.weight", 0)]
    value = spec.spaces[bound_space(spec, "layers.0.self_attn.v_proj.weight", 0)]
    output = spec.spaces[bound_space(spec, "layers.0.self_attn.o_proj.weight", 1)]
    assert spec.is_free(query.id) and spec.is_free(output.id)
    order = spec.spaces[query.block_space]
    assert order.kind == "tiled" and order.factors[0][0] == key.block_space
    assert value.block_space == key.block_space
    repeat = query.block_count // key.block_count
    assert output.parts == tuple(value.parts[h // repeat] for h in range(query.block_count))
