"""Online metric losses: mine pairs or triplets inside the batch, then average the seed's formulas.

Each loss also takes a memory (``memory`` float ``(M, D)``, ``memory_labels`` int64 ``(M,)``,
e.g. from `deephash.losses.CrossBatchMemory`): its selector then mines from the batch's anchors to
batch ∪ memory (see `deephash.mining.triplets`), and the loss reads distances from the batch rows
to the columns ``cat(embeddings, memory.detach())``, so gradients reach only the batch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from deephash.distances import squared_euclidean
from deephash.errors import DeephashError
from deephash.losses.metric import contrastive_from_squared, upcast_half
from deephash.losses.registry import register_loss
from deephash.mining.pairs import negative_mask, positive_mask
from deephash.mining.selectors import (
    AllTripletSelector,
    PairSelector,
    TripletSelector,
    check_memory,
    create_selector,
    memory_squared_distances,
)
from deephash.mining.triplets import count_below


class OnlineContrastiveLoss(nn.Module):
    """Contrastive loss over the pairs a ``PairSelector`` picks in the batch.

    Args:
        margin: Euclidean margin for different-class pairs.
        pair_selector: chooses positive (t = 1) and negative (t = 0) pairs.

    Attributes:
        num_selected: number of pairs used in the last call (int).
    """

    def __init__(self, margin: float, pair_selector: PairSelector) -> None:
        super().__init__()
        self.margin = margin
        self.pair_selector = pair_selector
        self.num_selected: int | torch.Tensor = 0

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        memory: torch.Tensor | None = None,
        memory_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``embeddings`` float ``(B, D)``, ``labels`` int64 ``(B,)`` → scalar mean over all pairs.

        With ``memory`` float ``(M, D)`` and ``memory_labels`` int64 ``(M,)``: over the pairs from
        the batch's anchors to batch ∪ memory (the memory gets no gradient)."""
        embeddings = upcast_half(embeddings)
        memory = _columns_memory(embeddings, memory, memory_labels)
        positives, negatives = self.pair_selector.get_pairs(embeddings, labels, *_selector_memory(memory, memory_labels))
        pairs = torch.cat((positives, negatives))
        self.num_selected = len(pairs)
        if len(pairs) == 0:
            return embeddings.sum() * 0
        target = torch.cat((positives.new_ones(len(positives)), negatives.new_zeros(len(negatives))))
        squared = pair_squared_distances(embeddings, pairs[:, 0], pairs[:, 1], memory)
        return contrastive_from_squared(squared, target, self.margin).mean()


class OnlineTripletLoss(nn.Module):
    """Triplet loss over the triplets a ``TripletSelector`` picks in the batch.

    With ``AllTripletSelector`` the O(B^3) triplets are never listed: see ``batch_all_triplet_loss``.

    Args:
        margin: margin in squared-distance units.
        triplet_selector: chooses ``(anchor, positive, negative)`` triplets.

    Attributes:
        num_selected: number of triplets used in the last call (int, or a 0-d int64 tensor for
            the all-triplets selector, which avoids a device sync).
    """

    def __init__(self, margin: float, triplet_selector: TripletSelector) -> None:
        super().__init__()
        self.margin = margin
        self.triplet_selector = triplet_selector
        self.num_selected: int | torch.Tensor = 0

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        memory: torch.Tensor | None = None,
        memory_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``embeddings`` float ``(B, D)``, ``labels`` int64 ``(B,)`` → scalar mean over triplets.

        With ``memory`` float ``(M, D)`` and ``memory_labels`` int64 ``(M,)``: over the triplets
        whose anchor is in the batch and positive and negative in batch ∪ memory (the memory gets
        no gradient)."""
        embeddings = upcast_half(embeddings)
        memory = _columns_memory(embeddings, memory, memory_labels)
        if isinstance(self.triplet_selector, AllTripletSelector):
            loss, self.num_selected = batch_all_triplet_loss(embeddings, labels, self.margin, memory, memory_labels)
            return loss
        triplets = self.triplet_selector.get_triplets(embeddings, labels, *_selector_memory(memory, memory_labels))
        self.num_selected = len(triplets)
        if len(triplets) == 0:
            return embeddings.sum() * 0
        anchor = triplets[:, 0]
        squared = pair_squared_distances(
            embeddings, torch.cat((anchor, anchor)), triplets[:, 1:].T.flatten(), memory
        )
        d_ap, d_an = squared.split(len(triplets))
        return F.relu(d_ap - d_an + self.margin).mean()


GRAM_PAIRS_PER_ENTRY = 64  # pairs read from the B×B matrix once N·this ≥ B² (bench/mining.py)


def pair_squared_distances(
    embeddings: torch.Tensor, first: torch.Tensor, second: torch.Tensor, memory: torch.Tensor | None = None
) -> torch.Tensor:
    """``|e[first[i]] − c[second[i]]|²`` for every i, with gradients: float ``(N,)``.

    ``c`` is ``embeddings``, or, given a memory, the columns ``cat(embeddings, memory)`` (so
    ``second`` may index memory slots as ``B + slot``; the memory gets no gradient).

    Many pairs among few rows (N ≥ B·C/64 for C columns, e.g. every positive pair of a large
    balanced batch) are read from the B×C distance matrix, one matrix product whose backward is
    two more; fewer pairs are computed from explicit differences, whose gathers and scatter-adds
    cost O(N·D). Both agree to float rounding; the matrix clamps at 0, so duplicate rows get a
    finite gradient either way.

    Args:
        embeddings: float ``(B, D)``.
        first: int64 ``(N,)`` row indices in ``[0, B)``.
        second: int64 ``(N,)`` column indices in ``[0, B)`` (or ``[0, B + M)``).
        memory: float ``(M, D)`` without gradient, or ``None``.
    """
    if memory is None:
        if len(first) * GRAM_PAIRS_PER_ENTRY >= len(embeddings) ** 2:
            return squared_euclidean(embeddings)[first, second]
        return (embeddings[first] - embeddings[second]).pow(2).sum(1)
    if len(first) * GRAM_PAIRS_PER_ENTRY >= len(embeddings) * (len(embeddings) + len(memory)):
        return memory_squared_distances(embeddings, memory)[first, second]
    columns = torch.cat((embeddings, memory))
    return (embeddings[first] - columns[second]).pow(2).sum(1)


def _columns_memory(
    embeddings: torch.Tensor, memory: torch.Tensor | None, memory_labels: torch.Tensor | None
) -> torch.Tensor | None:
    """The memory checked, detached, on the embeddings' device and dtype (or ``None``)."""
    if memory is None:
        if memory_labels is not None:
            raise DeephashError("memory_labels given without memory")
        return None
    check_memory(embeddings, memory, memory_labels)
    return memory.detach().to(embeddings.device, embeddings.dtype)


def _selector_memory(memory: torch.Tensor | None, memory_labels: torch.Tensor | None) -> tuple:
    """Extra positional arguments for a selector: none without a memory (so selectors written for
    the batch alone still work), else ``(memory, memory_labels)``."""
    return () if memory is None else (memory, memory_labels)


def batch_all_triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    margin: float,
    memory: torch.Tensor | None = None,
    memory_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``relu(d_ap − d_an + margin)`` over every ``a < p`` same-label, ``n`` other-label triplet.

    For each anchor the negative distances are sorted once; for a pair ``(a, p)`` with threshold
    ``t = d_ap + margin`` the ``k`` negatives below ``t`` (binary search) contribute
    ``k·t − (sum of the k smallest)``, read from a prefix sum. O(B² log B) time, O(B²) memory.

    With a memory: every batch anchor ``a``, column ``p != a`` of its label and column ``n`` of
    another in batch ∪ memory; O(B·C log C) time and O(B·C) memory for C = B + M columns.

    Args:
        embeddings: float ``(B, D)``.
        labels: int64 ``(B,)``.
        margin: margin in squared-distance units.
        memory: float ``(M, D)`` (no gradient) or ``None``.
        memory_labels: int64 ``(M,)`` or ``None``.

    Returns:
        ``(loss, count)``: scalar loss (exactly 0 with zero gradients when there is no triplet)
        and the number of triplets as a 0-d int64 tensor. Zero-loss triplets count.
    """
    labels = labels.to(embeddings.device)
    memory = _columns_memory(embeddings, memory, memory_labels)
    if memory is not None:
        return _memory_all_triplet_loss(embeddings, labels, margin, memory, memory_labels)
    distances = squared_euclidean(embeddings)
    positives, negatives = positive_mask(labels), negative_mask(labels)
    with torch.no_grad():
        padded, order = torch.sort(distances.masked_fill(~negatives, float("inf")), dim=1)
        thresholds = distances + margin
        count = torch.searchsorted(padded, thresholds, side="left")
    sorted_negatives = distances.gather(1, order).masked_fill(~negatives.gather(1, order), 0)
    prefix = F.pad(sorted_negatives.double().cumsum(dim=1), (1, 0))
    hinge_sums = count * (distances.double() + margin) - prefix.gather(1, count)
    total = (positives.sum(dim=1) * negatives.sum(dim=1)).sum()
    loss = hinge_sums.masked_fill(~positives, 0).sum() / total.clamp(min=1)
    return loss.to(embeddings.dtype), total


def _memory_all_triplet_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float, memory: torch.Tensor, memory_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_all_triplet_loss` over batch ∪ memory; only the P anchor-positive pairs are searched
    and summed (not all B·(B+M) entries), and no mask is needed after the sort: an anchor's count
    never reaches past its negatives (the ``inf`` tail)."""
    columns = torch.cat((labels, memory_labels.to(labels.device)))
    distances = memory_squared_distances(embeddings, memory)
    positives, negatives = positive_mask(labels, columns), negative_mask(labels, columns)
    with torch.no_grad():
        padded, order = torch.sort(distances.masked_fill(~negatives, float("inf")), dim=1)
        anchor, positive = positives.nonzero(as_tuple=True)
        count = count_below(padded, anchor, distances[anchor, positive] + margin, side="left")
        del padded
    prefix = distances.gather(1, order).double().cumsum(dim=1)
    below = torch.where(count > 0, prefix[anchor, (count - 1).clamp(min=0)], 0.0)
    hinge_sums = count * (distances[anchor, positive].double() + margin) - below
    total = (positives.sum(dim=1) * negatives.sum(dim=1)).sum()
    loss = hinge_sums.sum() / total.clamp(min=1)
    return loss.to(embeddings.dtype), total


def _resolve_selector(selector: str | object, margin: float, params: dict | None) -> object:
    """A selector object, built by name (passing ``margin`` when it takes one) if a string."""
    return create_selector(selector, default_margin=margin, **dict(params or {})) if isinstance(selector, str) else selector


@register_loss("online-contrastive")
def online_contrastive(
    margin: float = 1.0, selector: str | PairSelector = "all-positive", selector_params: dict | None = None
) -> OnlineContrastiveLoss:
    """``OnlineContrastiveLoss`` with a selector given by name (``all-positive``, ``hard-negative``) or object."""
    return OnlineContrastiveLoss(margin, _resolve_selector(selector, margin, selector_params))


@register_loss("online-triplet")
def online_triplet(
    margin: float = 1.0, selector: str | TripletSelector = "all", selector_params: dict | None = None
) -> OnlineTripletLoss:
    """``OnlineTripletLoss`` with a selector given by name (``all``, ``hardest``, ``random``,
    ``semihard``, ``batch-hard``) or object; ``margin`` is passed on to selectors that take one."""
    return OnlineTripletLoss(margin, _resolve_selector(selector, margin, selector_params))
