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
    size = len(labels)
    counts = torch.unique(labels, return_counts=True)[1]
    total = (size * size - int(counts.pow(2).sum())) // 2
    if 4 * n > total:  # a large share of all pairs: permute the full list
        negatives = all_negative_pairs(labels)
        return negatives[randperm(len(negatives), labels.device, generator)[:n]]
    # A small share: draw flat indices of the B×B grid uniformly, keep distinct pairs i < j with
    # different labels (each kept draw is uniform over those pairs), repeat until n are distinct,
    # then take a uniform n-subset of them. By symmetry the result is a uniform n-subset.
    found = labels.new_empty(0)
    while len(found) < n:
        draws = 2 * (n - len(found)) * size * size // total + 64
        flat = randint(size * size, draws, labels.device, generator)
        i, j = flat // size, flat % size
        flat = flat[(i < j) & (labels[i] != labels[j])]
        found = torch.unique(torch.cat((found, flat)))
    flat = found[randperm(len(found), labels.device, generator)[:n]]
    return torch.stack((flat // size, flat % size), dim=1)


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
    n = min(n, flat.numel())
    if n == 0:
        return labels.new_empty((0, 2), dtype=torch.int64)
    index = _below_estimated_quantile(flat, n)
    values, top = torch.topk(flat[index], n, largest=False)
    index = index[top[values.isfinite()]]
    return torch.stack((index // size, index % size), dim=1)


def _below_estimated_quantile(flat: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of a subset of ``flat`` that surely holds its ``n`` smallest values.

    A full top-n over B² values is slow when n is large. The n/len quantile is estimated on an
    evenly strided subsample (no randomness), padded by a safety factor; when fewer than n values
    fall below it the threshold rises, ending with every index. The subset is exact, only its
    size depends on the estimate.
    """
    stride = max(1, len(flat) // 65536)
    sample = flat[::stride]
    for share in (1.5, 3.0):
        rank = min(len(sample) - 1, int(share * n / stride) + 16)
        threshold = torch.kthvalue(sample, rank + 1).values
        below = (flat <= threshold).nonzero().squeeze(1)
        if len(below) >= n:
            return below
    return torch.arange(len(flat), device=flat.device)


def randperm(n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """``torch.randperm(n)`` drawn from ``generator`` (on its own device), placed on ``device``."""
    if generator is None:
        return torch.randperm(n, device=device)
    return torch.randperm(n, generator=generator, device=generator.device).to(device)


def randint(high: int, n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """int64 ``(n,)`` uniform in ``[0, high)`` drawn from ``generator``, placed on ``device``."""
    if generator is None:
        return torch.randint(high, (n,), device=device)
    return torch.randint(high, (n,), generator=generator, device=generator.device).to(device)


def uniform(n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """float32 ``(n,)`` uniform in ``[0, 1)`` drawn from ``generator``, placed on ``device``."""
    if generator is None:
        return torch.rand(n, device=device)
    return torch.rand(n, generator=generator, device=generator.device).to(device)
