"""Stages and blocks of a network (what segment finds) and how align-depth padded the shallow
model of a pair (its depth plan): plain data that the pipeline state hands on."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable


@dataclass(frozen=True)
class Block:
    """One block of a stage. A residual block: the module ``path`` that owns it and its
    residual ``adds``. A plain layer (``adds`` empty): its ``nodes``, weight layer first;
    ``path`` is the weight layer's module."""

    stage: int
    index: int
    path: str
    adds: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()  # the modules whose state the block holds, in graph order

    @property
    def output(self) -> str:
        return self.adds[-1] if self.adds else self.nodes[-1]

    @property
    def is_layer(self) -> bool:
        return not self.adds


Stages = list[list[Block]]


@dataclass
class DepthPlan:
    """What align-depth decided: the CKA matrix and alignment of every stage, and how the
    shallow model was padded (deep block paths that are identity blocks, keys zeroed)."""

    stages: list[dict] = field(default_factory=list)
    padded_paths: list[str] = field(default_factory=list)
    zeroed: list[str] = field(default_factory=list)
    identity: list[str] = field(default_factory=list)  # keys of plain layers made identities
    swapped: bool = False

    def unaligned_keys(self, keys: Iterable[str]) -> set[str]:
        return {k for k in keys if any(k.startswith(p + ".") for p in self.padded_paths)}

    def to_dict(self) -> dict:
        return {"swapped": self.swapped, "padded": self.padded_paths, "zeroed": self.zeroed,
                "identity": self.identity,
                "stages": [{key: value for key, value in stage.items() if key != "cka"}
                           | {"cka": stage["cka"].tolist()} for stage in self.stages]}
