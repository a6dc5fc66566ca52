"""The sign rule of every binary code: ``sign(x)`` with ``0 ↦ +1``, written once.

Hash heads, hashing losses, PCA codes, the search service and :func:`deephash.retrieval.pack_codes`
all binarise with these two functions, so a value of exactly 0 gives the same bit everywhere: a
``+1`` (a ``1`` bit once packed). PyTorch is imported only when a tensor comes in, so the
server of an exported model (``deephash serve --model``) uses the same rule without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from deephash._tensors import is_tensor

if TYPE_CHECKING:
    import torch

__all__ = ["is_plus", "sign"]


def is_plus(x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Where the sign of ``x`` is ``+1`` (``x >= 0``: 0 counts as ``+1``); bool of x's shape and kind."""
    return x >= 0


def sign(x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Sign of ``x`` as ``{-1, +1}`` with ``0 ↦ +1``, without gradient.

    Args:
        x: a tensor or array of any shape (NaN gives ``-1``).

    Returns:
        The same kind (torch on x's device, or numpy) and shape; x's dtype when it is floating,
        else float32.
    """
    if is_tensor(x):  # torch only where a tensor came in: an exported model's server runs without it
        import torch

        dtype = x.dtype if x.is_floating_point() else torch.float32
        one = torch.ones((), dtype=dtype, device=x.device)
        return torch.where(is_plus(x.detach()), one, -one)
    x = np.asarray(x)
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
    return np.where(is_plus(x), 1.0, -1.0).astype(dtype)
