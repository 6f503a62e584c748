"""A merge planned to a size budget: the stop point and the merged width chosen for the user.

A merge trades size for accuracy: a full merge is one model's size, partial zipping (merged up
to a cut, both tails after it) grows with the tails, an elastic zip wider than the models grows
with its width, and stopping at the input keeps both models whole (their ensemble).
:func:`plan` tries every such candidate the graph allows, keeps those within the budget
(parameters, or FLOPs per sample), and returns the one whose predictions agree best with the
ensemble of the two models on a held-out part of the calibration data.

The candidates share one statistics pass: the pipeline runs once up to collect-stats on the
fitting part of the calibration data, and each candidate runs only match (once per width),
zip and repair from that state. The calibration batches are held in a list, to be split into
the fitting three quarters and the held-out quarter.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from mergec.errors import MergeError
from mergec.ir.fx import check_batch
from mergec.ir.state import MergeOptions, PipelineState
from mergec.passes.zip import check_cut, find_stop_node
from mergec.pipeline import build_passes, run_pipeline

log = logging.getLogger(__name__)

#: What a budget counts: parameters, or floating-point operations for one sample.
MEASURES = ("parameters", "flops")
#: The widths an elastic zip candidate is merged to, as fractions of d_a + d_b (0.5: one
#: model's width for two models of one width; 1: nothing merged).
WIDTH_FRACTIONS = (0.625, 0.75, 0.875, 1.0)
#: The share of the calibration batches held out to score the candidates (at least one).
HELD_OUT = 0.25


@dataclass
class Candidate:
    """One merge the planner tried: where it stops, its width, its size, its agreement."""

    label: str
    stop_at: str | None = None
    heads: str = "average"
    width: Any = "max"
    size: int = 0
    agreement: float = 0.0
    chosen: bool = False
    whole: bool = False  # nothing merged: both models as they are


    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_budget(budget: Any, measure: str, options: MergeOptions) -> None:
    """Refuses a budget that is not a positive int, an unknown measure, or options that fix
    what the planner chooses."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise MergeError(f"merge: budget must be a positive int ({measure}), got {budget!r}")
    if measure not in MEASURES:
        raise MergeError(f"merge: budget_measure must be one of {', '.join(MEASURES)}, got "
                         f"{measure!r}")
    if options.partial or options.width != "max":
        raise MergeError("merge: a budget chooses the stop point and the width; drop stop_at, "
                         "heads='separate' and width")


def split_calibration(calibration: list) -> tuple[list, list]:
    """The fitting batches and the held-out ones (the last quarter, at least one)."""
    if len(calibration) < 2:
        raise MergeError("merge: a budget needs at least two calibration batches: the "
                         "candidates are scored on held-out ones")
    held = max(1, round(HELD_OUT * len(calibration)))
    return calibration[:-held], calibration[-held:]


def plan_merge(options: MergeOptions, models: tuple[nn.Module, ...], example_inputs: Any,
               calibration: Iterable[Any], budget: int, measure: str = "parameters"
               ) -> tuple[PipelineState, dict]:
    """The best merge of ``models`` within ``budget`` (its last pipeline state) and what the
    planner did: every candidate tried, with its size and agreement, the chosen one marked."""
    check_budget(budget, measure, options)
    fit, held = split_calibration(list(calibration))
    best, candidates = None, []
    for candidate, state in evaluated(options, models, example_inputs, fit, held, measure):
        candidates.append(candidate)
        if candidate.size <= budget and (best is None or better(candidate, best[0])):
            best = (candidate, state)
    if best is None:
        smallest = min(candidates, key=lambda c: c.size)
        raise MergeError(f"merge: no merge fits a budget of {budget} {measure}; the smallest, "
                         f"{smallest.label}, has {smallest.size}")
    best[0].chosen = True
    return best[1], {"measure": measure, "budget": budget, "held_out_batches": len(held),
                     "candidates": [c.to_dict() for c in candidates]}


def evaluated(options: MergeOptions, models: tuple[nn.Module, ...], example_inputs: Any,
              fit: list, held: list, measure: str = "parameters"
              ) -> Iterator[tuple[Candidate, PipelineState]]:
    """Every candidate merge of ``models`` with its size and its agreement with the ensemble
    on the ``held`` batches, and its final state. The pipeline runs once up to collect-stats
    on the ``fit`` batches; each candidate runs match (once per width), zip and repair from
    there."""
    from mergec.merge import run_merge

    base = run_merge(options, models, example_inputs, fit, stop_after="collect-stats")
    one = tuple(t[:1] for t in base.example)
    reference = _predict(list(base.graphs), held, base.example)  # eval semantics
    by_width: dict[Any, PipelineState] = {}
    for candidate in _candidates(options, base):
        chosen = dataclasses.replace(options, width=candidate.width, stop_at=candidate.stop_at,
                                     heads=candidate.heads, repair=_repair(options, candidate))
        passes = {p.name: p for p in build_passes(chosen)}
        try:
            if candidate.width not in by_width:
                by_width[candidate.width] = run_pipeline(base.evolve(options=chosen),
                                                         [passes["match"]])
            state = run_pipeline(by_width[candidate.width].evolve(options=chosen),
                                 [passes["zip"], passes["repair"]])
        except MergeError as error:  # a cut the graph does not allow, a width that fails
            log.info("budget: %s skipped: %s", candidate.label, error)
            continue
        candidate.size = size_of(state.merged, measure, one)
        candidate.agreement = agreement(state.merged, held, reference, base.example)
        log.info("budget: %s: %d %s, agreement %.4f", candidate.label, candidate.size,
                 measure, candidate.agreement)
        yield candidate, state


def _repair(options: MergeOptions, candidate: Candidate) -> str | None:
    """The candidate's repair: none where nothing is merged (the two models as they are: their
    ensemble), BatchNorm reset for partial merges (REPAIR rescales full merges only)."""
    if candidate.whole:
        return None
    if options.repair == "repair" and (candidate.stop_at or candidate.heads != "average"):
        return "reset"
    return options.repair


def better(candidate: Candidate, best: Candidate) -> bool:
    """Higher agreement wins; at equal agreement, the smaller merge."""
    return (candidate.agreement, -candidate.size) > (best.agreement, -best.size)


def _candidates(options: MergeOptions, base: PipelineState) -> list[Candidate]:
    """The merges to try: nothing merged (the ensemble), partial merges cut after each
    top-level module of model A that every path crosses, heads apart, the full merge, and
    (zip, spaces permuted only) elastic zips wider than one model."""
    graph = base.graphs[0]
    found = [Candidate("full merge")]
    inputs = [node.name for node in graph.graph.nodes if node.op == "placeholder"]
    cuts = [("nothing merged (both models: the ensemble)", inputs[0])] if len(inputs) == 1 \
        else []
    cuts += [(f"merged up to {name}", name) for name, _ in base.models[0].named_children()]
    seen = set()
    output = graph.graph.find_nodes(op="output")[0]
    for label, stop_at in cuts:
        try:
            node = find_stop_node(graph, stop_at)
            check_cut(graph, node)
        except MergeError:
            continue
        if node in seen or node in output.all_input_nodes:
            continue
        seen.add(node)
        found.append(Candidate(label, stop_at=stop_at, whole=stop_at in inputs))
    found.append(Candidate("merged up to the output layer's input", heads="separate"))
    rotations = any(space.group == "orthogonal" for space in base.specs[0].spaces.values())
    if options.method == "zip" and not (rotations and options.symmetry == "auto"):
        found += [Candidate(f"full merge at width {fraction:g} of d_a + d_b", width=fraction)
                  for fraction in WIDTH_FRACTIONS]
    return found


def size_of(module: nn.Module, measure: str, example: tuple) -> int:
    """``module``'s parameter count, or the floating-point operations of one forward pass on
    ``example`` (one sample)."""
    if measure == "parameters":
        return sum(parameter.numel() for parameter in module.parameters())
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(*example)
    return int(counter.get_total_flops())


def probabilities(output: Any) -> torch.Tensor:
    """A classifier's class probabilities; a partial merge's two outputs averaged as the
    ensemble averages its models'."""
    if isinstance(output, torch.Tensor):
        return output.float().softmax(dim=-1)
    if isinstance(output, (tuple, list)) and output and all(
            isinstance(part, torch.Tensor) for part in output):
        return sum(part.float().softmax(dim=-1) for part in output) / len(output)
    raise MergeError(f"merge: a budget scores classifiers (tensor outputs); the model returns "
                     f"{type(output).__name__}")


def _predict(modules: list[nn.Module], batches: list, example: tuple) -> torch.Tensor:
    """The class each held-out sample is given by ``modules`` (one module, or the ensemble of
    several: the mean of their probabilities)."""
    device = next((p.device for p in modules[0].parameters()), torch.device("cpu"))
    classes = []
    with torch.no_grad():
        for index, batch in enumerate(batches):
            inputs = tuple(t.to(device) for t in check_batch(batch, example, index))
            outputs = [module(*inputs) for module in modules]
            probs = probabilities(outputs if len(outputs) > 1 else outputs[0])
            classes.append(probs.argmax(dim=-1).flatten().cpu())
    return torch.cat(classes)


def agreement(module: nn.Module, batches: list, reference: torch.Tensor, example: tuple
              ) -> float:
    """The share of held-out samples on which ``module`` predicts the ensemble's class."""
    return (_predict([module], batches, example) == reference).float().mean().item()
