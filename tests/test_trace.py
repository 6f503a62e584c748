"""The trace pass (frontend): torch.export to an aten-level fx GraphModule."""
from __future__ import annotations

import pytest
import torch
import transformers
from torch import fx, nn

import mergec
from mergec import TraceError
from mergec.ir.fx import STATE_KEYS, Probes, to_device


class SmallNet(nn.Module):
    """Conv, BatchNorm, a residual add, dropout, pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = x + torch.relu(self.conv2(x))
        return self.head(self.dropout(x.mean(dim=(2, 3))))


class DataDependentGate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # Python control flow on a tensor's value: not exportable
            return x * 2
        return x


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.gate = DataDependentGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.linear(x))


def _small_net() -> SmallNet:
    torch.manual_seed(0)
    model = SmallNet()
    with torch.no_grad():  # non-trivial running statistics, so that eval mode matters
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.running_var.uniform_(0.5, 2)
    return model.eval()


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(config).eval()


def test_trace_returns_graph_module_with_same_outputs() -> None:
    model = _small_net()
    x = torch.randn(2, 3, 16, 16)
    graph_module = mergec.trace(model, x)
    assert isinstance(graph_module, fx.GraphModule)
    graph_module.graph.lint()
    with torch.no_grad():
        torch.testing.assert_close(graph_module(x), model(x))
        other = torch.randn(2, 3, 16, 16)
        torch.testing.assert_close(graph_module(other), model(other))


def test_trace_is_aten_level_with_state_dict_names() -> None:
    model = _small_net()
    graph_module = mergec.trace(model, torch.randn(2, 3, 16, 16))
    targets = {node.target for node in graph_module.graph.nodes if node.op == "call_function"}
    assert torch.ops.aten.conv2d.default in targets
    assert torch.ops.aten.linear.default in targets
    attributes = {node.target for node in graph_module.graph.nodes if node.op == "get_attr"}
    assert {"conv1.weight", "bn1.running_mean", "head.bias"} <= attributes
    assert graph_module.meta[STATE_KEYS] == tuple(model.state_dict())
    for node in graph_module.graph.nodes:
        if node.op == "call_function":
            assert "val" in node.meta


def test_trace_batch_is_dynamic() -> None:
    model = _small_net()
    graph_module = mergec.trace(model, torch.randn(2, 3, 16, 16))
    for batch in (1, 5):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(graph_module(x), model(x))


def test_trace_batch_is_dynamic_from_a_single_example() -> None:
    model = _small_net()
    graph_module = mergec.trace(model, torch.randn(1, 3, 16, 16))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(graph_module(x), model(x))


def test_trace_static_batch_when_asked() -> None:
    graph_module = mergec.trace(_small_net(), torch.randn(2, 3, 16, 16), dynamic_batch=False)
    graph_module(torch.randn(2, 3, 16, 16))
    with pytest.raises(AssertionError, match=r"x.size\(\)\[0\] == 2"):
        graph_module(torch.randn(5, 3, 16, 16))


def test_untraceable_model_raises_trace_error_naming_the_construct() -> None:
    with pytest.raises(TraceError, match="could not export GatedNet") as raised:
        mergec.trace(GatedNet(), torch.randn(2, 4))
    message = str(raised.value)
    assert "in module 'gate'" in message  # the module path whose forward failed
    assert "data-dependent" in message  # what the construct is
    assert f"{__file__}:" in message and "in forward" in message  # where it is
    assert raised.value.__cause__ is not None  # the export error is chained
    assert not isinstance(raised.value.__cause__, TraceError)
    assert "data-dependent" in str(raised.value.__cause__)


def test_non_module_raises_trace_error() -> None:
    with pytest.raises(TraceError, match="expected a torch.nn.Module, got function"):
        mergec.trace(lambda x: x * 2, torch.randn(2, 4))


def test_bad_example_inputs_raise_trace_error() -> None:
    with pytest.raises(TraceError, match="example inputs must be a tensor or a tuple"):
        mergec.trace(_small_net(), {"x": torch.randn(2, 3, 16, 16)})


def test_trace_does_not_modify_the_callers_model() -> None:
    model = _small_net().train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    parameters = [id(p) for p in model.parameters()]
    mergec.trace(model, torch.randn(4, 3, 16, 16))
    assert model.training and all(module.training for module in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():  # BatchNorm running stats too: no train-mode forward
        assert torch.equal(after[key], value), key
    assert [id(p) for p in model.parameters()] == parameters


def test_trace_accepts_a_tuple_of_inputs() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.linear(x) * y

    model = TwoInputs().eval()
    x, y = torch.randn(2, 4), torch.randn(2, 3)
    graph_module = mergec.trace(model, (x, y))
    with torch.no_grad():
        torch.testing.assert_close(graph_module(x, y), model(x, y))


def test_transformers_decoder_traces_despite_its_cache() -> None:
    """GPT2Model returns a DynamicCache by default, which is no pytree; trace asks for no
    cache and the graph computes the same hidden states."""
    model = _gpt2()
    input_ids = torch.randint(0, 100, (2, 12))
    graph_module = mergec.trace(model, input_ids)
    assert isinstance(graph_module, fx.GraphModule)
    with torch.no_grad():
        expected = model(input_ids, use_cache=False).last_hidden_state
        traced = graph_module(input_ids).last_hidden_state
        torch.testing.assert_close(traced, expected)
        other = torch.randint(0, 100, (3, 12))  # dynamic batch here too
        torch.testing.assert_close(graph_module(other).last_hidden_state,
                                   model(other, use_cache=False).last_hidden_state)


def test_transformers_decoder_graph_module_is_called_like_the_model() -> None:
    model = _gpt2()
    input_ids = torch.randint(0, 100, (2, 12))
    graph_module = mergec.trace(model, input_ids)
    with torch.no_grad():
        torch.testing.assert_close(graph_module(input_ids).last_hidden_state,
                                   model(input_ids, use_cache=False).last_hidden_state)


def test_a_tied_embedding_is_untied_with_one_role_per_use():
    """GPT-2 ties its token embedding to the output layer: trace gives each use its own copy,
    under its own module's name, so the spec binds the embedding's feature axis as produced
    and the output layer's as consumed, and merging two models averages each correctly."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=30,
                                     n_positions=8)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 30, (4, 6))
    graph_module = mergec.trace(model, ids)
    state = graph_module.state_dict()
    assert state["transformer.wte.weight"].data_ptr() != state["lm_head.weight"].data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(graph_module(ids).logits, model(ids).logits)
    spec = mergec.discover(graph_module)
    roles = {(b.key, b.axis): b.role for b in spec.bindings}
    assert roles[("transformer.wte.weight", 1)] == "produces"
    assert roles[("lm_head.weight", 1)] == "consumes"
    result = mergec.merge(model, model, ids, [(ids,)], method="average", repair=None,
                          progress=False)
    with torch.no_grad():
        torch.testing.assert_close(result.module(ids).logits, model(ids).logits)


def test_probes_return_intermediate_values_on_any_batch_size() -> None:
    model = SmallNet().eval()
    graph_module = mergec.trace(model, torch.randn(2, 3, 8, 8))
    before = graph_module.code
    relus = [node.name for node in graph_module.graph.nodes if "relu" in node.name]
    probes = Probes(graph_module, relus[:1])
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        expected = torch.relu(model.bn1(model.conv1(x)))
        assert torch.allclose(probes(x)[relus[0]], expected, atol=1e-6)
    # the code stops at the probe: neither the second conv nor the head runs
    targets = {str(node.target) for node in probes.module.graph.nodes}
    assert not any("linear" in target or "addmm" in target for target in targets)
    assert graph_module.code == before
    with pytest.raises(mergec.MergecError, match="no node 'nowhere'"):
        Probes(graph_module, ["nowhere"])


def _small_bert() -> nn.Module:
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=50,
                                     max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def test_a_graph_moved_to_a_device_creates_its_tensors_there() -> None:
    """BERT's graph builds position ids with aten.arange(..., device=cpu): moved by to_device,
    it runs on the other device (meta here, where mixing devices is an error as on a GPU)."""
    ids = torch.randint(0, 50, (2, 8))
    graph_module = mergec.trace(_small_bert(), (ids,))
    factories = [n for n in graph_module.graph.nodes if "device" in n.kwargs]
    assert factories and all(n.kwargs["device"] == torch.device("cpu") for n in factories)
    to_device(graph_module, "meta")
    assert all(n.kwargs["device"] == torch.device("meta") for n in factories)
    output = graph_module(ids.to("meta"))
    assert all(t.device.type == "meta" for t in torch.utils._pytree.tree_leaves(output)
               if isinstance(t, torch.Tensor))
