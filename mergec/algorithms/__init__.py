"""Graph-free algorithms of mergec, as pure functions of tensors.

Streaming statistics (:mod:`.covariance`, :mod:`.cka`), solvers that turn similarities into
merge/unmerge matrices (:mod:`.solvers`), Git Re-Basin weight matching (:mod:`.weight_matching`)
and depth alignment by dynamic programming (:mod:`.alignment`). Nothing here imports torch.fx,
so each algorithm can be tested and benchmarked alone.

``zip`` (ZipIt!) is importable from here but left out of ``__all__`` so that a star import does
not shadow the builtin. ``mergec.algorithms.weight_matching`` is the function (the module of
the same name is ``importlib.import_module("mergec.algorithms.weight_matching")``).
"""

from mergec.algorithms.alignment import DepthAlignment, align_depth
from mergec.algorithms.cka import LinearCKA, linear_cka
from mergec.algorithms.covariance import JointMoments, feature_rows
from mergec.algorithms.solvers import (
    BlockSolver,
    MergePlan,
    average,
    elastic_zip,
    match_blocks,
    permute,
    permute_joint,
    zip,
)
from mergec.algorithms.weight_matching import weight_matching, weight_similarity

__all__ = [
    "BlockSolver",
    "DepthAlignment",
    "JointMoments",
    "LinearCKA",
    "MergePlan",
    "align_depth",
    "average",
    "elastic_zip",
    "feature_rows",
    "linear_cka",
    "match_blocks",
    "permute",
    "permute_joint",
    "weight_matching",
    "weight_similarity",
]
