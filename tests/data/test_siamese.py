"""Pair and triplet wrappers: partners checked against the labels, fixed test sets, seed formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deephash.data import (
    ArrayDataset,
    SiameseDataset,
    SiameseMNIST,
    TripletCifar,
    TripletDataset,
    TripletMNIST,
)
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

    with pytest.raises(DeephashError, match=r"none of \.targets, \.labels"):
        SiameseDataset(NoLabels())


class BareOldMNIST:
    """torchvision's MNIST before 0.2.2 as the seed's wrappers read it: ``train_labels`` /
    ``train_data`` on the training split, ``test_labels`` / ``test_data`` on the test split, no
    ``targets``, ``labels`` or ``data``; uint8 images ``(N, H, W)`` whose pixel value is the index.
    This bare object has no ``__getitem__``: the wrappers read ``*_data`` and ``transform``."""

    def __init__(self, labels: np.ndarray, train: bool, transform=None) -> None:
        self.train, self.transform = train, transform
        self.prefix = "train" if train else "test"
        images = torch.arange(len(labels), dtype=torch.uint8)[:, None, None].expand(-1, 2, 3).contiguous()
        setattr(self, f"{self.prefix}_labels", torch.from_numpy(labels))
        setattr(self, f"{self.prefix}_data", images)


class OldMNIST(BareOldMNIST):
    """The same with torchvision's ``__getitem__`` (float ``(1, H, W)``, int label) and ``__len__``."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return getattr(self, f"{self.prefix}_data")[i][None].float() / 255, int(getattr(self, f"{self.prefix}_labels")[i])

    def __len__(self) -> int:
        return len(getattr(self, f"{self.prefix}_labels"))


def _check_partners(wrapper, labels: np.ndarray, kind: str) -> None:
    for i in range(len(labels)):
        images, target = wrapper[i]
        idx = [index_of(x) for x in images]
        assert idx[0] == i
        if kind == "pairs":
            assert target == int(labels[idx[0]] == labels[idx[1]])
        else:
            assert target == [] and labels[idx[1]] == labels[i] and labels[idx[2]] != labels[i]


@pytest.mark.parametrize("getitem", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_wrappers_read_the_old_torchvision_attributes(train, getitem):
    labels = np.random.default_rng(2).permutation(np.repeat(np.arange(3), 4))
    old = (OldMNIST if getitem else BareOldMNIST)(labels, train=train)
    assert not hasattr(old, "targets") and not hasattr(old, "labels") and not hasattr(old, "data")
    pairs, triplets = SiameseMNIST(old, seed=0), TripletMNIST(old, seed=0)
    assert pairs.train == train and len(pairs) == len(triplets) == len(labels)
    for _ in range(5 if train else 1):
        _check_partners(pairs, labels, "pairs")
        _check_partners(triplets, labels, "triplets")
    (x1, _), _ = pairs[0]
    assert x1.shape == (1, 2, 3) and x1.dtype == torch.float32


def test_wrapper_applies_the_datasets_transform_on_a_pillow_image_without_getitem():
    from PIL import Image

    labels = np.array([0, 0, 1, 1])
    seen = []

    def transform(image):
        seen.append(image)
        return torch.from_numpy(np.asarray(image, dtype=np.float32))[None] / 255

    old = BareOldMNIST(labels, train=False, transform=transform)
    (a, p, n), _ = TripletCifar(old, seed=0)[3]
    assert isinstance(seen[0], Image.Image) and seen[0].size == (3, 2)
    assert index_of(a) == 3 and labels[index_of(p)] == 1 and labels[index_of(n)] == 0


def test_wrappers_name_the_label_attributes_they_accept():
    class Unlabelled:
        train = True

        def __getitem__(self, i):
            return torch.zeros(1), 0

        def __len__(self):
            return 2

    with pytest.raises(DeephashError, match=r"none of \.targets, \.labels, \.train_labels, \.test_labels"):
        SiameseMNIST(Unlabelled())


def test_array_dataset_exposes_the_old_torchvision_names_for_the_seeds_sampler():
    from deephash import BalancedBatchSampler

    for train in (True, False):
        data = tiny(counts=(6, 6, 6), train=train)
        for name in ("train_labels", "test_labels"):
            assert getattr(data, name) is data.targets
        assert data.train_data is data.data and data.test_data is data.data
        sampler = BalancedBatchSampler(data.train_labels if train else data.test_labels, n_classes=3, n_samples=2,
                                       generator=torch.Generator().manual_seed(0))
        for batch in sampler:
            assert sorted(np.bincount(data.targets[batch].numpy(), minlength=3).tolist()) == [2, 2, 2]
