"""Depth alignment: which block of the deep model each block of the shallow model stands for.

Within a stage, ``align-depth`` has a similarity ``S[i, j]`` (linear CKA) between the output of
shallow block i and deep block j. An alignment is a strictly increasing map ``f`` from shallow
to deep blocks with ``f(0) = 0``: the first block of a stage downsamples in both models, so they
must correspond. Shallow block i stands for the *segment* of deep blocks ``f(i-1)+1 .. f(i)``
(segment 0 is block 0 alone); deep blocks after ``f(last)`` belong to no segment. The shallow
model is later padded with identity blocks at the deep positions outside the image of ``f``.

Two scores of aligning shallow block i with the segment ending at ``f(i)``:

- ``"segment-wise"``: ``S[i, f(i)]``, the segment's last block (its output is what continues);
- ``"layer-wise"``: the *mean* of ``S[i, k]`` over the segment's blocks. The mean, not the sum,
  so that every shallow block weighs the same whatever its segment's length and the total is on
  the scale of the segment-wise one.

Dynamic programming finds the alignment with the largest total in O(n_shallow · n_deep²).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mergec.errors import MergeError

logger = logging.getLogger(__name__)

Variant = Literal["segment-wise", "layer-wise"]


@dataclass(frozen=True)
class DepthAlignment:
    """Result of :func:`align_depth`.

    ``mapping[i]`` is the deep block aligned with shallow block i; ``segments[i]`` the deep
    blocks shallow block i stands for; ``score`` the total similarity that was maximised.
    """

    mapping: tuple[int, ...]
    segments: tuple[range, ...]
    score: float
    num_deep: int

    @property
    def padding(self) -> tuple[int, ...]:
        """Deep positions with no shallow block: where the shallow model gets identity blocks."""
        aligned = set(self.mapping)
        return tuple(block for block in range(self.num_deep) if block not in aligned)


def _segment_scores(similarity: Tensor, variant: Variant) -> Tensor:
    """``scores[i, start, end]``: score of shallow block i standing for deep blocks start..end."""
    num_shallow, num_deep = similarity.shape
    if variant == "segment-wise":
        return similarity[:, None, :].expand(num_shallow, num_deep, num_deep)
    prefix = torch.nn.functional.pad(
        similarity.cumsum(dim=1), (1, 0)
    )  # prefix[i, k] = sum of S[i, :k]
    start = torch.arange(num_deep)[:, None]
    end = torch.arange(num_deep)[None, :]
    lengths = (end - start + 1).clamp(min=1).to(similarity.dtype)
    sums = (
        prefix[:, None, 1:] - prefix[:, :-1, None]
    )  # sums[i, start, end] = sum of S[i, start..end]
    return sums / lengths


def align_depth(
    similarity: Tensor,
    variant: Variant = "segment-wise",
    *,
    last_to_last: bool = False,
    allowed: Tensor | None = None,
) -> DepthAlignment:
    """Best monotone alignment of shallow blocks (rows) to deep blocks (columns) of ``similarity``.

    ``similarity`` is ``[n_shallow, n_deep]`` with ``n_shallow <= n_deep``. With
    ``last_to_last`` the last shallow block must also map to the last deep block, so the
    segments cover every deep block. ``allowed`` (bool, like ``similarity``) says which deep
    blocks each shallow block may be aligned with (blocks of other shapes may not); a
    MergeError is raised when no alignment keeps to it.

    >>> cka = torch.tensor([[1.0, 0.2, 0.1, 0.0], [0.1, 0.3, 0.9, 0.2]])
    >>> align_depth(cka).mapping
    (0, 2)
    >>> align_depth(cka).segments
    (range(0, 1), range(1, 3))
    """
    _check_similarity(similarity, variant, last_to_last)
    scores = _segment_scores(similarity.detach().to("cpu", torch.float64), variant)
    num_shallow, num_deep = similarity.shape
    best = torch.full((num_shallow, num_deep), -math.inf, dtype=torch.float64)
    previous = torch.zeros((num_shallow, num_deep), dtype=torch.long)
    if allowed is None:
        allowed = torch.ones(num_shallow, num_deep, dtype=torch.bool)
    elif allowed.shape != similarity.shape:
        raise MergeError(f"align_depth: allowed has shape {tuple(allowed.shape)}, the similarity "
                         f"{tuple(similarity.shape)}")
    best[0, 0] = scores[0, 0, 0] if allowed[0, 0] else -math.inf
    for shallow in range(1, num_shallow):
        for end in range(shallow, num_deep):
            if not allowed[shallow, end]:
                continue
            # the previous shallow block ends at `before`; this one covers before+1 .. end
            before = torch.arange(shallow - 1, end)
            candidates = best[shallow - 1, before] + scores[shallow, before + 1, end]
            choice = int(candidates.argmax())
            best[shallow, end] = candidates[choice]
            previous[shallow, end] = before[choice]
    last_end = num_deep - 1 if last_to_last else int(best[num_shallow - 1].argmax())
    if best[num_shallow - 1, last_end] == -math.inf:
        raise MergeError("align_depth: no monotone alignment maps every shallow block to an "
                         "allowed deep block (of the same shapes), first block to first")
    mapping = _backtrack(previous, last_end)
    alignment = DepthAlignment(
        mapping, _segments(mapping), float(best[num_shallow - 1, last_end]), num_deep
    )
    logger.debug("align_depth (%s): mapping %s, score %.4f", variant, mapping, alignment.score)
    return alignment


def _check_similarity(similarity: Tensor, variant: str, last_to_last: bool) -> None:
    if variant not in ("segment-wise", "layer-wise"):
        raise MergeError(
            f"align_depth: variant must be 'segment-wise' or 'layer-wise', got {variant!r}"
        )
    if similarity.dim() != 2 or similarity.shape[0] < 1:
        raise MergeError(
            "align_depth: similarity must be [n_shallow, n_deep], "
            f"got shape {tuple(similarity.shape)}"
        )
    num_shallow, num_deep = similarity.shape
    if num_shallow > num_deep:
        raise MergeError(
            f"align_depth: {num_shallow} shallow blocks cannot map into {num_deep} deep blocks; "
            "rows must be the shallower model"
        )
    if last_to_last and num_shallow == 1 and num_deep > 1:
        raise MergeError(
            "align_depth: with one shallow block, last_to_last contradicts mapping the first "
            "block to the first"
        )
    if not torch.isfinite(similarity).all():
        raise MergeError("align_depth: the similarity contains NaN or infinite values")


def _backtrack(previous: Tensor, last_end: int) -> tuple[int, ...]:
    mapping = [last_end]
    for shallow in range(previous.shape[0] - 1, 0, -1):
        mapping.append(int(previous[shallow, mapping[-1]]))
    return tuple(reversed(mapping))


def _segments(mapping: tuple[int, ...]) -> tuple[range, ...]:
    starts = (0,) + tuple(end + 1 for end in mapping[:-1])
    return tuple(range(start, end + 1) for start, end in zip(starts, mapping))
