"""Balanced samplers checked by brute force over every batch; BatchLoader against direct indexing."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import torch

from deephash.data import (
    ArrayDataset,
    BalancedBatchSampler,
    BalancedBatchSamplerCifar,
    BatchLoader,
    DistributedBalancedBatchSampler,
    LabelledShareBatchSampler,
)
from deephash.errors import DeephashError


def make_labels(counts: list[int], seed: int = 0) -> np.ndarray:
    labels = np.concatenate([np.full(n, 10 * c + 3) for c, n in enumerate(counts)])  # non-contiguous class ids
    return np.random.default_rng(seed).permutation(labels)


def check_epoch(batches: list[list[int]], labels: np.ndarray, P: int, K: int) -> None:
    """Every batch: P distinct classes × K distinct items; per class, no item repeats within a pass."""
    assert len(batches) == len(labels) // (P * K)
    per_class: dict[int, list[int]] = {}
    for batch in batches:
        assert all(isinstance(i, int) for i in batch) and len(batch) == P * K == len(set(batch))
        counts = Counter(labels[i] for i in batch)
        assert len(counts) == P and set(counts.values()) == {K}
        for i in batch:
            per_class.setdefault(int(labels[i]), []).append(i)
    for c, drawn in per_class.items():
        n = int((labels == c).sum())
        per_pass = (n // K) * K
        for start in range(0, len(drawn), per_pass):
            chunk = drawn[start : start + per_pass]
            assert len(set(chunk)) == len(chunk)


@pytest.mark.parametrize("counts, P, K", [([5, 7, 3, 10], 2, 3), ([4] * 10, 10, 4), ([9, 2, 30, 6, 11], 3, 2), ([50, 50], 1, 7)])
def test_balanced_invariants(counts, P, K):
    labels = make_labels(counts)
    sampler = BalancedBatchSampler(torch.from_numpy(labels), P, K, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        check_epoch(list(sampler), labels, P, K)


def test_label_kinds_and_alias():
    labels = make_labels([6, 6, 6])
    batches = [list(BalancedBatchSamplerCifar(kind, 3, 2, torch.Generator().manual_seed(0)))
               for kind in (labels, labels.tolist(), torch.from_numpy(labels))]
    assert batches[0] == batches[1] == batches[2]
    assert BalancedBatchSamplerCifar is BalancedBatchSampler


def test_seeded_and_fresh_each_epoch():
    labels = make_labels([20] * 6)
    a = BalancedBatchSampler(labels, 3, 4, torch.Generator().manual_seed(7))
    b = BalancedBatchSampler(labels, 3, 4, torch.Generator().manual_seed(7))
    first, second = list(a), list(a)
    assert first == list(b) and first != second
    assert list(BalancedBatchSampler(labels, 3, 4)) != list(BalancedBatchSampler(labels, 3, 4))


def test_uniform_coverage():
    """Class choice uniform, items covered evenly: over many epochs counts stay near their mean."""
    labels = make_labels([12, 8, 20, 16])
    sampler = BalancedBatchSampler(labels, 2, 4, torch.Generator().manual_seed(3))
    classes, items = Counter(), Counter()
    for _ in range(300):
        for batch in sampler:
            classes.update(int(labels[i]) // 10 for i in batch)
            items.update(batch)
    expected = sum(classes.values()) / 4
    assert all(abs(v - expected) < 0.05 * expected for v in classes.values())
    for c, n in enumerate([12, 8, 20, 16]):
        members = np.flatnonzero(labels == 10 * c + 3)
        hits = np.array([items[int(i)] for i in members])
        assert hits.min() > 0.8 * hits.mean()


def test_errors_say_what_to_change():
    with pytest.raises(DeephashError, match="n_classes=4 exceeds the 3 classes"):
        BalancedBatchSampler([0, 0, 1, 1, 2, 2], 4, 1)
    with pytest.raises(ValueError, match="class 13 has 2 items, fewer than n_samples=3"):
        BalancedBatchSampler(make_labels([5, 2, 4]), 2, 3)
    with pytest.raises(DeephashError, match="1-D"):
        BalancedBatchSampler(np.zeros((3, 2)), 1, 1)


def test_distributed_ranks():
    labels = make_labels([16] * 8)
    W, P, K = 3, 2, 4
    ranks = [DistributedBalancedBatchSampler(labels, P, K, W, r, seed=5) for r in range(W)]
    epochs = [[list(s) for s in ranks]]
    for s in ranks:
        s.set_epoch(1)
    epochs.append([list(s) for s in ranks])
    assert epochs[0] != epochs[1]
    for per_rank in epochs:
        assert all(len(b) == len(labels) // (P * K * W) == len(ranks[0]) for b in per_rank)
        for rank_batches in per_rank:
            for batch in rank_batches:
                counts = Counter(labels[i] for i in batch)
                assert len(counts) == P and set(counts.values()) == {K}
        assert per_rank[0] != per_rank[1]
        for step in zip(*per_rank):  # one global step: disjoint items, one balanced global batch
            items = [i for batch in step for i in batch]
            assert len(set(items)) == len(items) == P * K * W
            counts = Counter(labels[i] for i in items)
            assert len(counts) == P and set(counts.values()) == {K * W}
    again = DistributedBalancedBatchSampler(labels, P, K, W, 1, seed=5)
    assert list(again) == epochs[0][1]
    with pytest.raises(DeephashError, match="rank"):
        DistributedBalancedBatchSampler(labels, P, K, 2, 2)


def test_batch_loader():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (30, 2, 4, 4), dtype=torch.uint8, generator=g)
    data = ArrayDataset(images, torch.arange(30) % 5)
    sampler = BalancedBatchSampler(data.targets, 5, 2, torch.Generator().manual_seed(0))
    loader = BatchLoader(data, sampler, "cpu", augment=lambda x: 1 - x)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    replay = list(BalancedBatchSampler(data.targets, 5, 2, torch.Generator().manual_seed(0)))
    for (x, y), idx in zip(batches, replay):
        assert x.dtype == torch.float32 and x.shape == (10, 2, 4, 4) and y.dtype == torch.int64
        assert torch.allclose(x, 1 - images[idx].float() / 255) and y.tolist() == [i % 5 for i in idx]
    seq = BatchLoader.sequential(data, 8)
    got = list(seq)
    assert len(seq) == 4 and [len(y) for _, y in got] == [8, 8, 8, 6]
    assert torch.equal(torch.cat([x for x, _ in got]), images.float() / 255)


def test_batch_loader_generic_dataset():
    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return torch.full((1, 2, 2), i / 10), i

    (x, y), = list(BatchLoader.sequential(Plain(), 5))
    assert x.shape == (5, 1, 2, 2) and y.tolist() == list(range(5)) and x[3, 0, 0, 0] == pytest.approx(0.3)


# ------------------------------------------------------------------------------ labelled share


def _partly_labelled(n: int, labelled_every: int, seed: int = 0) -> torch.Tensor:
    labels = torch.from_numpy(np.random.default_rng(seed).integers(0, 5, n))
    return torch.where(torch.arange(n) % labelled_every == 0, labels, -1)


@pytest.mark.parametrize("n, every, batch, share", [(300, 10, 20, 0.5), (301, 3, 16, 0.25), (97, 7, 10, 0.1)])
def test_labelled_share_batches(n, every, batch, share):
    labels = _partly_labelled(n, every)
    sampler = LabelledShareBatchSampler(labels, batch, share, generator=torch.Generator().manual_seed(1))
    L = min(max(round(share * batch), 1), batch - 1)
    labelled = sorted(torch.nonzero(labels >= 0).flatten().tolist())
    unlabelled = torch.nonzero(labels < 0).flatten().tolist()
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(unlabelled) // (batch - L)
    for b in batches:  # L labelled items first, then the unlabelled ones
        assert len(b) == batch
        assert (labels[b[:L]] >= 0).all() and (labels[b[L:]] < 0).all()
    drawn = [i for b in batches for i in b[L:]]
    assert len(drawn) == len(set(drawn)) == len(batches) * (batch - L)  # unlabelled: once an epoch at most
    handed = [i for b in batches for i in b[:L]]  # labelled: whole shuffled passes, one after another
    for start in range(0, len(handed), len(labelled)):
        chunk = handed[start:start + len(labelled)]
        assert len(chunk) == len(set(chunk))
        if len(chunk) == len(labelled):
            assert sorted(chunk) == labelled
    assert [i for b in sampler for i in b] != [i for b in batches for i in b]  # a fresh epoch draws again
    passes = [handed[s:s + len(labelled)] for s in range(0, len(handed) - len(labelled) + 1, len(labelled))]
    assert len(passes) < 2 or passes[0] != passes[1]  # each pass reshuffled


def test_labelled_share_is_seeded_and_ranks_split_one_epoch():
    labels = _partly_labelled(400, 4)
    one = list(LabelledShareBatchSampler(labels, 16, 0.5, generator=torch.Generator().manual_seed(5)))
    assert one == list(LabelledShareBatchSampler(labels, 16, 0.5, generator=torch.Generator().manual_seed(5)))
    ranks = [LabelledShareBatchSampler(labels, 16, 0.5, seed=9, rank=r, world=3) for r in range(3)]
    epochs = []
    for epoch in (0, 1):
        for sampler in ranks:
            sampler.set_epoch(epoch)
        per_rank = [list(s) for s in ranks]
        assert all(len(b) == len(ranks[0]) == 300 // (8 * 3) for b in per_rank)
        everything = [i for b in per_rank for batch in b for i in batch[8:]]
        assert len(everything) == len(set(everything))  # the ranks' unlabelled items are disjoint
        whole = LabelledShareBatchSampler(labels, 16, 0.5, seed=9 + epoch, world=1)  # the same draw as one process
        assert sorted(map(tuple, (b for r in per_rank for b in r))) == sorted(map(tuple, list(whole)[:len(ranks[0]) * 3]))
        epochs.append(per_rank)
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize("labels, batch, share, message", [
    (_partly_labelled(50, 5), 10, 0.0, "labelled_share must be in (0, 1)"),
    (_partly_labelled(50, 5), 10, 1.0, "labelled_share must be in (0, 1)"),
    (torch.arange(50) % 3, 10, 0.5, "needs labelled and unlabelled items; got 50 labelled and 0 unlabelled"),
    (torch.full((50,), -1), 10, 0.5, "got 0 labelled and 50 unlabelled"),
    (torch.cat([torch.zeros(10, dtype=torch.int64), torch.full((6,), -1)]), 16, 0.5,
     "6 unlabelled items fill no batch of 8"),
    (_partly_labelled(60, 20), 16, 0.5, "3 labelled items fill no batch's 8 labelled places"),
    (_partly_labelled(50, 5), 1, 0.5, "batches of at least 2 items, got 1"),
])
def test_labelled_share_errors_say_what_to_change(labels, batch, share, message):
    with pytest.raises(DeephashError, match=re.escape(message)):
        LabelledShareBatchSampler(labels, batch, share)


def test_first_batches_are_the_wrapped_samplers_first_batches_every_epoch():
    from deephash.data import FirstBatches
    from deephash.data.samplers import RandomBatchSampler

    wrapped = FirstBatches(RandomBatchSampler(100, 8, torch.Generator().manual_seed(5)), 3)
    oracle = RandomBatchSampler(100, 8, torch.Generator().manual_seed(5))
    seen = set()
    for _ in range(4):  # each epoch: a fresh permutation, its first 3 batches (what an unwrapped epoch starts with)
        epoch = list(wrapped)
        assert epoch == list(oracle)[:3] and len(wrapped) == 3
        items = [i for batch in epoch for i in batch]
        assert len(items) == len(set(items)) == 24  # without replacement within the epoch
        seen |= set(items)
    assert len(seen) > 24  # a new subset every epoch
    assert len(FirstBatches(RandomBatchSampler(20, 8, torch.Generator()), 10)) == 3  # never more than an epoch has
    with pytest.raises(DeephashError, match="steps_per_epoch"):
        FirstBatches(oracle, 0)
    from deephash.config import config_from_dict
    from deephash.errors import ConfigError

    with pytest.raises(ConfigError, match="train.steps_per_epoch must be 0 .* got -1"):
        config_from_dict({"train": {"steps_per_epoch": -1}})


def test_first_batches_pass_set_epoch_on_so_distributed_ranks_stay_disjoint():
    from deephash.data import FirstBatches

    labels = make_labels([40, 40, 40, 40])
    ranks = [FirstBatches(DistributedBalancedBatchSampler(labels, 2, 3, num_replicas=2, rank=r, seed=7), 2) for r in (0, 1)]
    full = [DistributedBalancedBatchSampler(labels, 2, 3, num_replicas=2, rank=r, seed=7) for r in (0, 1)]
    for epoch in (0, 3):
        for r in (0, 1):
            ranks[r].set_epoch(epoch)
            full[r].set_epoch(epoch)
        a, b = list(ranks[0]), list(ranks[1])
        assert a == list(full[0])[:2] and b == list(full[1])[:2]
        assert all(not set(x) & set(y) for x, y in zip(a, b))
    ranks[0].set_epoch(0)
    first = list(ranks[0])
    ranks[0].set_epoch(3)
    assert list(ranks[0]) != first
