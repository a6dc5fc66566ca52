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
    candidates = _negative_candidates(labels, column_labels)
    # Every cell of the grid gets an independent uniform key (float64: ties are negligible), the
    # cells that are no negative pair get 2, and the n smallest keys are a uniform n-subset of the
    # negative pairs, in random order: one top-k on the device, no rejection loop; the only value
    # read back is the output's size (the mask of the pairs that exist).
    keys = uniform(candidates.numel(), labels.device, generator, torch.float64).masked_fill(~candidates.flatten(), 2.0)
    values, flat = torch.topk(keys, min(int(n), keys.numel()), largest=False)
    return _grid_pairs(flat[values < 2.0], candidates.shape[1])


def _negative_candidates(labels: torch.Tensor, column_labels: torch.Tensor | None) -> torch.Tensor:
    """bool grid of the negative pairs: ``(B, B)`` upper triangle, or ``(B, B + M)`` (see the module)."""
    if column_labels is not None:
        check_columns(labels, column_labels)
        return negative_mask(labels, column_labels)
    return torch.triu(negative_mask(labels), diagonal=1)


def _grid_pairs(flat: torch.Tensor, width: int) -> torch.Tensor:
    """int64 ``(P, 2)`` ``(row, column)`` of flat indices into a grid ``width`` columns wide."""
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
    candidates = _negative_candidates(labels, column_labels)
    flat = distances.masked_fill(~candidates, float("inf")).flatten()
    values, index = torch.topk(flat, min(int(n), flat.numel()), largest=False)
    return _grid_pairs(index[values.isfinite()], candidates.shape[1])


def uniform(n: int, device: torch.device, generator: torch.Generator | None,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(n,)`` uniform in ``[0, 1)`` of ``dtype`` drawn from ``generator``, placed on ``device``."""
    if generator is None:
        return torch.rand(n, device=device, dtype=dtype)
    return torch.rand(n, generator=generator, device=generator.device, dtype=dtype).to(device)
