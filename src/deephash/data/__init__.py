"""Data: readers, in-memory data sets, balanced samplers, batched augmentation, pair wrappers."""

from deephash.data.augment import Compose, RandomCrop, RandomHorizontalFlip, build_augment
from deephash.data.datasets import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    ArrayDataset,
    ImageFolder,
    data_search_dirs,
    load_dataset,
)
from deephash.data.loader import BatchLoader
from deephash.data.siamese import SiameseDataset, SiameseMNIST, TripletCifar, TripletDataset, TripletMNIST
from deephash.data.samplers import BalancedBatchSampler, BalancedBatchSamplerCifar, DistributedBalancedBatchSampler
from deephash.data.images import list_image_folder, read_image
from deephash.data.sources import parse_cifar_batch, read_cifar_batch, read_idx
from deephash.data.unlabelled import NO_LABEL, drop_labels

__all__ = [
    "ArrayDataset",
    "BalancedBatchSampler",
    "BalancedBatchSamplerCifar",
    "BatchLoader",
    "CIFAR10_CLASSES",
    "Compose",
    "DistributedBalancedBatchSampler",
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
