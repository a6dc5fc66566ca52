"""Split protocols: which pooled images are queries, training images and database.

A protocol pools a data set's own train and test images and draws, seeded, the three index lists
``query``, ``train`` and ``database`` (DeepHash-pytorch's way of evaluating CIFAR-10). Without a
protocol a run uses the data set's own splits.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from deephash.registry import Registry

__all__ = ["PROTOCOL_SPLITS", "SPLIT_PROTOCOLS", "protocol_split"]

#: The split names every protocol draws.
PROTOCOL_SPLITS = ("query", "train", "database")
#: ``protocol(labels int64 (N,), seed) -> {"query", "train", "database"}`` sorted index arrays.
SPLIT_PROTOCOLS: Registry[dict[str, np.ndarray]] = Registry("split protocol")


def protocol_split(labels: np.ndarray, n_query: int, n_train: int, seed: int) -> dict[str, np.ndarray]:
    """A seeded per-class split: ``n_query`` queries and ``n_train`` training items per class.

    Args:
        labels: int64 ``(N,)``.
        n_query: queries drawn per class.
        n_train: training items drawn per class (after the queries).
        seed: seed of the permutation.

    Returns:
        ``{"query", "train", "database"}``: sorted int64 index arrays, disjoint, covering ``0..N-1``
        (the database is every item that is neither query nor training item).
    """
    labels = np.asarray(labels, dtype=np.int64)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).numpy()
    order = perm[np.argsort(labels[perm], kind="stable")]  # grouped by class, random within
    grouped = labels[order]
    rank = np.arange(len(order)) - np.searchsorted(grouped, grouped, side="left")
    return {
        "query": np.sort(order[rank < n_query]),
        "train": np.sort(order[(rank >= n_query) & (rank < n_query + n_train)]),
        "database": np.sort(order[rank >= n_query + n_train]),
    }


def _per_class(n_query: int, n_train: int) -> Callable[[np.ndarray, int], dict[str, np.ndarray]]:
    def draw(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        return protocol_split(labels, n_query, n_train, seed)

    return draw


# DeepHash-pytorch's CIFAR-10 protocol: 100 queries and 500 training images per class, the rest database.
SPLIT_PROTOCOLS.register("deephash-cifar10")(_per_class(100, 500))
