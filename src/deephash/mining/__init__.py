"""Online pair and triplet mining: pure functions and the seed's selector classes."""

from deephash.mining.pairs import (
    all_negative_pairs,
    all_positive_pairs,
    hardest_negative_pairs,
    random_negative_pairs,
)
from deephash.mining.selectors import (
    SELECTORS,
    AllPositivePairSelector,
    AllTripletSelector,
    BatchHardTripletSelector,
    HardestNegativeTripletSelector,
    HardNegativePairSelector,
    PairSelector,
    RandomNegativeTripletSelector,
    SemihardNegativeTripletSelector,
    TripletSelector,
    create_selector,
)
from deephash.mining.triplets import (
    all_triplets,
    batch_hard_triplets,
    hardest_negative_triplets,
    random_negative_triplets,
    semihard_negative_triplets,
)

__all__ = [
    "SELECTORS",
    "AllPositivePairSelector",
    "AllTripletSelector",
    "BatchHardTripletSelector",
    "HardNegativePairSelector",
    "HardestNegativeTripletSelector",
    "PairSelector",
    "RandomNegativeTripletSelector",
    "SemihardNegativeTripletSelector",
    "TripletSelector",
    "all_negative_pairs",
    "all_positive_pairs",
    "all_triplets",
    "batch_hard_triplets",
    "create_selector",
    "hardest_negative_pairs",
    "hardest_negative_triplets",
    "random_negative_pairs",
    "random_negative_triplets",
    "semihard_negative_triplets",
]
