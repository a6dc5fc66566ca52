"""Data: readers, in-memory data sets, photo folders streamed from disk, balanced samplers, batched augmentation, pair wrappers.

Names load lazily (PEP 562): ``deephash.data.images`` (the image decoder) imports without torch.
"""

from __future__ import annotations

from deephash._lazy import lazy_exports

#: Each public name and the module that defines it (imported on first use: PEP 562).
_EXPORTS: dict[str, str] = {
    "ArrayDataset": "deephash.data.datasets",
    "BadFiles": "deephash.data.photos",
    "DecodedBatch": "deephash.data.photos",
    "DecodeFailure": "deephash.data.photos",
    "StreamLoader": "deephash.data.photos",
    "BalancedBatchSampler": "deephash.data.samplers",
    "BalancedBatchSamplerCifar": "deephash.data.samplers",
    "BatchLoader": "deephash.data.loader",
    "build_augment": "deephash.data.augment",
    "CIFAR10_CLASSES": "deephash.data.datasets",
    "Compose": "deephash.data.augment",
    "data_search_dirs": "deephash.data.datasets",
    "DistributedBalancedBatchSampler": "deephash.data.samplers",
    "FirstBatches": "deephash.data.samplers",
    "LabelledShareBatchSampler": "deephash.data.samplers",
    "FASHION_MNIST_CLASSES": "deephash.data.datasets",
    "ImageFolder": "deephash.data.datasets",
    "list_image_folder": "deephash.data.images",
    "load_dataset": "deephash.data.datasets",
    "MNIST_CLASSES": "deephash.data.datasets",
    "NO_LABEL": "deephash.data.unlabelled",
    "drop_labels": "deephash.data.unlabelled",
    "parse_cifar_batch": "deephash.data.sources",
    "RandomCrop": "deephash.data.augment",
    "RandomHorizontalFlip": "deephash.data.augment",
    "read_cifar_batch": "deephash.data.sources",
    "read_idx": "deephash.data.sources",
    "read_image": "deephash.data.images",
    "SiameseDataset": "deephash.data.siamese",
    "SiameseMNIST": "deephash.data.siamese",
    "TripletCifar": "deephash.data.siamese",
    "TripletDataset": "deephash.data.siamese",
    "TripletMNIST": "deephash.data.siamese",
}

__all__ = [
    "ArrayDataset",
    "BadFiles",
    "DecodeFailure",
    "DecodedBatch",
    "StreamLoader",
    "BalancedBatchSampler",
    "BalancedBatchSamplerCifar",
    "BatchLoader",
    "CIFAR10_CLASSES",
    "Compose",
    "DistributedBalancedBatchSampler",
    "FirstBatches",
    "LabelledShareBatchSampler",
    "FASHION_MNIST_CLASSES",
    "ImageFolder",
    "MNIST_CLASSES",
    "NO_LABEL",
    "RandomCrop",
    "RandomHorizontalFlip",
    "SiameseDataset",
    "SiameseMNIST",
    "TripletCifar",
    "TripletDataset",
    "TripletMNIST",
    "build_augment",
    "data_search_dirs",
    "drop_labels",
    "list_image_folder",
    "load_dataset",
    "parse_cifar_batch",
    "read_cifar_batch",
    "read_idx",
    "read_image",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
