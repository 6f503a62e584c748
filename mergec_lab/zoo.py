"""Small model families that the examples, tests and benchmarks train and merge.

Each family exists at several widths and depths so that the heterogeneous protocols of
DESIGN.md (width x1 with x2, ResNet-20 with ResNet-32, VGG-11 with VGG-16, 4 with 6 transformer
layers) can be run on a CPU. All are written with plain modules and functional ops that
``torch.export.export(model.eval(), (x,), strict=False)`` lowers to the aten ops mergec's
passes have rules for (conv2d, linear, batch_norm, layer_norm, scaled_dot_product_attention,
view, add, cat, ...).

Example::

    >>> import torch
    >>> from mergec_lab import zoo
    >>> model = zoo.resnet20(width=2)
    >>> model(torch.randn(4, 1, 28, 28)).shape
    torch.Size([4, 10])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mergec.errors import MergecError


def _channels(base: int, width: float) -> int:
    """``base * width`` rounded, at least 1: the width multiplier of every family."""
    return max(1, int(round(base * width)))


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1
             ) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                      padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels)]


# ---------------------------------------------------------------------------------------------
# ResNet (CIFAR style)
# ---------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a residual add; a 1x1 conv-BN shortcut when the shape changes
    (He et al.'s option B), so every stage's residual stream is one permutable space."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, out_channels, 3, stride)
        self.conv2, self.bn2 = _conv_bn(out_channels, out_channels, 3)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(*_conv_bn(in_channels, out_channels, 1, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv, three stages of basic blocks (stride 1, 2, 2), global average pool, linear."""

    def __init__(self, blocks_per_stage: int, width: float, num_classes: int,
                 in_channels: int) -> None:
        super().__init__()
        widths = [_channels(c, width) for c in (16, 32, 64)]
        self.conv1, self.bn1 = _conv_bn(in_channels, widths[0], 3)
        stages: list[nn.Module] = []
        previous = widths[0]
        for stage_index, channels in enumerate(widths):
            blocks = []
            for block_index in range(blocks_per_stage):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                blocks.append(BasicBlock(previous, channels, stride))
                previous = channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def resnet20(width: float = 1, num_classes: int = 10, depth: int = 20, in_channels: int = 1
             ) -> ResNet:
    """CIFAR-style ResNet (He et al. 2016, section 4.2) with ``(depth - 2) / 6`` basic blocks per
    stage and 16·width, 32·width, 64·width channels.

    ``depth`` 20, 32, 44, 56 ... give ResNet-20, -32, ...; the depth-heterogeneous protocol
    merges ``resnet20()`` with ``resnet20(depth=32)``. Works on any input size >= 4x4 (the pool
    is adaptive); the benchmarks use 28x28 Fashion-MNIST.
    """
    if depth < 8 or (depth - 2) % 6 != 0:
        raise MergecError(f"resnet20: depth must be 6n+2 with n >= 1 (8, 14, 20, 32, ...), "
                          f"got {depth}")
    return ResNet((depth - 2) // 6, width, num_classes, in_channels)


# ---------------------------------------------------------------------------------------------
# VGG
# ---------------------------------------------------------------------------------------------

# Convs per stage of the original VGG configurations; stage s has base_width * 2**min(s, 3)
# channels (64, 128, 256, 512, 512 in the original, with base_width 64).
_VGG_CONVS_PER_STAGE = {"11": (1, 1, 2, 2, 2), "13": (2, 2, 2, 2, 2), "16": (2, 2, 3, 3, 3),
                        "19": (2, 2, 4, 4, 4)}


class VGG(nn.Module):
    """VGG feature stack for small images, global average pool, two-layer classifier.

    28x28 inputs are max-pooled after the first four stages (28, 14, 7, 3, 1) and not after the
    fifth, so the fifth stage runs on 1x1 maps, as VGG on CIFAR does.
    """

    def __init__(self, convs_per_stage: tuple[int, ...], width: int, num_classes: int,
                 in_channels: int, batch_norm: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for stage_index, convs in enumerate(convs_per_stage):
            channels = width * 2 ** min(stage_index, 3)
            for _ in range(convs):
                layers.append(nn.Conv2d(previous, channels, 3, padding=1, bias=not batch_norm))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(channels))
                layers.append(nn.ReLU())
                previous = channels
            if stage_index < len(convs_per_stage) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(previous, previous), nn.ReLU(), nn.Linear(previous, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


def vgg(cfg: str = "11", width: int = 16, num_classes: int = 10, in_channels: int = 1,
        batch_norm: bool = True) -> VGG:
    """A narrow VGG (Simonyan & Zisserman 2015) for 28x28 inputs.

    ``cfg`` is "11", "13", "16" or "19" (the number of weight layers in the original: the
    convolutions per stage follow it; the classifier here is two linear layers instead of three).
    ``width`` is the first stage's channel count; the stages have width x (1, 2, 4, 8, 8)
    channels, so the original is ``width=64`` and the default 16 is a quarter of it.
    """
    if cfg not in _VGG_CONVS_PER_STAGE:
        raise MergecError(f"vgg: cfg must be one of {sorted(_VGG_CONVS_PER_STAGE)}, got {cfg!r}")
    if width < 1:
        raise MergecError(f"vgg: width must be a positive channel count, got {width}")
    return VGG(_VGG_CONVS_PER_STAGE[cfg], int(width), num_classes, in_channels, batch_norm)


# ---------------------------------------------------------------------------------------------
# Vision transformer
# ---------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections, heads by reshape, and
    ``F.scaled_dot_product_attention``: the pattern annotate-units gives head structure."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads != 0:
            raise MergecError(f"small_vit: dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        return x.reshape(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = (self._split_heads(layer(x)) for layer in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))`` with a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SmallViT(nn.Module):
    """Patch embedding (strided conv), class token, learned positional embedding, pre-norm
    transformer blocks, final LayerNorm, linear head on the class token."""

    def __init__(self, depth: int, dim: int, heads: int, mlp_dim: int, patch: int,
                 image_size: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        if image_size % patch != 0:
            raise MergecError(f"small_vit: image_size {image_size} is not a multiple of "
                              f"patch {patch}")
        tokens = (image_size // patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def small_vit(depth: int = 4, dim: int = 64, heads: int = 4, mlp_dim: int = 128, patch: int = 4,
              image_size: int = 28, num_classes: int = 10, in_channels: int = 1) -> SmallViT:
    """A small Vision Transformer (Dosovitskiy et al. 2021) for 28x28 images: 49 patches of 4x4
    plus a class token. The depth-heterogeneous protocol merges depth 4 with depth 6."""
    return SmallViT(depth, dim, heads, mlp_dim, patch, image_size, num_classes, in_channels)


# ---------------------------------------------------------------------------------------------
# Tiny models for the 8x8 digits
# ---------------------------------------------------------------------------------------------

def digits_cnn(width: int = 16, num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """A three-conv CNN for 8x8 digits (conv-BN-ReLU x2, max-pool to 4x4, conv-BN-ReLU, global
    average pool, linear); trains to > 90% on five classes in a few seconds on a CPU, which makes
    it the model of the fast end-to-end tests."""
    return nn.Sequential(
        *_conv_bn(in_channels, width, 3), nn.ReLU(),
        *_conv_bn(width, 2 * width, 3), nn.ReLU(),
        nn.MaxPool2d(2),
        *_conv_bn(2 * width, 2 * width, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


def digits_mlp(width: int = 64, depth: int = 2, num_classes: int = 10, in_features: int = 64
               ) -> nn.Sequential:
    """An MLP on flattened 8x8 digits: ``depth`` hidden Linear-ReLU layers of ``width`` units,
    then a linear head. The simplest model with permutable hidden units."""
    if depth < 1:
        raise MergecError(f"digits_mlp: depth must be >= 1, got {depth}")
    layers: list[nn.Module] = [nn.Flatten()]
    previous = in_features
    for _ in range(depth):
        layers += [nn.Linear(previous, width), nn.ReLU()]
        previous = width
    layers.append(nn.Linear(previous, num_classes))
    return nn.Sequential(*layers)
