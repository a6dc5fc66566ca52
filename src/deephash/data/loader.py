"""Batches straight from an in-memory uint8 tensor: index, move, scale, augment, on the device."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

Batch = tuple[torch.Tensor, torch.Tensor]



def with_views(x: torch.Tensor, y: torch.Tensor, augment: Callable[[torch.Tensor], torch.Tensor] | None,
               views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch as training sees it: float ``(B, C, H, W)`` images ``x`` and int64 ``(B,)`` labels
    ``y``, augmented, and with ``views > 1`` stacked view-major as ``views`` augmented copies
    (``(views * B, C, H, W)``, labels repeated), as contrastive losses over views expect."""
    if views > 1:
        x = torch.cat([augment(x) if augment is not None else x for _ in range(views)])
        return x, y.repeat(views)
    return (augment(x) if augment is not None else x), y

class BatchLoader:
    """Iterate a batch sampler over a dataset that holds its images as one uint8 tensor.

    Args:
        dataset: has ``data`` uint8 ``(N, C, H, W)`` and ``targets`` int ``(N,)`` (an
            :class:`~deephash.data.ArrayDataset`); other datasets fall back to ``dataset[i]``.
        batch_sampler: an iterable of index lists with ``len()``, e.g. a BalancedBatchSampler.
        device: where batches go.
        augment: a callable on float ``(B, C, H, W)`` batches on ``device`` (see ``augment.py``).
        views: augmented views of every image per batch (contrastive training): the views are
            stacked view-major, ``x`` ``(V*B, C, H, W)`` = ``[view 1 of the B images, view 2, ...]``
            with ``y`` repeated V times.

    Yields ``(x float32 (V*B, C, H, W) in [0, 1], y int64 (V*B,))`` on ``device``; ``len()`` is the
    number of batches.
    """

    def __init__(
        self,
        dataset: Any,
        batch_sampler: Iterable[Sequence[int]],
        device: str | torch.device = "cpu",
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        views: int = 1,
    ) -> None:
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.device = torch.device(device)
        self.augment = augment
        self.views = views

    @classmethod
    def sequential(cls, dataset: Any, batch_size: int, device: str | torch.device = "cpu") -> BatchLoader:
        """A loader over the dataset in order, in batches of ``batch_size`` (the last may be smaller)."""
        n = len(dataset)
        batches = [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
        return cls(dataset, batches, device)

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def _fetch(self, indices: torch.Tensor) -> Batch:
        data = getattr(self.dataset, "data", None)
        targets = getattr(self.dataset, "targets", None)
        if isinstance(data, torch.Tensor) and data.dtype == torch.uint8 and isinstance(targets, torch.Tensor):
            x = data[indices].to(self.device, non_blocking=True).float().div_(255)
            return x, targets[indices].to(self.device, dtype=torch.int64, non_blocking=True)
        items = [self.dataset[i] for i in indices.tolist()]
        x = torch.stack([torch.as_tensor(item[0], dtype=torch.float32) for item in items]).to(self.device)
        return x, torch.tensor([int(item[1]) for item in items], dtype=torch.int64, device=self.device)

    def __iter__(self) -> Iterator[Batch]:
        for indices in self.batch_sampler:
            x, y = self._fetch(torch.as_tensor(list(indices), dtype=torch.int64))
            yield with_views(x, y, self.augment, self.views)
