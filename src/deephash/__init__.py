"""deephash: Siamese/triplet embeddings with online mining, and deep binary hashing for retrieval.

The seed's public names are re-exported here; the sub-packages follow the path of the data:
``data`` → ``models`` → ``distances`` → ``mining`` → ``losses`` → ``train`` → ``retrieval``.
"""


from deephash.data import (
    BalancedBatchSampler,
    BalancedBatchSamplerCifar,
    BatchLoader,
    SiameseMNIST,
    TripletCifar,
    TripletMNIST,
    load_dataset,
)
from deephash.distances import pairwise_distances
from deephash.errors import DeephashError
from deephash.losses import (
    ContrastiveLoss,
    CrossBatchMemory,
    CSQLoss,
    DSHLoss,
    DTSHLoss,
    LinearRamp,
    OnlineContrastiveLoss,
    OnlineTripletLoss,
    TripletLoss,
    ViewHashLoss,
)
from deephash.mining import (
    AllPositivePairSelector,
    AllTripletSelector,
    BatchHardTripletSelector,
    HardestNegativeTripletSelector,
    HardNegativePairSelector,
    PairSelector,
    RandomNegativeTripletSelector,
    SemihardNegativeTripletSelector,
    TripletSelector,
)
from deephash.models import (
    ClassificationNet,
    EmbeddingNet,
    EmbeddingNetL2,
    HashHead,
    RetrievalModel,
    SiameseNet,
    TripletNet,
    build_model,
)
from deephash.retrieval import HashIndex, mean_average_precision, pack_codes, unpack_codes
from deephash.train import AccumulatedAccuracyMetric, AverageNonzeroTripletsMetric, fit

from deephash._version import __version__

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
    "TripletMNIST",
    "TripletNet",
    "TripletSelector",
    "ViewHashLoss",
    "build_model",
    "fit",
    "load_dataset",
    "mean_average_precision",
    "pack_codes",
    "pairwise_distances",
    "unpack_codes",
    "__version__",
]
