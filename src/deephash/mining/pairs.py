"""Pair mining: pure functions of labels (and a distance matrix), run without gradients.

Every function returns int64 index pairs ``(i, j)`` with ``i < j`` on the labels' device.
"""

from __future__ import annotations

import torch


def positive_mask(labels: torch.Tensor) -> torch.Tensor:
    """Same-label pairs ``i < j``.

    Args:
        labels: int64 ``(B,)``.

    Returns:
        bool ``(B, B)``, True at ``[i, j]`` where ``i < j`` and ``labels[i] == labels[j]``.
    """
    same = labels[:, None] == labels[None, :]
    return torch.triu(same, diagonal=1)


def negative_mask(labels: torch.Tensor) -> torch.Tensor:
    """Different-label pairs in both orders.

    Args:
        labels: int64 ``(B,)``.

    Returns:
        bool ``(B, B)``, True at ``[i, j]`` where ``labels[i] != labels[j]``.
    """
    return labels[:, None] != labels[None, :]


@torch.no_grad()
def all_positive_pairs(labels: torch.Tensor) -> torch.Tensor:
    """Every same-label pair ``i < j``, in row-major order.

    Args:
        labels: int64 ``(B,)``.

    Returns:
        int64 ``(P, 2)``.
    """
    return positive_mask(labels).nonzero()


@torch.no_grad()
def all_negative_pairs(labels: torch.Tensor) -> torch.Tensor:
    """Every different-label pair ``i < j``, in row-major order.

    Args:
        labels: int64 ``(B,)``.

    Returns:
        int64 ``(Q, 2)``.
    """
    return torch.triu(negative_mask(labels), diagonal=1).nonzero()


@torch.no_grad()
def random_negative_pairs(
    labels: torch.Tensor, n: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A uniformly random sample, without replacement, of ``n`` different-label pairs ``i < j``.

    Args:
        labels: int64 ``(B,)``.
        n: how many pairs to draw; all of them when there are fewer.
        generator: source of randomness (on any device); ``None`` uses torch's global one.

    Returns:
        int64 ``(min(n, Q), 2)``.
    """
    negatives = all_negative_pairs(labels)
    order = randperm(len(negatives), labels.device, generator)
    return negatives[order[:n]]


@torch.no_grad()
def hardest_negative_pairs(distances: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` different-label pairs ``i < j`` with the smallest distance.

    Args:
        distances: float ``(B, B)``, e.g. squared Euclidean.
        labels: int64 ``(B,)``.
        n: how many pairs; all of them when there are fewer.

    Returns:
        int64 ``(min(n, Q), 2)``, nearest first.
    """
    size = len(labels)
    candidates = torch.triu(negative_mask(labels), diagonal=1)
    flat = distances.masked_fill(~candidates, float("inf")).flatten()
    values, index = torch.topk(flat, min(n, flat.numel()), largest=False)
    index = index[values.isfinite()]
    return torch.stack((index // size, index % size), dim=1)


def randperm(n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """``torch.randperm(n)`` drawn from ``generator`` (on its own device), placed on ``device``."""
    if generator is None:
        return torch.randperm(n, device=device)
    return torch.randperm(n, generator=generator, device=generator.device).to(device)


def uniform(n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """float32 ``(n,)`` uniform in ``[0, 1)`` drawn from ``generator``, placed on ``device``."""
    if generator is None:
        return torch.rand(n, device=device)
    return torch.rand(n, generator=generator, device=generator.device).to(device)
