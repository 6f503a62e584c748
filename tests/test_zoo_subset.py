"""A representative subset of the zoo run (benchmarks/coverage.py, docs/coverage.md) in CI.

One model per family of architecture mergec must handle: a residual network, grouped
convolutions, depthwise convolutions with squeeze-and-excitation, dense concatenation, window
attention, a BERT encoder, a Llama decoder with grouped-query attention and rotary embeddings,
and ALBERT, whose layers are one module shared across depth. Each must trace, keep its function
under a random permutation of its free spaces (invariant 1), and come back from a weight-matching
merge with its own permuted copy: matching must undo the permutation exactly, so the merged
model is the model.

Random weights, small inputs (64×64 images, 16 tokens of a 100-word vocabulary), one thread.
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
from torch import fx, nn
from torch.utils import _pytree as pytree

import mergec

INVARIANT_TOLERANCE = 1e-4  # permuted model against the model: max |Δ| / max |output|
MERGE_TOLERANCE = 1e-3  # merged model against the model, same measure
SEED = 1


@pytest.fixture(autouse=True, scope="module")
def one_thread_and_cleanup():
    """One torch thread (more threads than free cores made forward passes many times slower on
    a loaded machine); afterwards frees the cached models and their permuted copies."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    case.cache_clear()


def _image(seed: int = 0) -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed)),)


def _tokens(seed: int = 0) -> tuple[torch.Tensor]:
    return (torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(seed)),)


TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            vocab_size=100, max_position_embeddings=64, initializer_range=0.2)


def _bert() -> nn.Module:
    return transformers.BertModel(transformers.BertConfig(**TEXT))


def _llama_gqa() -> nn.Module:
    return transformers.LlamaModel(transformers.LlamaConfig(
        **TEXT, num_key_value_heads=2, bos_token_id=0, eos_token_id=0, pad_token_id=0))


def _albert() -> nn.Module:
    return transformers.AlbertModel(transformers.AlbertConfig(**TEXT, embedding_size=32))


def _t5_encoder() -> nn.Module:
    return transformers.T5EncoderModel(transformers.T5Config(
        d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=100,
        relative_attention_num_buckets=8))


def _squeezebert() -> nn.Module:
    groups = dict(q_groups=2, k_groups=2, v_groups=2, post_attention_groups=2,
                  intermediate_groups=2, output_groups=2)
    return transformers.SqueezeBertModel(transformers.SqueezeBertConfig(
        **TEXT, embedding_size=64, **groups))


def _deberta_v2() -> nn.Module:
    return transformers.DebertaV2Model(transformers.DebertaV2Config(
        **TEXT, relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"]))


def _mixtral() -> nn.Module:
    return transformers.MixtralModel(transformers.MixtralConfig(
        **TEXT, num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2,
        bos_token_id=0, eos_token_id=0, pad_token_id=0))


def _siglip_text() -> nn.Module:
    return transformers.SiglipTextModel(transformers.SiglipTextConfig(**TEXT))


tv = torchvision.models
#: name -> (constructor, example inputs with a seed, marks)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], tuple], list]] = {
    "resnet18": (tv.resnet18, _image, []),
    "regnet_x_400mf (grouped convs)": (tv.regnet_x_400mf, _image, []),
    "mobilenet_v3_small (depthwise, SE)": (tv.mobilenet_v3_small, _image, []),
    "densenet121 (dense concat)": (tv.densenet121, _image, [pytest.mark.slow]),
    "swin_t (window attention)": (tv.swin_t, _image, [pytest.mark.slow]),
    "bert": (_bert, _tokens, []),
    "llama_gqa (GQA, rotary, RMSNorm)": (_llama_gqa, _tokens, []),
    "albert (shared layers)": (_albert, _tokens, []),
    "t5_encoder (tied embedding under two names)": (_t5_encoder, _tokens, []),
    "squeezebert (grouped convs on the stream)": (_squeezebert, _tokens, []),
    "deberta_v2 (a parameter no activation carries)": (_deberta_v2, _tokens, []),
    "mixtral (experts: grouped products)": (_mixtral, _tokens, []),
    "siglip_text (a pooled output seen on fewer samples than units)": (
        _siglip_text, _tokens, []),
}


def _params(xfail: dict[str, str] | None = None) -> list:
    xfail = xfail or {}
    return [pytest.param(name, marks=marks + ([pytest.mark.xfail(strict=True,
                                                                 reason=xfail[name])]
                                              if name in xfail else []), id=name.split()[0])
            for name, (_, _, marks) in MODELS.items()]


#: the share of varying entries a permutation with the outputs in order moves, where not half:
#: SqueezeBERT's heads sit inside its grouped convolutions' groups, a split no rule describes,
#: so its attention spaces are fixed, and with the hidden states in order only the feed-forward
#: layers move
MOVED_SHARE = {"squeezebert (grouped convs on the stream)": 0.25}


@dataclass(frozen=True)
class Case:
    model: nn.Module
    example: Callable[[int], tuple]
    graph: fx.GraphModule
    expected: list[torch.Tensor]


def outputs(model: nn.Module, args: tuple) -> list[torch.Tensor]:
    """The output tensors in pytree order (``use_cache=False`` where the model takes it, as
    mergec's trace does)."""
    takes_cache = isinstance(model, (transformers.LlamaModel, transformers.MixtralModel))
    kwargs = {"use_cache": False} if takes_cache else {}
    with torch.no_grad():
        result = model(*args, **kwargs)
    return [leaf for leaf in pytree.tree_leaves(result) if isinstance(leaf, torch.Tensor)]


def relative_error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    assert len(actual) == len(expected)
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(actual, expected))


@functools.cache
def case(name: str) -> Case:
    build, example, _ = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    x = example(0)
    return Case(model, example, mergec.trace(model, x), outputs(model, x))


@functools.cache
def permuted(name: str, outputs: str = "fixed") -> nn.Module:
    """A copy with every free space permuted: with ``outputs="fixed"`` it computes the same
    function; with ``"auto"`` a backbone's hidden states come out permuted too."""
    c = case(name)
    return mergec.permute(c.model, c.example(0), seed=SEED,
                          spec=mergec.discover(c.graph, outputs=outputs))


@pytest.mark.parametrize("name", _params())
def test_traces_to_the_models_function(name: str) -> None:
    c = case(name)
    assert any(node.op == "placeholder" for node in c.graph.graph.nodes)
    assert relative_error(outputs(c.graph, c.example(0)), c.expected) <= INVARIANT_TOLERANCE


@pytest.mark.parametrize("name", _params())
def test_permuted_copy_computes_the_same_function(name: str) -> None:
    """Invariant 1, on a copy whose weights really moved (most of those that are not constant:
    a constant tensor, such as a norm's initial weight, is the same under every permutation)."""
    c, twin = case(name), permuted(name)
    state = twin.state_dict()
    varying = [key for key, tensor in c.model.state_dict().items()
               if tensor.is_floating_point() and tensor.numel() > 1 and tensor.min() < tensor.max()]
    moved = [key for key in varying if not torch.equal(state[key], c.model.state_dict()[key])]
    assert len(moved) >= MOVED_SHARE.get(name, 0.5) * len(varying)
    assert relative_error(outputs(twin, c.example(0)), c.expected) <= INVARIANT_TOLERANCE


@pytest.mark.parametrize("name", _params())
def test_weight_match_merge_with_permuted_copy_gives_the_model_back(name: str) -> None:
    """The copy's hidden states are permuted too (a backbone's): the merge maps them back."""
    c = case(name)
    calibration: list[Any] = [c.example(seed) for seed in (1, 2)]
    result = mergec.merge(c.model, permuted(name, "auto"), c.example(0), calibration,
                          method="weight-match", repair=None, progress=False)
    assert relative_error(outputs(result.module, c.example(0)), c.expected) <= MERGE_TOLERANCE


@pytest.mark.parametrize("name", _params())
def test_permute_merge_with_permuted_copy_gives_the_model_back(name: str) -> None:
    """Activation matching undoes the permutation too, also of a space no activation carries
    (it is matched on its weights), and on the CNNs, whose late spaces four 64×64 images
    observe on fewer samples than units: units after a ReLU that are nonzero on the same
    sample tie, and the weights break the ties."""
    c = case(name)
    calibration: list[Any] = [c.example(seed) for seed in (1, 2)]
    result = mergec.merge(c.model, permuted(name, "auto"), c.example(0), calibration,
                          method="permute", repair=None, progress=False)
    assert relative_error(outputs(result.module, c.example(0)), c.expected) <= MERGE_TOLERANCE
