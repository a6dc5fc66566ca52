"""In-memory image data sets (one uint8 tensor plus labels) and the named data sets deephash knows;
a photo folder (``"folder"``) is streamed from disk instead (:class:`~deephash.data.photos.ImageFolder`).

``load_dataset("fashion-mnist", "train")`` looks for the official files in, in order: the ``root``
argument, ``$DEEPHASH_DATA``, ``/usr/share/datasets/<name>`` (Debian's ``dataset-fashion-mnist``)
and the user cache ``${XDG_CACHE_HOME:-~/.cache}/deephash/<name>``; each folder is also searched
under ``<folder>/<name>``.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from deephash.data.photos import ImageFolder
from deephash.data.sources import parse_cifar_batch, read_cifar_batch, read_idx
from deephash.errors import DataFormatError, DeephashError, NotFoundError
from deephash.registry import Registry

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
MNIST_CLASSES = tuple(str(d) for d in range(10))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: The named data sets: ``factory(split=..., root=...) -> ArrayDataset``.
DATASETS: Registry[ArrayDataset] = Registry("data set")


class ArrayDataset(torch.utils.data.Dataset):
    """A labelled image set held in memory as one uint8 tensor.

    Args:
        images: uint8 ``(N, C, H, W)`` (tensor or array).
        targets: integer labels ``(N,)``; stored as int64.
        classes: optional class names, ``classes[label]``.
        paths: optional source file of each image.
        name: optional data set name, e.g. ``"fashion-mnist/train"``.
        train: whether this is a training split (pair/triplet wrappers read it, as torchvision's).

    Attributes:
        data: uint8 ``(N, C, H, W)`` (also as ``train_data`` / ``test_data``, torchvision's older
            names). targets / labels: int64 ``(N,)`` (also as ``train_labels`` / ``test_labels``).
    """

    def __init__(
        self,
        images: torch.Tensor | np.ndarray,
        targets: torch.Tensor | np.ndarray | Sequence[int],
        classes: Sequence[str] | None = None,
        paths: Sequence[str | os.PathLike] | None = None,
        name: str | None = None,
        train: bool = True,
    ) -> None:
        images = torch.as_tensor(images)
        targets = torch.as_tensor(targets)
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DeephashError(f"ArrayDataset needs uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if targets.ndim != 1 or len(targets) != len(images) or targets.is_floating_point():
            raise DeephashError(f"ArrayDataset needs {len(images)} integer targets (N,), got {targets.dtype} {tuple(targets.shape)}")
        if paths is not None and len(paths) != len(images):
            raise DeephashError(f"ArrayDataset got {len(paths)} paths for {len(images)} images")
        self.data = images
        self.targets = targets.to(torch.int64)
        self.classes = list(classes) if classes is not None else None
        self.paths = [str(p) for p in paths] if paths is not None else None
        self.name = name
        self.train = train

    @property
    def labels(self) -> torch.Tensor:
        """Alias of ``targets``: int64 ``(N,)``."""
        return self.targets

    # torchvision's older MNIST / CIFAR names, which the seed's code reads (e.g.
    # ``BalancedBatchSampler(train_dataset.train_labels, ...)``); like torchvision's later aliases,
    # each answers for either split.
    @property
    def train_labels(self) -> torch.Tensor:
        """Alias of ``targets``: int64 ``(N,)``."""
        return self.targets

    @property
    def test_labels(self) -> torch.Tensor:
        """Alias of ``targets``: int64 ``(N,)``."""
        return self.targets

    @property
    def train_data(self) -> torch.Tensor:
        """Alias of ``data``: uint8 ``(N, C, H, W)``."""
        return self.data

    @property
    def test_data(self) -> torch.Tensor:
        """Alias of ``data``: uint8 ``(N, C, H, W)``."""
        return self.data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Returns ``(float32 (C, H, W) in [0, 1], label)``."""
        return self.data[index].float().div_(255), int(self.targets[index])

    def batch(self, indices: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(float32 (B, C, H, W) in [0, 1], int64 (B,))`` for the given indices."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return self.data[indices].float().div_(255), self.targets[indices]

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ArrayDataset:
        """A new ArrayDataset holding the given items (copies), with the same classes."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        paths = [self.paths[i] for i in indices.tolist()] if self.paths is not None else None
        return ArrayDataset(self.data[indices], self.targets[indices], self.classes, paths, self.name, self.train)

    def __repr__(self) -> str:
        c, h, w = self.data.shape[1:]
        return f"ArrayDataset({self.name or 'unnamed'}: {len(self)} images {c}x{h}x{w}, train={self.train})"


# ------------------------------------------------------------------------------------ named sets


def _canonical(name: str) -> str:
    key = name.lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist", "cifar-10": "cifar10"}.get(key, key)
    if key not in DATASETS:
        raise NotFoundError(f"unknown data set {name!r}; known: {', '.join(DATASETS.names())}")
    return key


def data_search_dirs(name: str, root: str | os.PathLike | None = None) -> list[Path]:
    """The folders ``load_dataset`` searches for ``name``, in order."""
    bases: list[Path] = []
    if root is not None:
        bases.append(Path(root))
    if os.environ.get("DEEPHASH_DATA"):
        bases.append(Path(os.environ["DEEPHASH_DATA"]))
    bases.append(Path("/usr/share/datasets"))
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deephash"
    bases.append(cache)
    dirs: list[Path] = []
    for base in bases:
        for folder in (base, base / name):
            if folder not in dirs and not (base == Path("/usr/share/datasets") and folder == base):
                dirs.append(folder)
    return dirs


def _find_file(dirs: list[Path], stem: str) -> Path | None:
    for folder in dirs:
        for candidate in (folder / f"{stem}.gz", folder / stem):
            if candidate.is_file():
                return candidate
    return None


def _how_to_get(name: str) -> str:
    if name == "fashion-mnist":
        return "install it with `apt-get install dataset-fashion-mnist` or put the four official .gz files in a folder and set DEEPHASH_DATA to it"
    if name == "mnist":
        return "put the four official MNIST IDX files (train-images-idx3-ubyte.gz, ...) in a folder and set DEEPHASH_DATA to it"
    return "put cifar-10-python.tar.gz or its extracted cifar-10-batches-py folder in a folder and set DEEPHASH_DATA to it"


def _load_idx_pair(name: str, split: str, dirs: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    image_file = _find_file(dirs, f"{prefix}-images-idx3-ubyte")
    label_file = _find_file(dirs, f"{prefix}-labels-idx1-ubyte")
    if image_file is None or label_file is None:
        looked = ", ".join(str(d) for d in dirs)
        raise NotFoundError(
            f"{name} {split} data not found ({prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz]); "
            f"looked in {looked}; {_how_to_get(name)}"
        )
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataFormatError(f"{image_file}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
        raise DataFormatError(f"{label_file}: expected {len(images)} uint8 labels, got {labels.dtype} {labels.shape}")
    return images[:, None], labels.astype(np.int64)


def _cifar_members(split: str) -> list[str]:
    return [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]


def _load_cifar10(split: str, dirs: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    members = _cifar_members(split)
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    for folder in dirs:
        batches = folder / "cifar-10-batches-py"
        if all((batches / m).is_file() for m in members):
            parts = [read_cifar_batch(batches / m) for m in members]
            break
        archive = folder / "cifar-10-python.tar.gz"
        if archive.is_file():
            parts = _read_cifar_tar(archive, members)
            break
    if not parts:
        looked = ", ".join(str(d) for d in dirs)
        raise NotFoundError(f"cifar10 {split} data not found (cifar-10-batches-py/ or cifar-10-python.tar.gz); looked in {looked}; {_how_to_get('cifar10')}")
    images = np.concatenate([p[0] for p in parts]).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images), np.concatenate([p[1] for p in parts])


def _read_cifar_tar(archive: Path, members: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Read CIFAR batches straight from the tar archive, without extracting anything."""
    wanted = {f"cifar-10-batches-py/{m}": m for m in members}
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for info in tar:
                if info.name in wanted and info.isfile():
                    if info.size > 1 << 28:
                        raise DataFormatError(f"{archive}: member {info.name} is implausibly large ({info.size} bytes)")
                    data = tar.extractfile(info).read()  # type: ignore[union-attr]
                    found[wanted[info.name]] = parse_cifar_batch(data, f"{archive}:{info.name}")
    except DataFormatError:
        raise
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataFormatError(f"{archive}: corrupt archive: {err}") from err
    missing = [m for m in members if m not in found]
    if missing:
        raise DataFormatError(f"{archive}: lacks {', '.join(missing)}")
    return [found[m] for m in members]


def _load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[:, None]
    order = np.random.default_rng(0).permutation(len(images))
    cut = int(0.8 * len(images))
    chosen = order[:cut] if split == "train" else order[cut:]
    return images[chosen], digits.target[chosen].astype(np.int64)


def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None,
                 **options: Any) -> ArrayDataset | ImageFolder:
    """Load a named data set into memory.

    Args:
        name: ``"fashion-mnist"``, ``"mnist"``, ``"cifar10"``, ``"digits"`` (scikit-learn's 8×8
            digits, a fixed seeded 80/20 split, for quick tests) or ``"folder"`` (an image folder:
            ``root``, or ``root/split`` when that sub-folder exists).
        split: ``"train"`` or ``"test"``.
        options: for ``"folder"``: ``image_size`` (pixels, default 224) and ``channels`` (1 or 3).
        root: a folder searched first (see :func:`data_search_dirs` for the rest); the image folder
            itself for ``"folder"``.

    Returns:
        An :class:`ArrayDataset` (a streamed :class:`ImageFolder` for ``"folder"``): images uint8 ``(N, 1, 28, 28)`` (MNIST-like), ``(N, 3, 32, 32)``
        (CIFAR-10) or ``(N, 1, 8, 8)`` (digits), with class names and ``train`` set by the split.

    Raises:
        NotFoundError: unknown name, or no data found; the message says where it looked and how
            to get the data.
        DataFormatError: a file was found but is corrupt.
    """
    key = _canonical(name)
    if split not in ("train", "test"):
        raise DeephashError(f"unknown split {split!r} for {key}; use 'train' or 'test'")
    return DATASETS.create(key, split=split, root=root, **options)


@DATASETS.register("fashion-mnist")
def _fashion_mnist(split: str, root: str | os.PathLike | None) -> ArrayDataset:
    images, labels = _load_idx_pair("fashion-mnist", split, data_search_dirs("fashion-mnist", root))
    return _labelled("fashion-mnist", split, images, labels, FASHION_MNIST_CLASSES)


@DATASETS.register("mnist")
def _mnist(split: str, root: str | os.PathLike | None) -> ArrayDataset:
    return _labelled("mnist", split, *_load_idx_pair("mnist", split, data_search_dirs("mnist", root)), MNIST_CLASSES)


@DATASETS.register("cifar10")
def _cifar10(split: str, root: str | os.PathLike | None) -> ArrayDataset:
    return _labelled("cifar10", split, *_load_cifar10(split, data_search_dirs("cifar10", root)), CIFAR10_CLASSES)


@DATASETS.register("digits")
def _digits(split: str, root: str | os.PathLike | None) -> ArrayDataset:
    return _labelled("digits", split, *_load_digits(split), MNIST_CLASSES)


@DATASETS.register("folder")
def _folder(split: str, root: str | os.PathLike | None, image_size: int = 224, channels: int = 3) -> ImageFolder:
    if root is None:
        raise DeephashError("data set 'folder' needs the image folder as root (data.images in a config)")
    folder = Path(root)
    return ImageFolder(folder / split if (folder / split).is_dir() else folder, image_size=image_size, channels=channels,
                       train=split == "train")


def _labelled(key: str, split: str, images: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> ArrayDataset:
    if len(labels) and labels.max() >= len(classes):
        raise DataFormatError(f"{key} {split}: label {labels.max()} out of range for {len(classes)} classes")
    return ArrayDataset(torch.from_numpy(images), torch.from_numpy(labels), classes, name=f"{key}/{split}", train=split == "train")
