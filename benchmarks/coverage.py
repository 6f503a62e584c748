"""What annotate-units discovers on real architectures, what it costs, and whether whole model
zoos trace, permute and merge; writes docs/coverage.md.

*Discovery* (a few models, timed): graph size, spaces, free spaces, coverage (fraction of
parameter and buffer elements with an axis in a free space), the time of trace and of
annotate-units, annotate-units' time as a multiple of one forward pass of the same model on the
same input (measured in this process, medians of a few runs), and, for every space that is fixed
(identity only) or whose blocks are fixed inside, the reason annotate-units gave, grouped.

*The zoo* (every torchvision classification model, small configs of transformers
architectures): per model whether it traces, its coverage as loaded, invariant 1 (a randomly
permuted copy computes the same function), and whether merging the model with its permuted copy
gives the model back (weight matching; activation matching on a few random batches), with the
seconds of each step and the error of every step that fails. A failing model is a row, not a
crash. Rows are kept in docs/zoo.json (one per model, with the commit that measured it) and the
document is rendered from all of them after every model, so the zoo (hours on a 2-core CPU) can
be measured over several runs.

Weights are random (nothing is downloaded). Run from the repository root::

    python benchmarks/coverage.py                        # both parts, writes docs/coverage.md
    python benchmarks/coverage.py --part zoo --quick     # the zoo on a handful of models
    python benchmarks/coverage.py --part zoo --only resnet18 BertModel   # rerun two rows
    python benchmarks/coverage.py --part zoo --resume    # the models docs/zoo.json lacks
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import inspect
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
import transformers
from torch import nn
from torch.utils import _pytree as pytree

import mergec
from mergec.ir.fx import STATE_KEYS
from mergec.ir.spec import UnitSpec
from mergec.passes.annotate_units import annotate_units

sys.path.insert(0, str(Path(__file__).parent))
from _doc import git_commit, write_section  # noqa: E402

BATCH = 2


@dataclass(frozen=True)
class Entry:
    """One benchmarked model: a constructor, an example input, and how it is described."""

    name: str
    build: Callable[[], nn.Module]
    example: Callable[[], torch.Tensor]
    input: str
    family: str  # "torchvision" or "transformers"
    call_kwargs: dict[str, Any] = field(default_factory=dict)


def _image(size: int) -> torch.Tensor:
    return torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))


def _tokens(length: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, length), generator=torch.Generator().manual_seed(0))


def _torchvision(name: str) -> Entry:
    return Entry(name, getattr(torchvision.models, name), lambda: _image(224),
                 f"{BATCH}×3×224×224", "torchvision")


SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
IDS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _llama(config: dict, kv_heads: int) -> Callable[[], nn.Module]:
    return lambda: transformers.LlamaModel(transformers.LlamaConfig(
        **config, num_key_value_heads=kv_heads, max_position_embeddings=512, **IDS))


def entries() -> list[Entry]:
    """torchvision at its standard size (224×224), transformers at the tests' small configs
    (hidden 64, 2 layers, 4 heads, vocabulary 100) and at base size."""
    torchvision_names = ["resnet18", "resnet50", "vgg11_bn", "densenet121",
                         "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "vit_b_16",
                         "swin_t"]
    no_cache = {"use_cache": False}
    small_tokens = (lambda: _tokens(16, 100), f"{BATCH}×16 tokens")
    base_tokens = (lambda: _tokens(128, 30522), f"{BATCH}×128 tokens")
    llama_base = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                      intermediate_size=1376, vocab_size=32000)
    return [_torchvision(name) for name in torchvision_names] + [
        Entry("BertModel (small)", lambda: transformers.BertModel(transformers.BertConfig(
            **SMALL, vocab_size=100, max_position_embeddings=64)), *small_tokens,
            "transformers"),
        Entry("ViTModel (small, 32×32, patch 8)", lambda: transformers.ViTModel(
            transformers.ViTConfig(**SMALL, image_size=32, patch_size=8)),
            lambda: _image(32), f"{BATCH}×3×32×32", "transformers"),
        Entry("GPT2Model (small)", lambda: transformers.GPT2Model(transformers.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, n_inner=128, vocab_size=100, n_positions=64,
            **IDS)), *small_tokens, "transformers", no_cache),
        Entry("LlamaModel (small, MHA)", _llama({**SMALL, "vocab_size": 100}, 4),
              *small_tokens, "transformers", no_cache),
        Entry("LlamaModel (small, GQA 4q/2kv)", _llama({**SMALL, "vocab_size": 100}, 2),
              *small_tokens, "transformers", no_cache),
        Entry("BertModel (bert-base config)", lambda: transformers.BertModel(
            transformers.BertConfig()), *base_tokens, "transformers"),
        Entry("ViTModel (vit-base config, 224×224)", lambda: transformers.ViTModel(
            transformers.ViTConfig()), lambda: _image(224), f"{BATCH}×3×224×224",
            "transformers"),
        Entry("GPT2Model (gpt2 config)", lambda: transformers.GPT2Model(
            transformers.GPT2Config()), lambda: _tokens(128, 50257), f"{BATCH}×128 tokens",
            "transformers", no_cache),
        Entry("LlamaModel (512 wide, 8 layers, MHA)", _llama(llama_base, 8),
              lambda: _tokens(128, 32000), f"{BATCH}×128 tokens", "transformers", no_cache),
        Entry("LlamaModel (512 wide, 8 layers, GQA 8q/2kv)", _llama(llama_base, 2),
              lambda: _tokens(128, 32000), f"{BATCH}×128 tokens", "transformers", no_cache),
    ]


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------
@dataclass
class Result:
    entry: Entry
    nodes: int
    trace_s: float
    forward_s: float
    annotate_s: float
    specs: dict[str, UnitSpec]  # annotate-units' outputs option -> spec


def _median_time(function: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def measure(entry: Entry, repeats: int) -> Result:
    """Trace once per repeat; forward passes and annotate-units runs interleaved, so that load
    from other processes on the machine weighs on both sides of their ratio alike."""
    torch.manual_seed(0)
    model = entry.build().eval()
    x = entry.example()

    def forward() -> Any:
        with torch.no_grad():
            return model(x, **entry.call_kwargs)

    forward()  # warm-up
    trace_s, graph_module = _median_time(lambda: mergec.trace(model, x), repeats)
    keys = graph_module.meta[STATE_KEYS]
    name = type(model).__name__
    forward_times, annotate_times = [], []
    specs: dict[str, UnitSpec] = {}
    for _ in range(repeats):
        forward_times.append(_median_time(forward, 1)[0])
        seconds, specs["auto"] = _median_time(
            lambda: annotate_units(graph_module, keys, "auto", name), 1)
        annotate_times.append(seconds)
    if entry.family == "transformers":
        specs["fixed"] = annotate_units(graph_module, keys, "fixed", name)
    return Result(entry, len(graph_module.graph.nodes), trace_s,
                  statistics.median(forward_times), statistics.median(annotate_times), specs)


# ---------------------------------------------------------------------------------------------
# The zoo run: every torchvision classification model and small transformers architectures,
# traced, discovered, permuted (invariant 1) and merged with a permuted copy of themselves
# ---------------------------------------------------------------------------------------------
SMALL_INPUT, LARGE_INPUT = 64, 224
CALIBRATION_BATCHES = 3
INVARIANT_TOLERANCE, MERGE_TOLERANCE = 1e-4, 1e-3
METHODS = ("weight-match", "permute")


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: a constructor, example inputs drawn with a seed (the tuple of
    ``forward``'s positional inputs), and its size for ordering (parameters, 0 unknown)."""

    name: str
    family: str  # "torchvision" or "transformers"
    build: Callable[[], nn.Module]
    example: Callable[[int], tuple]
    input: str
    parameters: int = 0


def _image_batch(size: int) -> Callable[[int], tuple]:
    return lambda seed: (torch.randn(BATCH, 3, size, size,
                                     generator=torch.Generator().manual_seed(seed)),)


def _token_batch(length: int = 16, vocab: int = 100) -> Callable[[int], tuple]:
    return lambda seed: (torch.randint(0, vocab, (BATCH, length),
                                       generator=torch.Generator().manual_seed(seed)),)


def _audio_batch(samples: int) -> Callable[[int], tuple]:
    return lambda seed: (torch.randn(BATCH, samples,
                                     generator=torch.Generator().manual_seed(seed)),)


def torchvision_zoo() -> list[ZooEntry]:
    """Every classification model of torchvision, smallest first (parameter counts from the
    weights' metadata: nothing is downloaded). The input is picked at run time (64×64 where
    the model accepts it, else 224×224)."""
    entries = []
    for name in torchvision.models.list_models(module=torchvision.models):
        weights = torchvision.models.get_model_weights(name).DEFAULT
        entries.append(ZooEntry(name, "torchvision", functools.partial(_torchvision_model, name),
                                _image_batch(SMALL_INPUT), f"{BATCH}×3×{SMALL_INPUT}²",
                                int(weights.meta.get("num_params", 0))))
    return sorted(entries, key=lambda entry: (entry.parameters, entry.name))


def _torchvision_model(name: str) -> nn.Module:
    kwargs = {"init_weights": True} if name in {"googlenet", "inception_v3"} else {}
    return torchvision.models.get_model(name, **kwargs)


TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
TOKENS = dict(vocab_size=100, max_position_embeddings=64)
DECODER = dict(**TINY, **TOKENS, **IDS)
VISION = dict(image_size=32, patch_size=8)


def _hf(model: str, config: str, **kwargs: Any) -> Callable[[], nn.Module]:
    """A transformers base model of class ``model`` built from ``config(**kwargs)``; weights
    drawn with std 0.2 (not 0.02) where the config has an initializer range, so that attention
    is far from uniform and a wrong permutation shows in the outputs."""
    def build() -> nn.Module:
        settings = dict(kwargs)
        config_class = getattr(transformers, config)
        if "initializer_range" in inspect.signature(config_class.__init__).parameters:
            settings.setdefault("initializer_range", 0.2)
        return getattr(transformers, model)(config_class(**settings))
    return build


def transformers_zoo() -> list[ZooEntry]:
    """Small configs (hidden 32–64, 2 layers) of transformers architectures, as users load them:
    the base models (``AutoModel``), which return hidden states."""
    text, image = (_token_batch(), f"{BATCH}×16 tokens"), (_image_batch(32), f"{BATCH}×3×32²")
    bert = dict(**TINY, **TOKENS)
    swin = dict(image_size=32, patch_size=4, embed_dim=32, depths=[1, 1], num_heads=[2, 4],
                window_size=4)
    stages = dict(hidden_sizes=[16, 32], depths=[1, 1])
    specs: list[tuple[str, Callable[[], nn.Module], tuple]] = [
        ("BertModel", _hf("BertModel", "BertConfig", **bert), text),
        ("RobertaModel", _hf("RobertaModel", "RobertaConfig", **bert, pad_token_id=1), text),
        ("XLMRobertaModel", _hf("XLMRobertaModel", "XLMRobertaConfig", **bert, pad_token_id=1),
         text),
        ("DistilBertModel", _hf("DistilBertModel", "DistilBertConfig", dim=64, n_layers=2,
                                n_heads=4, hidden_dim=128, **TOKENS), text),
        ("ElectraModel", _hf("ElectraModel", "ElectraConfig", **bert, embedding_size=32), text),
        ("AlbertModel (layers shared)", _hf("AlbertModel", "AlbertConfig", **bert,
                                            embedding_size=32), text),
        ("DebertaV2Model", _hf("DebertaV2Model", "DebertaV2Config", **bert,
                               relative_attention=True, position_buckets=8,
                               pos_att_type=["p2c", "c2p"]), text),
        ("MPNetModel", _hf("MPNetModel", "MPNetConfig", **bert), text),
        ("MobileBertModel", _hf("MobileBertModel", "MobileBertConfig", **bert,
                                embedding_size=32, intra_bottleneck_size=32,
                                true_hidden_size=32, num_feedforward_networks=2), text),
        ("SqueezeBertModel (grouped convs)", _hf(
            "SqueezeBertModel", "SqueezeBertConfig", **bert, embedding_size=64, q_groups=2,
            k_groups=2, v_groups=2, post_attention_groups=2, intermediate_groups=2,
            output_groups=2), text),
        ("T5EncoderModel", _hf("T5EncoderModel", "T5Config", d_model=64, d_kv=16, d_ff=128,
                               num_layers=2, num_heads=4, vocab_size=100,
                               relative_attention_num_buckets=8), text),
        ("GPT2Model", _hf("GPT2Model", "GPT2Config", n_embd=64, n_layer=2, n_head=4, n_inner=128,
                          vocab_size=100, n_positions=64, **IDS), text),
        ("GPTNeoModel", _hf("GPTNeoModel", "GPTNeoConfig", hidden_size=64, num_layers=2,
                            num_heads=4, intermediate_size=128, attention_types=[
                                [["global", "local"], 1]], window_size=8, **TOKENS, **IDS),
         text),
        ("GPTNeoXModel (partial rotary)", _hf("GPTNeoXModel", "GPTNeoXConfig", **DECODER),
         text),
        ("GPTJModel", _hf("GPTJModel", "GPTJConfig", n_embd=64, n_layer=2, n_head=4,
                          n_inner=128, rotary_dim=8, vocab_size=100, n_positions=64, **IDS),
         text),
        ("OPTModel", _hf("OPTModel", "OPTConfig", hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64,
                         **TOKENS, pad_token_id=1, bos_token_id=0, eos_token_id=0), text),
        ("BloomModel (ALiBi)", _hf("BloomModel", "BloomConfig", hidden_size=64, n_layer=2,
                                   n_head=4, vocab_size=100, **IDS), text),
        ("FalconModel (multi-query)", _hf("FalconModel", "FalconConfig", hidden_size=64,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          **TOKENS, **IDS), text),
        ("LlamaModel (MHA)", _hf("LlamaModel", "LlamaConfig", **DECODER), text),
        ("LlamaModel (GQA 4q/2kv)", _hf("LlamaModel", "LlamaConfig", **DECODER,
                                        num_key_value_heads=2), text),
        ("MistralModel (GQA, sliding window)", _hf("MistralModel", "MistralConfig", **DECODER,
                                                   num_key_value_heads=2, sliding_window=8),
         text),
        ("Qwen2Model (GQA, qkv bias)", _hf("Qwen2Model", "Qwen2Config", **DECODER,
                                           num_key_value_heads=2), text),
        ("Qwen3Model (q/k norm)", _hf("Qwen3Model", "Qwen3Config", **DECODER,
                                      num_key_value_heads=2, head_dim=16), text),
        ("GemmaModel", _hf("GemmaModel", "GemmaConfig", **DECODER, num_key_value_heads=2,
                           head_dim=16), text),
        ("Gemma2Model (soft-capping)", _hf("Gemma2Model", "Gemma2Config", **DECODER,
                                           num_key_value_heads=2, head_dim=16,
                                           sliding_window=8), text),
        ("PhiModel (partial rotary)", _hf("PhiModel", "PhiConfig", **DECODER), text),
        ("Phi3Model (fused qkv, gate-up)", _hf("Phi3Model", "Phi3Config", **DECODER,
                                               num_key_value_heads=2), text),
        ("OlmoModel (non-parametric norm)", _hf("OlmoModel", "OlmoConfig", **DECODER), text),
        ("StableLmModel", _hf("StableLmModel", "StableLmConfig", **DECODER,
                                  num_key_value_heads=4), text),
        ("MixtralModel (mixture of experts, MHA)", _hf(
            "MixtralModel", "MixtralConfig", **DECODER, num_key_value_heads=4,
            num_local_experts=4, num_experts_per_tok=2), text),
        ("CLIPTextModel", _hf("CLIPTextModel", "CLIPTextConfig", **TINY, **TOKENS, **IDS), text),
        ("SiglipTextModel", _hf("SiglipTextModel", "SiglipTextConfig", **TINY, **TOKENS), text),
        ("ViTModel", _hf("ViTModel", "ViTConfig", **TINY, **VISION), image),
        ("DeiTModel", _hf("DeiTModel", "DeiTConfig", **TINY, **VISION), image),
        ("BeitModel (relative position bias)", _hf(
            "BeitModel", "BeitConfig", **TINY, **VISION, use_relative_position_bias=True),
         image),
        ("Dinov2Model", _hf("Dinov2Model", "Dinov2Config", **TINY, **VISION), image),
        ("CLIPVisionModel", _hf("CLIPVisionModel", "CLIPVisionConfig", **TINY, **VISION), image),
        ("SiglipVisionModel", _hf("SiglipVisionModel", "SiglipVisionConfig", **TINY, **VISION),
         image),
        ("SwinModel", _hf("SwinModel", "SwinConfig", **swin), image),
        ("Swinv2Model", _hf("Swinv2Model", "Swinv2Config", **swin), image),
        ("ConvNextModel", _hf("ConvNextModel", "ConvNextConfig", num_stages=2, **stages), image),
        ("ConvNextV2Model", _hf("ConvNextV2Model", "ConvNextV2Config", num_stages=2, **stages),
         image),
        ("ResNetModel", _hf("ResNetModel", "ResNetConfig", embedding_size=16, **stages), image),
        ("RegNetModel", _hf("RegNetModel", "RegNetConfig", embedding_size=16, groups_width=8,
                            **stages), image),
        ("SegformerModel", _hf("SegformerModel", "SegformerConfig", num_encoder_blocks=2,
                               depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                               patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
                               mlp_ratios=[2, 2]), image),
        ("Wav2Vec2Model (audio, weight norm)", _hf(
            "Wav2Vec2Model", "Wav2Vec2Config", **TINY, conv_dim=(32, 32), conv_stride=(5, 2),
            conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4),
         (_audio_batch(1600), f"{BATCH}×1600 samples")),
    ]
    return [ZooEntry(name, "transformers", build, example, shape)
            for name, build, (example, shape) in specs]


QUICK = ["resnet18", "mobilenet_v3_small", "regnet_x_400mf", "BertModel",
         "AlbertModel (layers shared)", "LlamaModel (GQA 4q/2kv)"]


@dataclass
class ZooResult:
    """What one zoo model gave, in plain values (a row of the results file); a step that
    failed holds its error's first line in ``errors`` and the steps after it that needed its
    result are not run."""

    name: str
    family: str
    input: str = ""
    parameters: int = 0
    nodes: int | None = None
    free: int | None = None  # spaces admitting a permutation other than the identity
    spaces: int | None = None
    coverage: float | None = None
    read_coverage: float | None = None  # of the entries the graph reads (None: not recorded)
    reasons: list[tuple[str, int, str]] = field(default_factory=list)  # of fixed spaces
    invariant_error: float | None = None
    merge_errors: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    commit: str = ""
    measured: str = ""  # UTC date and time

    def passed(self, step: str) -> bool:
        if step == "trace":
            return self.nodes is not None
        if step == "invariant":
            return self.invariant_error is not None and self.invariant_error <= INVARIANT_TOLERANCE
        error = self.merge_errors.get(step.removeprefix("merge "))
        return error is not None and error <= MERGE_TOLERANCE

    def describe(self, spec: UnitSpec) -> None:
        self.free, self.spaces = len(spec.free_spaces()), len(spec.spaces)
        self.coverage, self.reasons = spec.coverage(), _fixed_reasons(spec)
        self.read_coverage = spec.coverage(read_only=True)

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> ZooResult:
        known = {f.name for f in dataclasses.fields(cls)}
        result = cls(**{key: value for key, value in row.items() if key in known})
        result.reasons = [tuple(reason) for reason in result.reasons]
        return result


def _leaves(output: Any) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def relative_error(actual: Any, expected: Any) -> float:
    """max |actual - expected| / max |expected| over the output tensors (pytree order)."""
    got, want = _leaves(actual), _leaves(expected)
    if len(got) != len(want):
        raise ValueError(f"{len(got)} output tensors, the model has {len(want)}")
    worst = 0.0
    for a, b in zip(got, want):
        scale = float(b.abs().max()) if b.numel() else 0.0
        difference = float((a.float() - b.float()).abs().max()) if b.numel() else 0.0
        worst = max(worst, difference / scale if scale > 0 else difference)
    return worst


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _call_kwargs(model: nn.Module) -> dict[str, Any]:
    """``use_cache=False`` for a transformers model that takes it (as mergec's trace does)."""
    parameters = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in parameters else {}


def _forward(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    with torch.no_grad():
        return model(*args, **kwargs)


def _build(entry: ZooEntry, result: ZooResult) -> tuple[nn.Module, Callable[[int], tuple]]:
    """The model in eval mode and its input maker: for torchvision, 64×64 where the forward
    pass works, else 224×224."""
    torch.manual_seed(0)
    model = entry.build().eval()
    result.parameters = sum(tensor.numel() for tensor in model.parameters())
    example, result.input = entry.example, entry.input
    if entry.family == "torchvision":
        try:
            _forward(model, example(0), {})
        except Exception:  # noqa: BLE001 - any failure at 64×64 means: try the standard size
            example, result.input = _image_batch(LARGE_INPUT), f"{BATCH}×3×{LARGE_INPUT}²"
    return model, example


def _timed(result: ZooResult, step: str, function: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    try:
        return function()
    except Exception as error:  # noqa: BLE001 - a failing step is a row, not a crash
        result.errors[step] = _first_line(error)
        return None
    finally:
        result.seconds[step] = time.perf_counter() - start


def measure_zoo(entry: ZooEntry, methods: tuple[str, ...], commit: str = "") -> ZooResult:
    """Build, trace and discover (as loaded), permute under the spec with every output fixed
    and check invariant 1, merge with a copy permuted under the spec as loaded (a backbone's
    hidden states permuted too) by each method (repair=None) and compare the merged outputs
    with the model's."""
    result = ZooResult(entry.name, entry.family, entry.input, commit=commit,
                       measured=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"))
    built = _timed(result, "build", lambda: _build(entry, result))
    if built is None:
        return result
    model, example = built
    x, kwargs = example(0), _call_kwargs(model)
    expected = _timed(result, "forward", lambda: _forward(model, x, kwargs))
    if expected is None:
        return result
    graph = _timed(result, "trace", lambda: mergec.trace(model, x))
    if graph is None:
        return result
    result.nodes = len(graph.graph.nodes)
    spec = _timed(result, "discover", lambda: mergec.discover(graph))
    fixed = _timed(result, "discover fixed", lambda: mergec.discover(graph, outputs="fixed"))
    if spec is None or fixed is None:
        return result
    result.describe(spec)
    twin = _timed(result, "permute", lambda: mergec.permute(model, x, seed=1, spec=fixed))
    moved = twin if spec == fixed else _timed(
        result, "permute as loaded", lambda: mergec.permute(model, x, seed=1, spec=spec))
    if twin is None or moved is None:
        return result
    result.invariant_error = _timed(
        result, "invariant", lambda: relative_error(_forward(twin, x, kwargs), expected))
    calibration = [example(seed) for seed in range(1, CALIBRATION_BATCHES + 1)]
    for method in methods:
        def merged_error(method: str = method) -> float:
            merged = mergec.merge(model, moved, x, calibration, method=method, repair=None,
                                  progress=False)
            return relative_error(_forward(merged.module, x, {}), expected)
        error = _timed(result, f"merge {method}", merged_error)
        if error is not None:
            result.merge_errors[method] = error
    return result


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------
def _reason_and_place(text: str) -> tuple[str, str]:
    """Splits 'REASON at %node : ... (module path)' or 'REASON at return (...)' into the
    reason and a short place."""
    match = re.match(r"(.*?) at (%(\S+) : .*|return .*)$", text, re.DOTALL)
    if match is None:
        return text, ""
    reason, where, node = match.groups()
    if node is None:
        return reason, "the output"
    module = re.search(r"\(module ([^)]*)\)\s*$", where)
    return reason, f"`{node}`" + (f" in `{module.group(1)}`" if module else "")


def _fixed_reasons(spec: UnitSpec) -> list[tuple[str, int, str]]:
    """(reason, count, first place) for fixed spaces and for blocks fixed inside."""
    counts: Counter[str] = Counter()
    places: dict[str, str] = {}
    for space in spec.spaces.values():
        for prefix, text in (("", space.fixed), ("inside blocks: ", space.within_fixed)):
            if not text or (prefix and space.fixed):
                continue
            reason, place = _reason_and_place(text)
            reason = prefix + reason
            counts[reason] += 1
            places.setdefault(reason, place)
    return [(reason, count, places[reason]) for reason, count in counts.most_common()]


def _table(results: list[Result]) -> list[str]:
    lines = [
        "| model | input | graph nodes | spaces | free spaces | coverage as loaded "
        "| coverage, outputs fixed | trace s | annotate s | forward s | annotate / forward |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        spec = r.specs["auto"]
        fixed = f"{r.specs['fixed'].coverage():.3f}" if "fixed" in r.specs else "—"
        lines.append(
            f"| {r.entry.name} | {r.entry.input} | {r.nodes} | {len(spec.spaces)} "
            f"| {len(spec.free_spaces())} | {spec.coverage():.3f} | {fixed} "
            f"| {r.trace_s:.2f} | {r.annotate_s:.3f} | {r.forward_s:.3f} "
            f"| {r.annotate_s / r.forward_s:.2f}× |")
    return lines


def _reasons_section(results: list[Result]) -> list[str]:
    lines = ["### Fixed spaces and their reasons", "",
             "Per model (as loaded; for transformers also with every output fixed, "
             "`outputs=\"fixed\"`), every fixed space's reason, grouped, with a count and the "
             "first place it happened. `inside blocks` is a heads or groups space whose blocks "
             "may move but whose order inside a block is fixed.", ""]
    for r in results:
        lines.append(f"#### {r.entry.name}")
        lines.append("")
        for outputs, spec in r.specs.items():
            if len(r.specs) > 1:
                lines.append(f"outputs={outputs!r}:")
                lines.append("")
            reasons = _fixed_reasons(spec)
            if not reasons:
                lines.append("- nothing fixed")
            for reason, count, place in reasons:
                lines.append(f"- {count} × {reason}" + (f" (first: {place})" if place else ""))
            lines.append("")
    return lines


def render(results: list[Result], repeats: int, total_s: float, load_before: float
           ) -> str:
    lines = [
        DISCOVERY_BEGIN,
        "## Discovery: coverage and its cost",
        "",
        "Generated by `python benchmarks/coverage.py --part discovery` (do not edit by hand). "
        "Random weights; "
        f"batch {BATCH}; CPU ({platform.machine()}, {os.cpu_count()} cores), torch on "
        f"{torch.get_num_threads()} thread(s); "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, transformers "
        f"{transformers.__version__}; total run {total_s:.0f} s.",
        "",
        "- *graph nodes*: nodes of the traced aten graph. *spaces*: spaces in the unit spec "
        "as loaded (`mergec.discover`, `outputs=\"auto\"`); *free spaces*: those admitting a "
        "permutation other than the identity.",
        "- *coverage*: fraction of parameter and buffer elements in a state-dict entry with at "
        "least one axis in a free space. *As loaded*: what a merge aligns; transformers base "
        "models return hidden states, which a merge matches and maps back into A's basis at "
        "the output. *Outputs fixed* (`outputs=\"fixed\"`, the spec whose permutations keep "
        "the function): their residual stream is then fixed.",
        f"- *trace s*, *annotate s*: median of {repeats} runs of `mergec.trace` and of "
        "annotate-units (as loaded) on the traced graph. *forward s*: median of "
        f"{repeats} forward passes of the eager model on the same input, in the same process, "
        "under `torch.no_grad()`, interleaved with the annotate-units runs. *annotate / "
        "forward*: their ratio. The machine is shared (load average "
        f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end), so torch "
        "runs on one thread by default (`--threads`): with more threads than free cores, OpenMP's "
        "synchronisation made forward passes 20-500× slower here. Absolute times are still "
        "noisy; annotate-units is single-threaded Python.",
        "- torchvision models are the standard constructors at 224×224. transformers models "
        "at the tests' small configs (hidden 64, 2 layers, 4 heads, MLP 128, vocabulary 100) "
        "and at base size: `BertConfig()` (bert-base), `ViTConfig()` (vit-base/16, 224×224), "
        "`GPT2Config()` (gpt2), and a Llama of width 512, 8 layers, 8 heads, MLP 1376, "
        "vocabulary 32000 (the default `LlamaConfig()` is 7B parameters: too large here).",
        "- Spaces of size 3 fixed with \"block i is selected by position\" are the q/k/v "
        "selector of a fused qkv projection (torchvision ViT's `in_proj`, Swin's `qkv`): the "
        "three parts are separate spaces and are free; only their order is fixed, as it must "
        "be.",
        "",
        "### Summary",
        "",
        *_table(results),
        "",
        *_reasons_section(results),
    ]
    return "\n".join(lines).rstrip() + "\n" + DISCOVERY_END


# ---------------------------------------------------------------------------------------------
# Reporting the zoo
# ---------------------------------------------------------------------------------------------
ZOO_BEGIN, ZOO_END = "<!-- zoo: begin -->", "<!-- zoo: end -->"
DISCOVERY_BEGIN, DISCOVERY_END = "<!-- discovery: begin -->", "<!-- discovery: end -->"
STEPS = ("build", "forward", "trace", "discover", "permute", "invariant",
         *(f"merge {method}" for method in METHODS))


def _error_cell(result: ZooResult, value: float | None, step: str, tolerance: float) -> str:
    if step in result.errors:
        return "fails"
    if value is None:
        return "—"
    return f"{value:.1e}" + ("" if value <= tolerance else " ✗")


def _seconds(result: ZooResult, step: str) -> str:
    return f"{result.seconds[step]:.2f}" if step in result.seconds else "—"


def _zoo_table(results: list[ZooResult], methods: tuple[str, ...]) -> list[str]:
    header = ("| model | input | params (M) | graph nodes | free / spaces | coverage "
              "| invariant 1 error | " + " | ".join(f"{m} merge error" for m in methods)
              + " | trace s | discover s | permute s | "
              + " | ".join(f"{m} merge s" for m in methods) + " |")
    lines = [header, "|---|---|" + "---:|" * (8 + 2 * len(methods))]
    for r in results:
        structure = f"{r.free} / {r.spaces}" if r.spaces is not None else "—"
        coverage = f"{r.coverage:.3f}" if r.coverage is not None else "—"
        if r.read_coverage is not None and f"{r.read_coverage:.3f}" != coverage:
            coverage += f" ({r.read_coverage:.3f} of what the graph reads)"
        nodes = str(r.nodes) if r.nodes is not None else ("fails" if "trace" in r.errors
                                                           else "—")
        merges = [_error_cell(r, r.merge_errors.get(m), f"merge {m}", MERGE_TOLERANCE)
                  for m in methods]
        lines.append(
            f"| {r.name} | {r.input} | {r.parameters / 1e6:.2f} "
            f"| {nodes} | {structure} | {coverage} "
            f"| {_error_cell(r, r.invariant_error, 'invariant', INVARIANT_TOLERANCE)} "
            f"| {' | '.join(merges)} | {_seconds(r, 'trace')} | {_seconds(r, 'discover')} "
            f"| {_seconds(r, 'permute')} "
            f"| {' | '.join(_seconds(r, f'merge {m}') for m in methods)} |")
    return lines


def _pass_rates(results: list[ZooResult], methods: tuple[str, ...]) -> list[str]:
    lines = ["| zoo | models | traced | invariant 1 exact (≤1e-4) | "
             + " | ".join(f"{m} merge exact (≤1e-3)" for m in methods) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(methods)]
    for family in ("torchvision", "transformers"):
        rows = [r for r in results if r.family == family]
        if not rows:
            continue
        steps = ("trace", "invariant", *(f"merge {m}" for m in methods))
        counts = [sum(r.passed(step) for r in rows) for step in steps]
        lines.append(f"| {family} | {len(rows)} | " + " | ".join(map(str, counts)) + " |")
    return lines


def _failures(results: list[ZooResult]) -> list[str]:
    lines = []
    for r in results:
        problems = [f"{step}: `{r.errors[step]}`" for step in STEPS if step in r.errors]
        if r.invariant_error is not None and r.invariant_error > INVARIANT_TOLERANCE:
            problems.append(f"invariant 1: permuted model's outputs differ by "
                            f"{r.invariant_error:.1e} (relative)")
        problems += [f"{m} merge: merged outputs differ by {e:.1e} (relative)"
                     for m, e in r.merge_errors.items() if e > MERGE_TOLERANCE]
        if problems:
            lines.append(f"- **{r.name}**: " + "; ".join(problems))
    return lines or ["- none"]


def _zoo_reasons(results: list[ZooResult]) -> list[str]:
    lines = []
    for r in results:
        if r.spaces is None:
            continue
        text = "; ".join(f"{count} × {reason}" + (f" (first: {place})" if place else "")
                         for reason, count, place in r.reasons)
        lines.append(f"- **{r.name}**: {text or 'nothing fixed'}")
    return lines


def _provenance(results: list[ZooResult]) -> str:
    """Which commits measured the rows, when, and how long the steps took in all."""
    commits: dict[str, list[ZooResult]] = {}
    for r in results:
        commits.setdefault(r.commit or "unknown", []).append(r)
    parts = [f"{commit} ({len(rows)} models, {min(r.measured for r in rows)[:10]})"
             for commit, rows in commits.items()]
    minutes = sum(sum(r.seconds.values()) for r in results) / 60
    return (f"rows measured at {', '.join(parts)}; the steps took {minutes:.0f} min in all, "
            "torch on 1 thread, a shared 2-core machine: times are noisy")


def render_zoo(results: list[ZooResult], left_out: list[ZooEntry],
               methods: tuple[str, ...], source: Path) -> str:
    by_family = {family: [r for r in results if r.family == family]
                 for family in ("torchvision", "transformers")}
    lines = [
        ZOO_BEGIN, "## The zoo: trace, invariant 1 and merging a model with its permuted copy", "",
        "Generated by `python benchmarks/coverage.py --part zoo` from its rows in "
        f"`{source}` ({_provenance(results)}). Random weights, eval mode, batch 2. "
        "A model too large for the run's memory limit (16 GiB of data segment by default) "
        "fails the step that allocates past it. For each model:",
        "",
        "- *input*: torchvision models at 64×64 where their forward pass works, else at "
        "224×224 (the size is checked by the model, e.g. ViT); transformers models from small "
        "configs (hidden 32–64, 2 layers, vocabulary 100, 32×32 images), weights drawn with "
        "std 0.2 where the config has an initializer range (attention far from uniform).",
        "- *free / spaces*, *coverage*: `mergec.discover(traced)`, the spec as loaded: what "
        "a merge aligns (a base model's hidden states are matched and mapped back at the "
        "output; logits keep their order). Where the model holds entries the traced graph "
        "never reads (GoogLeNet's auxiliary classifiers in eval mode), the coverage of what "
        "it reads follows in parentheses (rows measured since b68c433).",
        "- *invariant 1 error*: `mergec.permute(model, x, seed=1)` (every output fixed) "
        "against the model, max |Δ| / max |output| over the output tensors; exact if ≤ 1e-4.",
        "- *merge error*: `mergec.merge(model, permuted, x, calibration, method=..., "
        f"repair=None)` against the model, same measure; exact if ≤ 1e-3. Calibration is "
        f"{CALIBRATION_BATCHES} random batches like x (`permute` matches on their activation "
        "correlations; `weight-match` does not read them). A merge of a model with its own "
        "permuted copy must give the model back. The copy is permuted along every space of "
        "the spec as loaded: a base model's hidden states come out permuted, and the merge "
        "maps them back.",
        "- ✗: above the tolerance; *fails*: the step raised (the error is under *Failures*); "
        "—: not run because a step before it failed.",
        "",
        "### Pass rates", "", *_pass_rates(results, methods), "",
    ]
    for family, rows in by_family.items():
        if rows:
            lines += [f"### {family}", "", *_zoo_table(rows, methods), ""]
    lines += ["### Failures", "", "Every step that raised (its error's first line) and every "
              "check above its tolerance: bugs or limits of mergec to look at.", "",
              *_failures(results), "",
              "### Fixed spaces in the zoo", "", "Per model (as loaded), the reason "
              "of every fixed space, grouped as above.", "", *_zoo_reasons(results), ""]
    if left_out:
        lines += ["### Not measured yet (`--resume` goes on with them)", "",
                  ", ".join(entry.name for entry in left_out), ""]
    lines.append(ZOO_END)
    return "\n".join(lines)


TITLE = ("# Coverage of annotate-units on real architectures\n\n"
         "Two parts, each generated by `python benchmarks/coverage.py` (do not edit by hand): "
         "what discovery finds on a few models and what it costs against a forward pass "
         "(*Discovery*), and every torchvision classification model and small transformers "
         "architectures traced, permuted and merged with a permuted copy of themselves "
         "(*The zoo*).\n")


def write_doc(path: Path, begin: str, end: str, section: str) -> None:
    """Rewrites one marked part of the document; a document of the older unmarked layout is
    started afresh."""
    text = path.read_text() if path.is_file() else ""
    if DISCOVERY_BEGIN not in text and ZOO_BEGIN not in text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(TITLE)
    write_section(path, begin, end, section)


def _selected(name: str, only: list[str] | None) -> bool:
    return not only or any(name.startswith(prefix) for prefix in only)


def run_discovery(args: argparse.Namespace) -> None:
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    results = []
    for entry in entries():
        if not _selected(entry.name, args.only):
            continue
        result = measure(entry, args.repeats)
        spec = result.specs["auto"]
        print(f"{entry.name}: {result.nodes} nodes, {len(spec.free_spaces())}/"
              f"{len(spec.spaces)} free, coverage {spec.coverage():.3f}, trace "
              f"{result.trace_s:.2f}s, annotate {result.annotate_s:.3f}s "
              f"({result.annotate_s / result.forward_s:.1f}× forward)", flush=True)
        results.append(result)
    if results:
        write_doc(args.out, DISCOVERY_BEGIN, DISCOVERY_END,
                  render(results, args.repeats, time.perf_counter() - start, load_before))


def _progress_line(index: int, total: int, result: ZooResult) -> str:
    errors = result.errors
    parts = [f"[{index}/{total}] {result.name} ({result.input})"]
    if result.coverage is not None:
        parts.append(f"coverage {result.coverage:.3f}")
    if result.invariant_error is not None:
        parts.append(f"invariant 1 {result.invariant_error:.1e}")
    parts += [f"merge {method} {error:.1e}" for method, error in result.merge_errors.items()]
    parts += [f"{step} FAILED ({message})" for step, message in errors.items()]
    return ", ".join(parts) + f" [{sum(result.seconds.values()):.0f}s]"


def load_results(path: Path) -> dict[str, ZooResult]:
    """The rows of a results file by model name (none if there is no file)."""
    if not path.is_file():
        return {}
    rows = json.loads(path.read_text())["models"]
    return {row["name"]: ZooResult.from_json(row) for row in rows}


def save_results(path: Path, results: dict[str, ZooResult]) -> None:
    about = ("mergec zoo results, one row per model, written by benchmarks/coverage.py "
             "(--part zoo); errors are relative (max |delta| / max |output|), seconds per step")
    rows = [dataclasses.asdict(result) for result in results.values()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"about": about, "models": rows}, indent=1) + "\n")


def limit_memory(gib: float) -> None:
    """Caps the process's data segment (RLIMIT_DATA: heap and anonymous mappings), so that a
    model too large for the machine fails its step with "can't allocate memory" and becomes a
    row, rather than the kernel killing the run."""
    limit = int(gib * 2**30)
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (limit if hard < 0 else min(limit, hard), hard))


def run_zoo(args: argparse.Namespace) -> None:
    """Measures the selected zoo models one by one. Each row goes into the results file
    (``--results``, JSON) as soon as it is measured, and the doc's zoo part is rendered from
    every stored row after each model: a long run can stop anywhere and ``--resume`` goes on
    with the models the file does not hold yet."""
    zoo = transformers_zoo() + torchvision_zoo()  # the small and quick first
    only = QUICK if args.quick else args.only
    stored = {} if args.fresh else load_results(args.results)
    selected = [entry for entry in zoo if _selected(entry.name, only)
                and not (args.resume and entry.name in stored)]
    methods, commit = tuple(args.methods), git_commit()  # the code this run imported
    if args.memory_limit:
        limit_memory(args.memory_limit)
    def render() -> None:
        rows = [stored[entry.name] for entry in zoo if entry.name in stored]
        left_out = [entry for entry in zoo if entry.name not in stored]
        write_doc(args.out, ZOO_BEGIN, ZOO_END, render_zoo(rows, left_out, methods, args.results))

    for index, entry in enumerate(selected, 1):
        result = measure_zoo(entry, methods, commit)
        print(_progress_line(index, len(selected), result), flush=True)
        stored[entry.name] = result
        gc.collect()
        save_results(args.results, stored)
        render()
    render()  # also when nothing was left to measure: the doc from the stored rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/coverage.md"))
    parser.add_argument("--part", choices=["all", "discovery", "zoo"], default="all",
                        help="which part of the document to measure and rewrite")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats (discovery)")
    parser.add_argument("--only", nargs="*", help="names (prefixes) of the models to run")
    parser.add_argument("--quick", action="store_true",
                        help=f"the zoo on a handful of models only ({', '.join(QUICK)})")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS,
                        help="merge methods tried on each zoo model")
    parser.add_argument("--results", type=Path, default=Path("docs/zoo.json"),
                        help="zoo rows, read and rewritten (JSON)")
    parser.add_argument("--resume", action="store_true",
                        help="skip the zoo models the results file holds already")
    parser.add_argument("--fresh", action="store_true",
                        help="discard the results file's rows instead of updating them")
    parser.add_argument("--memory-limit", type=float, default=16.0,
                        help="GiB of data segment for the zoo run (0: no limit)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: stable timings on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    if args.part in ("all", "discovery") and not args.quick:
        run_discovery(args)
    if args.part in ("all", "zoo"):
        run_zoo(args)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
