"""Tensor-or-array inputs without importing torch: the modules a server on an exported model loads
(``deephash serve --model``: retrieval's codes and index, the service) stay importable where
PyTorch is not installed. Layer 0, so that any part can ask."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

__all__ = ["as_numpy", "is_tensor"]


def is_tensor(x: Any) -> bool:
    """Whether ``x`` is a ``torch.Tensor``; False without importing torch when no module has (then
    nothing can be a tensor)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def as_numpy(x: Any) -> np.ndarray:
    """A numpy array of ``x``: a tensor detached and moved to the CPU, anything else ``np.asarray``."""
    return x.detach().cpu().numpy() if is_tensor(x) else np.asarray(x)
