"""The images of a run: its configured data set, split protocol and limit, and query references."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from deephash._io import atomic_savez
from deephash.config import Config
from deephash.data.datasets import ArrayDataset, load_dataset
from deephash.data.images import EVAL_CROP_FRACTION, read_image
from deephash.data.photos import ImageFolder
from deephash.data.splits import PROTOCOL_SPLITS, SPLIT_PROTOCOLS
from deephash.data.unlabelled import drop_labels, labelled_mask
from deephash.errors import DataFormatError, DeephashError, NotFoundError
from deephash.runs.layout import SPLIT_FILE

__all__ = ["DATASET_SHAPES", "DEFAULT_IMAGE_SIZE", "channel_stats", "eval_crop_fraction", "folder_image_size", "load_split", "model_input_shape", "query_images", "source_dataset", "training_stats"]

#: Photo folders' decoded side when ``data.image_size`` is 0 and no pretrained backbone says otherwise.
DEFAULT_IMAGE_SIZE = 224
#: Image shapes ``(C, H, W)`` of the named data sets, so a run need not read its data to know them.
DATASET_SHAPES = {"fashion-mnist": (1, 28, 28), "mnist": (1, 28, 28), "cifar10": (3, 32, 32), "digits": (1, 8, 8)}


def _load_source(config: Config, split: str, training: bool = False) -> ArrayDataset | ImageFolder:
    """One split of the configured data set (no protocol, no limit); a photo folder is streamed,
    with the images of its ``data.unlabelled_folder`` (unlabelled) only when ``training``."""
    data = config.data
    if data.dataset == "folder":
        folder = Path(data.images)
        folder = folder / split if (folder / split).is_dir() else folder
        dataset = ImageFolder(folder, image_size=folder_image_size(config), channels=data.channels, train=split == "train",
                              crop_scale=data.crop_scale, color_jitter=data.color_jitter, crop_fraction=eval_crop_fraction(config),
                              unlabelled_dir=data.unlabelled_folder, with_unlabelled=training)
        dataset.bad_files.max_fraction = data.max_bad_fraction
        dataset.bad_files.check()
        return dataset
    return load_dataset(data.dataset, split, root=data.root or None)


def _protocol_indices(config: Config, pooled_labels: np.ndarray, run_dir: Path | None) -> dict[str, np.ndarray]:
    """The split lists: from ``data.split_file``, else ``run_dir/split.npz``, else drawn (and saved)."""
    candidates = [Path(config.data.split_file)] if config.data.split_file else []
    if run_dir is not None:
        candidates.append(run_dir / SPLIT_FILE)
    for path in candidates:
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as stored:
                    split = {name: stored[name].astype(np.int64) for name in PROTOCOL_SPLITS}
            except (KeyError, ValueError, OSError, EOFError) as exc:
                raise DataFormatError(f"split file {path}: not a split of {PROTOCOL_SPLITS} ({exc})") from None
            top = max((int(v.max()) for v in split.values() if v.size), default=-1)
            if top >= len(pooled_labels):
                raise DataFormatError(f"split file {path} indexes item {top} of {len(pooled_labels)}")
            return split
        if path == Path(config.data.split_file):
            raise NotFoundError(f"split file {path} not found (data.split_file)")
    split = SPLIT_PROTOCOLS.get(config.data.protocol)(pooled_labels, config.seed)
    if run_dir is not None:
        atomic_savez(run_dir / SPLIT_FILE, **split, protocol=np.array(config.data.protocol), seed=np.array(config.seed))
    return split


def limited_items(n: int, limit: int, listed_by_class: bool) -> torch.Tensor:
    """int64 ``(limit,)``: the items ``data.limit`` keeps of ``n``. An in-memory data set keeps its
    first ``limit`` items (its order is the data set's own, mixed); a photo folder lists its files
    class by class, so it keeps ``limit`` items spread evenly over the listing (item
    ``floor(i · n / limit)`` for ``i < limit``), every class in proportion."""
    if not listed_by_class:
        return torch.arange(limit)
    return torch.div(torch.arange(limit) * n, limit, rounding_mode="floor")


def load_split(config: Config, split: str, run_dir: str | os.PathLike | None = None,
               training: bool = False) -> ArrayDataset | ImageFolder:
    """The images of one split, as the config says (protocol, class split and ``data.limit`` applied).

    Args:
        config: the experiment config.
        split: a split of the data set (``train``/``test``), or ``query``/``train``/``database``
            under a protocol.
        run_dir: where a protocol's ``split.npz`` is kept (read, or written when drawn).
        training: under a class split (``data.seen_classes``), True keeps the seen classes (what
            training uses), False the unseen ones (queries, database, everything evaluated). With
            ``data.labels = "none"``, True also drops the labels (`drop_labels`): training reads none;
            with ``data.labelled_fraction < 1`` it keeps that share of them (`labelled_mask`), and
            with ``data.unlabelled = "drop"`` only the items of that share; with
            ``data.train_on_database_unlabelled`` a class split's training set adds the unseen
            classes' images of this split (the database's, which the config requires) without labels.

    Returns:
        An ``ArrayDataset``: uint8 images ``(N, C, H, W)``, int64 targets ``(N,)``; for a photo
        folder an :class:`~deephash.data.photos.ImageFolder` (paths, decoded on demand; files
        that do not read are left out, and more than ``data.max_bad_fraction`` of them raise).

    Raises:
        NotFoundError: no data found. DeephashError: unknown split, or an empty split.
    """
    run_dir = Path(run_dir) if run_dir is not None else None
    if config.data.protocol:
        if config.data.dataset == "folder":
            raise DeephashError("split protocols pool in-memory data sets; a photo folder takes its splits from "
                                "its train/ and test/ sub-folders (leave data.protocol empty)")
        if split not in PROTOCOL_SPLITS:
            raise DeephashError(f"split {split!r} is not one of protocol {config.data.protocol}'s {PROTOCOL_SPLITS}")
        parts = [_load_source(config, name) for name in ("train", "test")]
        pooled = ArrayDataset(
            torch.cat([p.data for p in parts]), torch.cat([p.targets for p in parts]), parts[0].classes,
            name=f"{config.data.dataset}/{config.data.protocol}",
        )
        indices = _protocol_indices(config, pooled.targets.numpy(), run_dir)[split]
        dataset = pooled.subset(torch.from_numpy(indices))
        dataset.name, dataset.train = f"{pooled.name}/{split}", split == "train"
    else:
        dataset = _load_source(config, split, training)
    if config.data.seen_classes:
        keep = config.data.seen_classes if training else config.data.unseen_classes
        kept = dataset.subset(torch.nonzero(torch.isin(dataset.targets, torch.tensor(keep))).flatten())
        if training and config.data.train_on_database_unlabelled:  # + the unseen classes' database images, unlabelled
            new = torch.isin(dataset.targets, torch.tensor(config.data.unseen_classes))
            unseen = drop_labels(dataset.subset(torch.nonzero(new).flatten()))
            kept = ArrayDataset(torch.cat([kept.data, unseen.data]), torch.cat([kept.targets, unseen.targets]), kept.classes,
                                name=kept.name, train=kept.train)
        dataset = kept
    if training and config.data.labels == "none":
        dataset = drop_labels(dataset)
    elif training and config.data.labelled_fraction < 1:
        keep = labelled_mask(len(dataset), config.data.labelled_fraction, config.seed)
        if config.data.unlabelled == "drop":  # the labels-only baseline: the same labelled items, no others
            dataset = dataset.subset(torch.nonzero(keep).flatten())
        else:
            dataset = drop_labels(dataset, keep)
    if config.data.limit > 0 and len(dataset) > config.data.limit:
        dataset = dataset.subset(limited_items(len(dataset), config.data.limit, isinstance(dataset, ImageFolder)))
    if len(dataset) == 0:
        which = f" of the {'seen' if training else 'unseen'} classes" if config.data.seen_classes else ""
        raise NotFoundError(f"no images{which} in split {split!r} of {config.data.dataset}")
    return dataset


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images ``(N, C, H, W)`` scaled to [0, 1]."""
    x = images.to(torch.float64).div(255).transpose(0, 1).reshape(images.shape[1], -1)
    return [round(float(v), 6) for v in x.mean(dim=1)], [round(max(float(v), 1e-6), 6) for v in x.std(dim=1)]


def training_stats(dataset: ArrayDataset | ImageFolder, sample: int = 512, seed: int = 0) -> tuple[list[float], list[float]]:
    """:func:`channel_stats` of a training set: every image in memory, or for a photo folder a
    seeded sample of ``sample`` images decoded with the evaluation transform."""
    if isinstance(dataset, ImageFolder):
        chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:sample].sort().values
        return channel_stats(dataset.data[chosen])
    return channel_stats(dataset.data)


def folder_image_size(config: Config) -> int:
    """The side (pixels) a photo folder is decoded at: ``data.image_size``, or with 0 the default
    224 (a run that trains a pretrained timm backbone sets it from timm's configuration first)."""
    return config.data.image_size or DEFAULT_IMAGE_SIZE


def model_input_shape(config: Config, run_dir: Path) -> tuple[int, int, int]:
    """``(C, H, W)`` of the images the run's model was trained on."""
    if config.data.dataset in DATASET_SHAPES:
        return DATASET_SHAPES[config.data.dataset]
    if config.data.dataset == "folder":
        side = folder_image_size(config)
        return config.data.channels, side, side
    return tuple(load_split(config, config.data.train_split, run_dir).data.shape[1:])


def source_dataset(config: Config, run_dir: Path, split: str | None, images: str | os.PathLike | None,
                   labelled: bool | None = None) -> ArrayDataset | ImageFolder:
    """A split of the run's data (protocol and limit applied), or a photo folder streamed at the
    model's input size (``labelled``: see :func:`~deephash.data.images.list_image_folder`; the
    run's ``data.unlabelled_folder`` is no class there and is left out, as from its splits)."""
    if images is None:
        return load_split(config, split, run_dir)
    channels, height, _ = model_input_shape(config, run_dir)
    return ImageFolder(images, image_size=height, channels=channels, train=False, labelled=labelled,
                       crop_fraction=eval_crop_fraction(config), unlabelled_dir=config.data.unlabelled_folder,
                       with_unlabelled=False)


def eval_crop_fraction(config: Config) -> float:
    """The run's model view's centre crop (:func:`~deephash.data.images.eval_transform`), taken by
    every path that encodes an image file for it (folders, query files, the service's uploads, the
    exported encoder): a photo-folder run's 0.875, else 1.0 (the whole shorter side)."""
    return EVAL_CROP_FRACTION if config.data.dataset == "folder" else 1.0


def model_view(config: Config, path: str | os.PathLike, shape: tuple[int, int, int]) -> torch.Tensor:
    """One image file as the run's model sees it, as :func:`source_dataset` decodes folders: uint8
    ``(C, H, W)`` (the evaluation transform; a square image is simply resized outside photo-folder runs)."""
    return torch.from_numpy(read_image(path, "L" if shape[0] == 1 else "RGB", shape[1], eval_crop_fraction(config)))


def query_images(config: Config, run_dir: Path, items: Sequence[str]) -> tuple[torch.Tensor, list[int | None]]:
    """Query images from files or ``SPLIT:N`` references: uint8 ``(Q, C, H, W)`` and their labels
    (None for files)."""
    shape = model_input_shape(config, run_dir)
    images, labels, splits = [], [], {}
    for item in items:
        split, _, number = item.rpartition(":")
        if split and number.isdigit() and not Path(item).exists():
            if split not in splits:
                splits[split] = load_split(config, split, run_dir)
            dataset = splits[split]
            i = int(number)
            if i >= len(dataset):
                raise DeephashError(f"{item}: split {split!r} has {len(dataset)} items")
            images.append(dataset.data[i])
            labels.append(int(dataset.targets[i]))
        else:
            images.append(model_view(config, item, shape))
            labels.append(None)
    return torch.stack(images), labels
