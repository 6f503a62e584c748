"""Tests of the model zoo, the offline datasets and the training helpers."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from mergec.errors import MergecError
from mergec_lab import datasets, training, zoo

# (name, factory, input shape): every family at its default and at a heterogeneous variant.
ZOO: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("resnet20", lambda: zoo.resnet20(), (3, 1, 28, 28)),
    ("resnet32x2", lambda: zoo.resnet20(width=2, depth=32, num_classes=7), (3, 1, 28, 28)),
    ("resnet20-rgb", lambda: zoo.resnet20(in_channels=3), (3, 3, 32, 32)),
    ("vgg11", lambda: zoo.vgg("11"), (3, 1, 28, 28)),
    ("vgg16-nobn", lambda: zoo.vgg("16", width=8, num_classes=7, batch_norm=False), (3, 1, 28, 28)),
    ("vit4", lambda: zoo.small_vit(), (3, 1, 28, 28)),
    ("vit6", lambda: zoo.small_vit(depth=6, dim=32, heads=2, mlp_dim=64, num_classes=7),
     (3, 1, 28, 28)),
    ("digits_cnn", lambda: zoo.digits_cnn(), (3, 1, 8, 8)),
    ("digits_mlp", lambda: zoo.digits_mlp(width=32, depth=3, num_classes=7), (3, 1, 8, 8)),
]
ZOO_IDS = [name for name, _, _ in ZOO]


@pytest.mark.parametrize(("name", "factory", "shape"), ZOO, ids=ZOO_IDS)
def test_forward_shape(name: str, factory: Callable[[], nn.Module], shape: tuple[int, ...]) -> None:
    model = factory().eval()
    num_classes = 7 if name in {"resnet32x2", "vgg16-nobn", "vit6", "digits_mlp"} else 10
    assert model(torch.randn(shape)).shape == (shape[0], num_classes)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "factory", "shape"), ZOO, ids=ZOO_IDS)
def test_exportable(name: str, factory: Callable[[], nn.Module], shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(shape)
    exported = torch.export.export(model, (x,), strict=False)
    torch.testing.assert_close(exported.module()(x), model(x))


def test_vit_exports_to_sdpa_with_separate_qkv() -> None:
    model = zoo.small_vit(depth=1).eval()
    graph = torch.export.export(model, (torch.randn(2, 1, 28, 28),), strict=False).graph
    targets = [node.target for node in graph.nodes if node.op == "call_function"]
    assert torch.ops.aten.scaled_dot_product_attention.default in targets
    # q, k, v, proj, two MLP layers, head
    assert targets.count(torch.ops.aten.linear.default) == 7


def test_resnet_depth_and_shortcuts() -> None:
    model = zoo.resnet20(depth=32, width=2)
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [5, 5, 5]
    assert model.layer1[0].conv1.out_channels == 32 and model.layer3[0].conv1.out_channels == 128
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    assert isinstance(model.layer2[0].shortcut[0], nn.Conv2d)  # option B on downsampling
    assert model.layer2[0].shortcut[0].kernel_size == (1, 1)
    with pytest.raises(MergecError, match="6n\\+2"):
        zoo.resnet20(depth=21)


def test_vgg_configurations() -> None:
    convs = lambda model: sum(isinstance(m, nn.Conv2d) for m in model.modules())  # noqa: E731
    assert convs(zoo.vgg("11")) == 8 and convs(zoo.vgg("16")) == 13
    assert not any(isinstance(m, nn.BatchNorm2d) for m in zoo.vgg(batch_norm=False).modules())
    with pytest.raises(MergecError, match="cfg must be one of"):
        zoo.vgg("12")


def test_digits_shapes_and_split() -> None:
    x_train, y_train = datasets.digits("train")
    x_test, y_test = datasets.digits("test")
    assert x_train.shape == (1347, 1, 8, 8) and x_test.shape == (450, 1, 8, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert set(y_train.tolist()) == set(range(10)) == set(y_test.tolist())
    assert abs(x_train.mean().item()) < 1e-4 and abs(x_train.std().item() - 1) < 1e-3
    again, _ = datasets.digits("train")
    assert torch.equal(again, x_train)  # deterministic split


def test_class_subset_keeps_only_requested_classes() -> None:
    x, y = datasets.digits("train")
    x_b, y_b = datasets.class_subset(x, y, range(5, 10))
    assert set(y_b.tolist()) == {5, 6, 7, 8, 9}
    assert len(x_b) == len(y_b) == int((y >= 5).sum())
    assert torch.equal(x_b, x[y >= 5])
    _, relabelled = datasets.class_subset(x, y, [7, 2], relabel=True)
    assert set(relabelled.tolist()) == {0, 1}
    assert int((relabelled == 0).sum()) == int((y == 7).sum())


def test_batches_and_loader() -> None:
    x, y = datasets.digits("test")
    sizes = [len(batch) for batch in datasets.batches(x, 100)]
    assert sizes == [100, 100, 100, 100, 50]
    first = [batch_y for _, batch_y in datasets.loader(x, y, 64, shuffle=True, seed=3)]
    second = [batch_y for _, batch_y in datasets.loader(x, y, 64, shuffle=True, seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert sorted(torch.cat(first).tolist()) == sorted(y.tolist())


@pytest.mark.skipif(not datasets.fashion_mnist_available(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_loads() -> None:
    x, y = datasets.fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert y.bincount().tolist() == [1000] * 10
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05


def test_fashion_mnist_missing_names_the_package(tmp_path) -> None:
    with pytest.raises(MergecError, match="dataset-fashion-mnist"):
        datasets.fashion_mnist("train", root=str(tmp_path))


@pytest.mark.slow
def test_digits_cnn_trains_on_five_classes() -> None:
    x, y = datasets.class_subset(*datasets.digits("train"), range(5))
    x_test, y_test = datasets.class_subset(*datasets.digits("test"), range(5))
    torch.manual_seed(0)
    model = training.train(zoo.digits_cnn(), x, y, epochs=8, batch_size=32, lr=0.05, seed=0,
                           device="cpu", progress=False)
    assert training.evaluate(model, x_test, y_test) > 0.9
    assert training.predict_logits(model, x_test[:5]).shape == (5, 10)


@pytest.mark.slow
def test_train_is_deterministic_given_seed() -> None:
    x, y = datasets.class_subset(*datasets.digits("train"), range(5))

    def run(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = zoo.digits_mlp(width=16)
        return training.train(model, x, y, epochs=2, batch_size=64, lr=0.05, seed=seed,
                              device="cpu", progress=False).state_dict()

    first, second, other = run(1), run(1), run(2)
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_predict_logits_concatenates_tuple_outputs() -> None:
    class TwoHeads(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x[:, :2], x[:, 2:]

    x = torch.randn(7, 5)
    logits = training.predict_logits(TwoHeads(), x, batch_size=3, device="cpu")
    torch.testing.assert_close(logits, x)


def test_cached_train_reuses_the_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = datasets.class_subset(*datasets.digits("train"), range(5))
    calls: list[dict] = []
    real_train = training.train

    def counting_train(model: nn.Module, *args, **kwargs) -> nn.Module:
        calls.append(kwargs)
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(training, "train", counting_train)
    settings = {"epochs": 1, "batch_size": 128, "lr": 0.05, "seed": 0, "width": 8}

    def cached(settings: dict, x: torch.Tensor = x) -> nn.Module:
        return training.cached_train("mlp", lambda: zoo.digits_mlp(width=8), settings, x, y,
                                     cache_dir=tmp_path, device="cpu", progress=False)

    first = cached(settings)
    assert len(calls) == 1 and calls[0]["epochs"] == 1 and "width" not in calls[0]
    assert len(list(tmp_path.glob("mlp-*.safetensors"))) == 1
    second = cached(dict(settings))
    assert len(calls) == 1  # loaded, not trained
    assert all(torch.equal(first.state_dict()[k], v) for k, v in second.state_dict().items())
    cached({**settings, "lr": 0.1})
    cached(settings, x=x + 1)
    assert len(calls) == 3  # other settings or other data: a new checkpoint
    assert len(list(tmp_path.glob("mlp-*.safetensors"))) == 3
