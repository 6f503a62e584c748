"""Graph-free algorithms of mergec, as pure functions of tensors.

Streaming statistics (:mod:`.covariance`, :mod:`.cka`), solvers that turn similarities into
merge/unmerge matrices and the one Hungarian (:mod:`.solvers`), plans of structured spaces from
plans of their blocks (:mod:`.blocks`: placement, two-level block matching, elastic zip over
blocks), Git Re-Basin's weight similarity (:mod:`.weight_matching`) and depth alignment by
dynamic programming (:mod:`.alignment`). Nothing here imports torch.fx, so each algorithm can be
tested and benchmarked alone.

``zip`` (ZipIt!) is importable from here but left out of ``__all__`` so that a star import does
not shadow the builtin.
"""

from mergec.algorithms.alignment import DepthAlignment, align_depth
from mergec.algorithms.blocks import (
    BlockSpace,
    Placement,
    match_blocks,
    place,
    zip_blocks,
    zip_paired_blocks,
)
from mergec.algorithms.cka import LinearCKA, linear_cka
from mergec.algorithms.covariance import JointMoments, feature_rows, feature_view
from mergec.algorithms.solvers import (
    BlockSolver,
    MergePlan,
    average,
    elastic_zip,
    hungarian,
    pairing_plan,
    permute,
    permute_joint,
)
from mergec.algorithms.solvers import zip as zip  # re-exported, not starred: shadows the builtin
from mergec.algorithms.weight_matching import weight_similarity

__all__ = [
    "BlockSolver",
    "BlockSpace",
    "DepthAlignment",
    "JointMoments",
    "LinearCKA",
    "MergePlan",
    "Placement",
    "align_depth",
    "average",
    "elastic_zip",
    "feature_rows",
    "feature_view",
    "hungarian",
    "linear_cka",
    "match_blocks",
    "pairing_plan",
    "permute",
    "permute_joint",
    "place",
    "weight_similarity",
    "zip_blocks",
    "zip_paired_blocks",
]
