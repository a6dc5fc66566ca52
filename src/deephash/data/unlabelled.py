"""A data set's images without its labels (``data.labels = "none"``) or with some of them
(``data.labelled_fraction``): what training sees."""

from __future__ import annotations

from typing import Any

import torch

from deephash.data.datasets import ArrayDataset
from deephash.data.photos import ImageFolder

__all__ = ["NO_LABEL", "drop_labels", "labelled_mask"]

#: The target every item of an unlabelled data set carries (no class has it).
NO_LABEL = -1


def labelled_mask(n: int, fraction: float, seed: int) -> torch.Tensor:
    """bool ``(n,)``: ``round(fraction · n)`` items, drawn by ``torch.randperm`` from
    ``torch.Generator().manual_seed(seed)``, are True (the items that keep their label)."""
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:round(fraction * n)]] = True
    return keep


def drop_labels(dataset: Any, keep: torch.Tensor | None = None) -> ArrayDataset | ImageFolder:
    """The images of ``dataset`` with its targets set to `NO_LABEL`, except where ``keep`` is True.

    Args:
        dataset: has ``data`` uint8 ``(N, C, H, W)`` (an ``ArrayDataset``); its ``classes``,
            ``paths``, ``name`` and ``train`` are kept when it has them (names, not labels).
        keep: bool ``(N,)``: the items that keep their label; None: none does, and the dataset's
            labels are never read.

    Returns:
        An ``ArrayDataset`` sharing ``dataset.data`` (no copy), with int64 targets ``(N,)``; for a
        streamed photo folder (``ImageFolder``) the same folder with those targets.
    """
    data = dataset.data
    targets = torch.full((len(data),), NO_LABEL, dtype=torch.int64)
    if keep is not None:
        targets = torch.where(keep, dataset.targets, targets)
    if isinstance(dataset, ImageFolder):
        return dataset.with_targets(targets)
    return ArrayDataset(data, targets, getattr(dataset, "classes", None), getattr(dataset, "paths", None),
                        getattr(dataset, "name", None), getattr(dataset, "train", True))
