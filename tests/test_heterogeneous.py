"""Merging models of different width (elastic zip), and models that do not correspond."""
import pytest
import torch
from torch import nn

import mergec
from mergec import zoo


class MLP(nn.Module):
    def __init__(self, hidden: int = 8, batch_norm: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(5, hidden)
        self.norm = nn.BatchNorm1d(hidden) if batch_norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 3)

    def forward(self, x):
        h = torch.relu(self.norm(self.fc1(x)))
        return self.fc3(torch.relu(self.fc2(h)))


def _calibration(x):
    return [(batch,) for batch in x.split(32)]


def _randomize_batch_norm(model):
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize("make", [lambda w: MLP(w), lambda w: MLP(w, batch_norm=True),
                                  lambda w: zoo.digits_cnn(width=w)])
def test_width_sum_reproduces_the_logit_ensemble(make):
    """Invariant 5: at r = d_a + d_b nothing is merged and the model is the logit average."""
    torch.manual_seed(0)
    model_a, model_b = _randomize_batch_norm(make(8)), _randomize_batch_norm(make(12))
    x = torch.randn(96, 5) if isinstance(model_a, MLP) else torch.randn(96, 1, 8, 8)
    result = mergec.merge(model_a, model_b, x[:4], _calibration(x), width="sum", repair=None,
                          progress=False)
    first = next(v for k, v in result.module.state_dict().items() if v.dim() >= 2)
    assert first.shape[0] == 20  # layers of width r = 8 + 12
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), (model_a(x) + model_b(x)) / 2,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("width, expected", [("max", 12), ("min", 8), ("a", 8), ("b", 12),
                                             (10, 10), (0.25, 5)])
def test_elastic_width_gives_layers_of_that_width(width, expected):
    torch.manual_seed(0)
    model_a, model_b = MLP(8).eval(), MLP(12).eval()
    x = torch.randn(64, 5)
    result = mergec.merge(model_a, model_b, x[:4], _calibration(x), width=width, repair=None,
                          progress=False)
    state = result.module.state_dict()
    assert state["fc1.weight"].shape == (expected, 5)
    assert state["fc2.weight"].shape == (expected, expected)
    assert state["fc3.weight"].shape == (3, expected)
    assert result.module(x).shape == (64, 3)
    result.module.graph.lint()


class OneHidden(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(5, hidden)
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _widen(model: OneHidden, extra: int, seed: int) -> OneHidden:
    """Net2Net: duplicates ``extra`` hidden units and splits their outgoing weights between
    the copies, then permutes the hidden units: same function, wider."""
    generator = torch.Generator().manual_seed(seed)
    hidden = model.fc1.out_features
    source = torch.cat([torch.arange(hidden),
                        torch.randperm(hidden, generator=generator)[:extra]])
    counts = torch.bincount(source, minlength=hidden).float()
    source = source[torch.randperm(hidden + extra, generator=generator)]
    wide = OneHidden(hidden + extra).eval()
    with torch.no_grad():
        wide.fc1.weight.copy_(model.fc1.weight[source])
        wide.fc1.bias.copy_(model.fc1.bias[source])
        wide.fc2.weight.copy_(model.fc2.weight[:, source] / counts[source])
        wide.fc2.bias.copy_(model.fc2.bias)
    return wide


def test_net2net_widened_twin_merges_back_to_the_model():
    torch.manual_seed(0)
    model_a = OneHidden(8).eval()
    model_b = _widen(model_a, extra=4, seed=1)
    x = torch.randn(512, 5)
    with torch.no_grad():
        torch.testing.assert_close(model_b(x), model_a(x), rtol=1e-4, atol=1e-5)
    # α = 1: a merged unit keeps its correlation, so each unit's copies join it
    result = mergec.merge(model_a, model_b, x[:4], _calibration(x), width="a", alpha=1.0,
                          repair=None, progress=False)
    assert result.module.state_dict()["fc1.weight"].shape == (8, 5)
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model_a(x), rtol=1e-4, atol=1e-4)


def test_different_widths_need_zip():
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    with pytest.raises(mergec.MergecError, match="only method 'zip'"):
        mergec.merge(MLP(8).eval(), MLP(12).eval(), x[:4], _calibration(x), method="permute",
                     progress=False)


def test_unrelated_architectures_are_refused():
    torch.manual_seed(0)
    x = torch.randn(32, 1, 8, 8)
    with pytest.raises(mergec.MergecError, match="do not correspond"):
        mergec.merge(zoo.digits_cnn(width=8).eval(), zoo.digits_mlp().eval(), x[:4],
                     _calibration(x), progress=False)


def test_bad_width_option():
    x = torch.randn(32, 5)
    with pytest.raises(mergec.MergecError, match="width must be"):
        mergec.merge(MLP(8).eval(), MLP(8).eval(), x[:4], _calibration(x), width="wide",
                     progress=False)


def test_new_widths_are_reported_and_saved(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    result = mergec.merge(MLP(8).eval(), MLP(12).eval(), x[:4], _calibration(x),
                          progress=False)
    assert sorted(result.report.options["widths"].values()).count(12) == 2
    loaded = mergec.load(result.save(tmp_path / "merged"))
    torch.testing.assert_close(loaded(x), result.module(x))


def test_partial_zip_between_widths():
    """Stopping at the input gives both parents back; separate heads run each parent's own head
    on the merged trunk's unmerged features."""
    torch.manual_seed(0)
    model_a, model_b = MLP(8).eval(), MLP(12).eval()
    x = torch.randn(64, 5)
    result = mergec.merge(model_a, model_b, x[:4], _calibration(x), stop_at="x", repair=None,
                          progress=False)
    out_a, out_b = result.module(x)
    torch.testing.assert_close(out_a, model_a(x))
    torch.testing.assert_close(out_b, model_b(x))
    result = mergec.merge(model_a, model_b, x[:4], _calibration(x), heads="separate",
                          width="sum", repair=None, progress=False)
    out_a, out_b = result.module(x)  # nothing merged at width d_a + d_b: the parents exactly
    torch.testing.assert_close(out_a, model_a(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_b, model_b(x), rtol=1e-4, atol=1e-5)
    assert result.module.state_dict()["fc2.weight"].shape == (20, 20)
