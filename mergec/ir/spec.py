"""The unit spec: which parameter axes can be permuted together, as plain data.

This is Git Re-Basin's permutation spec, derived from the graph by ``annotate-units`` instead of
written by hand. A :class:`Space` is a set of feature axes whose coordinates can be permuted
together; a :class:`Binding` says that axis ``axis`` of state-dict entry ``key`` is indexed by a
space, and in which role.

Structures (``Space.kind``):

* ``flat`` — any permutation of the ``size`` units.
* ``blocks`` — attention heads or GroupNorm groups: ``block_count`` blocks of ``block_size``
  units; a permutation moves whole blocks (the permutation of the space ``block_space``, shared by
  every space tied to it, e.g. q, k and v of one attention) and permutes inside each block. When
  ``parts`` is set, the blocks were separated (a fused qkv projection indexed block by block) and
  the permutation inside block ``i`` is that of space ``parts[i]``.
* ``composite`` — a direct sum (``cat``, ``split``): each part permuted on its own.
* ``tiled`` — a product of factors, row-major; ``factors`` is a tuple of ``(space id or None,
  size)``. ``flatten`` of (C, H, W) is ``((channels, C), (None, H*W))``: each channel repeated.

``fixed`` says why a space admits only the identity; ``within_fixed`` why a blocks space admits
no permutation inside its blocks (rotary embeddings pin the q/k within-head order).

Symmetry groups (``Space.group``): every free space admits the permutations of its structure; a
flat space that only linear maps, sums and norms whose statistics are rotation-invariant touch
(a pre-norm transformer's residual stream once ``fold-norms`` has moved the norms' gains into the
layers that read them) admits every orthogonal map, ``"orthogonal"``. ``ones_fixed``: a
LayerNorm reads the space, whose centring commutes only with the orthogonal maps that keep the
all-ones direction. ``group_reason`` says which node restricts a flat free space to
permutations. ``sites`` are the (node, axis) pairs where a rotation space is observed: every
residual sum of a stream, since one rotation serves the stream at every depth.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from mergec.errors import SpecError

Role = Literal["produces", "consumes", "elementwise"]
Kind = Literal["flat", "blocks", "composite", "tiled"]
Group = Literal["permutation", "orthogonal"]


@dataclass(frozen=True)
class Space:
    """One permutation-equivalent set of feature axes."""

    id: str
    size: int
    kind: Kind = "flat"
    fixed: str | None = None
    within_fixed: str | None = None
    block_count: int | None = None
    block_space: str | None = None
    parts: tuple[str, ...] = ()
    factors: tuple[tuple[str | None, int], ...] = ()
    probe: str | None = None
    probe_axis: int | None = None
    probe_within_axis: int | None = None  # set when the probe carries blocks and their insides
    origin: str = ""
    group: Group = "permutation"
    ones_fixed: bool = False
    group_reason: str | None = None
    sites: tuple[tuple[str, int], ...] = ()  # (node, axis): where a rotation space is observed

    @property
    def block_size(self) -> int | None:
        return None if self.block_count is None else self.size // self.block_count

    @property
    def free(self) -> bool:
        return self.fixed is None


@dataclass(frozen=True)
class Binding:
    """Axis ``axis`` of state-dict entry ``key`` is indexed by ``space``.

    ``role`` is ``produces`` (a layer's output axis: weight dim 0, bias), ``consumes`` (a layer's
    input axis) or ``elementwise`` (a per-unit scale or shift: norm affine, running stats,
    positional embedding). ``groups`` > 1 marks the input axis of a grouped convolution, whose
    weight holds only the diagonal blocks of a block-diagonal matrix over ``space``.
    """

    key: str
    axis: int
    space: str
    role: Role
    groups: int = 1


@dataclass(frozen=True)
class UnitSpec:
    """Every space of a model and, per state-dict entry, the axes bound to them.

    ``shapes`` maps every state-dict key to its shape, so that coverage counts every element,
    also of entries with no bound axis. ``outputs`` gives, per model output tensor (flattened in
    pytree order), the space of each axis (None where the axis is not a feature axis).
    """

    spaces: dict[str, Space]
    bindings: tuple[Binding, ...]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    model: str = ""
    outputs: tuple[tuple[str | None, ...], ...] = ()

    # -- queries ---------------------------------------------------------------------------
    def is_free(self, space_id: str) -> bool:
        """Whether ``space_id`` admits some permutation other than the identity."""
        space = self.spaces[space_id]
        if space.fixed is not None:
            return False
        if space.kind == "composite":
            return any(self.is_free(part) for part in space.parts)
        if space.kind == "tiled":
            return any(f is not None and self.is_free(f) for f, _ in space.factors)
        if space.kind == "blocks":
            if space.parts:
                inner_free = any(self.is_free(part) for part in space.parts)
            else:
                inner_free = space.within_fixed is None
            order_free = space.block_space is not None and self.is_free(space.block_space)
            return inner_free or order_free
        return space.size > 1

    def bindings_of(self, key: str) -> tuple[Binding, ...]:
        return tuple(b for b in self.bindings if b.key == key)

    def free_spaces(self) -> list[Space]:
        return [s for s in self.spaces.values() if self.is_free(s.id)]

    def coverage(self, read_only: bool = False) -> float:
        """Fraction of parameter and buffer elements with at least one axis in a free space;
        with ``read_only``, of those the graph reads (not the :meth:`unread` entries)."""
        total = covered = 0
        free_keys = {b.key for b in self.bindings if self.is_free(b.space)}
        skipped = set(self.unread()) if read_only else set()
        for key, shape in self.shapes.items():
            if key in skipped:
                continue
            count = math.prod(shape)
            total += count
            covered += count if key in free_keys else 0
        return covered / total if total else 0.0

    def unread(self) -> tuple[str, ...]:
        """State-dict entries with axes that no node of the traced graph reads (GoogLeNet's
        auxiliary classifiers in eval mode): bound to no space, and no part of the function."""
        bound = {binding.key for binding in self.bindings}
        return tuple(key for key, shape in self.shapes.items() if shape and key not in bound)

    # -- JSON ------------------------------------------------------------------------------
    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps({
            "model": self.model,
            "spaces": [asdict(space) for space in self.spaces.values()],
            "bindings": [asdict(binding) for binding in self.bindings],
            "shapes": {key: list(shape) for key, shape in self.shapes.items()},
            "outputs": [list(axes) for axes in self.outputs],
        }, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "UnitSpec":
        try:
            data = json.loads(text)
            spaces = {}
            for raw in data["spaces"]:
                raw["parts"] = tuple(raw["parts"])
                raw["factors"] = tuple((f, int(n)) for f, n in raw["factors"])
                raw["sites"] = tuple((node, int(axis)) for node, axis in raw.get("sites", ()))
                spaces[raw["id"]] = Space(**raw)
            bindings = tuple(Binding(**raw) for raw in data["bindings"])
            shapes = {key: tuple(shape) for key, shape in data["shapes"].items()}
        except (KeyError, TypeError, ValueError) as error:
            raise SpecError(f"unit spec JSON is malformed: {error}") from error
        outputs = tuple(tuple(axes) for axes in data.get("outputs", ()))
        return cls(spaces=spaces, bindings=bindings, shapes=shapes, model=data.get("model", ""),
                   outputs=outputs)
