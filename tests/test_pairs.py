"""Pair and triplet wrappers: partners checked against the labels, fixed test sets, seed formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deephash.data import ArrayDataset, SiameseDataset, SiameseMNIST, TripletCifar, TripletDataset, TripletMNIST
from deephash.errors import DeephashError


def tiny(counts=(4, 3, 5, 1), train=True) -> ArrayDataset:
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    labels = np.random.default_rng(0).permutation(labels)
    images = torch.arange(len(labels), dtype=torch.uint8).reshape(-1, 1, 1, 1)  # pixel value = index
    return ArrayDataset(images, torch.from_numpy(labels), train=train)


def index_of(x: torch.Tensor) -> int:
    return round(float(x.flatten()[0]) * 255)


def test_siamese_train_pairs_follow_labels():
    data = tiny()
    pairs = SiameseMNIST(data, seed=1)
    assert pairs.train and len(pairs) == len(data)
    targets = []
    for _ in range(20):
        for i in range(len(data)):
            (x1, x2), target = pairs[i]
            a, b = index_of(x1), index_of(x2)
            assert a == i and isinstance(target, int)
            same = int(data.targets[a] == data.targets[b])
            assert target == same
            if target and (data.targets == data.targets[a]).sum() > 1:
                assert b != a
            targets.append(target)
    assert 0.35 < np.mean(targets) < 0.65


def test_siamese_test_pairs_fixed_and_seeded():
    data = tiny(train=False)
    pairs = SiameseDataset(data, seed=3)
    assert not pairs.train
    first = [(index_of(pairs[i][0][1]), pairs[i][1]) for i in range(len(data))]
    assert first == [(index_of(pairs[i][0][1]), pairs[i][1]) for i in range(len(data))]
    assert [t for _, t in first] == [1 - i % 2 for i in range(len(data))]  # even positive, odd negative
    for i, (j, t) in enumerate(first):
        assert t == int(data.targets[i] == data.targets[j])
    other = SiameseDataset(data, seed=4)
    assert first != [(index_of(other[i][0][1]), other[i][1]) for i in range(len(data))]
    assert SiameseDataset(data, train=True, seed=3).train


def test_triplets_train_and_test():
    for train in (True, False):
        data = tiny(train=train)
        triplets = TripletMNIST(data, seed=0)
        assert triplets.train == train
        for _ in range(10 if train else 1):
            for i in range(len(data)):
                (a, p, n), empty = triplets[i]
                a, p, n = index_of(a), index_of(p), index_of(n)
                assert empty == [] and a == i
                assert data.targets[p] == data.targets[a] != data.targets[n]
                singleton = int((data.targets == data.targets[a]).sum()) == 1
                assert (p == a) == singleton  # a class of one item is its own positive
    fixed = TripletDataset(tiny(train=False), seed=2)
    assert [fixed[i][0][2].item() for i in range(5)] == [fixed[i][0][2].item() for i in range(5)]
    assert TripletCifar is TripletDataset


def test_negatives_cover_other_classes():
    data = tiny((30, 30, 30))
    triplets = TripletDataset(data, seed=0)
    seen = set()
    for _ in range(60):
        (_, _, n), _ = triplets[0]
        seen.add(int(data.targets[index_of(n)]))
    assert seen == {0, 1, 2} - {int(data.targets[0])}


def test_labels_attribute_and_errors():
    class WithLabels(torch.utils.data.Dataset):
        labels = [0, 1, 0, 1]

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.tensor([float(i)]), self.labels[i]

    pairs = SiameseDataset(WithLabels(), train=False)  # no .train attribute: explicit mode
    (x1, x2), t = pairs[0]
    assert t == 1 and int(x2) == 2
    with pytest.raises(DeephashError, match="two classes"):
        TripletDataset(tiny((3,)))

    class NoLabels(WithLabels):
        labels = None

    with pytest.raises(DeephashError, match="neither .targets nor .labels"):
        SiameseDataset(NoLabels())
