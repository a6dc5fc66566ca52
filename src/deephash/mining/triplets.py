"""Triplet mining: pure functions of a distance matrix and labels, run without gradients.

Every function returns int64 triplets ``(anchor, positive, negative)`` ``(N, 3)`` on the labels'
device. The hinge value of a triplet is ``d_ap - d_an + margin``.

Square case (``column_labels=None``, distances ``(B, B)``): anchor-positive pairs are unordered
(``anchor < positive``) except in batch-hard mining, which picks one triplet per anchor.

Rectangular case (a cross-batch memory: ``distances`` ``(B, B + M)`` from the batch's anchors to
the batch followed by the memory, ``column_labels`` ``(B + M,)`` whose first B entries are the
batch's ``labels``): the anchor is a batch row, the positive and the negative are columns. Every
batch anchor is paired with every same-label column except itself (the batch block's diagonal),
so two batch items of one label form two anchor-positive pairs, one per anchor; each selector then
applies its per-pair (or per-anchor) rule over all the anchor's negative columns. Positive and
negative column indices ``>= B`` are memory slots ``index - B``.
"""

from __future__ import annotations

import torch

from deephash.mining.pairs import (
    all_positive_pairs,
    check_columns,
    negative_mask,
    positive_mask,
    uniform,
)


@torch.no_grad()
def all_triplets(labels: torch.Tensor, column_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Every ``(a, p, n)`` with ``a < p`` of one label and ``n`` of another (O(B^3) output).

    Rectangular case: every batch anchor ``a``, column ``p != a`` of its label, column ``n`` of
    another (O(B·(B+M)²) output: for small tests; ``OnlineTripletLoss`` never lists them).

    Args:
        labels: int64 ``(B,)``.
        column_labels: int64 ``(B + M,)`` for the rectangular case, or ``None``.

    Returns:
        int64 ``(N, 3)``, ordered by anchor, positive, negative.
    """
    if column_labels is not None:
        check_columns(labels, column_labels)
    pairs = all_positive_pairs(labels, column_labels)
    pair_index, negatives = negative_mask(labels, column_labels)[pairs[:, 0]].nonzero(as_tuple=True)
    return torch.cat((pairs[pair_index], negatives[:, None]), dim=1)


@torch.no_grad()
def sorted_negative_distances(
    distances: torch.Tensor, labels: torch.Tensor, column_labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each anchor's distances to its negatives, ascending, padded with ``inf``.

    Args:
        distances: float ``(B, B)`` (or ``(B, B + M)``).
        labels: int64 ``(B,)``.
        column_labels: int64 ``(B + M,)`` for the rectangular case, or ``None``.

    Returns:
        ``(values, order)``: float sorted rows with ``inf`` at non-negatives, and int64 column
        indices such that ``values = distances.gather(1, order)`` where finite; both of
        ``distances``' shape.
    """
    return torch.sort(distances.masked_fill(~negative_mask(labels, column_labels), float("inf")), dim=1)


@torch.no_grad()
def hardest_negative_triplets(
    distances: torch.Tensor,
    labels: torch.Tensor,
    margin: float,
    column_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """For each pair ``a < p``, the negative with the largest hinge value, kept where it is > 0.

    That negative is the anchor's nearest one (the first column among equals). Rectangular case:
    each anchor-positive pair ``(a, p)``, ``p`` any other column of ``a``'s label; its negative is
    ``a``'s nearest column of another label in batch ∪ memory.

    Args:
        distances: float ``(B, B)`` (or ``(B, B + M)``) squared distances.
        labels: int64 ``(B,)``.
        margin: hinge margin (distance units).
        column_labels: int64 ``(B + M,)`` for the rectangular case, or ``None``.

    Returns:
        int64 ``(N, 3)``, at most one per anchor-positive pair.
    """
    if column_labels is not None:
        check_columns(labels, column_labels, distances)
    nearest, negative = distances.masked_fill(~negative_mask(labels, column_labels), float("inf")).min(dim=1)
    keep = positive_mask(labels, column_labels) & (distances - nearest[:, None] + margin > 0)
    anchor, positive = keep.nonzero(as_tuple=True)
    return torch.stack((anchor, positive, negative[anchor]), dim=1)


@torch.no_grad()
def random_negative_triplets(
    distances: torch.Tensor,
    labels: torch.Tensor,
    margin: float,
    generator: torch.Generator | None = None,
    column_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """For each pair ``a < p``, one uniformly random negative with hinge value > 0.

    Rectangular case: for each ``(a, p)``, ``p`` any other column of ``a``'s label, a uniform
    draw among ``a``'s negative columns in batch ∪ memory with ``d_an < d_ap + margin``.

    Args:
        distances: float ``(B, B)`` (or ``(B, B + M)``) squared distances.
        labels: int64 ``(B,)``.
        margin: hinge margin (distance units).
        generator: source of randomness; ``None`` uses torch's global one.
        column_labels: int64 ``(B + M,)`` for the rectangular case, or ``None``.

    Returns:
        int64 ``(N, 3)``, one per anchor-positive pair that has such a negative.
    """
    values, order, anchor, positive, d_ap = _pairs_and_sorted_negatives(distances, labels, column_labels)
    end = count_below(values, anchor, d_ap + margin, side="left")
    return _sample_ranges(order, anchor, positive, torch.zeros_like(end), end, generator)


@torch.no_grad()
def semihard_negative_triplets(
    distances: torch.Tensor,
    labels: torch.Tensor,
    margin: float,
    generator: torch.Generator | None = None,
    column_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """For each pair ``a < p``, one uniformly random negative with ``0 < hinge < margin``.

    That is ``d_ap < d_an < d_ap + margin``: farther than the positive, yet inside the margin.
    Rectangular case: for each ``(a, p)``, ``p`` any other column of ``a``'s label, a uniform
    draw among ``a``'s negative columns in batch ∪ memory in that range.

    Args:
        distances: float ``(B, B)`` (or ``(B, B + M)``) squared distances.
        labels: int64 ``(B,)``.
        margin: hinge margin (distance units).
        generator: source of randomness; ``None`` uses torch's global one.
        column_labels: int64 ``(B + M,)`` for the rectangular case, or ``None``.

    Returns:
        int64 ``(N, 3)``, one per anchor-positive pair that has such a negative.
    """
    values, order, anchor, positive, d_ap = _pairs_and_sorted_negatives(distances, labels, column_labels)
    start = count_below(values, anchor, d_ap, side="right")
    end = count_below(values, anchor, d_ap + margin, side="left")
    return _sample_ranges(order, anchor, positive, start, end, generator)


@torch.no_grad()
def batch_hard_triplets(
    distances: torch.Tensor, labels: torch.Tensor, column_labels: torch.Tensor | None = None
) -> torch.Tensor:
    """For each anchor with a positive and a negative: its farthest positive and nearest negative.

    Ties go to the first column. Rectangular case: the farthest other column of the anchor's
    label and the nearest column of another label, both over batch ∪ memory.

    Args:
        distances: float ``(B, B)`` (or ``(B, B + M)``) squared distances.
        labels: int64 ``(B,)``.
        column_labels: int64 ``(B + M,)`` for the rectangular case, or ``None``.

    Returns:
        int64 ``(N, 3)``, one triplet per such anchor, in anchor order.
    """
    if column_labels is not None:
        check_columns(labels, column_labels, distances)
    same = labels[:, None] == (labels if column_labels is None else column_labels)[None, :]
    farthest, positive = torch.where(same, distances, -float("inf")).fill_diagonal_(-float("inf")).max(dim=1)
    nearest, negative = torch.where(same, float("inf"), distances).min(dim=1)
    anchor = ((farthest > -float("inf")) & (nearest < float("inf"))).nonzero().squeeze(1)
    return torch.stack((anchor, positive[anchor], negative[anchor]), dim=1)


def _pairs_and_sorted_negatives(distances: torch.Tensor, labels: torch.Tensor, column_labels: torch.Tensor | None
                                ) -> tuple[torch.Tensor, ...]:
    """What the drawing miners start from: each anchor's negatives sorted (values, column order)
    and every anchor-positive pair with its distance (``anchor``, ``positive``, ``d_ap``)."""
    if column_labels is not None:
        check_columns(labels, column_labels, distances)
    values, order = sorted_negative_distances(distances, labels, column_labels)
    return (values, order, *_pairs_with_distances(distances, labels, column_labels))


def _pairs_with_distances(
    distances: torch.Tensor, labels: torch.Tensor, column_labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every anchor-positive pair (see ``positive_mask``) as ``(anchor, positive, d_ap)``, each
    ``(P,)``, anchor-major."""
    anchor, positive = positive_mask(labels, column_labels).nonzero(as_tuple=True)
    return anchor, positive, distances[anchor, positive]


def count_below(values: torch.Tensor, anchor: torch.Tensor, queries: torch.Tensor, side: str) -> torch.Tensor:
    """``searchsorted(values[anchor[i]], queries[i], side)`` for every i, in one batched call.

    The P queries are laid out in a matrix of ``values``' shape, one row per anchor (an anchor has
    at most one pair per column), so that torch's batched searchsorted runs once and no size is
    read back to the host. ``anchor`` must be sorted (anchor-major pairs).

    Args:
        values: float ``(B, B)`` (or ``(B, B + M)``) rows sorted ascending.
        anchor: int64 ``(P,)`` sorted row of each query.
        queries: float ``(P,)``.
        side: ``"left"`` (count of values < q) or ``"right"`` (count of values <= q).

    Returns:
        int64 ``(P,)``.
    """
    if len(anchor) == 0:
        return anchor.clone()
    per_row = torch.bincount(anchor, minlength=len(values))
    first = torch.cumsum(per_row, 0) - per_row
    slot = torch.arange(len(anchor), device=anchor.device) - first[anchor]
    grid = queries.new_zeros(values.shape)  # a row holds at most one query per column: no host sync for the width
    grid[anchor, slot] = queries
    return torch.searchsorted(values, grid, side=side)[anchor, slot]


def _sample_ranges(
    order: torch.Tensor,
    anchor: torch.Tensor,
    positive: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """For each pair with ``start < end``, a uniform column of ``order[anchor, start:end]``.

    Args:
        order: int64 ``(B, B)`` (or ``(B, B + M)``) each anchor's negative columns, nearest first.
        anchor, positive: int64 ``(P,)`` the pairs.
        start, end: int64 ``(P,)`` half-open ranges into ``order[anchor]``.
        generator: source of randomness, or ``None``.
    """
    keep = end > start
    anchor, positive, low, count = anchor[keep], positive[keep], start[keep], (end - start)[keep]
    offset = (uniform(len(anchor), order.device, generator) * count).long()
    column = low + torch.minimum(offset, count - 1)
    return torch.stack((anchor, positive, order[anchor, column]), dim=1)
