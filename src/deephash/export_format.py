"""The contract of an exported encoder folder, shared by its writer (``deephash.runs.export``, torch)
and its reader (``deephash.serve.onnx_encoder``, no torch): the names, and how code values become bits."""

from __future__ import annotations

import numpy as np

__all__ = ["DESCRIPTION_FILE", "ENCODER_FILE", "FORMAT", "FORMAT_VERSION", "INPUT", "RERANK", "VALUES", "sign_bits"]

#: The ONNX graph and the JSON that describes it, inside the export folder.
ENCODER_FILE = "encoder.onnx"
DESCRIPTION_FILE = "encoder.json"
#: ``encoder.json``'s ``format`` and ``format_version`` (raise the version on an incompatible change).
FORMAT = "deephash-onnx-encoder"
FORMAT_VERSION = 1
#: The graph's input (normalised images) and outputs (code values, re-rank vectors).
INPUT, VALUES, RERANK = "images", "code_values", "rerank"


def sign_bits(values: np.ndarray) -> np.ndarray:
    """The sign rule on code values: bool of the same shape, True (a 1 bit, +1) where ``value >= 0``
    (0 ↦ +1, NaN ↦ -1), as ``deephash.models.heads.sign_codes`` does for tensors.

    The one place the ONNX path binarises (the export's check and ``OnnxEncoder``); to become the
    low-layer sign function of branch ``rules`` (``deephash.signs.is_plus``) once both are merged.
    """
    return np.asarray(values) >= 0
