"""``mergec.merge_many``: N trained models of one architecture in, one merged module out.

Every model is traced and annotated by the pipeline's own passes (run pairwise as
(model 0, model m) up to align-depth), then matched to one universe of units:

- ``zip``: ZipIt!'s N-way greedy zip on the joint correlation of all N models' features,
  ``[x_1; ...; x_N]``, accumulated in one pass of the calibration data through all of them
  (one accumulator per space holds every pair's statistics); each model has its own budget of
  within-model merges (β of its width). Heads and GroupNorm groups stay blocks: each model's
  blocks are paired with model 0's as for two models, and the N blocks at each position are
  zipped N-way inside.
- ``mudsc``: the same zip on MuDSC's dual similarity, the weights' cosine similarity of all N
  models' units mixed with the activations' correlation, in two sweeps over the spaces as for
  two models (each model's other axes read in model 0's order under the plans found so far).
- ``permute`` and ``weight-match``: each model is first aligned to model 0 by the pairwise
  match (Hungarian on the activations' correlation, or Git Re-Basin's weight matching), then
  the alignment is refined MergeMany-style: in rounds, each model in a seeded random order,
  model 0 included, is matched again to the mean of the other N - 1 models as aligned so far
  (of their aligned features for permute, whose statistics are linear maps of the joint
  accumulator's, so no data is read again; of their aligned weights for weight-match), until a
  round changes nothing (at most ``rounds``). So no model's units are the reference of the
  result: model 0 moves like the others. The result's units are finally labelled in model 0's
  order, which changes no weight of the merge, so that the features it returns come out in
  model 0's basis. permute, like zip, reads the calibration data once through all N models.
- ``average``: unit i of every model with unit i of the others.

The merged weights are Σ_m M_m W_m U_m over the N models (:func:`~mergec.passes.zip.
merged_state`), and BatchNorm statistics are reset on the calibration data (``repair="reset"``).
Partial zipping (``stop_at``, ``heads="separate"``) merges the trunk of the N models and runs
each model's own tail after the cut: the module returns N outputs. Two models go through the
same code; the options it does not cover (``outputs="both"``, models of different depths)
are merged by :func:`mergec.merge` for two models and refused for more.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import fx, nn

from mergec.algorithms.blocks import BlockSpace, block_scores, block_units, plan_score
from mergec.algorithms.covariance import JointMoments, activation_similarity
from mergec.algorithms.solvers import ManyPlan, ZipSolver, hungarian, zip_many
from mergec.errors import MergeError
from mergec.inputs import check_calibration, check_device, check_models, merge_device
from mergec.ir.fx import as_args, follow_weights_device, to_device
from mergec.ir.groups import ORTHOGONAL
from mergec.ir.spec import UnitSpec
from mergec.ir.state import MergeOptions, OutputAffine, PipelineState
from mergec.merge import MergeResult, report_of, run_merge
from mergec.passes.collect_stats import joint_moments
from mergec.passes.match import (
    ManyWeightSimilarities,
    block_groups,
    flat_width,
    full_plan,
    is_leaf,
    keep_order,
    output_leaves,
    parameters_of,
    resized,
)
from mergec.passes.repair import repair_statistics, reset_batch_norms
from mergec.passes.zip import Zip, check_runs, full_module, map_outputs, merged_state, partial_of
from mergec.pipeline import build_passes, run_pipeline

log = logging.getLogger(__name__)

#: The methods that zip N models (ZipIt!'s N-way greedy): on permutation spaces only.
ZIPS = ("zip", "mudsc")
#: A transport of a model's units into the universe is orthogonal to this tolerance.
ORTHOGONAL_TOLERANCE = 1e-6


def merge_many(models: Sequence[nn.Module], example_inputs: Any, calibration: Iterable[Any], *,
               method: str = "zip", alpha: float = 0.5, beta: float = 0.5, width: Any = "max",
               repair: str | None = "reset", device: str | None = None, seed: int = 0,
               progress: bool = True, samples_per_batch: int | None = None,
               symmetry: str = "auto", outputs: str = "auto", rounds: int = 5,
               **options: Any) -> MergeResult:
    """Merges N ≥ 2 trained models of one architecture into one (see the module's text for
    how each method treats N). ``models[0]`` is model A of :func:`mergec.merge`: its graph is
    the merged model's, and the features the merge returns come out in its basis. ``width``
    (zip) is the merged width of every flat space: ``"max"`` (the widest model's), ``"min"``,
    ``"a"`` (model 0's), ``"sum"`` (nothing merged: the merged model computes the mean of the
    N models' logits), a fraction of the sum of the widths, or an int. ``rounds`` bounds the
    refinement rounds of permute and weight-match (0: every model aligned to model 0 alone).
    The other options are :func:`mergec.merge`'s; ``report.many`` says what the N-way steps
    decided.

    Example::

        result = mergec.merge_many([model_1, model_2, model_3], x[:8], batches,
                                   method="zip", alpha=0.5, beta=0.5)
    """
    models = tuple(models)
    if len(models) < 2 or not all(isinstance(m, nn.Module) for m in models):
        raise MergeError(f"merge_many: needs at least two torch.nn.Module models, got "
                         f"{', '.join(type(m).__name__ for m in models) or 'none'}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise MergeError(f"merge_many: rounds must be an int >= 0, got {rounds!r}")
    settings = dict(method=method, alpha=alpha, beta=beta, width=width, repair=repair,
                    device=device, seed=seed, progress=progress,
                    samples_per_batch=samples_per_batch, symmetry=symmetry, outputs=outputs,
                    **options)
    unknown = set(options) - set(MergeOptions.__dataclass_fields__)
    if unknown:
        raise MergeError(f"merge_many: unknown option {', '.join(sorted(unknown))}")
    state = merge_many_state(MergeOptions(**settings), models, example_inputs, calibration,
                             rounds)
    return MergeResult(module=state.merged, report=report_of(state))


def merge_many_state(options: MergeOptions, models: Sequence[nn.Module], example_inputs: Any,
                     calibration: Iterable[Any], rounds: int = 5) -> PipelineState:
    """:func:`merge_many` with validated options: the state it ends with (``merged``,
    ``plans`` as model 0's pairs with model 1, ``many``), as :func:`~mergec.merge.run_merge`
    returns it for two models."""
    models = tuple(models)
    gap = _unsupported(options)
    example = as_args(example_inputs)
    if gap is None:
        options = replace(options,
                          device=merge_device(options.device, check_models(models, example)))
        check_device(options.device)
    calibration = check_calibration(calibration)
    if isinstance(calibration, Iterator):
        calibration = list(calibration)
    start = time.perf_counter()
    prepared = _prepare(options, models, example, calibration) if gap is None else []
    gap = gap or _unsupported_graphs(options, prepared)
    if gap is not None:
        if len(models) != 2:
            raise MergeError(f"merge_many: {gap}")
        log.info("merge_many: %s; the pair is merged by merge()", gap)
        return run_merge(options, models, example_inputs, calibration)
    state = _merge_prepared(options, prepared, example, calibration, rounds)
    follow_weights_device(state.merged)  # the result moves with .to(device)
    return state.evolve(many={**state.many, "seconds": time.perf_counter() - start})


def _unsupported(options: MergeOptions) -> str | None:
    """Why the N-way code does not merge with ``options``, or None."""
    if options.outputs == "both":
        return "outputs='both' returns two models' bases"
    if options.method != "zip" and options.width not in ("max", "min", "a"):
        return (f"width {options.width!r} is a zip option; {options.method} keeps the "
                "models' width")
    return None


# ---------------------------------------------------------------------------------------------
# Preparation: each model traced and annotated by the pipeline's passes
# ---------------------------------------------------------------------------------------------
def _prepare(options: MergeOptions, models: tuple[nn.Module, ...], example: tuple,
             calibration: Iterable[Any]) -> list[PipelineState]:
    """One pipeline state per model m ≥ 1, of the pair (model 0, model m), run up to
    align-depth. N-way zip and mudsc merge permutation spaces only (no rotations)."""
    if options.method in ZIPS:
        options = replace(options, symmetry="permutation")
    states = []
    for index, model in enumerate(models[1:], start=1):
        log.info("merge_many: preparing model %d of %d", index + 1, len(models))
        state = PipelineState(options=options, models=(models[0], model), example=example,
                              calibration=calibration)
        states.append(run_pipeline(state, build_passes(options), stop_after="align-depth"))
    return states


def _unsupported_graphs(options: MergeOptions, prepared: list[PipelineState]) -> str | None:
    """Why the N-way code does not merge these graphs, or None."""
    if any(state.depth is not None for state in prepared):
        return "the models differ in depth; merge_many merges models of one depth"
    if options.method != "zip" and any(state.specs[0].shapes != state.specs[1].shapes
                                       for state in prepared):
        return f"the models differ in width; {options.method} merges models of one width (zip)"
    return None


def _merge_prepared(options: MergeOptions, prepared: list[PipelineState], example: tuple,
                    calibration: Iterable[Any], rounds: int) -> PipelineState:
    """Plans for every space, the merged module and its reset statistics."""
    graphs = (prepared[0].graphs[0],) + tuple(state.graphs[1] for state in prepared)
    specs = (prepared[0].specs[0],) + tuple(state.specs[1] for state in prepared)
    timings: dict[str, float] = {}
    for state in prepared:
        for name, seconds in state.timings.items():
            timings[name] = timings.get(name, 0.0) + seconds
    start = time.perf_counter()
    moments = joint_moments(graphs, specs, calibration, example, options.device,
                            options.progress, options.samples_per_batch, options.seed,
                            rotations=options.method == "permute" and options.symmetry == "auto") \
        if options.method in ZIPS + ("permute",) else {}
    if moments:
        timings["collect-stats"] = time.perf_counter() - start
    start = time.perf_counter()
    if options.method in ZIPS:
        plans, summaries, many = _zip_plans(options, specs, moments, graphs)
    else:
        plans, summaries, many = _aligned_plans(options, graphs, specs, moments, rounds)
    timings["match"] = time.perf_counter() - start
    start = time.perf_counter()
    affines = (_affines_of(prepared[0], 0),) + tuple(_affines_of(state, 1) for state in prepared)
    merged, maps = _emit(options, graphs, specs, plans, example, affines)
    timings["zip"] = time.perf_counter() - start
    start = time.perf_counter()
    repair = {"batch_norms_reset": 0 if options.repair is None else reset_batch_norms(
        merged, calibration, example, options.device, options.progress)}
    if options.repair == "repair":
        repair["normalisations_repaired"] = repair_statistics(
            merged, graphs, plans, calibration, options.device, specs[0],
            _rotated(options, specs[0]))
    timings["repair"] = time.perf_counter() - start
    if options.device:
        to_device(merged, options.device)
    pairs = {s: plan.pair(1) for s, plan in plans.items()}
    return prepared[0].evolve(
        graphs=graphs, specs=specs, plans=pairs, summaries=summaries, merged=merged,
        moments={s: m.pair(0, 1) for s, m in moments.items()}, output_maps=tuple(maps),
        repair=repair, timings=timings,
        many={"models": len(graphs), **many})


def _rotated(options: MergeOptions, spec: UnitSpec) -> frozenset[str]:
    """The spaces the N models were aligned in by rotations: the orthogonal ones, where permute
    and weight-match rotate them (zip and mudsc permute every space)."""
    if options.method not in ("permute", "weight-match") or options.symmetry != "auto":
        return frozenset()
    return frozenset(s for s, space in spec.spaces.items() if space.group == ORTHOGONAL)


def _affines_of(state: PipelineState, model: int) -> Mapping[int, OutputAffine]:
    """fold-norms' output affines of ``model`` (0 or 1) of a prepared pair."""
    return state.output_affines[model] if state.output_affines else {}


def _emit(options: MergeOptions, graphs: tuple[fx.GraphModule, ...],
          specs: tuple[UnitSpec, ...], plans: dict[str, ManyPlan], example: tuple,
          affines: tuple[Mapping[int, OutputAffine], ...] = ()
          ) -> tuple[fx.GraphModule, list[dict]]:
    """A copy of model 0's graph module holding the merged weights (resized where the merged
    widths differ), its free outputs mapped into model 0's basis; with ``stop_at`` or
    ``heads="separate"``, the merged trunk and the N models' tails, which return N outputs.
    ``affines``: each model's norm gains and shifts fold-norms took into its outputs."""
    spec = specs[0]
    state = merged_state([graph.state_dict() for graph in graphs], spec, plans)
    stop = Zip(stop_at=options.stop_at, heads=options.heads).stop_node(graphs[0])
    if stop is not None:
        return partial_of(graphs, spec, plans, state, stop, affines), []
    merged = full_module(graphs[0], state, plans, spec)
    maps = map_outputs(merged, spec, {s: p.pair(1) for s, p in plans.items()}, (0,), affines)
    if any(p.width != spec.spaces[s].size for s, p in plans.items()):
        check_runs(merged, example)
    return merged, maps


# ---------------------------------------------------------------------------------------------
# zip: ZipIt!'s N-way greedy on one joint accumulator per space
# ---------------------------------------------------------------------------------------------
def _zip_plans(options: MergeOptions, specs: tuple[UnitSpec, ...],
               moments: dict[str, JointMoments], graphs: tuple[fx.GraphModule, ...]
               ) -> tuple[dict[str, ManyPlan], dict[str, dict], dict]:
    """Every space's N-way plan: the free flat leaves zipped on their joint correlation
    (``moments``; β = 0 in a space that reaches an output, relabelled to model 0's order
    there), the heads and groups of each block order zipped inside paired blocks
    (:func:`_zipped_group`), the others kept unit by unit. mudsc zips on MuDSC's dual
    similarity (:func:`_similarity_of`) in two sweeps over the leaves, as for two models: each
    leaf's weight similarity reads the other spaces under the plans found so far."""
    spec, count = specs[0], len(specs)
    outputs = set(output_leaves(spec))
    leaves = [s for s in spec.spaces if is_leaf(spec, s)]
    leaf_plans = {s: ManyPlan.average(spec.spaces[s].size, count) for s in leaves}
    groups = block_groups(spec, leaves)
    similarity = _similarity_of(options, specs, moments, graphs, leaf_plans)
    solved: dict[str, torch.Tensor] = {}  # the similarity each zipped leaf was solved on
    for _ in range(2 if options.method == "mudsc" else 1):
        for leaf in leaves:
            space = spec.spaces[leaf]
            if not spec.is_free(leaf) or leaf in groups["order_of"]:
                continue
            if space.kind == "flat" and (joint := similarity(leaf)) is not None:
                dims = tuple(other.spaces[leaf].size for other in specs)
                leaf_plans[leaf] = zip_many(joint, dims, flat_width(dims, options.width),
                                            alpha=options.alpha,
                                            beta=0.0 if leaf in outputs else options.beta)
                solved[leaf] = joint
            members = groups["members"].get(space.block_space, [])
            if space.kind == "blocks" and members[:1] == [leaf]:  # a group, at its first
                joints = {member: similarity(member) for member in members}
                if all(joint is not None for joint in joints.values()):
                    leaf_plans.update(_zipped_group(options, spec, space.block_space, joints,
                                                    groups))
                    solved.update(joints)
    summaries = {}
    for leaf, joint in solved.items():
        if leaf in outputs:
            leaf_plans[leaf] = leaf_plans[leaf].in_order_of(0)
        summaries[leaf] = _zip_summary(leaf_plans[leaf], joint)
    merged = resized(spec, {s: leaf_plans[s].width for s in solved})
    plans = {s: _full_many(specs, merged, leaf_plans, s) for s in spec.spaces}
    settings = {"alpha": options.alpha, "beta": options.beta}
    return plans, summaries, {**settings, "weight_beta": options.weight_beta} \
        if options.method == "mudsc" else settings


def _similarity_of(options: MergeOptions, specs: tuple[UnitSpec, ...],
                   moments: dict[str, JointMoments], graphs: tuple[fx.GraphModule, ...],
                   leaf_plans: dict[str, ManyPlan]) -> Callable[[str], torch.Tensor | None]:
    """What a leaf is zipped on: the joint correlation of the N models' features (None
    without statistics); for mudsc ``β_w · S_weight + (1 − β_w) · S_act``, the weights alone
    where a leaf has no statistics, the weights read under the current ``leaf_plans``
    (:class:`~mergec.passes.match.ManyWeightSimilarities`)."""
    spec = specs[0]
    weight_similarity = ManyWeightSimilarities(spec, [parameters_of(g) for g in graphs]) \
        if options.method == "mudsc" else None
    full_plans = functools.partial(_full_many, specs, spec, leaf_plans)

    @functools.cache
    def correlation(leaf: str) -> torch.Tensor | None:  # the same in every sweep
        return activation_similarity(moments[leaf], spec.spaces[leaf].size) \
            if leaf in moments else None

    def similarity(leaf: str) -> torch.Tensor | None:
        activations = correlation(leaf)
        if weight_similarity is None:
            return activations
        weights = weight_similarity(leaf, full_plans)
        return weights if activations is None else \
            options.weight_beta * weights + (1 - options.weight_beta) * activations
    return similarity


def _zipped_group(options: MergeOptions, spec: UnitSpec, order: str,
                  joints: dict[str, torch.Tensor], groups: dict) -> dict[str, ManyPlan]:
    """N-way zip of the blocks spaces (attention heads, GroupNorm groups) of block order
    ``order``, ``joints`` each one's N-model similarity: model m's blocks are paired with model
    0's as for two models (a pair of blocks scores the similarity its within-block zip merges,
    summed over the spaces of the order: q·k and v of one attention), then the N blocks paired
    at each position are zipped N-way inside, so merged heads stay heads. The order's plan
    pairs the blocks; an order other spaces' parts depend on keeps block i with block i."""
    members = list(joints)
    count = len(joints[members[0]]) // spec.spaces[members[0]].size
    blocks_count = spec.spaces[members[0]].block_count
    inside = {m: spec.spaces[m].within_fixed is None for m in members}
    solves = {m: ZipSolver(options.alpha, options.beta) if inside[m] else keep_order
              for m in members}
    pair = order not in groups["fixed_order"]
    pairings = [torch.arange(blocks_count)]
    for model in range(1, count):
        if not pair:
            pairings.append(torch.arange(blocks_count))
            continue
        spaces = [BlockSpace(_pair_of(joints[m], spec.spaces[m].size, model),
                             spec.spaces[m].block_size, spec.spaces[m].block_size, solves[m],
                             plan_score(solves[m])) for m in members]
        pairings.append(hungarian(block_scores(spaces, blocks_count))[1])
    plans = {m: _zipped_blocks(options, joints[m], pairings, inside[m]) for m in members}
    if pair and spec.is_free(order):
        orders = [torch.eye(blocks_count, dtype=torch.float64)[p] for p in pairings]
        plans[order] = ManyPlan(tuple(o / count for o in orders),
                                tuple(o.T.contiguous() for o in orders))
    return plans


def _pair_of(joint: torch.Tensor, size: int, model: int) -> torch.Tensor:
    """Model 0's and model ``model``'s block of an N-model joint similarity."""
    index = torch.cat([torch.arange(size), model * size + torch.arange(size)])
    return joint[index][:, index]


def _zipped_blocks(options: MergeOptions, similarity: torch.Tensor,
                   pairings: list[torch.Tensor], inside: bool) -> ManyPlan:
    """The N-way plan of one blocks space (``similarity``: its N-model joint correlation): at
    each block position k, block ``pairings[m][k]`` of every model m zipped N-way into merged
    block k (``inside`` False: averaged unit by unit, the order inside blocks pinned)."""
    count, blocks_count = len(pairings), len(pairings[0])
    size = similarity.shape[0] // count
    width = size // blocks_count
    inner = []
    for block in range(blocks_count):
        index = torch.cat([block_units(int(p[block]), width, model * size)
                           for model, p in enumerate(pairings)])
        inner.append(zip_many(similarity[index][:, index], (width,) * count, width,
                              alpha=options.alpha, beta=options.beta) if inside
                     else ManyPlan.average(width, count))
    dtype = inner[0].merges[0].dtype
    merges = [torch.zeros(size, size, dtype=dtype) for _ in range(count)]
    unmerges = [torch.zeros(size, size, dtype=dtype) for _ in range(count)]
    for block, plan in enumerate(inner):
        rows = block_units(block, width)
        for model, p in enumerate(pairings):
            columns = block_units(int(p[block]), width)
            merges[model][rows[:, None], columns[None, :]] = plan.merges[model]
            unmerges[model][columns[:, None], rows[None, :]] = plan.unmerges[model]
    return ManyPlan(tuple(merges), tuple(unmerges))


def _full_many(specs: tuple[UnitSpec, ...], merged: UnitSpec, leaf_plans: dict[str, ManyPlan],
               space_id: str) -> ManyPlan:
    """The N-way plan of ``space_id`` assembled from its leaves' plans (``merged``: the
    merged model's widths)."""
    spec = specs[0]
    pairs = [full_plan(spec, space_id, {s: p.pair(m) for s, p in leaf_plans.items()},
                       spec_b=specs[m], merged=merged) for m in range(1, len(specs))]
    return ManyPlan((pairs[0].merge_a, *(p.merge_b for p in pairs)),
                    (pairs[0].unmerge_a, *(p.unmerge_b for p in pairs)))


def _zip_summary(plan: ManyPlan, similarity: torch.Tensor) -> dict:
    """What the report keeps of an N-way zip: width, and how many merged units hold a unit of
    every model, of some, of one."""
    members = torch.stack([(u.to_dense() > 0).sum(dim=0) for u in plan.unmerges])  # N × r
    models_in = (members > 0).sum(dim=0)
    return {"width": plan.width, "units_of_all_models": int((models_in == len(plan.dims)).sum()),
            "units_of_one_model": int((models_in == 1).sum()),
            "within_model_merges": int((members - 1).clamp(min=0).sum())}


# ---------------------------------------------------------------------------------------------
# permute, weight-match, average: every model aligned to a universe, MergeMany-style
# ---------------------------------------------------------------------------------------------
def _aligned_plans(options: MergeOptions, graphs: tuple[fx.GraphModule, ...],
                   specs: tuple[UnitSpec, ...], joint: dict[str, JointMoments], rounds: int
                   ) -> tuple[dict[str, ManyPlan], dict[str, dict], dict]:
    """Each model's transport into the universe (an orthogonal map per space: a permutation,
    or a rotation of a residual stream), first to model 0, then refined against the mean of
    the others, finally labelled in model 0's order; the plans average the aligned models.
    permute reads every pair's statistics from ``joint``, one accumulator per space of all N
    models' features."""
    count = len(graphs)
    identity = {s: torch.eye(space.size, dtype=torch.float64)
                for s, space in specs[0].spaces.items()}
    transports = [identity] + [
        _transport(_match(options, graphs[0], graphs[m], specs[0], specs[m],
                          {s: moments.pair(0, m) for s, moments in joint.items()}), identity)
        for m in range(1, count)]
    history = []
    if options.method != "average" and count > 2:
        draw = torch.Generator().manual_seed(options.seed)
        for round_index in range(rounds):
            changed = {}
            for m in torch.randperm(count, generator=draw).tolist():
                others = [j for j in range(count) if j != m]
                mean = _mean_module(graphs, specs[0], transports, others)
                moments = {s: _mean_moments(j, transports, others, m, s)
                           for s, j in joint.items()}
                new = _transport(_match(options, mean, graphs[m], specs[0], specs[m], moments),
                                 identity)
                changed[m] = sum(not torch.allclose(new[s], transports[m][s], atol=1e-9)
                                 for s in new)
                transports[m] = new
            history.append({"round": round_index + 1, "spaces_changed": changed})
            if not any(changed.values()):
                break
    back = {s: t.T for s, t in transports[0].items()}  # the universe in model 0's order
    transports = [{s: back[s] @ t[s] for s in t} for t in transports]
    plans = _averaging(transports, list(range(count)))
    summaries = {s: {"width": specs[0].spaces[s].size,
                     "moved_units": [int((t[s].diagonal() != 1).sum()) for t in transports]}
                 for s in identity if specs[0].is_free(s)}
    return plans, summaries, {"refinement": history, "rounds": len(history)}


def _match(options: MergeOptions, module_a: fx.GraphModule, module_b: fx.GraphModule,
           spec_a: UnitSpec, spec_b: UnitSpec, moments: dict[str, JointMoments]) -> dict:
    """The pairwise plans of two traced, annotated modules (the match pass, on ``moments``
    for the methods that match on activations)."""
    match = next(p for p in build_passes(options) if p.name == "match")
    state = PipelineState(options=options, models=(module_a, module_b), example=(),
                          graphs=(module_a, module_b), specs=(spec_a, spec_b), moments=moments)
    return dict(run_pipeline(state, [match]).plans)


def _mean_moments(joint: JointMoments, transports: list[dict[str, torch.Tensor]],
                  others: list[int], model: int, space: str) -> JointMoments:
    """The joint moments of the mean of the ``others``' features as aligned so far (in the
    universe) and of ``model``'s, read from the N-model accumulator of ``space``."""
    dims, offsets = joint.dims, joint.offsets
    matrix = torch.zeros(dims[0] + dims[model], sum(dims), dtype=torch.float64)
    for other in others:
        matrix[:dims[0], offsets[other]:offsets[other] + dims[other]] = \
            transports[other][space] / len(others)
    matrix[dims[0]:, offsets[model]:offsets[model] + dims[model]] = torch.eye(dims[model])
    return joint.linear(matrix, (dims[0], dims[model]))


def _transport(plans: dict, identity: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each space's map of B's units into A's, ``2 · unmerge_a · merge_b``, from a pairwise
    plan that pairs each unit of B with one of A (a permutation) or rotates B onto A; the
    identity where there is no plan (average)."""
    result = dict(identity)
    for space_id, plan in plans.items():
        unmerge_a, merge_b = (m.to_dense().to(torch.float64) for m in (plan.unmerge_a,
                                                                      plan.merge_b))
        transport = 2.0 * unmerge_a @ merge_b
        gram = transport @ transport.T
        if not torch.allclose(gram, torch.eye(len(gram), dtype=gram.dtype),
                              atol=ORTHOGONAL_TOLERANCE):
            raise MergeError(f"merge_many: the match of space {space_id} is not a permutation "
                             "or a rotation; it cannot align a model to the others")
        result[space_id] = transport
    return result


def _mean_module(graphs: tuple[fx.GraphModule, ...], spec: UnitSpec,
                 transports: list[dict[str, torch.Tensor]], members: list[int]
                 ) -> fx.GraphModule:
    """The mean of the models ``members`` as aligned so far, in model 0's graph (its
    BatchNorm statistics the mean of theirs: the mean of copies of one model is that model)."""
    plans = _averaging(transports, members)
    states = [graphs[m].state_dict() for m in members]
    return full_module(graphs[0], merged_state(states, spec, plans), plans, spec)


def _averaging(transports: list[dict[str, torch.Tensor]], members: list[int]
               ) -> dict[str, ManyPlan]:
    """The plans that average the models ``members``, each carried into the universe by its
    transports (merge ``T_m / n``, unmerge ``T_mᵀ``)."""
    return {s: ManyPlan(tuple(transports[m][s] / len(members) for m in members),
                        tuple(transports[m][s].T.contiguous() for m in members))
            for s in transports[0]}
