"""The HTTP search service: ``create_app(index_dir, run_dir)`` (or ``model_dir=``, an exported
model on ONNX Runtime, without torch) and its ``SearchService``."""

from __future__ import annotations

from deephash.serve.onnx_encoder import OnnxEncoder
from deephash.serve.service import SearchService

__all__ = ["OnnxEncoder", "SearchService", "create_app"]


def __getattr__(name: str):
    if name == "create_app":  # FastAPI is an optional dependency: import it only when asked
        from deephash.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'deephash.serve' has no attribute {name!r}")
