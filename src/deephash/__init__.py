"""deephash: Siamese/triplet embeddings with online mining, and deep binary hashing for retrieval.

The seed's public names are re-exported here; the sub-packages follow the path of the data:
``data`` → ``models`` → ``distances`` → ``mining`` → ``losses`` → ``train`` → ``retrieval``.

Names load lazily (PEP 562): ``import deephash`` imports no sub-package, so the parts that do not
need PyTorch (the ONNX search service) run without it; ``deephash.X`` imports X's module when first used.
"""

from __future__ import annotations

from deephash._lazy import lazy_exports

from deephash._version import __version__

#: Each public name and the module that defines it (imported on first use: PEP 562).
_EXPORTS: dict[str, str] = {
    "AccumulatedAccuracyMetric": "deephash.train",
    "AllPositivePairSelector": "deephash.mining",
    "AllTripletSelector": "deephash.mining",
    "AverageNonzeroTripletsMetric": "deephash.train",
    "BalancedBatchSampler": "deephash.data",
    "BalancedBatchSamplerCifar": "deephash.data",
    "BatchHardTripletSelector": "deephash.mining",
    "BatchLoader": "deephash.data",
    "build_model": "deephash.models",
    "ClassificationNet": "deephash.models",
    "ContrastiveLoss": "deephash.losses",
    "CrossBatchMemory": "deephash.losses",
    "CSQLoss": "deephash.losses",
    "DeephashError": "deephash.errors",
    "DSHLoss": "deephash.losses",
    "DTSHLoss": "deephash.losses",
    "EmbeddingNet": "deephash.models",
    "EmbeddingNetL2": "deephash.models",
    "fit": "deephash.train",
    "HardestNegativeTripletSelector": "deephash.mining",
    "HardNegativePairSelector": "deephash.mining",
    "HashHead": "deephash.models",
    "HashIndex": "deephash.retrieval",
    "LinearRamp": "deephash.losses",
    "load_dataset": "deephash.data",
    "mean_average_precision": "deephash.retrieval",
    "OnlineContrastiveLoss": "deephash.losses",
    "OnlineTripletLoss": "deephash.losses",
    "pack_codes": "deephash.retrieval",
    "knn_pseudo_labels": "deephash.train",
    "PseudoLabels": "deephash.train",
    "sign": "deephash.signs",
    "PairSelector": "deephash.mining",
    "pairwise_distances": "deephash.distances",
    "RandomNegativeTripletSelector": "deephash.mining",
    "RetrievalModel": "deephash.models",
    "SemihardNegativeTripletSelector": "deephash.mining",
    "SiameseMNIST": "deephash.data",
    "SiameseNet": "deephash.models",
    "TripletCifar": "deephash.data",
    "TripletLoss": "deephash.losses",
    "ViewHashLoss": "deephash.losses",
    "TripletMNIST": "deephash.data",
    "TripletNet": "deephash.models",
    "TripletSelector": "deephash.mining",
    "unpack_codes": "deephash.retrieval",
}

__all__ = [
    "AccumulatedAccuracyMetric",
    "AllPositivePairSelector",
    "AllTripletSelector",
    "AverageNonzeroTripletsMetric",
    "BalancedBatchSampler",
    "BalancedBatchSamplerCifar",
    "BatchHardTripletSelector",
    "BatchLoader",
    "ClassificationNet",
    "ContrastiveLoss",
    "CrossBatchMemory",
    "CSQLoss",
    "DSHLoss",
    "DTSHLoss",
    "DeephashError",
    "EmbeddingNet",
    "EmbeddingNetL2",
    "HardNegativePairSelector",
    "HardestNegativeTripletSelector",
    "HashHead",
    "HashIndex",
    "LinearRamp",
    "OnlineContrastiveLoss",
    "OnlineTripletLoss",
    "PairSelector",
    "RandomNegativeTripletSelector",
    "RetrievalModel",
    "SemihardNegativeTripletSelector",
    "SiameseMNIST",
    "SiameseNet",
    "TripletCifar",
    "TripletLoss",
    "ViewHashLoss",
    "TripletMNIST",
    "TripletNet",
    "TripletSelector",
    "build_model",
    "fit",
    "load_dataset",
    "mean_average_precision",
    "pack_codes",
    "sign",
    "pairwise_distances",
    "unpack_codes",
    "__version__",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
