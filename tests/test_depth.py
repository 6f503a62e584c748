"""Models of one family at different depths: segment, align-depth, identity padding."""
import pytest
import torch
from torch import nn

import archgen  # tests/ is on sys.path under pytest's default (prepend) import mode
import mergec
from mergec.passes.segment import segment
from mergec_lab import zoo


def _randomize_batch_norm(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(torch.rand(size, generator=generator) * 0.4 - 0.2)
            module.running_var.copy_(torch.rand(size, generator=generator) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(size, generator=generator) * 0.6 - 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def family():
    torch.manual_seed(0)
    shallow = _randomize_batch_norm(zoo.resnet20(depth=14))
    deep = archgen.with_identity_blocks(shallow, _randomize_batch_norm(zoo.resnet20(depth=20)),
                                        {0: 0, 2: 1})
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(deep(x), shallow(x))
    return shallow, deep, x, [(batch,) for batch in x.split(16)]


def test_segment_finds_stages_and_blocks():
    torch.manual_seed(0)
    model = zoo.resnet20(depth=14).eval()
    stages = segment(_annotated(model, torch.randn(2, 1, 28, 28)))
    assert [[block.path for block in stage] for stage in stages] == [
        ["layer1.0", "layer1.1"], ["layer2.0", "layer2.1"], ["layer3.0", "layer3.1"]]
    vit = zoo.small_vit(depth=2, dim=16, heads=2, mlp_dim=32, image_size=8, patch=4).eval()
    stages = segment(_annotated(vit, torch.randn(2, 1, 8, 8)))
    assert len(stages) == 1 and len(stages[0]) == 2
    assert all(len(block.adds) == 2 for block in stages[0])  # attention and MLP residuals


def _annotated(model, x):
    graph_module = mergec.trace(model, x)
    mergec.discover(graph_module)
    return graph_module


@pytest.mark.parametrize("method", ["permute", "weight-match"])
def test_identity_blocks_are_aligned_around_and_the_merge_computes_the_model(family, method):
    shallow, deep, x, calibration = family
    result = mergec.merge(shallow, deep, x[:4], calibration, method=method, repair=None,
                          progress=False)
    plan = result.report.depth
    assert [stage["mapping"] for stage in plan.stages] == [[0, 2]] * 3
    assert plan.padded_paths == ["layer1.1", "layer2.1", "layer3.1"]
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), shallow(x), rtol=1e-4, atol=1e-4)


def test_deeper_model_first_gives_the_same_merge(family):
    shallow, deep, x, calibration = family
    result = mergec.merge(deep, shallow, x[:4], calibration, method="permute", repair=None,
                          progress=False)
    assert result.report.depth.swapped
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), shallow(x), rtol=1e-4, atol=1e-4)


def test_real_depth_merge_runs_and_plots(tmp_path):
    torch.manual_seed(0)
    shallow, deep = zoo.resnet20(depth=14).eval(), zoo.resnet20(depth=20).eval()
    x = torch.randn(48, 1, 28, 28)
    for unaligned in ("average", "keep"):
        result = mergec.merge(shallow, deep, x[:4], [(b,) for b in x.split(16)],
                              unaligned=unaligned, depth_variant="layer-wise", progress=False)
        assert result.module(x).shape == (48, 10)
        assert set(result.module.state_dict()) == set(deep.state_dict())
    written = result.report.plot(tmp_path)
    assert any(path.name == "cka_stage0.png" for path in written)
    assert result.report.to_dict()["depth"]["stages"][0]["mapping"][0] == 0


def test_depth_options_are_checked(family):
    shallow, deep, x, calibration = family
    with pytest.raises(mergec.MergecError, match="unaligned must be"):
        mergec.merge(shallow, deep, x[:4], calibration, unaligned="drop", progress=False)


# ---------------------------------------------------------------------------------------------
# Plain chains (no residual adds): layers, identity layers
# ---------------------------------------------------------------------------------------------
def _vgg_with_identity_layers(shallow: nn.Module, deep: nn.Module) -> nn.Module:
    """``deep`` (a VGG with more convolutions per stage) computing ``shallow``: in every stage
    the first convolutions hold the shallow model's, the extra ones are identities (Dirac
    kernel, BatchNorm passing its input through, ReLU after ReLU)."""
    convs = lambda model: [m for m in model.features if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]  # noqa: E731
    shallow_layers, deep_layers = convs(shallow), convs(deep)
    shallow_by_stage, deep_by_stage = {}, {}
    for layers, by_stage in ((shallow_layers, shallow_by_stage), (deep_layers, deep_by_stage)):
        for conv, bn in zip(layers[::2], layers[1::2]):
            by_stage.setdefault(conv.out_channels, []).append((conv, bn))
    with torch.no_grad():
        for width, deep_stage in deep_by_stage.items():
            for index, (conv, bn) in enumerate(deep_stage):
                if index < len(shallow_by_stage[width]):
                    source_conv, source_bn = shallow_by_stage[width][index]
                    conv.load_state_dict(source_conv.state_dict())
                    bn.load_state_dict(source_bn.state_dict())
                else:
                    nn.init.dirac_(conv.weight)
                    bn.weight.fill_(1.0), bn.bias.zero_(), bn.running_mean.zero_()
                    bn.running_var.fill_(1.0 - bn.eps)
        deep.classifier.load_state_dict(shallow.classifier.state_dict())
    return deep.eval()


def test_segment_cuts_a_plain_chain_into_stages_of_layers():
    torch.manual_seed(0)
    stages = segment(_annotated(zoo.vgg("11", width=4).eval(), torch.randn(2, 1, 28, 28)))
    assert [len(stage) for stage in stages] == [1, 1, 2, 2, 2, 2]  # 5 conv stages, classifier
    assert stages[2][1].path == "features.11"
    assert stages[2][1].modules == ("features.11", "features.12")  # conv and its BatchNorm
    assert stages[-1][0].modules == ("classifier.0",)


@pytest.mark.parametrize("method", ["permute", "zip"])
def test_identity_layers_are_aligned_around_and_the_merge_computes_the_model(method):
    torch.manual_seed(0)
    shallow = _randomize_batch_norm(zoo.vgg("11", width=4))
    deep = _vgg_with_identity_layers(shallow, _randomize_batch_norm(zoo.vgg("13", width=4)))
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(deep(x), shallow(x))
    result = mergec.merge(shallow, deep, x[:4], [(b,) for b in x.split(16)], method=method,
                          repair=None, progress=False)
    plan = result.report.depth
    assert [stage["mapping"] for stage in plan.stages] == [[0], [0], [0, 1], [0, 1], [0, 1],
                                                            [0, 1]]
    assert plan.padded_paths == ["features.3", "features.4", "features.10", "features.11"]
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), shallow(x), rtol=1e-4, atol=1e-4)


def test_vgg_11_with_vgg_16_merges_with_both_unaligned_modes():
    torch.manual_seed(0)
    shallow, deep = zoo.vgg("11", width=4).eval(), zoo.vgg("16", width=4).eval()
    x = torch.randn(48, 1, 28, 28)
    outputs = []
    for unaligned in ("average", "keep"):
        result = mergec.merge(deep, shallow, x[:4], [(b,) for b in x.split(16)],
                              unaligned=unaligned, progress=False)
        assert set(result.module.state_dict()) == set(deep.state_dict())
        outputs.append(result.module(x))
        assert [len(s["deep"]) for s in result.report.depth.stages] == [2, 2, 3, 3, 3, 2]
        identity = result.report.depth.identity
        assert "features.3.weight" in identity and "features.4.running_var" in identity
    assert not torch.allclose(*outputs)  # the unaligned layers differ between the two modes


def _chain(widths: list[int], activation: type[nn.Module]) -> nn.Module:
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths, widths[1:]):
        layers += [nn.Linear(width_in, width_out), activation()]
    return nn.Sequential(*layers[:-1]).eval()


def test_an_mlp_with_an_identity_layer_inserted_merges_back():
    torch.manual_seed(0)
    shallow, deep = _chain([6, 12, 12, 3], nn.ReLU), _chain([6, 12, 12, 12, 3], nn.ReLU)
    with torch.no_grad():
        deep[0].load_state_dict(shallow[0].state_dict())
        deep[2].weight.copy_(torch.eye(12)), deep[2].bias.zero_()
        deep[4].load_state_dict(shallow[2].state_dict())
        deep[6].load_state_dict(shallow[4].state_dict())
    x = torch.randn(64, 6)
    result = mergec.merge(shallow, deep, x[:4], [(b,) for b in x.split(16)], method="permute",
                          repair=None, progress=False)
    assert result.report.depth.stages[0]["mapping"] == [0, 2, 3]
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), shallow(x), rtol=1e-4, atol=1e-4)


def test_a_chain_whose_layers_cannot_become_identities_is_refused():
    torch.manual_seed(0)
    shallow, deep = _chain([6, 12, 12, 3], nn.GELU), _chain([6, 12, 12, 12, 3], nn.GELU)
    x = torch.randn(32, 6)
    with pytest.raises(mergec.MergecError, match="cannot make an identity"):
        mergec.merge(shallow, deep, x[:4], [(x,)], progress=False)


# ---------------------------------------------------------------------------------------------
# A transformers model: GPT-2 (pre-norm blocks, GELU written as a polynomial, embeddings summed)
# ---------------------------------------------------------------------------------------------
def _gpt2(layers: int):
    import transformers

    config = transformers.GPT2Config(n_layer=layers, n_embd=32, n_head=2, vocab_size=50,
                                     n_positions=16)
    return transformers.GPT2LMHeadModel(config).eval()


def test_segment_finds_gpt2_blocks_and_not_its_polynomials():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4, 8))
    stages = segment(_annotated(_gpt2(2), ids))
    # one stage (the residual stream); the embeddings' sum and GELU's x + 0.044715 x³ are
    # not blocks
    assert [[block.path for block in stage] for stage in stages] == [
        ["transformer.h.0", "transformer.h.1"]]


def test_gpt2_with_an_identity_block_inserted_merges_back():
    torch.manual_seed(0)
    shallow, deep = _gpt2(2), _gpt2(3)
    state = deep.state_dict()
    source = shallow.state_dict()
    for key in state:  # deep block 0 is shallow block 0, deep block 2 is shallow block 1
        if key.startswith("transformer.h.1."):
            if key.endswith(("attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_proj.weight",
                             "mlp.c_proj.bias")):
                state[key] = torch.zeros_like(state[key])
        elif key.startswith("transformer.h.2."):
            state[key] = source[key.replace("h.2.", "h.1.")].clone()
        else:
            state[key] = source[key].clone()
    deep.load_state_dict(state)
    ids = torch.randint(0, 50, (64, 8))
    with torch.no_grad():
        expected = shallow(ids).logits
        torch.testing.assert_close(deep(ids).logits, expected)
    result = mergec.merge(shallow, deep, ids[:4], [(b,) for b in ids.split(16)],
                          method="permute", repair=None, progress=False)
    assert result.report.depth.stages[0]["mapping"] == [0, 2]
    assert result.report.depth.padded_paths == ["transformer.h.1"]
    with torch.no_grad():
        torch.testing.assert_close(result.module(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_transformers_vit_segments_by_layer_and_merges_across_depths():
    """HF ViT: a layer's first residual add sits in the layer, its second in ``output``; both
    belong to one block."""
    import transformers

    def make(layers: int):
        config = transformers.ViTConfig(num_hidden_layers=layers, hidden_size=32,
                                        num_attention_heads=2, intermediate_size=64,
                                        image_size=8, patch_size=4, num_channels=1,
                                        num_labels=3)
        return transformers.ViTForImageClassification(config).eval()

    torch.manual_seed(0)
    shallow, deep = make(2), make(3)
    x = torch.randn(48, 1, 8, 8)
    stages = segment(_annotated(shallow, x[:4]))
    assert [[len(block.adds) for block in stage] for stage in stages] == [[2, 2]]
    result = mergec.merge(shallow, deep, x[:4], [(b,) for b in x.split(16)], progress=False)
    assert len(result.report.depth.padded_paths) == 1
    assert result.module(x).logits.shape == (48, 3)


def test_post_norm_blocks_that_cannot_be_identities_are_refused():
    """BERT normalises after each residual add: with a LayerNorm that is not the identity on
    its inputs, a block with a zeroed branch is no identity, and align-depth says so."""
    import transformers

    def make(layers: int):
        config = transformers.BertConfig(num_hidden_layers=layers, hidden_size=32,
                                         num_attention_heads=2, intermediate_size=64,
                                         vocab_size=50, max_position_embeddings=16)
        model = transformers.BertModel(config).eval()
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "LayerNorm" in name:
                    parameter.uniform_(0.5, 1.5)
        return model

    torch.manual_seed(0)
    ids = torch.randint(0, 50, (32, 8))
    with pytest.raises(mergec.MergecError, match="does not compute the shallow model"):
        mergec.merge(make(2), make(3), ids[:4], [(ids,)], progress=False)


class _Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), \
            nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), \
            nn.BatchNorm2d(width)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def _conv_bn(width_in: int, width_out: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(width_in, width_out, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(width_out), nn.ReLU())


class _FlatNet(nn.Module):
    """A stem, ``first`` residual blocks at width 8, a strided block to width 16 and
    ``second`` residual blocks, numbered flat (``blocks.0 ... blocks.N``) as EfficientNet's
    ``_blocks`` are: a deeper sibling shifts the names of every later block."""

    def __init__(self, first: int, second: int):
        super().__init__()
        self.blocks = nn.Sequential(_conv_bn(1, 8, 1), *(_Residual(8) for _ in range(first)),
                                    _conv_bn(8, 16, 2), *(_Residual(16) for _ in range(second)))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.head(self.blocks(x))


def test_a_deeper_sibling_with_flat_numbered_blocks_aligns_by_structure():
    """Shallow blocks 0-4 (stem, R8, R8, down, R16); the deep sibling (stem, R8, R8, R8,
    down, R16, R16) holds them at 0, 1, 3, 4, 5 with identities at 2 (mid-stage) and 6."""
    torch.manual_seed(0)
    shallow = _randomize_batch_norm(_FlatNet(2, 1))
    deep = _randomize_batch_norm(_FlatNet(3, 2))
    state, source = deep.state_dict(), shallow.state_dict()
    places = {0: 0, 1: 1, 3: 2, 4: 3, 5: 4}
    for key in state:
        block, rest = key.split(".", 2)[1:] if key.startswith("blocks.") else (None, key)
        if block is None:
            state[key] = source[key].clone()
        elif int(block) in places:
            state[key] = source[f"blocks.{places[int(block)]}.{rest}"].clone()
        elif rest.startswith("bn2.weight") or rest.startswith("bn2.bias"):
            state[key] = torch.zeros_like(state[key])
    deep.load_state_dict(state)
    x = torch.randn(64, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(deep(x), shallow(x))
    result = mergec.merge(shallow, deep, x[:4], [(b,) for b in x.split(32)], method="permute",
                          repair=None, progress=False)
    plan = result.report.depth
    assert [stage["mapping"] for stage in plan.stages] == [[0, 2], [0]]
    assert plan.padded_paths == ["blocks.2", "blocks.6"]
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), shallow(x), rtol=1e-4, atol=1e-4)
