"""Partial zipping: the trunk before stop_at is merged, both tails run after it."""
import pytest
import torch
from torch import nn

import mergec
from mergec_lab import zoo


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return zoo.digits_cnn(width=8).eval(), zoo.digits_cnn(width=8).eval()


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(1)
    x = torch.randn(64, 1, 8, 8)
    return x, [(batch,) for batch in x.split(16)]


def test_stop_at_the_input_returns_both_parents(models, data):
    model_a, model_b = models
    x, calibration = data
    result = mergec.merge(model_a, model_b, x[:4], calibration, stop_at="input_1",
                          repair=None, progress=False)
    out_a, out_b = result.module(x)
    torch.testing.assert_close(out_a, model_a(x))
    torch.testing.assert_close(out_b, model_b(x))


def test_separate_heads_on_a_merged_trunk(models, data):
    model_a, model_b = models
    x, calibration = data
    result = mergec.merge(model_a, model_b, x[:4], calibration, heads="separate",
                          method="permute", repair=None, progress=False)
    out_a, out_b = result.module(x)
    assert out_a.shape == out_b.shape == (64, 10)
    # the heads are the parents' own output layers
    heads = {name: value for name, value in result.module.state_dict().items() if "tail" in name}
    key = next(k for k in model_a.state_dict() if k.endswith("weight") and
               model_a.state_dict()[k].dim() == 2)
    torch.testing.assert_close(heads[f"tail_a.{key}"], model_a.state_dict()[key])
    torch.testing.assert_close(heads[f"tail_b.{key}"], model_b.state_dict()[key])
    # merging a model with itself and keeping both heads computes the model twice
    same = mergec.merge(model_a, model_a, x[:4], calibration, heads="separate",
                        method="zip", repair=None, progress=False)
    first, second = same.module(x)
    torch.testing.assert_close(first, model_a(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(second, model_a(x), rtol=1e-4, atol=1e-5)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.left = nn.Linear(8, 8)
        self.right = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.head(torch.relu(self.left(h)) + self.right(h))


def test_stop_at_a_branch_is_refused():
    torch.manual_seed(0)
    model_a, model_b = Branchy().eval(), Branchy().eval()
    x = torch.randn(32, 6)
    with pytest.raises(mergec.MergecError, match="not every path"):
        mergec.merge(model_a, model_b, x[:4], [(x,)], stop_at="left", progress=False)


def test_partial_result_saves_and_loads(models, data, tmp_path):
    model_a, model_b = models
    x, calibration = data
    result = mergec.merge(model_a, model_b, x[:4], calibration, stop_at="relu_1",
                          progress=False)
    result.module.graph.lint()
    loaded = mergec.load(result.save(tmp_path / "merged"))
    for got, expected in zip(loaded(x), result.module(x)):
        torch.testing.assert_close(got, expected)
