"""Property tests of annotate-units (``mergec.discover``) and ``mergec.permute`` over random
architectures from :mod:`archgen`: invariant 1 of the design (permuting every free space keeps
the function), the permutation really moves the weights, each architecture's expectations
(what a fix-everything annotator would miss), the JSON round trip and coverage, and backbones
whose outputs come out permuted (``outputs="free"``)."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._pytree import tree_flatten

import archgen  # tests/ is on sys.path under pytest's default (prepend) import mode
import mergec
from mergec.ir.spec import UnitSpec
from mergec.permute import permute_state_dict, random_permutations

RTOL, ATOL = 1e-4, 1e-5
seeds = st.integers(min_value=0, max_value=2**16)


def budget(examples: int) -> settings:
    """Few examples, no deadline: every example exports a model (~0.2 s on a CPU core)."""
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def outputs(model: torch.nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        flat, _ = tree_flatten(model(*inputs))
    return [t for t in flat if isinstance(t, torch.Tensor)]


def assert_same_outputs(twin: torch.nn.Module, model: torch.nn.Module, inputs: tuple) -> None:
    for got, want in zip(outputs(twin, inputs), outputs(model, inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def permuted_copy(model: torch.nn.Module, spec: UnitSpec, perms: dict[str, torch.Tensor]
                  ) -> torch.nn.Module:
    twin = copy.deepcopy(model)
    twin.load_state_dict(permute_state_dict(model.state_dict(), spec, perms))
    return twin


def moving_permutations(spec: UnitSpec) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The first random permutations (seeds 0, 1, ...) that move some space, and those spaces."""
    for seed in range(32):
        perms = random_permutations(spec, seed)
        moved = {space for space, perm in perms.items()
                 if not torch.equal(perm, torch.arange(len(perm)))}
        if moved:
            return perms, moved
    raise AssertionError(f"32 seeds gave only identities for the free spaces of {spec.spaces}")


# ---------------------------------------------------------------------------------------------
# Invariant 1 and its companions, over every family
# ---------------------------------------------------------------------------------------------
@budget(30)
@given(case=archgen.cases(), seed=seeds)
def test_permuting_free_spaces_keeps_outputs(case: archgen.Case, seed: int) -> None:
    spec = mergec.discover(case.model, case.inputs)
    twin = mergec.permute(case.model, case.inputs, seed=seed, spec=spec)
    assert_same_outputs(twin, case.model, case.inputs)


@budget(15)
@given(case=archgen.cases())
def test_permutation_moves_every_bound_entry(case: archgen.Case) -> None:
    spec = mergec.discover(case.model, case.inputs)
    perms, moved = moving_permutations(spec)
    twin = permuted_copy(case.model, spec, perms)
    before, after = case.model.state_dict(), twin.state_dict()
    moved_keys = {b.key for b in spec.bindings if b.space in moved}
    assert moved_keys, f"spaces {moved} move but bind no state-dict entry"
    unchanged = sorted(key for key in moved_keys if torch.equal(before[key], after[key]))
    assert not unchanged, f"bound to a moved space, yet unchanged: {unchanged}"
    assert_same_outputs(twin, case.model, case.inputs)


@budget(30)
@given(case=archgen.cases())
def test_expectations_hold(case: archgen.Case) -> None:
    case.check(mergec.discover(case.model, case.inputs))


@budget(10)
@given(case=archgen.cases())
def test_json_round_trip_and_coverage(case: archgen.Case) -> None:
    spec = mergec.discover(case.model, case.inputs)
    again = UnitSpec.from_json(spec.to_json())
    assert again == spec
    assert again.to_json() == spec.to_json()
    assert 0.0 < spec.coverage() <= 1.0  # every case has a free hidden layer
    assert set(spec.shapes) == set(case.model.state_dict())


@budget(8)
@given(case=archgen.cases(), seed=seeds)
def test_spec_depends_on_the_graph_not_the_weights(case: archgen.Case, seed: int) -> None:
    spec = mergec.discover(case.model, case.inputs)
    twin = mergec.permute(case.model, case.inputs, seed=seed, spec=spec)
    assert mergec.discover(twin, case.inputs) == spec


# ---------------------------------------------------------------------------------------------
# Backbones: outputs="free", outputs come out permuted by their spaces
# ---------------------------------------------------------------------------------------------
def gather_outputs(values: list[torch.Tensor], spec: UnitSpec,
                   perms: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each output permuted along every axis that ``spec.outputs`` puts in a space."""
    assert len(spec.outputs) == len(values), (spec.outputs, [v.shape for v in values])
    gathered = []
    for value, axes in zip(values, spec.outputs):
        assert len(axes) == value.dim(), f"output labels {axes} for shape {tuple(value.shape)}"
        for axis, space in enumerate(axes):
            if space is not None:
                value = value.index_select(axis, perms[space])
        gathered.append(value)
    return gathered


@budget(10)
@given(case=archgen.cases())
def test_is_free_agrees_with_the_permutations(case: archgen.Case) -> None:
    """A space is free exactly when some random permutation moves it (fixed ones never do)."""
    spec = mergec.discover(case.model, case.inputs)
    moved: set[str] = set()
    for seed in range(16):
        perms = random_permutations(spec, seed)
        moved |= {space for space, perm in perms.items()
                  if not torch.equal(perm, torch.arange(len(perm)))}
    assert moved == {space.id for space in spec.free_spaces()}


@budget(20)
@given(case=archgen.cases(head=False), seed=seeds)
def test_backbone_outputs_come_out_permuted(case: archgen.Case, seed: int) -> None:
    spec = mergec.discover(case.model, case.inputs, outputs="free")
    case.check(spec)  # with free outputs the stream is free: the expectations still hold
    assert any(space is not None for axes in spec.outputs for space in axes), spec.outputs
    perms = random_permutations(spec, seed)
    twin = permuted_copy(case.model, spec, perms)
    expected = gather_outputs(outputs(case.model, case.inputs), spec, perms)
    for got, want in zip(outputs(twin, case.inputs), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


@budget(8)
@given(case=archgen.cases())
def test_free_outputs_permute_the_logits(case: archgen.Case) -> None:
    """With a head, outputs="free" frees the logits' space, and only that changes."""
    fixed = mergec.discover(case.model, case.inputs)
    free = mergec.discover(case.model, case.inputs, outputs="free")
    (logits,) = free.outputs
    assert logits[0] is None and logits[-1] is not None and free.is_free(logits[-1])
    assert fixed.outputs[0][-1] is not None and not fixed.is_free(fixed.outputs[0][-1])
    assert "reaches a model output" in fixed.spaces[fixed.outputs[0][-1]].fixed
    assert len(free.free_spaces()) == len(fixed.free_spaces()) + 1


# ---------------------------------------------------------------------------------------------
# Every block kind, so that each rule is exercised whatever the draws above
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(archgen.FAMILY_OF))
def test_every_block_kind(kind: str) -> None:
    @budget(3)
    @given(case=archgen.cases(require=(kind,)), seed=seeds)
    def check(case: archgen.Case, seed: int) -> None:
        assert kind in case.name
        spec = mergec.discover(case.model, case.inputs)
        case.check(spec)
        assert_same_outputs(mergec.permute(case.model, case.inputs, seed=seed, spec=spec),
                            case.model, case.inputs)

    check()


def test_generated_expectations_reject_a_fix_everything_spec() -> None:
    """The expectations are not vacuous: a spec with every space fixed fails them."""
    @budget(5)
    @given(case=archgen.cases())
    def check(case: archgen.Case) -> None:
        spec = mergec.discover(case.model, case.inputs)
        spaces = {id_: replace(space, fixed="fixed by the test")
                  for id_, space in spec.spaces.items()}
        everything_fixed = UnitSpec(spaces=spaces, bindings=spec.bindings, shapes=spec.shapes,
                                    outputs=spec.outputs)
        with pytest.raises(AssertionError):
            case.check(everything_fixed)

    check()
