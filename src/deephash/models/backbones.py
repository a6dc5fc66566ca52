"""Backbones by name: the seed's trunk, a compact BatchNorm CNN for 28x28, a CIFAR ResNet-18, timm.

Each maps float (B, C, H, W) images to (B, out_features) features and exposes ``out_features``.
``@register_backbone(name)`` adds one; ``create_backbone(name)`` builds one; names of the form
``"timm:<model>"`` build a timm model (imported lazily).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from deephash.errors import DeephashError, first_line
from deephash.models.seed_networks import EmbeddingNet, seed_convnet
from deephash.registry import Registry

__all__ = ["BACKBONES", "SeedCNN", "FMnistCNN", "BasicBlock", "ResNetCifar", "create_backbone", "list_backbones",
           "register_backbone", "timm_backbone"]

#: Backbone factories ``factory(in_channels=..., **params)`` by name (timm's ``register_model``).
BACKBONES: Registry[nn.Module] = Registry("backbone")
register_backbone = BACKBONES.register


class SeedCNN(nn.Module):
    """The seed EmbeddingNet's trunk and its two 256-unit layers: (B, C, 28, 28) -> (B, 256)."""

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.out_features = 256
        self.convnet = seed_convnet(in_channels)
        self.fc = nn.Sequential(nn.Linear(64 * 4 * 4, 256), nn.PReLU(), nn.Linear(256, 256), nn.PReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convnet(x).flatten(1))


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class FMnistCNN(nn.Module):
    """A compact BatchNorm CNN for 28x28 images.

    Stages of 3x3 conv-BN-ReLU blocks with widths ``width * 2**s``; a 2x2 max-pool between
    stages. With ``stem="space-to-depth"`` the image is first folded into 2x2 blocks
    (``PixelUnshuffle(2)``: (C, H, W) -> (4C, H/2, W/2), nothing lost) and the first stage runs at
    half resolution in place of the first max-pool: the same output size, 1.12x faster training
    on the CPU, because the full-resolution BatchNorm, ReLU and pooling passes are memory-bound
    (``bench/layout.py``; it cost mAP in one run, BENCHMARKS.md). The last feature map is either
    averaged (``fc = 0``: global average pooling, features = the last width) or flattened into a
    fully connected layer of ``fc`` units with BatchNorm and ReLU, which keeps where things are in
    the image and lets the network fit its training set much sooner (measured in BENCHMARKS.md).
    With the defaults (width 32, depth (2, 2, 1)) the convolutions cost about 22 M multiply-adds per
    28x28 image.

    Args:
        in_channels: Image channels C.
        width: Channels of the first stage.
        depth: Convolutions per stage (its length is the number of stages).
        dropout: Dropout probability on the pooled / flattened features (0 disables it).
        fc: Units of the fully connected layer on the flattened map (0: global average pooling).
        image_size: Input height and width (needed by ``fc``), 28 for (Fashion-)MNIST.
        stem: ``"pool"`` (a first stage at full resolution, then a max-pool) or
            ``"space-to-depth"`` (fold 2x2 blocks into channels; needs an even ``image_size`` and
            at least two stages).
        pool_first: Max-pool each stage's last convolution before its BatchNorm and ReLU rather
            than after them: the same function when BatchNorm's scale is positive (max commutes
            with an increasing map), with the statistics taken on the pooled map, and the
            memory-bound BatchNorm and ReLU passes on a quarter of the pixels (1.08x faster
            training of the Fashion-MNIST recipe's network, ``bench/layout.py``).

    Shapes:
        forward: float (B, C, image_size, image_size) -> float (B, out_features), out_features =
        ``fc`` or ``width * 2**(len(depth) - 1)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        width: int = 32,
        depth: Sequence[int] = (2, 2, 1),
        dropout: float = 0.0,
        fc: int = 0,
        image_size: int = 28,
        stem: str = "pool",
        pool_first: bool = False,
    ) -> None:
        super().__init__()
        if width < 1 or not depth or any(d < 1 for d in depth) or fc < 0:
            raise DeephashError(f"fmnist-cnn needs width >= 1, every depth >= 1 and fc >= 0, got {width}, {list(depth)}, {fc}")
        if stem not in ("pool", "space-to-depth"):
            raise DeephashError(f"fmnist-cnn: unknown stem {stem!r}; expected 'pool' or 'space-to-depth'")
        fold = stem == "space-to-depth"
        if fold and (len(depth) < 2 or image_size % 2):
            raise DeephashError(f"fmnist-cnn: the space-to-depth stem needs >= 2 stages and an even image size, "
                                f"got {len(depth)} stages and {image_size}")
        layers: list[nn.Module] = [nn.PixelUnshuffle(2)] if fold else []
        c_in = in_channels * 4 if fold else in_channels
        for stage, n_convs in enumerate(depth):
            c_out = width * 2**stage
            pooled = stage < len(depth) - 1 and not (fold and stage == 0)  # a max-pool ends the stage
            for i in range(n_convs):
                layers.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False))
                if pooled and pool_first and i == n_convs - 1:
                    layers.append(nn.MaxPool2d(2))
                layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
            if pooled and not pool_first:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.fc: nn.Module | None = None
        if fc:
            side = image_size // 2 ** (len(depth) - 1)
            if side < 1:
                raise DeephashError(f"fmnist-cnn: {len(depth)} stages pool a {image_size}x{image_size} image to nothing")
            self.pool: nn.Module = nn.Flatten()
            self.fc = nn.Sequential(nn.Linear(c_in * side * side, fc), nn.BatchNorm1d(fc), nn.ReLU(inplace=True))
            self.out_features = fc
            self.map_features = c_in * side * side
        else:
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.out_features = c_in
            self.map_features = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_map(x)[0]

    def forward_with_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The features (B, out_features) and, from the same pass, the last feature map pooled or
        flattened (B, map_features): what the fully connected layer reads (the features themselves
        without one)."""
        pooled = self.dropout(self.pool(self.features(x)))
        return (self.fc(pooled) if self.fc is not None else pooled), pooled


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN layers and a (projected) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet for 32x32 images: 3x3 stem, no max-pool, four stages of basic blocks.

    Args:
        in_channels: Image channels C.
        width: Channels of the first stage; stage s has ``width * 2**s``.
        blocks: Basic blocks per stage ((2, 2, 2, 2) is ResNet-18).

    Shapes:
        forward: float (B, C, H, W) -> float (B, width * 8).
    """

    def __init__(self, in_channels: int = 3, width: int = 64, blocks: Sequence[int] = (2, 2, 2, 2)) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, width))
        stages: list[nn.Module] = []
        c_in = width
        for stage, n_blocks in enumerate(blocks):
            c_out = width * 2**stage
            for b in range(n_blocks):
                stages.append(BasicBlock(c_in, c_out, stride=2 if (stage > 0 and b == 0) else 1))
                c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x))).flatten(1)


@register_backbone("seed-cnn")
def seed_cnn(in_channels: int = 1) -> SeedCNN:
    """The seed's EmbeddingNet trunk with its 256-unit layers (28x28 inputs; 256 features)."""
    return SeedCNN(in_channels)


@register_backbone("seed-embeddingnet")
def seed_embeddingnet(in_channels: int = 1, embedding_dim: int = 2) -> EmbeddingNet:
    """The seed's whole EmbeddingNet; its features are the embedding (out_features = embedding_dim)."""
    return EmbeddingNet(in_channels, embedding_dim)


register_backbone("fmnist-cnn")(FMnistCNN)  # the class is its own factory (see `FMnistCNN`)


@register_backbone("resnet18-cifar")
def resnet18_cifar(in_channels: int = 3, width: int = 64) -> ResNetCifar:
    """ResNet-18 for 32x32 images (features: 8 * width, 512 by default)."""
    return ResNetCifar(in_channels, width, (2, 2, 2, 2))


def import_timm(model_name: str) -> Any:
    """The timm package, or a one-line error naming the backbone that needs it."""
    try:
        import timm
    except ImportError as exc:
        raise DeephashError(f"backbone 'timm:{model_name}' needs the timm package; install it with `pip install timm`"
                            ) from exc
    return timm


def timm_backbone(model_name: str, in_channels: int = 3, pretrained: bool = False, **params: object) -> nn.Module:
    """A timm model as a feature extractor (``num_classes=0``).

    Args:
        model_name: A timm model name.
        in_channels: Image channels C.
        pretrained: Start from timm's own pretrained weights (its hub cache; downloaded where the
            machine can reach the hub).
        **params: Further keyword arguments of ``timm.create_model``.

    Raises:
        DeephashError: timm is not installed, or it could not make the model or its weights.
    """
    timm = import_timm(model_name)
    try:
        model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, in_chans=in_channels, **params)
    except (RuntimeError, OSError, ValueError, TypeError) as exc:  # unknown model or parameter, no weights, hub unreachable
        what = "pretrained " if pretrained else ""
        raise DeephashError(f"timm could not make the {what}model {model_name!r}: {first_line(exc)}") from None
    model.out_features = int(model.num_features)
    return model


def list_backbones() -> list[str]:
    """Registered backbone names, sorted (``timm:<model>`` names are not listed)."""
    return BACKBONES.names()


def create_backbone(name: str, in_channels: int = 1, **params: object) -> nn.Module:
    """Build the backbone registered as ``name``, or ``"timm:<model>"``.

    Args:
        name: A registered name, or ``"timm:<model>"``.
        in_channels: Image channels C.
        **params: Keyword parameters of that backbone's factory.

    Returns:
        A module mapping (B, C, H, W) to (B, out_features).

    Raises:
        ConfigError: unknown name or parameter.
    """
    if name.startswith("timm:"):
        return timm_backbone(name[len("timm:"):], in_channels=in_channels, **params)
    return BACKBONES.create(name, in_channels=in_channels, **params)
