"""The seed's networks: EmbeddingNet (28x28 images), its L2 variant and the seed's wrappers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EmbeddingNet", "EmbeddingNetL2", "ClassificationNet", "SiameseNet", "TripletNet"]


def seed_convnet(in_channels: int = 1) -> nn.Sequential:
    """The seed's convolutional trunk: (B, C, 28, 28) -> (B, 64, 4, 4)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 5),
        nn.PReLU(),
        nn.MaxPool2d(2, stride=2),
        nn.Conv2d(32, 64, 5),
        nn.PReLU(),
        nn.MaxPool2d(2, stride=2),
    )


class EmbeddingNet(nn.Module):
    """The seed's embedding network for 28x28 images.

    Args:
        in_channels: Image channels C.
        embedding_dim: Size D of the embedding.

    Shapes:
        forward: float (B, C, 28, 28) -> float (B, D).
    """

    def __init__(self, in_channels: int = 1, embedding_dim: int = 2) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.embedding_dim = embedding_dim
        self.out_features = embedding_dim
        self.convnet = seed_convnet(in_channels)
        self.fc = nn.Sequential(
            nn.Linear(64 * 4 * 4, 256),
            nn.PReLU(),
            nn.Linear(256, 256),
            nn.PReLU(),
            nn.Linear(256, embedding_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convnet(x).flatten(1))

    def get_embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)


class EmbeddingNetL2(EmbeddingNet):
    """EmbeddingNet whose output is divided by its L2 norm (a new tensor, never in place)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(super().forward(x), p=2.0, dim=1, eps=1e-12)


class ClassificationNet(nn.Module):
    """The seed's classifier: PReLU on the embedding, a linear layer and log-softmax.

    Args:
        embedding_net: Module mapping images to (B, D); must expose ``embedding_dim``
            or ``out_features``.
        n_classes: Number of classes K.

    Shapes:
        forward: images -> float (B, K) log-probabilities.
    """

    def __init__(self, embedding_net: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.embedding_net = embedding_net
        self.n_classes = n_classes
        dim = getattr(embedding_net, "embedding_dim", None) or embedding_net.out_features
        self.nonlinear = nn.PReLU()
        self.fc1 = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc1(self.nonlinear(self.embedding_net(x))), dim=-1)

    def get_embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.embedding_net(x))


class SiameseNet(nn.Module):
    """Applies one embedding network to two inputs: ``forward(x1, x2) -> (o1, o2)``."""

    def __init__(self, embedding_net: nn.Module) -> None:
        super().__init__()
        self.embedding_net = embedding_net

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embedding_net(x1), self.embedding_net(x2)

    def get_embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_net(x)


class TripletNet(nn.Module):
    """Applies one embedding network to three inputs: ``forward(a, p, n) -> (oa, op, on)``."""

    def __init__(self, embedding_net: nn.Module) -> None:
        super().__init__()
        self.embedding_net = embedding_net

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.embedding_net(x1), self.embedding_net(x2), self.embedding_net(x3)

    def get_embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_net(x)
