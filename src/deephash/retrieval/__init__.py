"""Binary codes, the Hamming index and retrieval metrics.

Names load lazily (PEP 562): codes, the index and the search engine import without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

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


def __getattr__(name: str) -> Any:
    """A public name from its module, or a sub-package (``deephash.runs``), imported when first asked for."""
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    elif not name.startswith("__"):
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
