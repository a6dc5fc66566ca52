"""Input normalisation and the heads that turn backbone features into embeddings or hash codes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deephash.errors import DeephashError
from deephash.registry import Registry
from deephash.signs import sign

__all__ = ["HEADS", "Normalize", "HashHead", "EmbeddingHead", "IdentityHead", "ClassifierHead", "sign_codes"]

#: Heads by the ``model.head`` name: ``factory(in_features=F, spec=ModelSpec)``.
HEADS: Registry[nn.Module] = Registry("head")


def sign_codes(x: torch.Tensor) -> torch.Tensor:
    """Sign with 0 mapped to +1 (:func:`deephash.signs.sign`): tensor of x's shape in {-1, +1}."""
    return sign(x)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` on (B, C, H, W) images; mean and std are buffers.

    Args:
        mean: C values (or one value for every channel).
        std: C positive values (or one value).
    """

    def __init__(self, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)) -> None:
        super().__init__()
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32)
        std_t = torch.as_tensor(list(std), dtype=torch.float32)
        if mean_t.ndim != 1 or std_t.ndim != 1 or len(mean_t) == 0 or len(std_t) != len(mean_t):
            raise DeephashError(f"Normalize needs mean and std of the same length, got {list(mean)} and {list(std)}")
        if not bool((std_t > 0).all()):
            raise DeephashError(f"Normalize needs every std > 0, got {list(std)}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class HashHead(nn.Module):
    """Linear layer to ``bits`` outputs: tanh while training, sign (0 ↦ +1) in eval mode.

    Args:
        in_features: Feature size F.
        bits: Code length, any integer >= 8.

    Attributes:
        scale: β of the relaxed codes ``tanh(β·a)`` (1; raised during training by
            ``deephash.train.TanhContinuation``); the sign does not depend on it.

    Shapes:
        forward: float (B, F) -> float (B, bits), in (-1, 1) (train) or {-1, +1} (eval).
    """

    def __init__(self, in_features: int, bits: int) -> None:
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or bits < 8:
            raise DeephashError(f"hash codes need an integer number of bits >= 8, got {bits!r}")
        self.bits = bits
        self.scale = 1.0
        self.linear = nn.Linear(in_features, bits)

    def relaxed(self, x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """tanh codes ``tanh(scale · a)`` in (-1, 1), whatever the mode, at ``scale`` (default: the
        head's own): float (B, bits)."""
        a = self.linear(x)
        scale = self.scale if scale is None else scale
        return torch.tanh(a if scale == 1.0 else scale * a)

    def binary(self, x: torch.Tensor) -> torch.Tensor:
        """±1 codes (0 ↦ +1), whatever the mode: float (B, bits)."""
        return sign_codes(self.linear(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relaxed(x) if self.training else self.binary(x)


class EmbeddingHead(nn.Module):
    """Linear layer to a ``dim``-dimensional embedding, optionally L2-normalised.

    Shapes:
        forward: float (B, F) -> float (B, dim).
    """

    def __init__(self, in_features: int, dim: int, normalize: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.normalize = normalize
        self.linear = nn.Linear(in_features, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return F.normalize(out, dim=1) if self.normalize else out


class IdentityHead(nn.Module):
    """Passes the backbone's (B, dim) features through unchanged (for the seed's EmbeddingNet)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ClassifierHead(nn.Module):
    """Linear layer to class logits: float (B, F) -> float (B, n_classes)."""

    def __init__(self, in_features: int, n_classes: int) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.linear = nn.Linear(in_features, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@HEADS.register("hash")
def _hash_head(in_features: int, spec: object) -> HashHead:
    return HashHead(in_features, spec.bits)


@HEADS.register("embedding")
def _embedding_head(in_features: int, spec: object) -> EmbeddingHead:
    return EmbeddingHead(in_features, spec.embedding_dim, normalize=bool(spec.normalize))


@HEADS.register("identity")
def _identity_head(in_features: int, spec: object) -> IdentityHead:
    return IdentityHead(in_features)
