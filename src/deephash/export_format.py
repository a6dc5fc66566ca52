"""The contract of an exported encoder folder, shared by its writer (``deephash.runs.export``, torch)
and its reader (``deephash.serve.onnx_encoder``, no torch): the names. Code values become bits by the one sign
rule, ``deephash.signs.is_plus`` (0 ↦ +1)."""

from __future__ import annotations

__all__ = ["DESCRIPTION_FILE", "ENCODER_FILE", "FORMAT", "FORMAT_VERSION", "INPUT", "RERANK", "VALUES"]

#: The ONNX graph and the JSON that describes it, inside the export folder.
ENCODER_FILE = "encoder.onnx"
DESCRIPTION_FILE = "encoder.json"
#: ``encoder.json``'s ``format`` and ``format_version`` (raise the version on an incompatible change).
FORMAT = "deephash-onnx-encoder"
FORMAT_VERSION = 1
#: The graph's input (normalised images) and outputs (code values, re-rank vectors).
INPUT, VALUES, RERANK = "images", "code_values", "rerank"
