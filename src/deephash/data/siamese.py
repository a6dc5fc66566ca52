"""Pair and triplet wrappers over any labelled dataset (the seed's SiameseMNIST, TripletMNIST,
TripletCifar), for training SiameseNet / TripletNet with offline pairs or triplets.

The wrapped dataset yields ``(image, label)`` and exposes its labels as ``.targets`` (as
torchvision's data sets do), ``.labels``, or ``.train_labels`` / ``.test_labels`` (torchvision's
older MNIST and CIFAR API, which the seed's wrappers read; chosen by ``.train``). A dataset without
``__getitem__`` is read from ``.data`` / ``.train_data`` / ``.test_data`` and its ``.transform``, as
the seed's wrappers do. In train mode every access draws fresh partners from
a seeded numpy Generator kept on the wrapper (DataLoader workers each copy it: give each worker
its own seed through ``worker_init_fn`` when that matters). In test mode the partners are drawn
once, with the given seed, so evaluation sees the same pairs every time.

A class with a single item is its own positive (there is no other); every item needs another
class for its negative, so at least two classes are required.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from deephash.errors import DeephashError


def _split_attribute(dataset: Any, names: tuple[str, ...]) -> Any:
    """The first of ``names`` that ``dataset`` has (not None); the legacy ``train_*`` / ``test_*``
    pair is tried in the order that ``dataset.train`` makes likely."""
    legacy = [n for n in names if n.startswith(("train_", "test_"))]
    if not getattr(dataset, "train", True):
        legacy.reverse()
    for name in [n for n in names if n not in legacy] + legacy:
        value = getattr(dataset, name, None)
        if value is not None:
            return value
    return None


def dataset_labels(dataset: Any) -> np.ndarray:
    """A dataset's labels as int64 ``(N,)``: ``.targets``, ``.labels``, or the older torchvision
    API's ``.train_labels`` / ``.test_labels``.

    Raises:
        DeephashError: none of them, or not one integer per item.
    """
    labels = _split_attribute(dataset, ("targets", "labels", "train_labels", "test_labels"))
    if labels is None:
        raise DeephashError(
            f"{type(dataset).__name__} exposes none of .targets, .labels, .train_labels, .test_labels; pair wrappers need one"
        )
    labels = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    n = len(dataset) if hasattr(dataset, "__len__") else len(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != n:
        raise DeephashError(f"dataset labels must be {n} integers, got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


class _Images:
    """Item ``i``'s image: ``dataset[i][0]``, or for a dataset without ``__getitem__`` its raw
    ``.data`` / ``.train_data`` / ``.test_data`` row through ``.transform`` (on a Pillow image, as
    the seed does) or, without one, as float32 ``(C, H, W)`` in [0, 1]."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.raw = None
        if not hasattr(type(dataset), "__getitem__"):
            self.raw = _split_attribute(dataset, ("data", "train_data", "test_data"))
            if self.raw is None:
                raise DeephashError(f"{type(dataset).__name__} has no __getitem__ and no .data / .train_data / .test_data")
            self.transform = getattr(dataset, "transform", None)

    def __call__(self, index: int) -> Any:
        if self.raw is None:
            return self.dataset[index][0]
        image = self.raw[index]
        array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if self.transform is not None:
            from PIL import Image

            return self.transform(Image.fromarray(array))
        tensor = torch.as_tensor(array)
        tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)  # (H, W) or (H, W, C)
        return tensor.float().div(255) if tensor.dtype == torch.uint8 else tensor.float()


class _PartnerTable:
    """Labels grouped by class, and vectorised draws of same-class and other-class partners."""

    def __init__(self, dataset: Any) -> None:
        labels = dataset_labels(dataset)
        self.classes, self.label_index, self.counts = np.unique(labels, return_inverse=True, return_counts=True)
        if len(self.classes) < 2:
            raise DeephashError("pair and triplet wrappers need at least two classes (a negative must exist)")
        self.order = np.argsort(self.label_index, kind="stable")
        self.starts = np.cumsum(self.counts) - self.counts
        self.position = np.empty(len(labels), dtype=np.int64)
        self.position[self.order] = np.arange(len(labels)) - self.starts[self.label_index[self.order]]

    def positives(self, index: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A uniformly random other item of each index's class (the item itself if it is alone)."""
        c = self.label_index[index]
        n = self.counts[c]
        r = np.floor(rng.random(len(index)) * np.maximum(n - 1, 1)).astype(np.int64)
        r = np.where(n == 1, 0, r + (r >= self.position[index]))
        return self.order[self.starts[c] + r]

    def negatives(self, index: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A uniformly random class other than each index's, then a uniformly random item of it."""
        c = self.label_index[index]
        other = np.floor(rng.random(len(index)) * (len(self.classes) - 1)).astype(np.int64)
        other += other >= c
        r = np.floor(rng.random(len(index)) * self.counts[other]).astype(np.int64)
        return self.order[self.starts[other] + r]


class _PartnerDataset(torch.utils.data.Dataset):
    """What the pair and triplet wrappers share: the wrapped data set, its partner table and image
    reader, the train flag and the seeded generator of partner draws."""

    def __init__(self, dataset: Any, train: bool | None, seed: int) -> None:
        self.dataset = dataset
        self.train = bool(getattr(dataset, "train", True)) if train is None else train
        self.table = _PartnerTable(dataset)
        self.images = _Images(dataset)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.table.label_index)


class SiameseDataset(_PartnerDataset):
    """Pairs ``((x1, x2), target)``: target 1 when both images share a class, 0 otherwise.

    Args:
        dataset: yields ``(image, label)``; labels as in the module docstring.
        train: True draws a fresh partner (same class or not, with probability 1/2) at every access;
            False uses fixed pairs: even indices with a positive, odd indices with a negative (the
            seed's test protocol). None reads ``dataset.train`` (default True).
        seed: seeds the partner draws.
    """

    def __init__(self, dataset: Any, train: bool | None = None, seed: int = 0) -> None:
        super().__init__(dataset, train, seed)
        self.pairs: np.ndarray | None = None
        if not self.train:
            index = np.arange(len(self))
            same = index % 2 == 0
            partner = np.where(same, self.table.positives(index, self.rng), self.table.negatives(index, self.rng))
            self.pairs = np.stack([index, partner, same.astype(np.int64)], axis=1)  # (N, 3) i, j, target

    def __getitem__(self, index: int) -> tuple[tuple[Any, Any], int]:
        if self.pairs is not None:
            i, j, target = (int(v) for v in self.pairs[index])
        else:
            i, target = int(index), int(self.rng.integers(2))
            draw = self.table.positives if target else self.table.negatives
            j = int(draw(np.array([i]), self.rng)[0])
        return (self.images(i), self.images(j)), target


class TripletDataset(_PartnerDataset):
    """Triplets ``((anchor, positive, negative), [])``: the positive shares the anchor's class, the
    negative does not.

    Args:
        dataset: yields ``(image, label)``; labels as in the module docstring.
        train: True draws fresh partners at every access; False uses fixed seeded triplets, one per
            anchor. None reads ``dataset.train`` (default True).
        seed: seeds the partner draws.
    """

    def __init__(self, dataset: Any, train: bool | None = None, seed: int = 0) -> None:
        super().__init__(dataset, train, seed)
        self.triplets: np.ndarray | None = None
        if not self.train:
            index = np.arange(len(self))
            positives = self.table.positives(index, self.rng)
            self.triplets = np.stack([index, positives, self.table.negatives(index, self.rng)], axis=1)

    def __getitem__(self, index: int) -> tuple[tuple[Any, Any, Any], list]:
        if self.triplets is not None:
            a, p, n = (int(v) for v in self.triplets[index])
        else:
            a = int(index)
            anchor = np.array([a])
            p = int(self.table.positives(anchor, self.rng)[0])
            n = int(self.table.negatives(anchor, self.rng)[0])
        return (self.images(a), self.images(p), self.images(n)), []


SiameseMNIST = SiameseDataset
TripletMNIST = TripletDataset
TripletCifar = TripletDataset
