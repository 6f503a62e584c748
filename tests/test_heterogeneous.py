"""Merging models of different width (elastic zip), and models that do not correspond."""
import pytest
import torch
from torch import nn

import mergec
from mergec_lab import zoo


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


# ---------------------------------------------------------------------------------------------
# Different numbers of heads
# ---------------------------------------------------------------------------------------------
class Attender(nn.Module):
    """Tokens -> embedding -> multi-head self-attention with a residual (no normalisation) ->
    ReLU MLP -> mean over tokens -> 3 logits; ``head_size`` features per head, a stream of
    ``width`` features (default heads x head_size)."""

    def __init__(self, heads: int, head_size: int = 4, attend: str = "sdpa",
                 width: int | None = None):
        super().__init__()
        inner = heads * head_size
        width = width or inner
        self.heads, self.attend = heads, attend
        self.embed = nn.Linear(5, width)
        self.q, self.k, self.v = (nn.Linear(width, inner) for _ in range(3))
        self.out = nn.Linear(inner, width)
        self.mlp = nn.Linear(width, 2 * width)
        self.head = nn.Linear(2 * width, 3)

    def _split(self, x):
        batch, tokens, width = x.shape
        return x.view(batch, tokens, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, x):
        h = self.embed(x)
        q, k, v = (self._split(layer(h)) for layer in (self.q, self.k, self.v))
        if self.attend == "sdpa":
            y = nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            y = ((q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5).softmax(dim=-1) @ v
        h = h + self.out(y.transpose(1, 2).flatten(2))
        return self.head(torch.relu(self.mlp(h)).mean(dim=1))


@pytest.mark.parametrize("attend", ["sdpa", "explicit"])
def test_width_sum_over_heads_reproduces_the_logit_ensemble(attend):
    torch.manual_seed(0)
    model_a, model_b = Attender(2, attend=attend).eval(), Attender(3, attend=attend).eval()
    x = torch.randn(96, 6, 5)
    result = mergec.merge(model_a, model_b, x[:4], _calibration(x), width="sum", repair=None,
                          progress=False)
    assert result.module.state_dict()["q.weight"].shape == (20, 20)  # 5 heads of 4
    heads = next(s for s in result.report.matches.values() if "merged blocks" in s)
    assert sorted(map(len, heads["merged blocks"])) == [1] * 5  # nothing merged
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), (model_a(x) + model_b(x)) / 2,
                                   rtol=1e-4, atol=1e-5)


class UnflattenAttender(Attender):
    """Heads split off by ``unflatten`` with literal sizes (not ``view``)."""

    def _split(self, x):
        return x.unflatten(-1, (self.heads, x.shape[-1] // self.heads)).transpose(1, 2)


@pytest.mark.parametrize("width", ["sum", "max", 4])
def test_heads_split_by_unflatten_change_count(width):
    """zip rewrites unflatten's literal sizes at the merged head count (the merged model did
    not run: 'Provided sizes [2, 4] don't multiply up to the size of dim 2')."""
    torch.manual_seed(0)
    model_a, model_b = UnflattenAttender(2).eval(), UnflattenAttender(3).eval()
    x = torch.randn(96, 6, 5)
    result = mergec.merge(model_a, model_b, x[:4], _calibration(x), width=width, repair=None,
                          progress=False)
    heads = {"sum": 5, "max": 3}.get(width, width)
    assert result.module.state_dict()["q.weight"].shape[0] == 4 * heads
    if width == "sum":
        with torch.no_grad():
            torch.testing.assert_close(result.module(x), (model_a(x) + model_b(x)) / 2,
                                       rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("width, heads", [("max", 3), ("min", 2), ("a", 2), ("b", 3), (4, 4)])
def test_elastic_heads_give_that_many_heads(width, heads):
    torch.manual_seed(0)
    model_a, model_b = Attender(2).eval(), Attender(3).eval()
    x = torch.randn(64, 6, 5)
    result = mergec.merge(model_a, model_b, x[:4], _calibration(x), width=width,
                          progress=False)
    state = result.module.state_dict()
    assert state["q.weight"].shape[0] == state["v.weight"].shape[0] == 4 * heads
    assert result.module(x).shape == (64, 3)


def _with_split_heads(model: Attender, seed: int) -> Attender:
    """A twin with every head duplicated (the out projection's columns split between the two
    copies, so it computes the same function), heads and units inside heads permuted."""
    generator = torch.Generator().manual_seed(seed)
    size = model.q.out_features // model.heads
    twin = Attender(2 * model.heads, size, width=model.embed.out_features).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    heads = torch.cat([torch.arange(model.heads)] * 2)[torch.randperm(2 * model.heads,
                                                                       generator=generator)]
    inside_qk = [torch.randperm(size, generator=generator) for _ in heads]
    inside_v = [torch.randperm(size, generator=generator) for _ in heads]
    rows_qk = torch.cat([h * size + p for h, p in zip(heads, inside_qk)])
    rows_v = torch.cat([h * size + p for h, p in zip(heads, inside_v)])
    new = {}
    for name in ("q", "k"):
        new[f"{name}.weight"], new[f"{name}.bias"] = (state[f"{name}.weight"][rows_qk],
                                                      state[f"{name}.bias"][rows_qk])
    new["v.weight"], new["v.bias"] = state["v.weight"][rows_v], state["v.bias"][rows_v]
    new["out.weight"], new["out.bias"] = state["out.weight"][:, rows_v] / 2, state["out.bias"]
    twin.load_state_dict({**state, **new})
    return twin


def test_a_twin_with_duplicated_heads_merges_back_to_the_model():
    torch.manual_seed(0)
    model = Attender(2).eval()
    twin = _with_split_heads(model, seed=1)
    x = torch.randn(128, 6, 5)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=1e-4, atol=1e-5)
    result = mergec.merge(model, twin, x[:4], _calibration(x), width="a", alpha=1.0,
                          repair=None, progress=False)
    assert result.module.state_dict()["q.weight"].shape == (8, 8)  # A's 2 heads of 4
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), rtol=1e-4, atol=1e-4)


def _with_larger_heads(model: Attender, extra: int, seed: int) -> Attender:
    """A twin computing the same function with ``extra`` more features per head: query and
    key get zero features and are scaled by (new size / size) ** 1/4, so that the attention
    logits under sdpa's 1/sqrt(head size) stay the same; value gets duplicated features whose
    out-projection columns are split between the copies (Net2Net). Heads and their insides
    are then permuted."""
    generator = torch.Generator().manual_seed(seed)
    heads, size = model.heads, model.q.out_features // model.heads
    new_size = size + extra
    twin = Attender(heads, new_size, width=model.embed.out_features).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    scale = (new_size / size) ** 0.25
    order = torch.randperm(heads, generator=generator)
    new = {}
    for name in ("q", "k"):
        weight = torch.zeros(heads, new_size, state[f"{name}.weight"].shape[1])
        bias = torch.zeros(heads, new_size)
        weight[:, :size] = state[f"{name}.weight"].view(heads, size, -1) * scale
        bias[:, :size] = state[f"{name}.bias"].view(heads, size) * scale
        new[f"{name}.weight"], new[f"{name}.bias"] = weight, bias
    copies = torch.randint(size, (extra,), generator=generator)
    inside = torch.cat([torch.arange(size), copies])
    v_weight = state["v.weight"].view(heads, size, -1)[:, inside]
    v_bias = state["v.bias"].view(heads, size)[:, inside]
    out = state["out.weight"].view(-1, heads, size).clone()
    counts = torch.bincount(inside, minlength=size).to(out.dtype)
    out = (out / counts)[:, :, inside]
    qk_inside = torch.randperm(new_size, generator=generator)
    v_inside = torch.randperm(new_size, generator=generator)
    for name in ("q", "k"):
        new[f"{name}.weight"] = new[f"{name}.weight"][order][:, qk_inside].reshape(
            heads * new_size, -1)
        new[f"{name}.bias"] = new[f"{name}.bias"][order][:, qk_inside].reshape(-1)
    new["v.weight"] = v_weight[order][:, v_inside].reshape(heads * new_size, -1)
    new["v.bias"] = v_bias[order][:, v_inside].reshape(-1)
    new["out.weight"] = out[:, order][:, :, v_inside].reshape(out.shape[0], -1)
    twin.load_state_dict({**state, **new})
    return twin


def test_heads_widened_inside_merge_back_to_the_model():
    """Elastic zip inside heads: B has A's function with larger heads (sdpa's scale follows
    the head size); merged at B's head size, the model computes A's function."""
    torch.manual_seed(0)
    model = Attender(2, head_size=4).eval()
    twin = _with_larger_heads(model, extra=2, seed=1)
    x = torch.randn(128, 6, 5)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=1e-4, atol=1e-5)
    result = mergec.merge(model, twin, x[:4], _calibration(x), width="b", repair=None,
                          progress=False)
    assert result.module.state_dict()["q.weight"].shape == (12, 8)  # 2 heads of 6
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("width, size", [("max", 6), ("min", 4), ("a", 4), ("b", 6)])
def test_heads_of_different_sizes_merge_to_the_chosen_size(width, size):
    torch.manual_seed(0)
    model_a = Attender(2, head_size=4, width=8).eval()
    model_b = Attender(2, head_size=6, width=8).eval()
    x = torch.randn(64, 6, 5)
    result = mergec.merge(model_a, model_b, x[:4], _calibration(x), width=width, progress=False)
    assert result.module.state_dict()["v.weight"].shape == (2 * size, 8)
    assert result.module(x).shape == (64, 3)


def test_heads_of_different_sizes_are_refused_where_mergec_cannot_follow_the_scale():
    torch.manual_seed(0)
    model_a = Attender(2, head_size=4, attend="explicit", width=8).eval()
    model_b = Attender(2, head_size=6, attend="explicit", width=8).eval()
    x = torch.randn(32, 6, 5)
    with pytest.raises(mergec.MergecError, match="heads of .* sizes 4 and 6"):
        mergec.merge(model_a, model_b, x[:4], _calibration(x), progress=False)
    with pytest.raises(mergec.MergecError, match="'max', 'min', 'a' or 'b'"):
        mergec.merge(Attender(2, head_size=4, width=8).eval(),
                     Attender(2, head_size=6, width=8).eval(), x[:4], _calibration(x),
                     width="sum", progress=False)
    with pytest.raises(mergec.MergecError, match="not their size"):  # count and size differ
        mergec.merge(Attender(2, head_size=4, width=8).eval(),
                     Attender(3, head_size=6, width=8).eval(), x[:4], _calibration(x),
                     progress=False)


def test_vits_of_different_widths_and_head_counts_merge():
    """zoo.small_vit at dim 32 with 2 heads and dim 48 with 3 heads (heads of 16): elastic
    zip over the residual stream, the MLP and the heads; LayerNorm's shape follows."""
    torch.manual_seed(0)
    make = lambda dim, heads: zoo.small_vit(depth=2, dim=dim, heads=heads, mlp_dim=64,  # noqa: E731
                                            image_size=8, patch=4).eval()
    model_a, model_b = make(32, 2), make(48, 3)
    x = torch.randn(64, 1, 8, 8)
    for width, dim in (("max", 48), ("min", 32)):
        result = mergec.merge(model_a, model_b, x[:4], _calibration(x), width=width,
                              repair="repair", progress=False)
        state = result.module.state_dict()
        assert state["blocks.0.attn.q.weight"].shape == (dim, dim)
        assert state["blocks.0.norm1.weight"].shape == (dim,)
        assert result.module(x).shape == (64, 10)


class GroupNet(nn.Module):
    """conv -> GroupNorm(groups of 4 channels) -> ReLU -> pool -> 3 logits."""

    def __init__(self, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(1, 4 * groups, 3, padding=1)
        self.norm = nn.GroupNorm(groups, 4 * groups)
        self.head = nn.Linear(4 * groups, 3)

    def forward(self, x):
        h = torch.relu(self.norm(self.conv(x)))
        return self.head(h.mean(dim=(2, 3)))


def test_width_sum_over_groupnorm_groups_reproduces_the_logit_ensemble():
    torch.manual_seed(0)
    model_a, model_b = GroupNet(2).eval(), GroupNet(3).eval()
    for model in (model_a, model_b):
        model.norm.weight.data.uniform_(0.5, 1.5), model.norm.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(64, 1, 6, 6)
    result = mergec.merge(model_a, model_b, x[:4], _calibration(x), width="sum", repair=None,
                          progress=False)
    assert result.module.state_dict()["norm.weight"].shape == (20,)
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), (model_a(x) + model_b(x)) / 2,
                                   rtol=1e-4, atol=1e-5)
    merged = mergec.merge(model_a, model_b, x[:4], _calibration(x), progress=False)
    assert merged.module.state_dict()["norm.weight"].shape == (12,)  # "max": 3 groups
    assert merged.module(x).shape == (64, 3)


@pytest.mark.parametrize("stop_at", ["embed", "add"])  # heads in both tails; heads merged
def test_partial_zip_with_different_head_counts(stop_at):
    """At width "sum" nothing merges, so the two tails give both parents back exactly,
    whether the heads are in the tails (stop at the embedding: a path through the input's
    shape alone does not go around the stop) or in the merged trunk."""
    torch.manual_seed(0)
    model_a, model_b = Attender(2).eval(), Attender(3).eval()
    x = torch.randn(64, 6, 5)
    result = mergec.merge(model_a, model_b, x[:4], _calibration(x), width="sum",
                          stop_at=stop_at, repair=None, progress=False)
    with torch.no_grad():
        out_a, out_b = result.module(x)
        torch.testing.assert_close(out_a, model_a(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out_b, model_b(x), rtol=1e-4, atol=1e-5)
    merged = mergec.merge(model_a, model_b, x[:4], _calibration(x), stop_at=stop_at,
                          progress=False)
    assert [o.shape for o in merged.module(x)] == [(64, 3), (64, 3)]
