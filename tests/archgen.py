"""Hypothesis strategies for random small architectures, each with what annotate-units must find.

A generated :class:`Case` is an ``nn.Module`` that ``torch.export`` (non-strict) accepts, example
inputs, and *expectations*: facts about its unit spec that an annotator which fixes everything
(or joins everything) would fail: a hidden layer's output axis is free, a residual stream's
parameters share one space, q and k share a space while v has its own with the same heads, a
GroupNorm's channels form G blocks, a fused qkv projection is a composite of (q, k, v), ...

Three families, built from blocks that each know their own expectations:

* ``mlp``: Linear chains with activations, BatchNorm1d / LayerNorm, residual Linear blocks;
* ``conv``: conv-BN chains, residual adds, DenseNet concat, split/chunk branches, GroupNorm,
  depthwise and grouped convs, squeeze-excitation, ConvNeXt blocks (channels-last LayerNorm,
  layer scale), pooling; a pooled or flattened (C, H, W) head;
* ``tokens``: a Linear embedding with positional embedding and class token, pre-norm MLP and
  attention blocks (sdpa or explicit matmul-softmax-matmul; separate, chunked, split or indexed
  fused qkv; ``nn.MultiheadAttention``), layer scale; a mean-pooled or class-token head.

Structure-imposing ops (GroupNorm, grouped conv, split) act on a space the block creates itself,
so that the expectations hold in any composition of blocks.

:func:`pairs` draws one architecture of these blocks as a :class:`Pair` of layer constructors
whose widths are :class:`Width` values (a count in model A and one in model B), so that the
same architecture builds at the same widths, at two random widths, or at the widths a merge
should give (``pair.build(max)``): the merges of invariants 3 and 5.

Example::

    @given(archgen.cases())
    def test(case):
        spec = mergec.discover(case.model, case.inputs)
        case.check(spec)
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Union

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from torch import nn

from mergec.ir.spec import UnitSpec

# ---------------------------------------------------------------------------------------------
# References to spaces and expectations over a unit spec
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Axis:
    """Axis ``axis`` of state-dict entry ``key``: names the space bound to it."""

    key: str
    axis: int = 0

    def __repr__(self) -> str:
        return f"{self.key}[{self.axis}]"


@dataclass(frozen=True)
class Cat:
    """The direct sum of the spaces of ``parts`` (a concatenation along channels)."""

    parts: tuple["Ref", ...]


Ref = Union[Axis, Cat]


def space_of(spec: UnitSpec, axis: Axis) -> str:
    """The space bound to ``axis``; fails unless exactly one binding names it."""
    found = [b.space for b in spec.bindings if b.key == axis.key and b.axis == axis.axis]
    assert len(found) == 1, f"{axis!r} has bindings {found}, expected exactly one"
    return found[0]


def matches(spec: UnitSpec, space_id: str, ref: Ref) -> bool:
    """Whether ``space_id`` is the space ``ref`` names (recursively for concatenations)."""
    if isinstance(ref, Axis):
        return space_id == space_of(spec, ref)
    space = spec.spaces[space_id]
    return (space.kind == "composite" and len(space.parts) == len(ref.parts)
            and all(matches(spec, part, sub) for part, sub in zip(space.parts, ref.parts)))


@dataclass(frozen=True)
class Free:
    """The space of ``axis`` admits a permutation other than the identity."""

    axis: Axis

    def check(self, spec: UnitSpec) -> None:
        space = space_of(spec, self.axis)
        assert spec.is_free(space), f"{self.axis!r} is in {spec.spaces[space]}, expected free"


@dataclass(frozen=True)
class Same:
    """``axis`` is in the space ``ref`` names (a residual stream, a norm's affine, a consumer)."""

    axis: Axis
    ref: Ref

    def check(self, spec: UnitSpec) -> None:
        space = space_of(spec, self.axis)
        assert matches(spec, space, self.ref), \
            f"{self.axis!r} is in {spec.spaces[space]}, expected the space of {self.ref!r}"


@dataclass(frozen=True)
class Distinct:
    """``first`` and ``second`` are in different spaces (two independent layers)."""

    first: Axis
    second: Axis

    def check(self, spec: UnitSpec) -> None:
        space = space_of(spec, self.first)
        assert space != space_of(spec, self.second), \
            f"{self.first!r} and {self.second!r} share {spec.spaces[space]}"


@dataclass(frozen=True)
class Blocked:
    """The space of ``axis`` has ``count`` blocks (heads, groups) whose order is free, shared
    with the blocks of ``like`` when given."""

    axis: Axis
    count: int
    like: Axis | None = None

    def check(self, spec: UnitSpec) -> None:
        space = spec.spaces[space_of(spec, self.axis)]
        assert space.kind == "blocks" and space.block_count == self.count, \
            f"{self.axis!r} is in {space}, expected {self.count} blocks"
        assert space.block_space is not None and spec.is_free(space.block_space), \
            f"{self.axis!r}: the order of its blocks is fixed: {space}"
        if self.like is not None:
            other = spec.spaces[space_of(spec, self.like)]
            assert other.block_space == space.block_space, \
                f"{self.axis!r} ({space}) and {self.like!r} ({other}) have different blocks"


@dataclass(frozen=True)
class Composite:
    """The space of ``axis`` is a direct sum of parts of ``sizes``; part ``i`` is the space of
    ``parts[i]`` (its consumer; None for a part of size 1, which no axis binds)."""

    axis: Axis
    sizes: tuple[int, ...]
    parts: tuple[Axis | None, ...]

    def check(self, spec: UnitSpec) -> None:
        space = spec.spaces[space_of(spec, self.axis)]
        assert space.kind == "composite", f"{self.axis!r} is in {space}, expected composite"
        assert tuple(spec.spaces[p].size for p in space.parts) == self.sizes, \
            f"{self.axis!r}: parts {space.parts} do not have sizes {self.sizes}"
        for part, consumer in zip(space.parts, self.parts):
            assert consumer is None or part == space_of(spec, consumer), \
                f"{self.axis!r}: part {part} is not the space of {consumer!r}"


@dataclass(frozen=True)
class FusedQKV:
    """A fused projection's output axis holds (q, k, v): q and k one space (their dot product),
    v another that the output projection consumes; with several heads, q and v have the same
    free head order."""

    axis: Axis
    out_projection: Axis
    heads: int

    def check(self, spec: UnitSpec) -> None:
        space = spec.spaces[space_of(spec, self.axis)]
        assert space.kind in ("composite", "blocks") and len(space.parts) == 3, \
            f"{self.axis!r} is in {space}, expected three parts q, k, v"
        q, k, v = space.parts
        assert q == k != v, f"{self.axis!r}: parts {space.parts}, expected (q, q, v)"
        assert v == space_of(spec, self.out_projection), \
            f"{self.axis!r}: v part {v} is not the input of {self.out_projection!r}"
        assert spec.is_free(q) and spec.is_free(v), f"{self.axis!r}: q or v fixed: {space}"
        if self.heads > 1:
            q_space, v_space = spec.spaces[q], spec.spaces[v]
            assert q_space.kind == v_space.kind == "blocks", (q_space, v_space)
            assert q_space.block_count == self.heads and q_space.block_space == \
                v_space.block_space, (q_space, v_space)


@dataclass(frozen=True)
class Tiled:
    """The space of ``axis`` is the flatten of (C, H, W): channels ``channel`` times ``rest``
    positions that keep their order."""

    axis: Axis
    channel: Ref
    channels: int
    rest: int

    def check(self, spec: UnitSpec) -> None:
        space = spec.spaces[space_of(spec, self.axis)]
        assert space.kind == "tiled", f"{self.axis!r} is in {space}, expected tiled"
        (first, size), *others = space.factors
        assert size == self.channels and first is not None \
            and matches(spec, first, self.channel), \
            f"{self.axis!r}: first factor {space.factors[0]}, expected {self.channel!r}"
        assert all(f is None for f, _ in others) and \
            math.prod(n for _, n in others) == self.rest, space.factors


@dataclass(frozen=True)
class MinFree:
    """The spec has at least ``count`` free spaces."""

    count: int

    def check(self, spec: UnitSpec) -> None:
        free = spec.free_spaces()
        assert len(free) >= self.count, f"{len(free)} free spaces, expected >= {self.count}"


Expectation = Union[Free, Same, Distinct, Blocked, Composite, FusedQKV, Tiled, MinFree]


# ---------------------------------------------------------------------------------------------
# Blocks: each module states what annotate-units must find in it
# ---------------------------------------------------------------------------------------------
@dataclass
class Found:
    """What a block contributes: expectations, the space of its output, new free spaces."""

    expectations: list[Expectation] = field(default_factory=list)
    stream: Ref | None = None
    new_free: int = 0


class Block(nn.Module):
    """A module of a generated net. ``found(prefix, stream)`` gives its expectations, where
    ``prefix`` is its state-dict prefix and ``stream`` the space of its input's feature axis."""

    def found(self, prefix: str, stream: Ref) -> Found:
        raise NotImplementedError


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu,
            "sigmoid": torch.sigmoid, "leaky_relu": F.leaky_relu}[name]


def _hidden(prefix: str, name: str, stream: Ref | None) -> list[Expectation]:
    """A layer ``name`` that reads the stream (None: the model input) and writes a new free
    space."""
    weight = Axis(f"{prefix}{name}.weight", 0)
    expectations: list[Expectation] = [Free(weight)]
    if stream is not None:
        expectations.append(Same(Axis(f"{prefix}{name}.weight", 1), stream))
    if isinstance(stream, Axis):
        expectations.append(Distinct(weight, stream))
    return expectations


# -- mlp family ------------------------------------------------------------------------------
class LinearAct(Block):
    """Linear -> [BatchNorm1d | LayerNorm] -> activation [-> dropout]."""

    def __init__(self, width_in: int, width_out: int, norm: str, activation: str):
        super().__init__()
        self.fc = nn.Linear(width_in, width_out)
        self.norm = {"batch": nn.BatchNorm1d(width_out), "layer": nn.LayerNorm(width_out),
                     "none": nn.Identity()}[norm]
        self.activation = activation
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(_activation(self.activation)(self.norm(self.fc(x))))

    def found(self, prefix: str, stream: Ref) -> Found:
        out = Axis(f"{prefix}fc.weight", 0)
        expectations = _hidden(prefix, "fc", stream) + [Same(Axis(f"{prefix}fc.bias"), out)]
        if not isinstance(self.norm, nn.Identity):
            expectations.append(Same(Axis(f"{prefix}norm.weight"), out))
        return Found(expectations, out, 1)


class LinearHead(Block):
    """The classifier: a Linear whose output (the logits) must keep its order."""

    def __init__(self, width: int, classes: int):
        super().__init__()
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    def found(self, prefix: str, stream: Ref) -> Found:
        return Found([Same(Axis(f"{prefix}fc.weight", 1), stream)], None, 0)


class ResidualLinear(Block):
    """x + fc2(act(fc1(x)))."""

    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(_activation(self.activation)(self.fc1(x)))

    def found(self, prefix: str, stream: Ref) -> Found:
        return Found(_hidden(prefix, "fc1", stream) + [
            Same(Axis(f"{prefix}fc2.weight", 0), stream),
            Same(Axis(f"{prefix}fc2.weight", 1), Axis(f"{prefix}fc1.weight", 0))], stream, 1)


# -- conv family -----------------------------------------------------------------------------
class ConvBN(Block):
    """conv -> [BatchNorm2d] -> activation."""

    def __init__(self, width_in: int, width_out: int, kernel: int, batch_norm: bool,
                 activation: str):
        super().__init__()
        self.conv = nn.Conv2d(width_in, width_out, kernel, padding=kernel // 2)
        self.bn = nn.BatchNorm2d(width_out) if batch_norm else nn.Identity()
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _activation(self.activation)(self.bn(self.conv(x)))

    def found(self, prefix: str, stream: Ref) -> Found:
        out = Axis(f"{prefix}conv.weight", 0)
        expectations = _hidden(prefix, "conv", stream) + [Same(Axis(f"{prefix}conv.bias"), out)]
        if isinstance(self.bn, nn.BatchNorm2d):
            expectations += [Same(Axis(f"{prefix}bn.{name}"), out)
                             for name in ("weight", "bias", "running_mean", "running_var")]
        return Found(expectations, out, 1)


class ResidualConv(Block):
    """x + bn2(conv2(relu(bn1(conv1(x))))): the ResNet basic block."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, hidden, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))

    def found(self, prefix: str, stream: Ref) -> Found:
        return Found(_hidden(prefix, "conv1", stream) + [
            Same(Axis(f"{prefix}bn1.running_var"), Axis(f"{prefix}conv1.weight")),
            Same(Axis(f"{prefix}conv2.weight"), stream),
            Same(Axis(f"{prefix}bn2.weight"), stream),
            Same(Axis(f"{prefix}bn2.running_mean"), stream)], stream, 1)


class DenseLayer(Block):
    """cat([x, conv(relu(bn(x)))], channels): a DenseNet layer; the output is composite."""

    def __init__(self, width: int, growth: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(width)
        self.conv = nn.Conv2d(width, growth, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], dim=1)

    def found(self, prefix: str, stream: Ref) -> Found:
        new = Axis(f"{prefix}conv.weight", 0)
        return Found(_hidden(prefix, "conv", stream) + [Same(Axis(f"{prefix}bn.weight"), stream)],
                     Cat((stream, new)), 1)


class SplitBranches(Block):
    """A 1x1 conv whose channels are split (``split`` or ``chunk``) into two branches, each
    with its own 1x1 conv, concatenated back."""

    def __init__(self, width: int, hidden: int, first: int, outs: tuple[int, int], how: str):
        super().__init__()
        self.sizes = (first, hidden - first)
        self.how = how
        self.conv = nn.Conv2d(width, hidden, 1)
        self.left = nn.Conv2d(self.sizes[0], outs[0], 1)
        self.right = nn.Conv2d(self.sizes[1], outs[1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x))
        if self.how == "chunk":
            left, right = y.chunk(2, dim=1)
        else:
            left, right = torch.split(y, list(self.sizes), dim=1)
        return torch.cat([F.relu(self.left(left)), self.right(right)], dim=1)

    def found(self, prefix: str, stream: Ref) -> Found:
        parts = tuple(Axis(f"{prefix}{name}.weight", 1) if size > 1 else None
                      for name, size in zip(("left", "right"), self.sizes))
        return Found(_hidden(prefix, "conv", stream) + [
            Composite(Axis(f"{prefix}conv.weight"), self.sizes, parts),
            Free(Axis(f"{prefix}left.weight")), Free(Axis(f"{prefix}right.weight"))],
            Cat((Axis(f"{prefix}left.weight"), Axis(f"{prefix}right.weight"))), 3)


class GroupNormBlock(Block):
    """conv -> GroupNorm(G) -> activation: G blocks of channels."""

    def __init__(self, width_in: int, width_out: int, groups: int, activation: str):
        super().__init__()
        self.conv = nn.Conv2d(width_in, width_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, width_out)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _activation(self.activation)(self.norm(self.conv(x)))

    def found(self, prefix: str, stream: Ref) -> Found:
        out = Axis(f"{prefix}conv.weight", 0)
        expectations = _hidden(prefix, "conv", stream) + [Same(Axis(f"{prefix}norm.weight"), out),
                                                          Same(Axis(f"{prefix}norm.bias"), out)]
        groups, channels = self.norm.num_groups, self.norm.num_channels
        if 1 < groups < channels:
            expectations.append(Blocked(out, groups))
        return Found(expectations, out, 1)


class Depthwise(Block):
    """Depthwise 3x3 conv -> BatchNorm -> activation: the channel space passes through."""

    def __init__(self, width: int, activation: str):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.bn = nn.BatchNorm2d(width)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _activation(self.activation)(self.bn(self.conv(x)))

    def found(self, prefix: str, stream: Ref) -> Found:
        return Found([Same(Axis(f"{prefix}conv.weight"), stream),
                      Same(Axis(f"{prefix}conv.bias"), stream),
                      Same(Axis(f"{prefix}bn.running_var"), stream)], stream, 0)


class Grouped(Block):
    """1x1 conv -> grouped 3x3 conv (G groups) -> BatchNorm -> relu: the groups tie the block
    order of the grouped conv's input and output."""

    def __init__(self, width: int, hidden: int, width_out: int, groups: int):
        super().__init__()
        self.pointwise = nn.Conv2d(width, hidden, 1)
        self.grouped = nn.Conv2d(hidden, width_out, 3, padding=1, groups=groups)
        self.bn = nn.BatchNorm2d(width_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.grouped(F.relu(self.pointwise(x)))))

    def found(self, prefix: str, stream: Ref) -> Found:
        hidden, out = Axis(f"{prefix}pointwise.weight"), Axis(f"{prefix}grouped.weight")
        groups = self.grouped.groups
        expectations = _hidden(prefix, "pointwise", stream)
        expectations.append(Same(Axis(f"{prefix}bn.weight"), out))
        if groups == self.grouped.in_channels == self.grouped.out_channels:  # depthwise
            expectations.append(Same(out, hidden))
        else:
            expectations += [Blocked(hidden, groups), Blocked(out, groups, like=hidden)]
        return Found(expectations, out, 1)


class SqueezeExcite(Block):
    """x * sigmoid(fc2(relu(fc1(mean over space of x)))): gating by the pooled features."""

    def __init__(self, width: int, reduced: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, reduced), nn.Linear(reduced, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * gate[:, :, None, None]

    def found(self, prefix: str, stream: Ref) -> Found:
        return Found(_hidden(prefix, "fc1", stream) + [Same(Axis(f"{prefix}fc2.weight"), stream),
                                                       Same(Axis(f"{prefix}fc2.bias"), stream)],
                     stream, 1)


class ConvNeXtBlock(Block):
    """x + permute(gamma * fc2(gelu(fc1(LayerNorm(permute(dwconv(x))))))): channels-last."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.dwconv = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.gamma = nn.Parameter(torch.full((width,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.fc2(F.gelu(self.fc1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)

    def found(self, prefix: str, stream: Ref) -> Found:
        return Found(_hidden(prefix, "fc1", stream) + [
            Same(Axis(f"{prefix}{name}"), stream)
            for name in ("dwconv.weight", "norm.weight", "norm.bias", "fc2.weight", "gamma")],
            stream, 1)


class Pool(Block):
    """2x2 max or average pooling."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, 2) if self.kind == "max" else F.avg_pool2d(x, 2)

    def found(self, prefix: str, stream: Ref) -> Found:
        return Found([], stream, 0)


class PoolHead(Block):
    """Global average pooling (``mean`` or ``adaptive_avg_pool2d``) -> flatten -> Linear."""

    def __init__(self, width: int, classes: int, adaptive: bool):
        super().__init__()
        self.adaptive = adaptive
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1) if self.adaptive \
            else x.mean(dim=(2, 3))
        return self.fc(pooled)

    def found(self, prefix: str, stream: Ref) -> Found:
        return Found([Same(Axis(f"{prefix}fc.weight", 1), stream)], None, 0)


class FlattenHead(Block):
    """flatten (C, H, W) -> Linear -> relu -> Linear: the first Linear's input is tiled."""

    def __init__(self, width: int, positions: int, hidden: int, classes: int):
        super().__init__()
        self.width, self.positions = width, positions
        self.fc1, self.fc2 = nn.Linear(width * positions, hidden), nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))

    def found(self, prefix: str, stream: Ref) -> Found:
        return Found([Tiled(Axis(f"{prefix}fc1.weight", 1), stream, self.width, self.positions),
                      Free(Axis(f"{prefix}fc1.weight"))], None, 1)


# -- tokens family ---------------------------------------------------------------------------
class Embed(Block):
    """Linear patch/feature embedding, optional positional embedding and class token."""

    def __init__(self, features: int, width: int, tokens: int, positional: bool,
                 class_token: bool):
        super().__init__()
        self.fc = nn.Linear(features, width)
        self.pos = nn.Parameter(0.1 * torch.randn(1, tokens, width)) if positional else None
        self.cls = nn.Parameter(0.1 * torch.randn(1, 1, width)) if class_token else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x)
        if self.pos is not None:
            x = x + self.pos
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        return x

    def found(self, prefix: str, stream: Ref) -> Found:
        out = Axis(f"{prefix}fc.weight", 0)
        expectations: list[Expectation] = [Free(out)]
        if self.pos is not None:
            expectations.append(Same(Axis(f"{prefix}pos", 2), out))
        if self.cls is not None:
            expectations.append(Same(Axis(f"{prefix}cls", 2), out))
        return Found(expectations, out, 1)


class MLPBlock(Block):
    """Pre-norm transformer MLP: x + [gamma *] fc2(act(fc1(LayerNorm(x))))."""

    def __init__(self, width: int, hidden: int, activation: str, layer_scale: bool):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.activation = activation
        self.gamma = nn.Parameter(torch.full((width,), 0.5)) if layer_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(_activation(self.activation)(self.fc1(self.norm(x))))
        return x + (y if self.gamma is None else self.gamma * y)

    def found(self, prefix: str, stream: Ref) -> Found:
        expectations = _hidden(prefix, "fc1", stream) + [
            Same(Axis(f"{prefix}norm.weight"), stream), Same(Axis(f"{prefix}fc2.weight"), stream)]
        if self.gamma is not None:
            expectations.append(Same(Axis(f"{prefix}gamma"), stream))
        return Found(expectations, stream, 1)


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return scores.softmax(dim=-1) @ v


class AttentionBlock(Block):
    """Pre-norm self-attention: x + [gamma *] out(attend(q, k, v)) with ``heads`` heads.

    ``qkv``: ``separate`` Linears, or one fused Linear cut by ``chunk``, ``split`` or reshaped to
    (3, heads, head_dim) and ``index``ed; ``attend``: ``sdpa`` or ``explicit``
    matmul-softmax-matmul.
    """

    def __init__(self, width: int, heads: int, qkv: str, attend: str, bias: bool,
                 layer_scale: bool):
        super().__init__()
        self.heads, self.qkv_kind, self.attend = heads, qkv, attend
        self.norm = nn.LayerNorm(width)
        if qkv == "separate":
            self.q, self.k, self.v = (nn.Linear(width, width, bias=bias) for _ in range(3))
        else:
            self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.out = nn.Linear(width, width)
        self.gamma = nn.Parameter(torch.full((width,), 0.5)) if layer_scale else None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        return x.view(batch, tokens, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        h = self.norm(x)
        if self.qkv_kind == "separate":
            q, k, v = (self._heads(layer(h)) for layer in (self.q, self.k, self.v))
        elif self.qkv_kind == "index":
            qkv = self.qkv(h).reshape(batch, tokens, 3, self.heads, width // self.heads)
            qkv = qkv.permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            fused = self.qkv(h)
            parts = fused.chunk(3, dim=-1) if self.qkv_kind == "chunk" \
                else fused.split(width, dim=-1)
            q, k, v = (self._heads(part) for part in parts)
        if self.attend == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = _explicit_attention(q, k, v)
        y = self.out(y.transpose(1, 2).reshape(batch, tokens, width))
        return x + (y if self.gamma is None else self.gamma * y)

    def found(self, prefix: str, stream: Ref) -> Found:
        out_in = Axis(f"{prefix}out.weight", 1)
        expectations: list[Expectation] = [
            Same(Axis(f"{prefix}out.weight"), stream), Same(Axis(f"{prefix}norm.weight"), stream)]
        if self.gamma is not None:
            expectations.append(Same(Axis(f"{prefix}gamma"), stream))
        if self.qkv_kind == "separate":
            q, k, v = (Axis(f"{prefix}{name}.weight") for name in "qkv")
            expectations += [Same(k, q), Same(out_in, v), Distinct(q, v), Free(q), Free(v)]
            expectations += _hidden(prefix, "q", stream)
            if self.heads > 1:
                expectations += [Blocked(q, self.heads), Blocked(v, self.heads, like=q)]
        else:
            expectations += [FusedQKV(Axis(f"{prefix}qkv.weight"), out_in, self.heads),
                             Same(Axis(f"{prefix}qkv.weight", 1), stream)]
        return Found(expectations, stream, 2)


class MultiheadAttentionBlock(Block):
    """Pre-norm ``nn.MultiheadAttention`` (batch first): x + attention(LN(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.attention(h, h, h, need_weights=False)[0]

    def found(self, prefix: str, stream: Ref) -> Found:
        return Found([
            FusedQKV(Axis(f"{prefix}attention.in_proj_weight"),
                     Axis(f"{prefix}attention.out_proj.weight", 1), self.attention.num_heads),
            Same(Axis(f"{prefix}attention.in_proj_weight", 1), stream),
            Same(Axis(f"{prefix}attention.out_proj.weight"), stream)], stream, 2)


class TokenHead(Block):
    """LayerNorm -> mean over tokens or the class token -> Linear."""

    def __init__(self, width: int, classes: int, class_token: bool):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, classes)
        self.class_token = class_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.fc(x[:, 0] if self.class_token else x.mean(dim=1))

    def found(self, prefix: str, stream: Ref) -> Found:
        return Found([Same(Axis(f"{prefix}fc.weight", 1), stream),
                      Same(Axis(f"{prefix}norm.weight"), stream)], None, 0)


# ---------------------------------------------------------------------------------------------
# Nets and cases
# ---------------------------------------------------------------------------------------------
class Net(nn.Module):
    """stem -> blocks -> head (a head of None returns the features)."""

    def __init__(self, stem: Block | None, blocks: list[Block], head: Block | None):
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x if self.head is None else self.head(x)

    def found(self) -> list[Expectation]:
        expectations: list[Expectation] = []
        stream: Ref | None = None
        free = 0
        parts = [("stem.", self.stem)] + [(f"blocks.{i}.", b) for i, b in enumerate(self.blocks)]
        parts += [("head.", self.head)]
        for prefix, block in parts:
            if block is None:
                continue
            found = block.found(prefix, stream)
            expectations += found.expectations
            stream, free = found.stream, free + found.new_free
        return expectations + [MinFree(free)]


class Case:
    """A generated model, its example inputs and what its unit spec must satisfy (discovered
    with ``outputs="fixed"``; for a backbone without head, with ``outputs="free"``)."""

    def __init__(self, name: str, model: nn.Module, inputs: tuple[torch.Tensor, ...],
                 expectations: tuple[Expectation, ...]):
        self.name, self.model, self.inputs, self.expectations = name, model, inputs, expectations

    def check(self, spec: UnitSpec) -> None:
        for expectation in self.expectations:
            expectation.check(spec)

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(x.shape)) for x in self.inputs)
        expected = "\n  ".join(map(repr, self.expectations))
        return f"Case({self.name}, inputs {shapes})\n{self.model}\nexpecting:\n  {expected}"


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Gives every constant-initialised entry (norm affine, running statistics, layer scale)
    random values, so that a permutation that misses it changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif bool((tensor == tensor.reshape(-1)[0]).all()):
                tensor.add_(0.5 * torch.randn(tensor.shape, generator=generator))
    return model


# -- settings and data for merge tests --------------------------------------------------------
def budget(examples: int, *allowed: HealthCheck) -> settings:
    """Few examples, no deadline (every merge exports both models), the same examples on every
    run, and no shrinking (a shrink step costs several merges; the failing case prints whole);
    ``allowed``: health checks to suppress besides slowness and data size."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           *allowed])


def random_like(example: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    """``rows`` samples of standard normal data shaped like ``example`` past the batch axis."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((rows, *example.shape[1:]), generator=generator)


# -- strategies ------------------------------------------------------------------------------
ACTIVATIONS = st.sampled_from(["relu", "gelu", "tanh", "silu", "sigmoid", "leaky_relu"])
widths = st.integers(min_value=2, max_value=8)

MLP_BLOCKS = ("linear", "residual_linear")
CONV_BLOCKS = ("conv_bn", "residual_conv", "dense", "split", "group_norm", "depthwise",
               "grouped", "squeeze_excite", "convnext", "pool")
TOKEN_BLOCKS = ("mlp", "attention", "multihead_attention")
HEADS = ("pool_head", "flatten_head")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def _mlp_block(draw: st.DrawFn, kind: str, width: int) -> tuple[Block, int]:
    if kind == "residual_linear":
        return ResidualLinear(width, draw(widths), draw(ACTIVATIONS)), width
    out = draw(widths)
    return LinearAct(width, out, draw(st.sampled_from(["batch", "layer", "none"])),
                     draw(ACTIVATIONS)), out


@st.composite
def _conv_block(draw: st.DrawFn, kind: str, width: int, size: int) -> tuple[Block, int, int]:
    """A conv block reading ``width`` channels at ``size``x``size``: (block, width, size)."""
    if kind == "conv_bn":
        out = draw(widths)
        return ConvBN(width, out, draw(st.sampled_from([1, 3])), draw(st.booleans()),
                      draw(ACTIVATIONS)), out, size
    if kind == "residual_conv":
        return ResidualConv(width, draw(widths)), width, size
    if kind == "dense":
        growth = draw(st.integers(2, 4))
        return DenseLayer(width, growth), width + growth, size
    if kind == "split":
        how = draw(st.sampled_from(["split", "chunk"]))
        # at least one part wider than 1 channel, so that the split space can move
        hidden = 2 * draw(st.integers(2, 4)) if how == "chunk" else draw(st.integers(3, 8))
        first = hidden // 2 if how == "chunk" else draw(st.integers(1, hidden - 1))
        outs = (draw(st.integers(2, 4)), draw(st.integers(2, 4)))
        return SplitBranches(width, hidden, first, outs, how), sum(outs), size
    if kind == "group_norm":
        out = draw(st.sampled_from([4, 6, 8, 9, 12]))
        return GroupNormBlock(width, out, draw(st.sampled_from(_divisors(out))),
                              draw(ACTIVATIONS)), out, size
    if kind == "depthwise":
        return Depthwise(width, draw(ACTIVATIONS)), width, size
    if kind == "grouped":
        groups = draw(st.sampled_from([2, 3, 4]))
        hidden = groups * draw(st.integers(1, 3))
        out = groups * draw(st.integers(1, 3))
        return Grouped(width, hidden, out, groups), out, size
    if kind == "squeeze_excite":
        return SqueezeExcite(width, draw(st.integers(2, 4))), width, size
    if kind == "convnext":
        return ConvNeXtBlock(width, draw(st.integers(2, 12))), width, size
    if kind == "pool":
        if size < 4:
            return ResidualConv(width, draw(widths)), width, size
        return Pool(draw(st.sampled_from(["max", "avg"]))), width, size // 2
    raise ValueError(kind)


@st.composite
def _token_block(draw: st.DrawFn, kind: str, width: int) -> Block:
    heads = draw(st.sampled_from([d for d in _divisors(width) if width // d >= 2]))
    if kind == "mlp":
        return MLPBlock(width, draw(st.integers(2, 12)), draw(ACTIVATIONS), draw(st.booleans()))
    if kind == "attention":
        return AttentionBlock(width, heads, draw(st.sampled_from(["separate", "chunk", "split",
                                                                  "index"])),
                              draw(st.sampled_from(["sdpa", "explicit"])), draw(st.booleans()),
                              draw(st.booleans()))
    if kind == "multihead_attention":
        return MultiheadAttentionBlock(width, heads)
    raise ValueError(kind)


def _kinds(draw: st.DrawFn, available: tuple[str, ...], required: tuple[str, ...],
           max_blocks: int) -> list[str]:
    kinds = draw(st.lists(st.sampled_from(available), min_size=0 if required else 1,
                          max_size=max_blocks))
    for kind in required:
        kinds.insert(draw(st.integers(0, len(kinds))), kind)
    return kinds


@st.composite
def mlp_cases(draw: st.DrawFn, require: tuple[str, ...] = (), head: bool = True,
              max_blocks: int = 3) -> Case:
    """Linear chains (with norms and dropout) and residual Linear blocks on (B, F) inputs."""
    features = draw(st.integers(2, 6))
    width, blocks = features, []
    kinds = ["linear"] + _kinds(draw, MLP_BLOCKS, require, max_blocks)
    for kind in kinds:
        block, width = draw(_mlp_block(kind, width))
        blocks.append(block)
    head_block = LinearHead(width, draw(st.integers(2, 5))) if head else None
    return _case(draw, f"mlp{kinds}", Net(None, blocks, head_block),
                 (torch.randn(3, features),))


@st.composite
def conv_cases(draw: st.DrawFn, require: tuple[str, ...] = (), head: str | None = "any",
               max_blocks: int = 3) -> Case:
    """A conv stem, conv blocks, and a pooled or flattened head on (B, 3, H, W) inputs."""
    size = input_size = draw(st.sampled_from([4, 6, 8]))
    width = draw(widths)
    stem = ConvBN(3, width, 3, draw(st.booleans()), "relu")
    kinds = _kinds(draw, CONV_BLOCKS, require, max_blocks)
    blocks = []
    for kind in kinds:
        block, width, size = draw(_conv_block(kind, width, size))
        blocks.append(block)
    if head == "any":
        head = draw(st.sampled_from(HEADS))
    classes = draw(st.integers(2, 5))
    head_block = {"pool_head": lambda: PoolHead(width, classes, draw(st.booleans())),
                  "flatten_head": lambda: FlattenHead(width, size * size, draw(widths), classes),
                  None: lambda: None}[head]()
    return _case(draw, f"conv{kinds}+{head}", Net(stem, blocks, head_block),
                 (torch.randn(2, 3, input_size, input_size),))


@st.composite
def token_cases(draw: st.DrawFn, require: tuple[str, ...] = (), head: bool = True,
                max_blocks: int = 2) -> Case:
    """A Linear embedding (positional embedding, class token), transformer blocks and a
    pooled or class-token head on (B, T, F) inputs."""
    features, tokens = draw(st.integers(2, 5)), draw(st.integers(2, 5))
    width = draw(st.sampled_from([h * d for h in (1, 2, 3, 4) for d in (2, 3, 4)]))
    class_token = draw(st.booleans())
    stem = Embed(features, width, tokens, draw(st.booleans()), class_token)
    kinds = _kinds(draw, TOKEN_BLOCKS, require, max_blocks)
    blocks = [draw(_token_block(kind, width)) for kind in kinds]
    head_block = TokenHead(width, draw(st.integers(2, 5)), class_token) if head else None
    return _case(draw, f"tokens{kinds}", Net(stem, blocks, head_block),
                 (torch.randn(2, tokens, features),))


def _case(draw: st.DrawFn, name: str, net: Net, inputs: tuple[torch.Tensor, ...]) -> Case:
    seed = draw(st.integers(0, 2**16))
    randomize_(net, seed)
    generator = torch.Generator().manual_seed(seed)
    inputs = tuple(torch.randn(x.shape, generator=generator) for x in inputs)
    return Case(name, net.eval(), inputs, tuple(net.found()))


FAMILY_OF = {**{k: "mlp" for k in MLP_BLOCKS}, **{k: "conv" for k in CONV_BLOCKS},
             **{k: "tokens" for k in TOKEN_BLOCKS}}


def cases(require: tuple[str, ...] = (), head: bool = True) -> st.SearchStrategy[Case]:
    """Random architectures of every family; ``require`` names block kinds that must appear
    (all of one family); ``head=False`` gives backbones that return their features."""
    families = {FAMILY_OF[kind] for kind in require}
    assert len(families) <= 1, f"blocks of different families: {require}"
    strategies = {"mlp": mlp_cases(require, head), "tokens": token_cases(require, head),
                  "conv": conv_cases(require, "any" if head else None)}
    if families:
        return strategies[families.pop()]
    return st.one_of(list(strategies.values()))


def with_identity_blocks(shallow: nn.Module, deep: nn.Module, positions: dict[int, int]
                         ) -> nn.Module:
    """``deep`` computing ``shallow``: deep block j of every stage holds shallow block
    positions[j]; the other deep blocks are identities (last BatchNorm zeroed)."""
    state, source = deep.state_dict(), shallow.state_dict()
    for key in state:
        if not key.startswith("layer"):
            state[key] = source[key].clone()
            continue
        stage, block, rest = key.split(".", 2)
        if int(block) in positions:
            state[key] = source[f"{stage}.{positions[int(block)]}.{rest}"].clone()
        elif rest in ("bn2.weight", "bn2.bias"):
            state[key] = torch.zeros_like(state[key])
    deep.load_state_dict(state)
    return deep.eval()


# ---------------------------------------------------------------------------------------------
# Pairs: one architecture built twice, at the same or at different widths
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Width:
    """A width that may differ between the two models of a pair: a sum of ``unit * count``
    terms whose count is ``a`` in model A and ``b`` in model B. A concatenation adds terms;
    a block space (heads, groups) is a count of blocks times the units of one block."""

    terms: tuple[tuple[int, int, int], ...]  # (unit, count in A, count in B)

    @staticmethod
    def of(a: int, b: int, unit: int = 1) -> "Width":
        return Width(((unit, a, b),))

    def __add__(self, other: "Width") -> "Width":
        return Width(self.terms + other.terms)

    def __mul__(self, unit: int) -> "Width":
        return Width(tuple((u * unit, a, b) for u, a, b in self.terms))

    def at(self, count: Callable[[int, int], int]) -> int:
        """The width where each term's count is ``count(a, b)`` (A: ``lambda a, b: a``)."""
        return sum(unit * count(a, b) for unit, a, b in self.terms)


class HeadsAttention(Block):
    """x + out(attend(q, k, v)), [pre-norm]: ``heads`` heads of ``head_size`` features over a
    stream of any width (so that the stream and the heads change width independently)."""

    def __init__(self, width: int, heads: int, head_size: int, attend: str, norm: bool):
        super().__init__()
        self.heads, self.head_size, self.attend = heads, head_size, attend
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.q, self.k, self.v = (nn.Linear(width, heads * head_size) for _ in range(3))
        self.out = nn.Linear(heads * head_size, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        h = self.norm(x)
        q, k, v = (layer(h).view(batch, tokens, self.heads, self.head_size).transpose(1, 2)
                   for layer in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v) if self.attend == "sdpa" \
            else _explicit_attention(q, k, v)
        return x + self.out(y.transpose(1, 2).flatten(2))

    def found(self, prefix: str, stream: Ref) -> Found:
        q, v = Axis(f"{prefix}q.weight"), Axis(f"{prefix}v.weight")
        expectations = _hidden(prefix, "q", stream) + [
            Same(Axis(f"{prefix}k.weight"), q), Same(Axis(f"{prefix}out.weight", 1), v),
            Same(Axis(f"{prefix}out.weight"), stream), Distinct(q, v)]
        if self.heads > 1:
            expectations += [Blocked(q, self.heads), Blocked(v, self.heads, like=q)]
        return Found(expectations, stream, 2)


def without_norm(block: Block) -> Block:
    """``block`` with its ``norm`` (a LayerNorm) replaced by the identity."""
    block.norm = nn.Identity()
    return block


Layer = tuple[Callable[..., Block], tuple]  # a block's constructor and arguments (some Width)


@dataclass
class Pair:
    """One architecture at two widths: ``build(count)`` makes the model whose every
    :class:`Width` takes ``count(a, b)`` (model A: ``A``, model B: ``B``, a merge's target
    widths: ``count = max``, ...); ``inputs`` are random inputs of ``shape`` (batch first)."""

    name: str
    stem: Layer | None
    blocks: list[Layer]
    head: Layer
    shape: tuple[int, ...]
    input_seed: int

    @property
    def inputs(self) -> torch.Tensor:
        return torch.randn(self.shape, generator=torch.Generator().manual_seed(self.input_seed))

    def build(self, count: Callable[[int, int], int], seed: int = 0) -> Net:
        """The model at ``count``'s widths, initialised from ``seed`` (norm affines, running
        statistics and layer scales random too), in eval mode."""
        def make(layer: Layer | None) -> Block | None:
            if layer is None:
                return None
            constructor, args = layer
            return constructor(*(resolve(a) for a in args))

        def resolve(arg: object) -> object:
            if isinstance(arg, tuple):
                return tuple(resolve(a) for a in arg)
            return arg.at(count) if isinstance(arg, Width) else arg

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = Net(make(self.stem), [make(layer) for layer in self.blocks], make(self.head))
        return randomize_(net, seed).eval()



def A(a: int, b: int) -> int:
    return a


def B(a: int, b: int) -> int:
    return b


PAIR_FAMILIES = ("mlp", "conv", "tokens")
# blocks whose normalisation is per channel (BatchNorm, GroupNorm over blocks of the same
# size, or none), and those with a LayerNorm over the whole stream: ``per_channel=False`` only
PER_CHANNEL_BLOCKS = {"mlp": ("linear", "residual_linear"),
                      "conv": ("conv_bn", "residual_conv", "dense", "split", "group_norm",
                               "depthwise", "grouped", "squeeze_excite", "pool"),
                      "tokens": ("mlp", "heads_attention")}
LAYER_NORM_BLOCKS = {"mlp": ("layer_norm_linear",), "conv": ("convnext",),
                     "tokens": ("attention", "multihead_attention")}


def _inputs(draw: st.DrawFn, *shape: int) -> tuple[tuple[int, ...], int]:
    """Random inputs of ``shape``: the shape and a seed."""
    return shape, draw(st.integers(0, 2**16))


def _pair_width(draw: st.DrawFn, same: bool, low: int = 2, high: int = 8,
                unit: int = 1) -> Width:
    a = draw(st.integers(low, high))
    return Width.of(a, a if same else draw(st.integers(low, high)), unit)


@st.composite
def _mlp_layer(draw: st.DrawFn, kind: str, width: Width | int, same: bool
               ) -> tuple[Layer, Width]:
    if kind == "residual_linear":
        return (ResidualLinear, (width, _pair_width(draw, same), draw(ACTIVATIONS))), width
    out = _pair_width(draw, same)
    norm = "layer" if kind == "layer_norm_linear" else draw(st.sampled_from(["batch", "none"]))
    return (LinearAct, (width, out, norm, draw(ACTIVATIONS))), out


@st.composite
def _conv_layer(draw: st.DrawFn, kind: str, width: Width, size: int, same: bool
                ) -> tuple[Layer, Width, int]:
    """A conv block of a pair reading ``width`` channels at ``size``x``size``."""
    pair = functools.partial(_pair_width, draw, same)
    if kind == "conv_bn":
        out = pair()
        return (ConvBN, (width, out, draw(st.sampled_from([1, 3])), draw(st.booleans()),
                         draw(ACTIVATIONS))), out, size
    if kind in ("residual_conv", "squeeze_excite", "convnext"):
        hidden = pair(high=4) if kind == "squeeze_excite" else pair()
        block = {"residual_conv": ResidualConv, "squeeze_excite": SqueezeExcite,
                 "convnext": ConvNeXtBlock}[kind]
        return (block, (width, hidden)), width, size
    if kind == "dense":
        growth = pair(high=4)
        return (DenseLayer, (width, growth)), width + growth, size
    if kind == "split":
        how = draw(st.sampled_from(["split", "chunk"]))
        first = pair(high=4)
        second = first if how == "chunk" else pair(high=4)
        outs = (pair(high=4), pair(high=4))
        return (SplitBranches, (width, first + second, first, outs, how)), outs[0] + outs[1], \
            size
    if kind == "group_norm":
        groups, group_size = pair(high=3), draw(st.integers(2, 3))
        return (GroupNormBlock, (width, groups * group_size, groups, draw(ACTIVATIONS))), \
            groups * group_size, size
    if kind == "grouped":
        groups = pair(low=2, high=3)
        hidden, out = (groups * draw(st.integers(1, 2)) for _ in range(2))
        return (Grouped, (width, hidden, out, groups)), out, size
    if kind == "depthwise":
        return (Depthwise, (width, draw(ACTIVATIONS))), width, size
    if kind == "pool" and size >= 4:
        return (Pool, (draw(st.sampled_from(["max", "avg"])),)), width, size // 2
    return (ResidualConv, (width, pair())), width, size


def _normless(block: Callable[..., Block]) -> Callable[..., Block]:
    """``block``'s constructor, its LayerNorm replaced by the identity."""
    return lambda *args: without_norm(block(*args))


@st.composite
def _token_layer(draw: st.DrawFn, kind: str, width: Width, same: bool, per_channel: bool
                 ) -> Layer:
    if kind == "mlp":
        block = _normless(MLPBlock) if per_channel else MLPBlock
        return block, (width, _pair_width(draw, same), draw(ACTIVATIONS), draw(st.booleans()))
    if kind == "heads_attention":
        return HeadsAttention, (width, _pair_width(draw, same, high=3),
                                draw(st.integers(2, 3)), draw(st.sampled_from(["sdpa",
                                                                               "explicit"])),
                                not per_channel and draw(st.booleans()))
    # a LayerNorm block whose heads divide the stream: drawn at one width only
    stream = width.at(A)
    heads = draw(st.sampled_from([d for d in _divisors(stream) if stream // d >= 2]))
    if kind == "multihead_attention":
        return MultiheadAttentionBlock, (width, heads)
    return AttentionBlock, (width, heads, draw(st.sampled_from(["separate", "chunk", "split",
                                                                "index"])),
                            draw(st.sampled_from(["sdpa", "explicit"])), draw(st.booleans()),
                            draw(st.booleans()))


def _pair_kinds(draw: st.DrawFn, family: str, same: bool, per_channel: bool,
                require: tuple[str, ...], max_blocks: int) -> list[str]:
    kinds = PER_CHANNEL_BLOCKS[family]
    if not per_channel:
        kinds += LAYER_NORM_BLOCKS[family] if same or family != "tokens" else ()
    return _kinds(draw, kinds, require, max_blocks)


@st.composite
def pairs(draw: st.DrawFn, family: str | None = None, same: bool = False,
          per_channel: bool = True, require: tuple[str, ...] = (), max_blocks: int = 3
          ) -> Pair:
    """One random architecture of ``family`` (any when None) at two widths: the same widths
    when ``same``, else each hidden width, head count and group count drawn twice (from 2 to
    8 units, heads and groups 2 or 3 of a size both models share). ``per_channel`` keeps to
    normalisations that act per channel (BatchNorm, GroupNorm, none; attention with several
    heads): the blocks after which elastic zip at width d_a + d_b is the logit ensemble. One
    group or one head is left out: it normalises over the whole space (GroupNorm(1, C) is a
    LayerNorm), and a single head is a flat space, so d_a + d_b units make one larger head.
    ``require`` names block kinds of ``family`` that must appear."""
    family = family or draw(st.sampled_from(PAIR_FAMILIES))
    kinds = _pair_kinds(draw, family, same, per_channel, require, max_blocks)
    classes = draw(st.integers(2, 5))
    if family == "mlp":
        features = draw(st.integers(2, 6))
        width, blocks = features, []
        for kind in ["linear"] + kinds:
            layer, width = draw(_mlp_layer(kind, width, same))
            blocks.append(layer)
        return Pair(f"mlp{kinds}", None, blocks, (LinearHead, (width, classes)),
                    *_inputs(draw, 96, features))
    if family == "conv":
        return draw(_conv_pair(kinds, same, classes))
    features, tokens = draw(st.integers(2, 5)), draw(st.integers(2, 5))
    width = _pair_width(draw, same, high=12)
    class_token = draw(st.booleans())
    stem = (Embed, (features, width, tokens, draw(st.booleans()), class_token))
    blocks = [draw(_token_layer(kind, width, same, per_channel)) for kind in kinds]
    head = (_normless(TokenHead) if per_channel else TokenHead, (width, classes, class_token))
    return Pair(f"tokens{kinds}", stem, blocks, head, *_inputs(draw, 64, tokens, features))


@st.composite
def _conv_pair(draw: st.DrawFn, kinds: list[str], same: bool, classes: int) -> Pair:
    size = input_size = draw(st.sampled_from([4, 6]))
    width = _pair_width(draw, same)
    stem = (ConvBN, (3, width, 3, draw(st.booleans()), "relu"))
    blocks = []
    for kind in kinds:
        layer, width, size = draw(_conv_layer(kind, width, size, same))
        blocks.append(layer)
    if draw(st.booleans()):
        head: Layer = (PoolHead, (width, classes, draw(st.booleans())))
    else:
        head = (FlattenHead, (width, size * size, _pair_width(draw, same), classes))
    return Pair(f"conv{kinds}", stem, blocks, head, *_inputs(draw, 64, 3, input_size, input_size))
