"""The seed's pair and triplet selector classes, each a thin wrapper over a mining function.

Selectors take ``(embeddings float (B, D), labels int64 (B,))``, compute squared Euclidean
distances without gradients, and return int64 index tensors on the embeddings' device.

The seed's ``cpu`` flag (``HardNegativePairSelector(cpu=True)``, ``RandomNegativeTripletSelector(
margin, cpu=False)``, ...), which moved its numpy mining to the CPU, is accepted and ignored: mining
here runs on the embeddings' device either way.
"""

from __future__ import annotations

import torch

from deephash.distances import squared_euclidean
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


class PairSelector:
    """Chooses positive and negative pairs within a batch."""

    def get_pairs(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(positive_pairs int64 (P, 2), negative_pairs int64 (Q, 2))``, ``i < j``."""
        raise NotImplementedError


@SELECTORS.register("all-positive")
class AllPositivePairSelector(PairSelector):
    """Every same-label pair; as many random different-label pairs (all of them if not ``balance``).

    Args:
        balance: sample ``len(positives)`` negatives instead of taking all.
        generator: source of randomness for the sample; ``None`` uses torch's global one.
    """

    def __init__(self, balance: bool = True, generator: torch.Generator | None = None) -> None:
        self.balance = balance
        self.generator = generator

    def get_pairs(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = labels.to(embeddings.device)
        positives = _pairs.all_positive_pairs(labels)
        if not self.balance:
            return positives, _pairs.all_negative_pairs(labels)
        return positives, _pairs.random_negative_pairs(labels, len(positives), self.generator)


@SELECTORS.register("hard-negative")
class HardNegativePairSelector(PairSelector):
    """Every same-label pair; the ``len(positives)`` closest different-label pairs.

    Args:
        cpu: the seed's flag, ignored (see the module docstring).
    """

    def __init__(self, cpu: bool = True) -> None:
        self.cpu = cpu

    def get_pairs(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = labels.to(embeddings.device)
        with torch.no_grad():
            distances = squared_euclidean(embeddings.detach())
        positives = _pairs.all_positive_pairs(labels)
        return positives, _pairs.hardest_negative_pairs(distances, labels, len(positives))


class TripletSelector:
    """Chooses ``(anchor, positive, negative)`` triplets within a batch."""

    def get_triplets(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return int64 ``(N, 3)`` triplets on the embeddings' device."""
        raise NotImplementedError

    def _distances(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return squared_euclidean(embeddings.detach()), labels.to(embeddings.device)


@SELECTORS.register("all")
class AllTripletSelector(TripletSelector):
    """Every ``(a, p, n)`` with ``a < p`` of one label and ``n`` of another.

    ``OnlineTripletLoss`` never asks for this O(B^3) list: it sums the hinges with sorted
    distances and prefix sums instead.
    """

    def get_triplets(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _triplets.all_triplets(labels.to(embeddings.device))


@SELECTORS.register("hardest")
class HardestNegativeTripletSelector(TripletSelector):
    """Per pair ``a < p``, the negative with the largest ``d_ap - d_an + margin``, if > 0.

    Args:
        margin: hinge margin (squared distance units).
        cpu: the seed's flag, ignored (see the module docstring).
    """

    def __init__(self, margin: float, cpu: bool = False) -> None:
        self.margin = margin
        self.cpu = cpu

    def get_triplets(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _triplets.hardest_negative_triplets(*self._distances(embeddings, labels), self.margin)


@SELECTORS.register("random")
class RandomNegativeTripletSelector(TripletSelector):
    """Per pair ``a < p``, a uniformly random negative with ``d_ap - d_an + margin > 0``.

    Args:
        margin: hinge margin (squared distance units).
        generator: source of randomness; ``None`` uses torch's global one. A bool here is the
            seed's positional ``cpu`` flag and is ignored like ``cpu``.
        cpu: the seed's flag, ignored (see the module docstring).
    """

    def __init__(self, margin: float, generator: torch.Generator | bool | None = None, cpu: bool = False) -> None:
        self.margin = margin
        self.generator, self.cpu = _generator_or_seed_cpu_flag(generator, cpu)

    def get_triplets(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _triplets.random_negative_triplets(
            *self._distances(embeddings, labels), self.margin, self.generator
        )


@SELECTORS.register("semihard")
class SemihardNegativeTripletSelector(TripletSelector):
    """Per pair ``a < p``, a uniformly random negative with ``0 < d_ap - d_an + margin < margin``.

    Args:
        margin: hinge margin (squared distance units).
        generator: source of randomness; ``None`` uses torch's global one. A bool here is the
            seed's positional ``cpu`` flag and is ignored like ``cpu``.
        cpu: the seed's flag, ignored (see the module docstring).
    """

    def __init__(self, margin: float, generator: torch.Generator | bool | None = None, cpu: bool = False) -> None:
        self.margin = margin
        self.generator, self.cpu = _generator_or_seed_cpu_flag(generator, cpu)

    def get_triplets(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _triplets.semihard_negative_triplets(
            *self._distances(embeddings, labels), self.margin, self.generator
        )


@SELECTORS.register("batch-hard")
class BatchHardTripletSelector(TripletSelector):
    """Per anchor with a positive and a negative: its farthest positive and nearest negative."""

    def get_triplets(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _triplets.batch_hard_triplets(*self._distances(embeddings, labels))


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
