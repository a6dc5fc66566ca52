"""A data set's images without its labels: what training sees under ``data.labels = "none"``."""

from __future__ import annotations

from typing import Any

import torch

from deephash.data.datasets import ArrayDataset

__all__ = ["NO_LABEL", "drop_labels"]

#: The target every item of an unlabelled data set carries (no class has it).
NO_LABEL = -1


def drop_labels(dataset: Any) -> ArrayDataset:
    """The images of ``dataset`` with every target set to `NO_LABEL`; its labels are never read.

    Args:
        dataset: has ``data`` uint8 ``(N, C, H, W)`` (an ``ArrayDataset``); its ``classes``,
            ``paths``, ``name`` and ``train`` are kept when it has them (names, not labels).

    Returns:
        An ``ArrayDataset`` sharing ``dataset.data`` (no copy), targets int64 ``(N,)`` all `NO_LABEL`.
    """
    data = dataset.data
    return ArrayDataset(data, torch.full((len(data),), NO_LABEL, dtype=torch.int64), getattr(dataset, "classes", None),
                        getattr(dataset, "paths", None), getattr(dataset, "name", None), getattr(dataset, "train", True))
