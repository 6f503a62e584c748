"""Plans of structured spaces (attention heads, GroupNorm groups) from plans of their blocks.

A space of ``count`` blocks of ``width`` units holds block i's units at ``i * width`` to
``(i + 1) * width - 1``. A permutation that keeps the structure moves whole blocks and permutes
units inside each block, so such spaces are merged in two levels: blocks are paired across the
models (:func:`match_blocks`, :func:`zip_paired_blocks`) or zipped within and across them
(:func:`zip_blocks`), and each merged block is a plan of the blocks it merges. :func:`place`
writes such per-block plans into the plan of the whole space; ``match`` also uses it to lay a
leaf's plan at every place where the leaf occurs inside a composite or tiled space.

Every ``joint`` similarity here is the square similarity of ``[x_a; x_b]``, A's units first.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from mergec.algorithms import solvers
from mergec.algorithms.solvers import BlockSolver, MergePlan
from mergec.errors import MergeError

#: How alike one block of A and one block of B are: ``(joint_similarity, d_a, d_b) -> score``,
#: where ``joint_similarity`` is the ``(d_a + d_b)`` square similarity of the two blocks' units.
PairScore = Callable[[Tensor, int, int], float]


class Placement(NamedTuple):
    """Where the plan of a part (a leaf, a block pair, a merged block) sits in a full plan:
    the positions of its merged features and of each model's features."""

    plan: MergePlan
    merged: Tensor
    units_a: Tensor
    units_b: Tensor


#: A placed plan with more entries than this (4096 × 4096) is built as sparse COO matrices.
SPARSE_PLAN_ENTRIES = 1 << 24


def place(placements: Iterable[Placement], width: int, dim_a: int, dim_b: int) -> MergePlan:
    """The plan (``width`` merged features of ``dim_a`` and ``dim_b``; float64, on the CPU)
    holding each placement's plan at its positions and zero elsewhere; sparse COO matrices
    where a dense one would hold more than :data:`SPARSE_PLAN_ENTRIES` entries.

    >>> half = solvers.average(1)
    >>> swap = [Placement(half, torch.tensor([k]), torch.tensor([k]), torch.tensor([1 - k]))
    ...         for k in (0, 1)]
    >>> place(swap, 2, 2, 2).merge_b
    tensor([[0.0000, 0.5000],
            [0.5000, 0.0000]], dtype=torch.float64)
    """
    placements = list(placements)
    if width * max(dim_a, dim_b) > SPARSE_PLAN_ENTRIES:
        return _place_sparse(placements, width, dim_a, dim_b)
    if len(placements) == 1 and _in_order(placements[0], width, dim_a, dim_b):
        # a leaf's own plan (most spaces): the same matrices, not copied into new zeros
        matrices = _matrices(placements[0].plan)
        return MergePlan(*(matrix.to("cpu", torch.float64) for matrix in matrices))
    merge_a = torch.zeros(width, dim_a, dtype=torch.float64)
    merge_b = torch.zeros(width, dim_b, dtype=torch.float64)
    unmerge_a = torch.zeros(dim_a, width, dtype=torch.float64)
    unmerge_b = torch.zeros(dim_b, width, dtype=torch.float64)
    for plan, merged, units_a, units_b in placements:
        merge_a[_block(merged, units_a)] = plan.merge_a.to(torch.float64).cpu()
        merge_b[_block(merged, units_b)] = plan.merge_b.to(torch.float64).cpu()
        unmerge_a[_block(units_a, merged)] = plan.unmerge_a.to(torch.float64).cpu()
        unmerge_b[_block(units_b, merged)] = plan.unmerge_b.to(torch.float64).cpu()
    return MergePlan(merge_a, merge_b, unmerge_a, unmerge_b)


def _in_order(placement: Placement, width: int, dim_a: int, dim_b: int) -> bool:
    """Whether a placement covers the whole plan, every position at its own index."""
    return all(len(positions) == size and bool((positions == torch.arange(size)).all())
               for positions, size in ((placement.merged, width), (placement.units_a, dim_a),
                                       (placement.units_b, dim_b))) \
        and not any(matrix.is_sparse for matrix in _matrices(placement.plan))


def _matrices(plan: MergePlan) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return plan.merge_a, plan.merge_b, plan.unmerge_a, plan.unmerge_b


def _block(rows: Tensor, columns: Tensor) -> tuple[slice | Tensor, slice | Tensor]:
    """The index of the block at ``rows`` × ``columns``: slices where the positions are
    consecutive (a block copy, where a gather indexes every entry), else broadcast tensors."""
    index = [slice(int(p[0]), int(p[-1]) + 1) if len(p) and bool((p.diff() == 1).all())
             else p for p in (rows, columns)]
    if isinstance(index[0], Tensor) and isinstance(index[1], Tensor):
        return index[0][:, None], index[1][None, :]
    return index[0], index[1]


def _place_sparse(placements: list[Placement], width: int, dim_a: int, dim_b: int
                  ) -> MergePlan:
    """:func:`place` as sparse COO matrices, for spaces whose dense plan would not fit (a
    flatten into a classifier, vgg's 25,088 = 512 channels × 49 pixels: 5 GB per matrix)."""
    entries: dict[str, tuple[list, list, list]] = {name: ([], [], []) for name in
                                                   ("merge_a", "merge_b", "unmerge_a",
                                                    "unmerge_b")}
    for plan, merged, units_a, units_b in placements:
        for name, rows, columns in (("merge_a", merged, units_a), ("merge_b", merged, units_b),
                                    ("unmerge_a", units_a, merged),
                                    ("unmerge_b", units_b, merged)):
            matrix = getattr(plan, name).to("cpu", torch.float64)
            row, column = matrix.nonzero(as_tuple=True)
            entries[name][0].append(rows[row])
            entries[name][1].append(columns[column])
            entries[name][2].append(matrix[row, column])
    shapes = {"merge_a": (width, dim_a), "merge_b": (width, dim_b),
              "unmerge_a": (dim_a, width), "unmerge_b": (dim_b, width)}
    matrices = {}
    for name, (rows, columns, values) in entries.items():
        indices = torch.stack([torch.cat(rows), torch.cat(columns)]) if rows else \
            torch.zeros(2, 0, dtype=torch.long)
        values = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
        matrices[name] = torch.sparse_coo_tensor(indices, values, shapes[name],
                                                 check_invariants=True).coalesce()
    return MergePlan(**matrices)


def block_units(block: int, width: int, offset: int = 0) -> Tensor:
    """The positions of block ``block``'s ``width`` units, after ``offset`` others."""
    return offset + torch.arange(block * width, (block + 1) * width)


def best_matching(similarity: Tensor) -> tuple[Tensor, float]:
    """The Hungarian matching of rows to columns (:func:`solvers.hungarian`): the column of
    each row and the mean similarity of the matched pairs (-inf where a pair never merges)."""
    rows, columns = solvers.hungarian(similarity)
    return columns, float(similarity[rows, columns].mean())


def matching_score(joint: Tensor, d_a: int, d_b: int) -> float:
    """A :data:`PairScore`: the mean similarity of the best unit matching across the blocks."""
    return best_matching(joint[:d_a, d_a:])[1]


def plan_score(solve: BlockSolver) -> PlanScore:
    """A :data:`PairScore`: the similarity of the units that ``solve``'s plan of the pair puts
    together across the models, summed and divided by A's block width."""
    return PlanScore(solve)


@dataclass(frozen=True)
class PlanScore:
    """:func:`plan_score`'s score; :meth:`batch` scores many pairs with one batched solve
    where the solver has one (:class:`~mergec.algorithms.solvers.ZipSolver`)."""

    solve: BlockSolver

    def __call__(self, joint: Tensor, d_a: int, d_b: int) -> float:
        return self._score(joint, self.solve(joint, d_a, d_b), d_a)

    def batch(self, joints: Tensor, d_a: int, d_b: int) -> list[float]:
        """The scores of ``joints[p]``, each as :meth:`__call__` gives it."""
        plans = solve_pairs(self.solve, joints, d_a, d_b)
        return [self._score(joint, plan, d_a) for joint, plan in zip(joints, plans)]

    @staticmethod
    def _score(joint: Tensor, plan: MergePlan, d_a: int) -> float:
        return float((joint[:d_a, d_a:] * solvers.together(plan)).sum() / d_a)


#: Block pairs solved or scored at once hold at most this many similarity entries (64 MB).
BATCH_ENTRIES = 1 << 23


def _chunks(joints: Iterable[Tensor]) -> Iterator[Tensor]:
    """The block pairs' joint similarities stacked, ``[P, n, n]`` at most
    :data:`BATCH_ENTRIES` entries at a time (a generator is read as the chunks are needed)."""
    chunk: list[Tensor] = []
    for joint in joints:
        chunk.append(joint)
        if len(chunk) * joint.numel() >= BATCH_ENTRIES:
            yield torch.stack(chunk)
            chunk = []
    if chunk:
        yield torch.stack(chunk)


def solve_pairs(solve: BlockSolver, joints: Iterable[Tensor], d_a: int, d_b: int
                ) -> list[MergePlan]:
    """``solve``'s plan of every block pair's joint similarity in ``joints``, batched where
    the solver can be (a ``batch`` method), else one call per pair."""
    batch = getattr(solve, "batch", None)
    if batch is None:
        return [solve(joint, d_a, d_b) for joint in joints]
    return [plan for chunk in _chunks(joints) for plan in batch(chunk, d_a, d_b)]


def score_pairs(score: PairScore, joints: Iterable[Tensor], d_a: int, d_b: int
                ) -> list[float]:
    """``score`` of every block pair's joint similarity in ``joints``, batched where the
    score can be."""
    batch = getattr(score, "batch", None)
    if batch is None:
        return [score(joint, d_a, d_b) for joint in joints]
    return [value for chunk in _chunks(joints) for value in batch(chunk, d_a, d_b)]


def rotation_score(joint: Tensor, d_a: int, d_b: int) -> float:
    """A :data:`PairScore` for blocks aligned by a rotation (``joint`` a second moment): the
    share of the two blocks' energy the best rotation aligns, ``tr(Qᵀ C_ab) / sqrt(tr C_aa ·
    tr C_bb)`` (the nuclear norm of the cross block over the traces), in [-1, 1], so that
    spaces of different scales add comparably."""
    cross = joint[:d_a, d_a:].to(torch.float64)
    energy = (joint[:d_a, :d_a].diagonal().sum() * joint[d_a:, d_a:].diagonal().sum()).sqrt()
    aligned = torch.linalg.svdvals(cross).sum()
    return float(aligned / energy) if energy > 0 else 0.0


@dataclass(frozen=True)
class BlockSpace:
    """One space of a group whose blocks move together (q·k and v of one attention, the input
    and output of a grouped convolution): its joint similarity over all ``count`` blocks of
    both models, its block widths, the solver of one block pair and the score of one."""

    joint: Tensor
    width_a: int
    width_b: int
    solve: BlockSolver
    score: PairScore

    def pair(self, block_a: int, block_b: int, count: int) -> Tensor:
        """The joint similarity of A's block ``block_a`` and B's block ``block_b``."""
        units = torch.cat([block_units(block_a, self.width_a),
                           block_units(block_b, self.width_b, count * self.width_a)])
        return self.joint[units][:, units]


def block_scores(spaces: Sequence[BlockSpace], count: int) -> Tensor:
    """``scores[i, j]``: how alike A's block i and B's block j are, summed over the spaces."""
    scores = torch.zeros(count, count, dtype=torch.float64)
    pairs = list(itertools.product(range(count), repeat=2))
    for space in spaces:
        joints = (space.pair(block_a, block_b, count) for block_a, block_b in pairs)
        values = score_pairs(space.score, joints, space.width_a, space.width_b)
        for (block_a, block_b), value in zip(pairs, values):
            scores[block_a, block_b] += value
    return scores


def match_blocks(spaces: Sequence[BlockSpace], count: int, pair: bool = True
                 ) -> tuple[Tensor, list[MergePlan]]:
    """Two-level matching of spaces sharing one order of ``count`` blocks.

    Every pair (A's block i, B's block j) is scored, scores added over the spaces; the
    Hungarian pairs the blocks (``pair=False`` keeps block i with block i); each space's plan
    is then its solver's plan of every paired block, merged block k coming from A's block k, so
    merged features keep the block structure. Returns B's block for each of A's and the plans.

    >>> x = torch.randn(200, 4)
    >>> joint = torch.corrcoef(torch.cat([x, x[:, [2, 3, 0, 1]]], dim=1).T)  # B swaps 2 heads
    >>> space = BlockSpace(joint, 2, 2, solvers.permute_joint, matching_score)
    >>> pairing, (plan,) = match_blocks([space], 2)
    >>> pairing, plan.merge_b
    (tensor([1, 0]), tensor([[0.0000, 0.0000, 0.5000, 0.0000],
            [0.0000, 0.0000, 0.0000, 0.5000],
            [0.5000, 0.0000, 0.0000, 0.0000],
            [0.0000, 0.5000, 0.0000, 0.0000]], dtype=torch.float64))
    """
    for space in spaces:
        size = count * (space.width_a + space.width_b)
        if count < 1 or tuple(space.joint.shape) != (size, size):
            raise MergeError(f"match_blocks: {count} blocks of widths {space.width_a} and "
                             f"{space.width_b} need a ({size}, {size}) joint similarity, got "
                             f"{tuple(space.joint.shape)}")
    pairing = solvers.hungarian(block_scores(spaces, count))[1] if pair else torch.arange(count)
    return pairing, [paired_plan(space, pairing) for space in spaces]


def paired_plan(space: BlockSpace, pairing: Tensor) -> MergePlan:
    """The plan of one space: the solver's plan of every block pair (A's block k with B's
    block ``pairing[k]``), side by side."""
    count, placements, start = len(pairing), [], 0
    joints = (space.pair(block_a, int(pairing[block_a]), count) for block_a in range(count))
    plans = solve_pairs(space.solve, joints, space.width_a, space.width_b)
    for block_a, plan in enumerate(plans):
        block_b = int(pairing[block_a])
        placements.append(Placement(plan, start + torch.arange(plan.width),
                                    block_units(block_a, space.width_a),
                                    block_units(block_b, space.width_b)))
        start += plan.width
    return place(placements, start, count * space.width_a, count * space.width_b)


def zip_paired_blocks(joints: Sequence[Tensor], count: int,
                      widths: Sequence[tuple[int, int, int]],
                      scales: Sequence[tuple[float, float]], alpha: float = 0.0
                      ) -> tuple[Tensor, list[MergePlan]]:
    """Blocks of one count and different widths: elastic zip inside paired blocks.

    ``widths[s]`` is space s's block width in A, in B and merged. Blocks are paired across the
    models by the Hungarian on their best unit matching (summed over the spaces), then every
    pair is zipped to the merged width; each model's merge is multiplied by its ``scales[s]``
    (``match`` keeps attention logits at their scale when the head size changes).
    """
    spaces = [BlockSpace(joint, width_a, width_b, _scaled_zip(width, scale, alpha),
                         matching_score)
              for joint, (width_a, width_b, width), scale in zip(joints, widths, scales)]
    return match_blocks(spaces, count)


def _scaled_zip(width: int, scale: tuple[float, float], alpha: float) -> BlockSolver:
    """Elastic zip of a block pair to ``width`` features, each model's merge scaled."""

    def solve(joint: Tensor, d_a: int, d_b: int) -> MergePlan:
        """The scaled elastic zip of one block pair."""
        plan = solvers.elastic_zip(joint, d_a, d_b, target=width, alpha=alpha)
        return MergePlan(plan.merge_a.to(torch.float64) * scale[0],
                         plan.merge_b.to(torch.float64) * scale[1],
                         plan.unmerge_a, plan.unmerge_b)

    return solve


def merged_blocks(block_plan: MergePlan) -> list[list[int]]:
    """The blocks each merged block of a plan over blocks absorbs (A's blocks 0 .. n_a-1, then
    B's), in increasing order."""
    unmerge = torch.cat([block_plan.unmerge_a, block_plan.unmerge_b])
    return [(unmerge[:, k] > 0).nonzero().flatten().tolist() for k in range(block_plan.width)]


def zip_blocks(joints: Sequence[Tensor], counts: tuple[int, int], widths: Sequence[int],
               pinned: Sequence[bool], target: int, alpha: float = 0.0
               ) -> tuple[MergePlan, list[MergePlan]]:
    """Elastic zip over blocks of one width whose count differs (``counts``: A's and B's).

    Every two blocks, within or across the models, are scored by their best unit matching
    (identity where the space's order inside blocks is ``pinned``), averaged over the spaces;
    elastic zip on those scores merges the blocks down to ``target``. Inside a merged block
    every contributor is permuted to the order of its anchor, the contributor most alike the
    others (summed scores; the first on a tie), which does not depend on which model is A:
    pairwise matchings of three blocks or more need not compose, so aligning to A's first
    block would make merge(A, B) and merge(B, A) compute different functions. Returns the plan
    over blocks (of the shared block order) and each space's plan.
    """
    scores, orders = _block_alignments(joints, sum(counts), widths, pinned)
    block_plan = solvers.elastic_zip(scores, counts[0], counts[1], target=target, alpha=alpha)
    anchors = [max(contributors, key=lambda x: float(scores[x, contributors].sum()))
               for contributors in merged_blocks(block_plan)]
    return block_plan, [_zipped_plan(block_plan, width, space_orders, anchors)
                        for width, space_orders in zip(widths, orders)]


def _block_alignments(joints: Sequence[Tensor], total: int, widths: Sequence[int],
                      pinned: Sequence[bool]
                      ) -> tuple[Tensor, list[dict[tuple[int, int], Tensor]]]:
    """The score of every two of the ``total`` blocks (1 with itself) and, per space and pair
    ``x < y`` of blocks, block y's unit matched to each unit of block x."""
    orders: list[dict[tuple[int, int], Tensor]] = [{} for _ in joints]
    scores = torch.eye(total, dtype=torch.float64)
    for x in range(total):
        for y in range(x + 1, total):
            score = 0.0
            for index, (joint, width) in enumerate(zip(joints, widths)):
                cross = joint[block_units(x, width)][:, block_units(y, width)]
                if pinned[index]:
                    order, matched = torch.arange(len(cross)), float(cross.diagonal().mean())
                else:
                    order, matched = best_matching(cross)
                orders[index][x, y] = order
                score += matched
            scores[x, y] = scores[y, x] = score / len(joints)
    return scores, orders


def _zipped_plan(block_plan: MergePlan, width: int, orders: Mapping[tuple[int, int], Tensor],
                 anchors: Sequence[int]) -> MergePlan:
    """One space's plan from the plan over its blocks: every block that merged block k absorbs
    enters it with the block plan's weights, its units aligned to block ``anchors[k]``:
    ``orders[x, y]`` (``x < y``) is block y's unit matched to each unit of block x."""
    counts = (block_plan.dim_a, block_plan.dim_b)
    merges = (block_plan.merge_a.to(torch.float64), block_plan.merge_b.to(torch.float64))
    unmerges = (block_plan.unmerge_a.to(torch.float64), block_plan.unmerge_b.to(torch.float64))
    placements = []
    for k, contributors in enumerate(merged_blocks(block_plan)):
        anchor = anchors[k]
        for x in contributors:
            model = 0 if x < counts[0] else 1
            block = x - model * counts[0]
            inside = torch.arange(width) if x == anchor else orders[anchor, x] \
                if anchor < x else torch.argsort(orders[x, anchor])
            permutation = torch.eye(width, dtype=torch.float64)[inside]  # row i: unit inside[i]
            placements.append(_one_sided(model, merges[model][k, block] * permutation,
                                         unmerges[model][block, k] * permutation.T,
                                         block_units(k, width), block_units(block, width)))
    return place(placements, block_plan.width * width, counts[0] * width, counts[1] * width)


def _one_sided(model: int, merge: Tensor, unmerge: Tensor, merged: Tensor, units: Tensor
               ) -> Placement:
    """A placement of one model's features only (the other model's side is empty)."""
    no_merge = merge.new_zeros(len(merged), 0)
    no_unmerge = unmerge.new_zeros(0, len(merged))
    nothing = torch.zeros(0, dtype=torch.long)
    if model == 0:
        return Placement(MergePlan(merge, no_merge, unmerge, no_unmerge), merged, units, nothing)
    return Placement(MergePlan(no_merge, merge, no_unmerge, unmerge), merged, nothing, units)
