"""The seed's pair and triplet selector classes, each a thin wrapper over a mining function.

Selectors take ``(embeddings float (B, D), labels int64 (B,))``, compute squared Euclidean
distances without gradients, and return int64 index tensors on the embeddings' device.

The seed's ``cpu`` flag (``HardNegativePairSelector(cpu=True)``, ``RandomNegativeTripletSelector(
margin, cpu=False)``, ...), which moved its numpy mining to the CPU, is accepted and ignored: mining
here runs on the embeddings' device either way.

Given a memory as well (``memory`` float ``(M, D)``, ``memory_labels`` int64 ``(M,)``, e.g. the
queue of `deephash.losses.CrossBatchMemory`), they mine the rectangular case of
`deephash.mining.triplets`: anchors are the B batch rows, positives and negatives are columns of
batch ∪ memory, indexed ``0..B-1`` for the batch and ``B + slot`` for the memory. Every anchor
pairs with every other same-label column (so two batch items of a label give two pairs, one per
anchor, not only ``a < p``); no anchor is its own positive.
"""

from __future__ import annotations

import torch

from deephash.distances import squared_euclidean
from deephash.errors import DeephashError
from deephash.mining import pairs as _pairs
from deephash.mining import triplets as _triplets
from deephash.registry import Registry

#: The selectors a config or a loss can name.
SELECTORS: Registry[object] = Registry("selector")


def _generator_or_seed_cpu_flag(
    generator: torch.Generator | bool | None, cpu: bool
) -> tuple[torch.Generator | None, bool]:
    """``(generator, cpu)``: a bool passed where the generator goes is the seed's ``cpu`` flag."""
    if isinstance(generator, bool):
        return None, generator
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator, cpu


def memory_columns(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    memory: torch.Tensor | None,
    memory_labels: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Squared distances from the batch to batch ∪ memory, without gradients, and column labels.

    Args:
        embeddings: float ``(B, D)``; labels: int64 ``(B,)`` (on the embeddings' device).
        memory: float ``(M, D)`` or ``None``; memory_labels: int64 ``(M,)`` or ``None``.

    Returns:
        ``(distances, column_labels)``: float ``(B, B)`` and ``None`` without a memory, else float
        ``(B, B + M)`` (the batch block equal to the square matrix, diagonal 0) and int64 ``(B + M,)``.
    """
    with torch.no_grad():
        embeddings = embeddings.detach()
        if memory is None:
            return squared_euclidean(embeddings), None
        check_memory(embeddings, memory, memory_labels)
        distances = memory_squared_distances(embeddings, memory.detach().to(embeddings.dtype))
        return distances, torch.cat((labels, memory_labels.to(labels.device)))


def memory_squared_distances(embeddings: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances from the batch to batch ∪ memory, by the Gram trick, clamped at 0.

    One matrix product over the columns ``cat(embeddings, memory)``; gradients (if any) flow into
    ``embeddings`` through both the rows and the batch's columns, none into a detached memory.

    Args:
        embeddings: float ``(B, D)``.
        memory: float ``(M, D)``, same dtype.

    Returns:
        float ``(B, B + M)``; the batch block's diagonal is exactly 0.
    """
    columns = torch.cat((embeddings, memory))
    rows_sq = embeddings.pow(2).sum(1)
    distances = torch.addmm(columns.pow(2).sum(1)[None, :], embeddings, columns.T, alpha=-2)
    distances = distances.add_(rows_sq[:, None]).clamp_(min=0)
    distances.diagonal().zero_()
    return distances


def check_memory(embeddings: torch.Tensor, memory: torch.Tensor, memory_labels: torch.Tensor | None) -> None:
    """Raise ``DeephashError`` unless ``memory`` is ``(M, D)`` for ``(B, D)`` embeddings with ``(M,)`` labels."""
    if memory_labels is None:
        raise DeephashError("a memory needs its labels: pass memory_labels int64 (M,)")
    if memory.ndim != 2 or memory.shape[1] != embeddings.shape[1] or memory_labels.shape != memory.shape[:1]:
        raise DeephashError(
            f"memory must be (M, {embeddings.shape[1]}) with labels (M,), got {tuple(memory.shape)} "
            f"and {tuple(memory_labels.shape)}"
        )


def column_labels(embeddings: torch.Tensor, labels: torch.Tensor, memory: torch.Tensor | None,
                  memory_labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The row labels on the embeddings' device and the column labels of batch ∪ memory
    (None without a memory), for selectors that need labels only."""
    labels = labels.to(embeddings.device)
    if memory is None:
        return labels, None
    check_memory(embeddings, memory, memory_labels)
    return labels, torch.cat((labels, memory_labels.to(labels.device)))


class PairSelector:
    """Chooses positive and negative pairs within a batch (or from the batch to batch ∪ memory)."""

    def get_pairs(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        memory: torch.Tensor | None = None,
        memory_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(positive_pairs int64 (P, 2), negative_pairs int64 (Q, 2))``: ``i < j``, or
        ``(anchor, column)`` given a memory (see the module)."""
        raise NotImplementedError


@SELECTORS.register("all-positive")
class AllPositivePairSelector(PairSelector):
    """Every same-label pair; as many random different-label pairs (all of them if not ``balance``).

    With a memory: every ``(anchor, column)`` of one label, ``column != anchor``; the negatives a
    uniform sample (without replacement) of the ``(anchor, column)`` pairs of different labels.

    Args:
        balance: sample ``len(positives)`` negatives instead of taking all.
        generator: source of randomness for the sample; ``None`` uses torch's global one.
    """

    def __init__(self, balance: bool = True, generator: torch.Generator | None = None) -> None:
        self.balance = balance
        self.generator = generator

    def get_pairs(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        memory: torch.Tensor | None = None,
        memory_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        labels, columns = column_labels(embeddings, labels, memory, memory_labels)
        positives = _pairs.all_positive_pairs(labels, columns)
        if not self.balance:
            return positives, _pairs.all_negative_pairs(labels, columns)
        return positives, _pairs.random_negative_pairs(labels, len(positives), self.generator, columns)


@SELECTORS.register("hard-negative")
class HardNegativePairSelector(PairSelector):
    """Every same-label pair; the ``len(positives)`` closest different-label pairs.

    With a memory: every ``(anchor, column)`` of one label, ``column != anchor``, and the as many
    closest ``(anchor, column)`` pairs of different labels (an in-batch pair is one per anchor).

    Args:
        cpu: the seed's flag, ignored (see the module docstring).
    """

    def __init__(self, cpu: bool = True) -> None:
        self.cpu = cpu

    def get_pairs(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        memory: torch.Tensor | None = None,
        memory_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        labels = labels.to(embeddings.device)
        distances, columns = memory_columns(embeddings, labels, memory, memory_labels)
        positives = _pairs.all_positive_pairs(labels, columns)
        return positives, _pairs.hardest_negative_pairs(distances, labels, len(positives), columns)


class TripletSelector:
    """Chooses ``(anchor, positive, negative)`` triplets within a batch (or from a memory too)."""

    def get_triplets(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        memory: torch.Tensor | None = None,
        memory_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return int64 ``(N, 3)`` triplets on the embeddings' device; given a memory, positive
        and negative index columns of batch ∪ memory (see the module)."""
        distances, labels, columns = self._distances(embeddings, labels, memory, memory_labels)
        return self.select(distances, labels, columns)

    def select(self, distances: torch.Tensor, labels: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
        """The triplets of a squared-distance matrix ``(B, B)`` or ``(B, B + M)`` (no gradients),
        row labels ``(B,)`` and column labels (None: the rows'). A selector that mines from
        distances implements this; one that needs none overrides :meth:`get_triplets`."""
        raise NotImplementedError

    def _distances(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        memory: torch.Tensor | None = None,
        memory_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(distances (B, B) or (B, B + M), labels (B,), column_labels None or (B + M,))``."""
        labels = labels.to(embeddings.device)
        distances, columns = memory_columns(embeddings, labels, memory, memory_labels)
        return distances, labels, columns


@SELECTORS.register("all")
class AllTripletSelector(TripletSelector):
    """Every ``(a, p, n)`` with ``a < p`` of one label and ``n`` of another.

    With a memory: every batch anchor ``a``, column ``p != a`` of its label, column ``n`` of another.

    ``OnlineTripletLoss`` never asks for this O(B^3) list (O(B·(B+M)²) with a memory): it sums
    the hinges with sorted distances and prefix sums instead.
    """

    def get_triplets(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        memory: torch.Tensor | None = None,
        memory_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return _triplets.all_triplets(*column_labels(embeddings, labels, memory, memory_labels))


@SELECTORS.register("hardest")
class HardestNegativeTripletSelector(TripletSelector):
    """Per pair ``a < p``, the negative with the largest ``d_ap - d_an + margin``, if > 0.

    With a memory: per pair ``(a, p)``, ``p`` any other column of ``a``'s label, ``a``'s nearest
    negative column in batch ∪ memory, if the hinge is > 0.

    Args:
        margin: hinge margin (squared distance units).
        cpu: the seed's flag, ignored (see the module docstring).
    """

    def __init__(self, margin: float, cpu: bool = False) -> None:
        self.margin = margin
        self.cpu = cpu

    def select(self, distances: torch.Tensor, labels: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
        return _triplets.hardest_negative_triplets(distances, labels, self.margin, columns)


class _DrawingTripletSelector(TripletSelector):
    """A selector that draws one negative per pair at random, within a margin-defined range.

    Args:
        margin: hinge margin (squared distance units).
        generator: source of randomness; ``None`` uses torch's global one. A bool here is the
            seed's positional ``cpu`` flag and is ignored like ``cpu``.
        cpu: the seed's flag, ignored (see the module docstring).
    """

    def __init__(self, margin: float, generator: torch.Generator | bool | None = None, cpu: bool = False) -> None:
        self.margin = margin
        self.generator, self.cpu = _generator_or_seed_cpu_flag(generator, cpu)


@SELECTORS.register("random")
class RandomNegativeTripletSelector(_DrawingTripletSelector):
    """Per pair ``a < p``, a uniformly random negative with ``d_ap - d_an + margin > 0``.

    With a memory: per pair ``(a, p)``, ``p`` any other column of ``a``'s label, a uniform draw
    among ``a``'s negative columns in batch ∪ memory with that hinge > 0. Arguments: see
    :class:`_DrawingTripletSelector`.
    """

    def select(self, distances: torch.Tensor, labels: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
        return _triplets.random_negative_triplets(distances, labels, self.margin, self.generator, columns)


@SELECTORS.register("semihard")
class SemihardNegativeTripletSelector(_DrawingTripletSelector):
    """Per pair ``a < p``, a uniformly random negative with ``0 < d_ap - d_an + margin < margin``.

    With a memory: per pair ``(a, p)``, ``p`` any other column of ``a``'s label, a uniform draw
    among ``a``'s negative columns in batch ∪ memory in that range. Arguments: see
    :class:`_DrawingTripletSelector`.
    """

    def select(self, distances: torch.Tensor, labels: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
        return _triplets.semihard_negative_triplets(distances, labels, self.margin, self.generator, columns)


@SELECTORS.register("batch-hard")
class BatchHardTripletSelector(TripletSelector):
    """Per anchor with a positive and a negative: its farthest positive and nearest negative.

    With a memory: per batch anchor, the farthest other column of its label and the nearest column
    of another label, both over batch ∪ memory."""

    def select(self, distances: torch.Tensor, labels: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
        return _triplets.batch_hard_triplets(distances, labels, columns)


def create_selector(name: str, *, default_margin: float | None = None, generator: torch.Generator | None = None,
                    **params: object) -> PairSelector | TripletSelector:
    """Build a selector by name.

    Args:
        name: one of ``all``, ``hardest``, ``random``, ``semihard``, ``batch-hard`` (triplets),
            ``all-positive``, ``hard-negative`` (pairs).
        default_margin: the margin given when the selector takes one and ``params`` has none
            (a loss's margin).
        generator: given when the selector draws at random.
        **params: constructor arguments, e.g. ``margin=1.0``.

    Raises:
        ConfigError: unknown name, or parameters the selector does not take.
    """
    for key, value in (("margin", default_margin), ("generator", generator)):
        if value is not None and key not in params and SELECTORS.accepts(name, key):
            params[key] = value
    return SELECTORS.create(name, **params)
