"""Pair mining: pure functions of labels (and a distance matrix), run without gradients.

Square case (``column_labels=None``): the batch against itself; every function returns int64
index pairs ``(i, j)`` with ``i < j`` on the labels' device.

Rectangular case (``column_labels`` given, for a cross-batch memory): rows are the B anchors of
the batch, columns are the batch followed by the memory, ``column_labels`` int64 ``(B + M,)``
whose first B entries are ``labels``. A pair is ``(anchor row, column)``: every batch anchor is
paired with every other item of batch ∪ memory, so two batch items form a pair in both orders
(each is an anchor), as in pytorch-metric-learning's ``CrossBatchMemory``; an anchor is never
paired with itself (the diagonal of the batch block). With M = 0 this is *not* the square case
(which keeps ``i < j`` only).
"""

from __future__ import annotations

import torch

from deephash.errors import DeephashError


def positive_mask(labels: torch.Tensor, column_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Same-label pairs ``i < j`` (square), or ``(anchor, column)`` with ``column != anchor``.

    Args:
        labels: int64 ``(B,)``.
        column_labels: int64 ``(B + M,)`` batch then memory (rectangular case), or ``None``.

    Returns:
        bool ``(B, B)``, True at ``[i, j]`` where ``i < j`` and ``labels[i] == labels[j]``; or bool
        ``(B, B + M)``, True where the labels agree, except on the diagonal.
    """
    if column_labels is not None:
        same = labels[:, None] == column_labels[None, :]
        same.diagonal().fill_(False)
        return same
    same = labels[:, None] == labels[None, :]
    return torch.triu(same, diagonal=1)


def negative_mask(labels: torch.Tensor, column_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Different-label pairs in both orders.

    Args:
        labels: int64 ``(B,)``.
        column_labels: int64 ``(B + M,)`` batch then memory (rectangular case), or ``None``.

    Returns:
        bool ``(B, B)`` (or ``(B, B + M)``), True at ``[i, j]`` where the labels differ.
    """
    if column_labels is not None:
        return labels[:, None] != column_labels[None, :]
    return labels[:, None] != labels[None, :]


def check_columns(labels: torch.Tensor, column_labels: torch.Tensor, distances: torch.Tensor | None = None) -> None:
    """Raise ``DeephashError`` unless the rectangular case's shapes fit: ``column_labels`` ``(B + M,)``
    starting with the B ``labels``, ``distances`` ``(B, B + M)``. Shapes only: no device sync."""
    size, columns = len(labels), len(column_labels)
    if columns < size:
        raise DeephashError(f"column_labels has {columns} entries, fewer than the {size} anchors (batch first)")
    if distances is not None and tuple(distances.shape) != (size, columns):
        raise DeephashError(f"distances must be ({size}, {columns}) for {size} anchors, got {tuple(distances.shape)}")


@torch.no_grad()
def all_positive_pairs(labels: torch.Tensor, column_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Every same-label pair ``i < j`` (or ``(anchor, column)``, see the module), row-major.

    Args:
        labels: int64 ``(B,)``.
        column_labels: int64 ``(B + M,)`` for the rectangular case, or ``None``.

    Returns:
        int64 ``(P, 2)``.
    """
    return positive_mask(labels, column_labels).nonzero()


@torch.no_grad()
def all_negative_pairs(labels: torch.Tensor, column_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Every different-label pair ``i < j`` (or ``(anchor, column)``, see the module), row-major.

    Args:
        labels: int64 ``(B,)``.
        column_labels: int64 ``(B + M,)`` for the rectangular case, or ``None``.

    Returns:
        int64 ``(Q, 2)``.
    """
    if column_labels is not None:
        return negative_mask(labels, column_labels).nonzero()
    return torch.triu(negative_mask(labels), diagonal=1).nonzero()


@torch.no_grad()
def random_negative_pairs(
    labels: torch.Tensor,
    n: int,
    generator: torch.Generator | None = None,
    column_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """A uniformly random sample, without replacement, of ``n`` different-label pairs ``i < j``
    (or ``(anchor, column)`` pairs, see the module).

    Args:
        labels: int64 ``(B,)``.
        n: how many pairs to draw; all of them when there are fewer.
        generator: source of randomness (on any device); ``None`` uses torch's global one.
        column_labels: int64 ``(B + M,)`` for the rectangular case, or ``None``.

    Returns:
        int64 ``(min(n, Q), 2)``.
    """
    if column_labels is not None:
        return _random_negative_columns(labels, column_labels, n, generator)
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


def _random_negative_columns(
    labels: torch.Tensor, column_labels: torch.Tensor, n: int, generator: torch.Generator | None
) -> torch.Tensor:
    """``random_negative_pairs`` in the rectangular case: the same two regimes on the B×(B+M) grid."""
    check_columns(labels, column_labels)
    rows, width = len(labels), len(column_labels)
    total = int(negative_mask(labels, column_labels).sum())
    if 4 * n > total:
        negatives = all_negative_pairs(labels, column_labels)
        return negatives[randperm(len(negatives), labels.device, generator)[:n]]
    found = labels.new_empty(0)
    while len(found) < n:
        draws = 2 * (n - len(found)) * rows * width // total + 64
        flat = randint(rows * width, draws, labels.device, generator)
        flat = flat[labels[flat // width] != column_labels[flat % width]]
        found = torch.unique(torch.cat((found, flat)))
    flat = found[randperm(len(found), labels.device, generator)[:n]]
    return torch.stack((flat // width, flat % width), dim=1)


@torch.no_grad()
def hardest_negative_pairs(
    distances: torch.Tensor, labels: torch.Tensor, n: int, column_labels: torch.Tensor | None = None
) -> torch.Tensor:
    """The ``n`` different-label pairs ``i < j`` (or ``(anchor, column)``) with the smallest distance.

    In the rectangular case two batch items at distance d are two pairs (one per anchor), so the
    closest in-batch negatives may fill two of the ``n`` places.

    Args:
        distances: float ``(B, B)`` (or ``(B, B + M)``), e.g. squared Euclidean.
        labels: int64 ``(B,)``.
        n: how many pairs; all of them when there are fewer.
        column_labels: int64 ``(B + M,)`` for the rectangular case, or ``None``.

    Returns:
        int64 ``(min(n, Q), 2)``, nearest first.
    """
    if column_labels is not None:
        check_columns(labels, column_labels, distances)
        candidates = negative_mask(labels, column_labels)
    else:
        candidates = torch.triu(negative_mask(labels), diagonal=1)
    width = candidates.shape[1]
    flat = distances.masked_fill(~candidates, float("inf")).flatten()
    n = min(n, flat.numel())
    if n == 0:
        return labels.new_empty((0, 2), dtype=torch.int64)
    index = _below_estimated_quantile(flat, n)
    values, top = torch.topk(flat[index], n, largest=False)
    index = index[top[values.isfinite()]]
    return torch.stack((index // width, index % width), dim=1)


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
