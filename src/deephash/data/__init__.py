"""Data: readers, in-memory data sets, photo folders streamed from disk, balanced samplers, batched augmentation, pair wrappers."""

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
from deephash.data.photos import BadFiles, DecodedBatch, DecodeFailure, StreamLoader
from deephash.data.sources import parse_cifar_batch, read_cifar_batch, read_idx

__all__ = [
    "ArrayDataset",
    "BadFiles",
    "BalancedBatchSampler",
    "BalancedBatchSamplerCifar",
    "BatchLoader",
    "CIFAR10_CLASSES",
    "Compose",
    "DecodeFailure",
    "DecodedBatch",
    "DistributedBalancedBatchSampler",
    "FASHION_MNIST_CLASSES",
    "ImageFolder",
    "MNIST_CLASSES",
    "RandomCrop",
    "RandomHorizontalFlip",
    "SiameseDataset",
    "SiameseMNIST",
    "StreamLoader",
    "TripletCifar",
    "TripletDataset",
    "TripletMNIST",
    "build_augment",
    "data_search_dirs",
    "list_image_folder",
    "load_dataset",
    "parse_cifar_batch",
    "read_cifar_batch",
    "read_idx",
    "read_image",
]
