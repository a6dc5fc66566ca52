"""Binary codes, the Hamming index and retrieval metrics.

Names load lazily (PEP 562): codes, the index and the search engine import without torch.
"""

from __future__ import annotations

from deephash._lazy import lazy_exports

#: Each public name and the module that defines it (imported on first use: PEP 562).
_EXPORTS: dict[str, str] = {
    "binarize": "deephash.retrieval.codes",
    "CodeSet": "deephash.retrieval.codes",
    "evaluate_codes": "deephash.retrieval.metrics",
    "evaluate_embeddings": "deephash.retrieval.metrics",
    "hamming_distances": "deephash.retrieval.hamming",
    "hamming_knn": "deephash.retrieval.hamming",
    "hamming_range": "deephash.retrieval.hamming",
    "HashIndex": "deephash.retrieval.index",
    "knn_accuracy": "deephash.retrieval.metrics",
    "load_codes": "deephash.retrieval.codes",
    "mean_average_precision": "deephash.retrieval.metrics",
    "mean_average_precision_real": "deephash.retrieval.metrics",
    "pack_codes": "deephash.retrieval.codes",
    "pr_curve": "deephash.retrieval.metrics",
    "precision_at_k": "deephash.retrieval.metrics",
    "precision_within_radius": "deephash.retrieval.metrics",
    "ranked_list_metrics": "deephash.retrieval.metrics",
    "recall_at_k": "deephash.retrieval.metrics",
    "save_codes": "deephash.retrieval.codes",
    "unpack_codes": "deephash.retrieval.codes",
}

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
