"""Binary codes, the Hamming index and retrieval metrics."""

from deephash.retrieval.codes import CodeSet, binarize, load_codes, pack_codes, save_codes, unpack_codes
from deephash.retrieval.hamming import hamming_distances, hamming_knn, hamming_range
from deephash.retrieval.index import HashIndex
from deephash.retrieval.metrics import (
    evaluate_codes,
    evaluate_embeddings,
    knn_accuracy,
    mean_average_precision,
    mean_average_precision_real,
    pr_curve,
    precision_at_k,
    precision_within_radius,
    ranked_list_metrics,
    recall_at_k,
)

__all__ = [
    "CodeSet",
    "HashIndex",
    "binarize",
    "evaluate_codes",
    "evaluate_embeddings",
    "hamming_distances",
    "hamming_knn",
    "hamming_range",
    "knn_accuracy",
    "load_codes",
    "mean_average_precision",
    "mean_average_precision_real",
    "pack_codes",
    "pr_curve",
    "precision_at_k",
    "precision_within_radius",
    "ranked_list_metrics",
    "recall_at_k",
    "save_codes",
    "unpack_codes",
]
