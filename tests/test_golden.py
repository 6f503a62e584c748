"""Golden tests: what annotate-units prints, what zip emits and what align-depth decides, on
small models built here, compared with the checked-in expectations under ``tests/golden/``.

After an intended change, ``pytest tests/test_golden.py --update-golden`` rewrites them; review
the diff before committing it.
"""
from __future__ import annotations

from typing import Callable, Iterator

import pytest
import torch
from torch import nn

import archgen  # tests/ is on sys.path under pytest's default (prepend) import mode
import mergec
from golden import Golden, as_json
from mergec.report import space_table
from mergec_lab import zoo


@pytest.fixture(autouse=True)
def deterministic() -> Iterator[None]:
    """One thread (a fixed reduction order) and a fixed seed for every golden test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _images(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# annotate-units: the space table of `mergec inspect`
# ---------------------------------------------------------------------------------------------
SPACE_TABLE_MODELS: dict[str, Callable[[], nn.Module]] = {
    # residual streams shared across blocks, BatchNorm, 1x1 conv shortcuts, a fixed output
    "space_table_resnet8": lambda: zoo.resnet20(width=0.25, depth=8),
    # attention: q and k share heads as blocks, v has its own, a head-order space
    "space_table_vit_heads": lambda: zoo.small_vit(depth=1, dim=8, heads=2, mlp_dim=16,
                                                  image_size=8, patch=4),
    # GroupNorm's channels as 2 blocks; a DenseNet concat as a composite space
    "space_table_groupnorm_dense": lambda: archgen.Net(
        archgen.ConvBN(1, 4, 3, batch_norm=True, activation="relu"),
        [archgen.GroupNormBlock(4, 6, groups=2, activation="relu"), archgen.DenseLayer(6, 3)],
        archgen.PoolHead(9, 3, adaptive=True)),
    # channels split into two branches and concatenated back; a grouped conv ties block orders
    "space_table_split_grouped": lambda: archgen.Net(
        archgen.ConvBN(1, 4, 3, batch_norm=True, activation="relu"),
        [archgen.SplitBranches(4, 6, first=2, outs=(3, 2), how="split"),
         archgen.Grouped(5, 4, 6, groups=2)],
        archgen.PoolHead(6, 3, adaptive=False)),
}


@pytest.mark.parametrize("name", sorted(SPACE_TABLE_MODELS))
def test_space_table(golden: Golden, name: str) -> None:
    model = SPACE_TABLE_MODELS[name]().eval()
    golden.check(f"{name}.txt", space_table(mergec.discover(model, _images(2, seed=1))))


# ---------------------------------------------------------------------------------------------
# zip: the emitted code of a merge and of a partial merge
# ---------------------------------------------------------------------------------------------
def _zip_digits_cnn(stop_at: str | None) -> str:
    """The code and state-dict shapes of zipping two seeds of a width-4 digits CNN."""
    torch.manual_seed(0)
    model_a = zoo.digits_cnn(width=4).eval()
    torch.manual_seed(1)
    model_b = zoo.digits_cnn(width=4).eval()
    x = _images(12, seed=2)
    result = mergec.merge(model_a, model_b, x[:4], [(batch,) for batch in x.split(4)],
                          method="zip", repair=None, stop_at=stop_at, progress=False)
    shapes = [f"# {key} {tuple(value.shape)}" for key, value in result.module.state_dict().items()]
    return "\n".join([result.module.code, "# state dict", *shapes])


@pytest.mark.parametrize("name, stop_at", [("zip_digits_cnn", None),
                                           ("zip_digits_cnn_stop_at_4", "4")])
def test_zip_code(golden: Golden, name: str, stop_at: str | None) -> None:
    first, second = _zip_digits_cnn(stop_at), _zip_digits_cnn(stop_at)
    assert first == second, "zip emitted different code for the same inputs in one process"
    golden.check(f"{name}.txt", first)


# ---------------------------------------------------------------------------------------------
# align-depth: the plan of merging residual networks of different depth
# ---------------------------------------------------------------------------------------------
def test_depth_plan(golden: Golden) -> None:
    shallow = archgen.randomize_(zoo.resnet20(width=0.25, depth=14), seed=0).eval()
    deep = archgen.randomize_(zoo.resnet20(width=0.25, depth=20), seed=1)
    deep = archgen.with_identity_blocks(shallow, deep, {0: 0, 2: 1})
    x = _images(24, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(deep(x), shallow(x))
    result = mergec.merge(shallow, deep, x[:4], [(batch,) for batch in x.split(8)],
                          method="zip", repair=None, progress=False)
    golden.check("depth_plan_resnet14_resnet20.json", as_json(result.report.depth.to_dict()))
