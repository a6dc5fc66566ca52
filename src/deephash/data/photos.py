"""Photo folders streamed from disk: a data set of paths (+ labels or none), decoded one image at a
time in ``torch.utils.data.DataLoader`` worker processes, and a record of the files that failed.

A bad file never stops a run by itself: files whose header Pillow cannot read are left out when
the folder is listed, and a file that fails to decode later comes back from the worker as a
:class:`DecodeFailure` that the collate drops. Both are counted in :class:`BadFiles`, which logs one
warning line per file and raises only when more than ``max_fraction`` of the files are bad.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from deephash._io import atomic_write_text
from deephash.data.loader import with_views
from deephash.data.images import check_image_header, list_image_folder, open_image
from deephash.data.transforms import EVAL_CROP_FRACTION, eval_resize_side, eval_transform, train_transform
from deephash.errors import DataFormatError, DeephashError, first_line

__all__ = ["BadFiles", "DecodeFailure", "DecodedBatch", "ImageFolder", "StreamLoader"]

LOG = logging.getLogger("deephash.data")


class BadFiles:
    """The image files of a data set that could not be read, and the share of them allowed.

    Args:
        total: files listed (bad ones included).
        max_fraction: the largest allowed share of bad files; None never raises.

    Attributes:
        found: ``{path: reason}`` in the order found.
    """

    def __init__(self, total: int, max_fraction: float | None = None) -> None:
        self.total = int(total)
        self.max_fraction = max_fraction
        self.found: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.found)

    def add(self, path: str, reason: str) -> None:
        """Record a bad file (once), log one warning line, and :meth:`check` the share."""
        if path in self.found:
            return
        self.found[path] = reason
        LOG.warning("deephash: skipped %s: %s", path, reason)
        self.check()

    def check(self) -> None:
        """Raise DataFormatError when more than ``max_fraction`` of the files are bad, naming the first few."""
        if self.max_fraction is None or len(self.found) <= self.max_fraction * self.total:
            return
        first = "; ".join(f"{p} ({r})" for p, r in list(self.found.items())[:3])
        raise DataFormatError(f"{len(self.found)} of {self.total} image files are unreadable, more than "
                              f"data.max_bad_fraction = {self.max_fraction}: {first}")

    def write(self, path: str | os.PathLike) -> None:
        """Write ``path`` (e.g. ``RUN_DIR/skipped.txt``): one ``file<TAB>reason`` line per bad file."""
        atomic_write_text(Path(path), "".join(f"{p}\t{r}\n" for p, r in self.found.items()))


class DecodeFailure(NamedTuple):
    """What a worker returns for an item that does not decode; the collate drops it."""

    index: int
    reason: str


class DecodedBatch(NamedTuple):
    """A batch out of the workers: uint8 ``images (B, C, H, W)``, int64 ``labels (B,)`` (-1 when
    unlabelled), int64 ``positions (B,)`` in the data set, and the ``failures`` dropped from it."""

    images: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    failures: list[DecodeFailure]


class _Collate:
    """Stack the decoded items, drop the failures (kept aside in the batch)."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape

    def __call__(self, items: Sequence[Any]) -> DecodedBatch:
        good = [item for item in items if not isinstance(item, DecodeFailure)]
        failures = [item for item in items if isinstance(item, DecodeFailure)]
        images = torch.stack([item[0] for item in good]) if good else torch.empty(0, *self.shape, dtype=torch.uint8)
        labels = torch.tensor([item[1] for item in good], dtype=torch.int64)
        positions = torch.tensor([item[2] for item in good], dtype=torch.int64)
        return DecodedBatch(images, labels, positions, failures)


class _DecodedImages:
    """``dataset.data`` of an :class:`ImageFolder`: indexing decodes (evaluation transform) on demand.

    ``view[i]`` is uint8 ``(C, H, W)``; ``view[slice]`` uint8 ``(n, C, H, W)``; ``view[indices]``
    uint8 ``(*indices.shape, C, H, W)``; an image
    that does not decode is recorded as bad and given as zeros.
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(self, dataset: ImageFolder) -> None:
        self.dataset = dataset

    def dim(self) -> int:
        """4, as a tensor of ``(N, C, H, W)`` images."""
        return 4

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.dataset), *self.dataset.shape)

    def __len__(self) -> int:
        return len(self.dataset)

    def _one(self, index: int) -> torch.Tensor:
        item = self.dataset[index]
        if isinstance(item, DecodeFailure):
            self.dataset.bad_files.add(self.dataset.paths[index], item.reason)
            return torch.zeros(self.dataset.shape, dtype=torch.uint8)
        return item[0]

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, (int, np.integer)) or (torch.is_tensor(index) and index.ndim == 0):
            return self._one(int(index))
        if isinstance(index, slice):
            chosen, shape = range(len(self.dataset))[index], None
        else:
            index = torch.as_tensor(index, dtype=torch.int64)
            chosen, shape = index.reshape(-1).tolist(), tuple(index.shape)
        if not len(chosen):
            return torch.empty(*(shape or (0,)), *self.dataset.shape, dtype=torch.uint8)
        images = torch.stack([self._one(i) for i in chosen])
        return images if shape is None else images.reshape(*shape, *self.dataset.shape)

    def numpy(self) -> np.ndarray:
        """Every image decoded: uint8 ``(N, C, H, W)`` (memory grows with N; for small folders)."""
        return self[:].numpy()


class ImageFolder(torch.utils.data.Dataset):
    """A folder of photos held as paths (+ labels, or none), decoded per item on demand.

    Items are listed by :func:`~deephash.data.images.list_image_folder` (class sub-folders at any
    depth, or an unlabelled tree); files whose header does not read are left out and recorded in
    ``bad_files``. ``dataset[i]`` decodes with the evaluation transform (shorter side resized,
    centre crop of ``image_size``); ``dataset[(i, seed)]`` with the training transform drawn from
    ``numpy.random.default_rng([*seed, i])`` (so a batch is the same whatever the number of workers).

    Args:
        root: the folder.
        image_size: the model's input side in pixels.
        channels: 1 (grey) or 3 (RGB).
        train: value of the ``train`` attribute.
        labelled, unlabelled_dir, with_unlabelled: see :func:`~deephash.data.images.list_image_folder`.
        check: read every file's header when listing (cheap; no pixel data).
        crop_scale: the training crop's share of the image area.
        color_jitter: the training colour jitter strength.
        crop_fraction: the evaluation centre crop's share of the resized shorter side (1.0: the
            shorter side is resized to ``image_size`` itself).

    Attributes:
        paths: absolute path of each item (str). relative_paths: each relative to ``root`` (posix).
        targets / labels: int64 ``(N,)``, -1 for unlabelled items. classes: class names or None.
        data: a lazy view, ``data[indices]`` decoded uint8 ``(n, C, H, W)``.
        bad_files: :class:`BadFiles` shared by every subset of this listing.

    Returns from ``dataset[i]``: ``(uint8 (C, H, W), label, i)`` or a :class:`DecodeFailure`.
    """

    def __init__(self, root: str | os.PathLike, image_size: int = 224, channels: int = 3, train: bool = True,
                 labelled: bool | None = None, check: bool = True, crop_scale: Sequence[float] = (0.08, 1.0),
                 color_jitter: float = 0.4, crop_fraction: float = EVAL_CROP_FRACTION, unlabelled_dir: str = "",
                 with_unlabelled: bool = True) -> None:
        if channels not in (1, 3):
            raise DeephashError(f"ImageFolder needs 1 or 3 channels, got {channels}")
        if int(image_size) < 1:
            raise DeephashError(f"ImageFolder needs image_size >= 1, got {image_size}")
        self.root = Path(root)
        files, labels, classes = list_image_folder(self.root, labelled, unlabelled_dir, with_unlabelled)
        self.bad_files = BadFiles(len(files))
        keep = np.ones(len(files), dtype=bool)
        if check:
            for i, path in enumerate(files):
                reason = check_image_header(path)
                if reason is not None:
                    keep[i] = False
                    self.bad_files.add(str(path), reason)
        self.paths = [str(p) for p, k in zip(files, keep) if k]
        self.targets = torch.from_numpy(labels[keep])
        self.classes = list(classes) or None
        self.image_size, self.channels, self.train = int(image_size), int(channels), train
        self.crop_scale, self.color_jitter = (float(crop_scale[0]), float(crop_scale[1])), float(color_jitter)
        self.crop_fraction = float(crop_fraction)
        self.name = str(root)
        self.data = _DecodedImages(self)

    @property
    def labels(self) -> torch.Tensor:
        """Alias of ``targets``: int64 ``(N,)``."""
        return self.targets

    @property
    def labelled(self) -> bool:
        """Whether the items have class labels."""
        return self.classes is not None

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of a decoded item."""
        return self.channels, self.image_size, self.image_size

    @property
    def relative_paths(self) -> list[str]:
        """Each item's path relative to ``root``, posix style."""
        return [Path(p).relative_to(self.root).as_posix() for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, Any]) -> tuple[torch.Tensor, int, int] | DecodeFailure:
        index, seed = key if isinstance(key, tuple) else (key, None)
        index = int(index)
        mode = "L" if self.channels == 1 else "RGB"
        try:
            if seed is None:
                side = eval_resize_side(self.image_size, self.crop_fraction)
                image = open_image(self.paths[index], mode, min_side=side)
                pixels = eval_transform(image, self.image_size, self.crop_fraction)
            else:
                image = open_image(self.paths[index], mode, min_side=self.image_size)
                rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), index])
                pixels = train_transform(image, self.image_size, rng, self.crop_scale, self.color_jitter)
        except DeephashError as error:
            return DecodeFailure(index, first_line(error).split(": ", 1)[-1])
        return torch.from_numpy(pixels), int(self.targets[index]), index

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ImageFolder:
        """The given items (a shallow copy sharing ``bad_files``)."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        out = copy.copy(self)
        out.paths = [self.paths[i] for i in indices.tolist()]
        out.targets = self.targets[indices]
        out.data = _DecodedImages(out)
        return out

    def with_targets(self, targets: torch.Tensor) -> ImageFolder:
        """The same items with int64 ``(N,)`` ``targets`` instead (a shallow copy sharing ``bad_files``)."""
        targets = torch.as_tensor(targets, dtype=torch.int64)
        if targets.shape != self.targets.shape:
            raise DeephashError(f"{len(targets)} targets for {len(self.targets)} images")
        out = self.subset(torch.arange(len(self.targets)))
        out.targets = targets
        return out

    def keep(self, positions: np.ndarray | Sequence[int]) -> None:
        """Keep only the items at ``positions`` (int, ascending), in place: e.g. those that decoded."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) == len(self.paths):
            return
        self.paths = [self.paths[i] for i in positions.tolist()]
        self.targets = self.targets[torch.from_numpy(positions)]

    def __repr__(self) -> str:
        return (f"ImageFolder({self.root}: {len(self)} images -> {self.channels}x{self.image_size}x{self.image_size}, "
                f"{len(self.classes or [])} classes, train={self.train})")


class _KeyedBatches:
    """The sampler's batches as dataset keys: plain indices, or ``(index, (epoch_seed, batch))``
    when the loader draws training crops."""

    def __init__(self, batch_sampler: Iterable[Sequence[int]], loader: StreamLoader) -> None:
        self.batch_sampler, self.loader = batch_sampler, loader

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[Any]]:
        seed = self.loader.epoch_seed() if self.loader.random_crops else None
        for number, batch in enumerate(self.batch_sampler):
            indices = [int(i) for i in batch]
            yield indices if seed is None else [(i, (seed, number)) for i in indices]


class StreamLoader:
    """Batches of an :class:`ImageFolder` decoded in DataLoader worker processes, as
    :class:`~deephash.data.BatchLoader` yields them.

    Args:
        dataset: an ImageFolder.
        batch_sampler: an iterable of index lists with ``len()``.
        device: where batches go (pinned memory and non-blocking copies on CUDA).
        augment: batched augmentation on ``device`` after decoding (see ``augment.py``).
        views: augmented views per image (the batched ``augment`` makes them), view-major.
        num_workers: decoding processes (0: in this process); kept alive between epochs.
        random_crops: decode with the training transform (random resized crop, flip, jitter).
        generator: draws one seed per epoch for the training transform (its state is what a
            checkpoint keeps); None uses 0.

    Yields ``(x float32 (V*B, C, H, W) in [0, 1], y int64 (V*B,))``; items that fail to decode are
    dropped from their batch and recorded in ``dataset.bad_files`` (which may raise). :meth:`decoded`
    yields the :class:`DecodedBatch` itself, with positions, for encoding.
    """

    def __init__(self, dataset: ImageFolder, batch_sampler: Iterable[Sequence[int]], device: str | torch.device = "cpu",
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None, views: int = 1, num_workers: int = 0,
                 random_crops: bool = False, generator: torch.Generator | None = None) -> None:
        self.dataset, self.batch_sampler = dataset, batch_sampler
        self.device = torch.device(device)
        self.augment, self.views = augment, views
        self.num_workers, self.random_crops, self.generator = int(num_workers), random_crops, generator
        self._loader: torch.utils.data.DataLoader | None = None

    @classmethod
    def sequential(cls, dataset: ImageFolder, batch_size: int, device: str | torch.device = "cpu",
                   num_workers: int = 0) -> StreamLoader:
        """A loader over the data set in order (evaluation transform), ``batch_size`` items a batch."""
        n = len(dataset)
        return cls(dataset, [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)], device,
                   num_workers=num_workers)

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def epoch_seed(self) -> int:
        """One draw from ``generator`` (0 without one): the seed of this epoch's training transforms."""
        if self.generator is None:
            return 0
        return int(torch.randint(0, 2**62, (1,), generator=self.generator, device=self.generator.device).item())

    def _data_loader(self) -> torch.utils.data.DataLoader:
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=_KeyedBatches(self.batch_sampler, self), num_workers=self.num_workers,
                collate_fn=_Collate(self.dataset.shape), pin_memory=self.device.type == "cuda",
                persistent_workers=self.num_workers > 0,
                # its own generator for the workers' base seed (unused: the keys carry the draws), so
                # iterating never consumes torch's global random state
                generator=torch.Generator().manual_seed(0))
        return self._loader

    def decoded(self) -> Iterator[DecodedBatch]:
        """The decoded batches on ``device`` (uint8 images), failures recorded."""
        for batch in self._data_loader():
            for failure in batch.failures:
                self.dataset.bad_files.add(self.dataset.paths[failure.index], failure.reason)
            yield DecodedBatch(batch.images.to(self.device, non_blocking=True),
                               batch.labels.to(self.device, non_blocking=True), batch.positions, batch.failures)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.decoded():
            if len(batch.images) == 0:
                continue
            yield with_views(batch.images.float().div_(255), batch.labels, self.augment, self.views)
