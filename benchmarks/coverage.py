"""What annotate-units discovers on real architectures, and what it costs; writes docs/coverage.md.

For every model: graph size, spaces, free spaces, coverage (fraction of parameter and buffer
elements with an axis in a free space), the time of trace and of annotate-units, annotate-units'
time as a multiple of one forward pass of the same model on the same input (measured in this
process, medians of a few runs), and, for every space that is fixed (identity only) or whose
blocks are fixed inside, the reason annotate-units gave, grouped.

Weights are random (nothing is downloaded). Run from the repository root::

    python benchmarks/coverage.py                 # all models, writes docs/coverage.md
    python benchmarks/coverage.py --only resnet18 --out /tmp/coverage.md
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
import transformers
from torch import nn

import mergec
from mergec.ir.fx import STATE_KEYS
from mergec.ir.spec import UnitSpec
from mergec.passes.annotate_units import annotate_units

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
    specs: dict[bool, UnitSpec]  # fix_outputs -> spec


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
    fixed_outputs = [True, False] if entry.family == "transformers" else [True]
    forward_times, annotate_times = [], []
    specs: dict[bool, UnitSpec] = {}
    for _ in range(repeats):
        forward_times.append(_median_time(forward, 1)[0])
        seconds, specs[True] = _median_time(
            lambda: annotate_units(graph_module, keys, True, name), 1)
        annotate_times.append(seconds)
    if False in fixed_outputs:
        specs[False] = annotate_units(graph_module, keys, False, name)
    return Result(entry, len(graph_module.graph.nodes), trace_s,
                  statistics.median(forward_times), statistics.median(annotate_times), specs)


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
        "| model | input | graph nodes | spaces | free spaces | coverage "
        "(fix_outputs=True) | coverage (fix_outputs=False) | trace s | annotate s "
        "| forward s | annotate / forward |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        spec = r.specs[True]
        free_outputs = f"{r.specs[False].coverage():.3f}" if False in r.specs else "—"
        lines.append(
            f"| {r.entry.name} | {r.entry.input} | {r.nodes} | {len(spec.spaces)} "
            f"| {len(spec.free_spaces())} | {spec.coverage():.3f} | {free_outputs} "
            f"| {r.trace_s:.2f} | {r.annotate_s:.3f} | {r.forward_s:.3f} "
            f"| {r.annotate_s / r.forward_s:.2f}× |")
    return lines


def _reasons_section(results: list[Result]) -> list[str]:
    lines = ["## Fixed spaces and their reasons", "",
             "Per model (fix_outputs=True; for transformers also what stays fixed with "
             "fix_outputs=False), every fixed space's reason, grouped, with a count and the "
             "first place it happened. `inside blocks` is a heads or groups space whose blocks "
             "may move but whose order inside a block is fixed.", ""]
    for r in results:
        lines.append(f"### {r.entry.name}")
        lines.append("")
        for fix_outputs, spec in r.specs.items():
            if len(r.specs) > 1:
                lines.append(f"fix_outputs={fix_outputs}:")
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
        "# Coverage of annotate-units on real architectures",
        "",
        "Generated by `python benchmarks/coverage.py` (do not edit by hand). Random weights; "
        f"batch {BATCH}; CPU ({platform.machine()}, {os.cpu_count()} cores), torch on "
        f"{torch.get_num_threads()} thread(s); "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, transformers "
        f"{transformers.__version__}; total run {total_s:.0f} s.",
        "",
        "- *graph nodes*: nodes of the traced aten graph. *spaces*: spaces in the unit spec "
        "(fix_outputs=True); *free spaces*: those admitting a permutation other than the "
        "identity.",
        "- *coverage*: fraction of parameter and buffer elements in a state-dict entry with at "
        "least one axis in a free space. Transformers base models return hidden states, so "
        "with fix_outputs=True their residual stream is fixed; fix_outputs=False treats the "
        "hidden states as features that come out permuted.",
        f"- *trace s*, *annotate s*: median of {repeats} runs of `mergec.trace` and of "
        "annotate-units (fix_outputs=True) on the traced graph. *forward s*: median of "
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
        "## Summary",
        "",
        *_table(results),
        "",
        *_reasons_section(results),
    ]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/coverage.md"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="*", help="names (prefixes) of the models to run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: stable timings on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    results = []
    for entry in entries():
        if args.only and not any(entry.name.startswith(name) for name in args.only):
            continue
        result = measure(entry, args.repeats)
        spec = result.specs[True]
        print(f"{entry.name}: {result.nodes} nodes, {len(spec.free_spaces())}/"
              f"{len(spec.spaces)} free, coverage {spec.coverage():.3f}, trace "
              f"{result.trace_s:.2f}s, annotate {result.annotate_s:.3f}s "
              f"({result.annotate_s / result.forward_s:.1f}× forward)", flush=True)
        results.append(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(results, args.repeats, time.perf_counter() - start,
                                load_before))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
