"""Batch samplers: balanced (P classes × K samples, the seed's BalancedBatchSampler), random, and
labelled-share (a fixed share of labelled items in every batch, for training on a few labels
beside many unlabelled images), each in a single-process and a distributed (one rank's share)
form, chosen by name through :data:`BATCH_SAMPLERS`.

Balanced batches:
An epoch is ``len(labels) // (P*K)`` batches. Each batch picks P distinct classes uniformly at
random; each class hands out its items K at a time from a shuffled order, without replacement,
and is reshuffled when fewer than K unused items remain. One epoch is drawn at once with tensor
algebra (a random-key sort per class pass), not item by item.
"""

from __future__ import annotations

import itertools
from typing import Iterator, Sequence

import numpy as np
import torch

from deephash.errors import DeephashError
from deephash.registry import Registry

#: ``factory(labels, n_classes=, n_samples=, batch_size=, labelled_share=, generator=, seed=, rank=, world=)``:
#: the batch sampler of ``sampler.kind``; with ``world > 1`` the rank's disjoint share, seeded by ``seed + epoch``.
BATCH_SAMPLERS: Registry[torch.utils.data.Sampler] = Registry("sampler kind")


def _as_label_tensor(labels: torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu()
    tensor = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if tensor.ndim != 1 or tensor.is_floating_point() or tensor.is_complex():
        raise DeephashError(f"labels must be a 1-D sequence of integers, got {tensor.dtype} {tuple(tensor.shape)}")
    return tensor.to(torch.int64)


class _BalancedDraw:
    """Validated label bookkeeping shared by the single-process and distributed samplers."""

    def __init__(self, labels: torch.Tensor | np.ndarray | Sequence[int], n_classes: int, n_samples: int) -> None:
        labels = _as_label_tensor(labels)
        if n_classes < 1 or n_samples < 1:
            raise DeephashError(f"n_classes and n_samples must be positive, got {n_classes} and {n_samples}")
        self.classes, inverse, self.counts = torch.unique(labels, return_inverse=True, return_counts=True)
        if n_classes > len(self.classes):
            raise DeephashError(
                f"n_classes={n_classes} exceeds the {len(self.classes)} classes in the labels; lower n_classes"
            )
        small = torch.nonzero(self.counts < n_samples).flatten()
        if len(small):
            c = int(small[0])
            raise DeephashError(
                f"class {int(self.classes[c])} has {int(self.counts[c])} items, fewer than n_samples={n_samples}; "
                f"lower n_samples to at most {int(self.counts.min())} or drop that class"
            )
        self.n_classes, self.n_samples = n_classes, n_samples
        self.order = torch.argsort(inverse, stable=True)  # dataset indices grouped by class
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.blocks = self.counts // n_samples  # K-blocks per shuffled pass of each class
        self.n_items = len(labels)

    def draw(self, n_batches: int, generator: torch.Generator) -> torch.Tensor:
        """Draw ``n_batches`` balanced batches: int64 ``(n_batches, P*K)`` dataset indices."""
        P, K, C = self.n_classes, self.n_samples, len(self.classes)
        if n_batches == 0:
            return torch.empty(0, P * K, dtype=torch.int64)
        # P distinct classes per batch: the first P of a random permutation of the classes.
        chosen = torch.rand(n_batches, C, generator=generator).argsort(dim=1)[:, :P].reshape(-1)
        # occurrence number t of each chosen class within the epoch (its rank among equal classes)
        by_class = torch.argsort(chosen, stable=True)
        draws = torch.bincount(chosen, minlength=C)
        first = torch.cumsum(draws, 0) - draws
        occurrence = torch.empty_like(chosen)
        occurrence[by_class] = torch.arange(len(chosen)) - first[chosen[by_class]]
        # shuffled passes: pass r of class c is one group of that class's indices in random order
        passes = (draws + self.blocks - 1) // self.blocks
        group_class = torch.repeat_interleave(torch.arange(C), passes)
        group_first = torch.cumsum(passes, 0) - passes  # first group of each class
        sizes = self.counts[group_class]
        group_offset = torch.cumsum(sizes, 0) - sizes
        group_of_item = torch.repeat_interleave(torch.arange(len(group_class)), sizes)
        within = torch.arange(len(group_of_item)) - group_offset[group_of_item]
        members = self.order[self.starts[group_class][group_of_item] + within]
        keys = group_of_item.double() + torch.rand(len(group_of_item), generator=generator, dtype=torch.float64)
        shuffled = members[torch.argsort(keys)]
        # the t-th draw of class c takes block t % blocks of pass t // blocks
        blocks = self.blocks[chosen]
        group = group_first[chosen] + occurrence // blocks
        start = group_offset[group] + (occurrence % blocks) * K
        picks = shuffled[start[:, None] + torch.arange(K)]
        return picks.reshape(n_batches, P * K)


def _fresh_generator() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_()))


class BalancedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batch sampler yielding ``n_classes`` distinct classes × ``n_samples`` items per batch.

    Args:
        labels: integer labels ``(N,)``: a tensor, numpy array or list.
        n_classes: P, distinct classes per batch.
        n_samples: K, items per class per batch.
        generator: the ``torch.Generator`` to draw from (seed it for reproducible epochs); None
            seeds a private one from torch's global generator.

    Yields ``len(self) = N // (P*K)`` lists of P*K dataset indices per epoch, grouped by class;
    every epoch draws new batches.

    Raises:
        DeephashError (a ValueError): n_classes exceeds the number of classes, or a class has
            fewer than n_samples items.
    """

    def __init__(
        self,
        labels: torch.Tensor | np.ndarray | Sequence[int],
        n_classes: int,
        n_samples: int,
        generator: torch.Generator | None = None,
    ) -> None:
        self._draw = _BalancedDraw(labels, n_classes, n_samples)
        self.n_classes, self.n_samples = n_classes, n_samples
        self.batch_size = n_classes * n_samples
        self.generator = generator if generator is not None else _fresh_generator()

    def __len__(self) -> int:
        return self._draw.n_items // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._draw.draw(len(self), self.generator).tolist()


BalancedBatchSamplerCifar = BalancedBatchSampler


class DistributedBalancedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Balanced batches for one rank of a distributed job.

    Every rank draws the same global batches from one generator seeded with ``seed + epoch``: P
    classes × ``n_samples · num_replicas`` items each, the items of a class taken without
    repetition. Rank r keeps the r-th run of ``n_samples`` items of every class, so at each step
    the ranks hold disjoint items of the same P classes (together one balanced global batch, what
    global-batch mining sees) and agree on the epoch without communicating. Call
    :meth:`set_epoch` at the start of every epoch, as with ``DistributedSampler``.

    Args:
        labels: integer labels ``(N,)``.
        n_classes, n_samples: P and K as in :class:`BalancedBatchSampler`.
        num_replicas: world size. rank: this process's rank in ``[0, num_replicas)``.
        seed: base seed, identical on every rank.
    """

    def __init__(
        self,
        labels: torch.Tensor | np.ndarray | Sequence[int],
        n_classes: int,
        n_samples: int,
        num_replicas: int,
        rank: int,
        seed: int = 0,
    ) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise DeephashError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        self._draw = _BalancedDraw(labels, n_classes, n_samples * num_replicas)
        self.n_classes, self.n_samples = n_classes, n_samples
        self.batch_size = n_classes * n_samples
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose batches the next iteration yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self._draw.n_items // (self.batch_size * self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        P, K, W = self.n_classes, self.n_samples, self.num_replicas
        batches = self._draw.draw(len(self), generator).view(-1, P, W, K)  # grouped by class
        yield from batches[:, :, self.rank, :].reshape(-1, P * K).tolist()


class RandomBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Shuffled batches of ``batch_size`` indices from ``generator``; a last batch of < 2 is dropped."""

    def __init__(self, n_items: int, batch_size: int, generator: torch.Generator) -> None:
        self.n_items, self.batch_size, self.generator = n_items, batch_size, generator

    def __len__(self) -> int:
        full, rest = divmod(self.n_items, self.batch_size)
        return full + (rest >= 2)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n_items, generator=self.generator)
        for batch in order.split(self.batch_size)[: len(self)]:
            yield batch.tolist()


class DistributedRandomBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Shuffled full batches of ``batch_size`` for one rank: the random sampler of a DDP job.

    Every rank draws the same permutation from a generator seeded with ``seed + epoch``, cuts it
    into ``num_replicas × len(self)`` full batches (the rest of the epoch is dropped, so every rank
    has batches of one size) and keeps every ``num_replicas``-th, starting at its rank. Call
    :meth:`set_epoch` every epoch.
    """

    def __init__(self, n_items: int, batch_size: int, num_replicas: int, rank: int, seed: int = 0) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise DeephashError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        if batch_size < 1:
            raise DeephashError(f"batch_size must be positive, got {batch_size}")
        self.n_items, self.batch_size = n_items, batch_size
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose batches the next iteration yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_items // (self.batch_size * self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        n = len(self) * self.num_replicas
        order = torch.randperm(self.n_items, generator=generator)[: n * self.batch_size]
        yield from order.reshape(n, self.batch_size)[self.rank :: self.num_replicas].tolist()


class LabelledShareBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of ``batch_size`` with ``round(share · batch_size)`` labelled items (label ≥ 0) first
    and unlabelled items (label < 0) after them.

    An epoch passes once over the unlabelled items, without replacement (``n_unlabelled //
    (batch_size - L)`` batches; the rest is dropped), while the labelled items are handed out in
    shuffled passes, one after another, as often as the epoch needs them: with 10 % of the items
    labelled and half of every batch labelled, each labelled item comes about nine times per epoch.
    A batch in which one pass ends and the next begins may hold an item twice. The epoch is
    drawn at once (a random-key sort per pass). With ``world > 1`` every rank draws the same epoch
    from ``seed + epoch`` (call :meth:`set_epoch`) and takes every ``world``-th batch.

    Raises:
        DeephashError (a ValueError): ``share`` not in (0, 1), a batch of fewer than 2 items, no
            unlabelled item, fewer labelled items than one batch's labelled part, or fewer
            unlabelled items than one batch's unlabelled part.
    """

    def __init__(self, labels: torch.Tensor | np.ndarray | Sequence[int], batch_size: int, share: float,
                 generator: torch.Generator | None = None, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        if not 0 < share < 1:
            raise DeephashError(f"sampler.labelled_share must be in (0, 1), got {share}")
        if batch_size < 2:
            raise DeephashError(f"the labelled-share sampler needs batches of at least 2 items, got {batch_size}")
        if world < 1 or not 0 <= rank < world:
            raise DeephashError(f"rank must be in [0, world={world}), got {rank}")
        labels = _as_label_tensor(labels)
        self.labelled = torch.nonzero(labels >= 0).flatten()
        self.unlabelled = torch.nonzero(labels < 0).flatten()
        self.n_labelled = min(max(round(share * batch_size), 1), batch_size - 1)
        self.n_unlabelled = batch_size - self.n_labelled
        if len(self.labelled) == 0 or len(self.unlabelled) == 0:
            raise DeephashError(f"the labelled-share sampler needs labelled and unlabelled items; got "
                                f"{len(self.labelled)} labelled and {len(self.unlabelled)} unlabelled")
        if len(self.labelled) < self.n_labelled:
            raise DeephashError(f"{len(self.labelled)} labelled items fill no batch's {self.n_labelled} labelled "
                                "places; lower sampler.batch_size or sampler.labelled_share")
        if len(self.unlabelled) < self.n_unlabelled * world:
            raise DeephashError(f"{len(self.unlabelled)} unlabelled items fill no batch of {self.n_unlabelled} "
                                f"unlabelled items per rank; lower sampler.batch_size or raise sampler.labelled_share")
        self.generator, self.seed, self.rank, self.world, self.epoch = generator, seed, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose batches the next iteration yields (used when ``world > 1``)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.unlabelled) // (self.n_unlabelled * self.world)

    def __iter__(self) -> Iterator[list[int]]:
        if self.world > 1 or self.generator is None:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
        else:
            generator = self.generator
        n_batches = len(self) * self.world
        unlabelled = self.unlabelled[torch.randperm(len(self.unlabelled), generator=generator)]
        unlabelled = unlabelled[: n_batches * self.n_unlabelled].view(n_batches, self.n_unlabelled)
        need, n = n_batches * self.n_labelled, len(self.labelled)
        passes = -(-need // n)
        order = torch.rand(passes, n, generator=generator).argsort(dim=1)  # one shuffle per pass
        labelled = self.labelled[order].flatten()[:need].view(n_batches, self.n_labelled)
        batches = torch.cat([labelled, unlabelled], dim=1)[self.rank :: self.world]
        yield from batches.tolist()


class FirstBatches(torch.utils.data.Sampler[list[int]]):
    """The first ``n_batches`` batches of every epoch of another batch sampler (``train.steps_per_epoch``).

    A collection too big to pass over in one epoch trains on a fresh part of it every epoch: the
    random sampler's first batches are a new random subset without replacement each epoch, the
    balanced sampler's are new balanced batches. ``set_epoch`` is passed on, so DDP ranks stay in
    step (every rank takes the same number of batches of the same global draw).

    Raises:
        DeephashError (a ValueError): ``n_batches < 1``.
    """

    def __init__(self, batch_sampler: torch.utils.data.Sampler[list[int]], n_batches: int) -> None:
        if n_batches < 1:
            raise DeephashError(f"train.steps_per_epoch must be at least 1 (or 0 for whole epochs), got {n_batches}")
        self.batch_sampler, self.n_batches = batch_sampler, n_batches

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch of the wrapped sampler, where it has epochs."""
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return min(self.n_batches, len(self.batch_sampler))  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(self.batch_sampler, len(self))


@BATCH_SAMPLERS.register("balanced")
def _balanced(labels: torch.Tensor, n_classes: int, n_samples: int, batch_size: int, generator: torch.Generator,
              seed: int, rank: int = 0, world: int = 1, labelled_share: float = 0.5) -> torch.utils.data.Sampler:
    if world > 1:
        return DistributedBalancedBatchSampler(labels, n_classes, n_samples, world, rank, seed=seed)
    return BalancedBatchSampler(labels, n_classes, n_samples, generator=generator)


@BATCH_SAMPLERS.register("random")
def _random(labels: torch.Tensor, n_classes: int, n_samples: int, batch_size: int, generator: torch.Generator,
            seed: int, rank: int = 0, world: int = 1, labelled_share: float = 0.5) -> torch.utils.data.Sampler:
    if world > 1:
        return DistributedRandomBatchSampler(len(labels), batch_size, world, rank, seed=seed)
    return RandomBatchSampler(len(labels), batch_size, generator)


@BATCH_SAMPLERS.register("labelled-share")
def _labelled_share(labels: torch.Tensor, n_classes: int, n_samples: int, batch_size: int,
                    generator: torch.Generator, seed: int, rank: int = 0, world: int = 1,
                    labelled_share: float = 0.5) -> torch.utils.data.Sampler:
    return LabelledShareBatchSampler(labels, batch_size, labelled_share, generator=generator if world == 1 else None,
                                     seed=seed, rank=rank, world=world)
