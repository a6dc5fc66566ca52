"""Device names to ``torch.device``: one rule for configs, ``fit`` and the command line."""

from __future__ import annotations

import torch

from deephash.errors import DeephashError

__all__ = ["resolve_device"]


def resolve_device(name: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise ``torch.device(name)``.

    Raises:
        DeephashError: a CUDA device was asked for but none is available.
    """
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeephashError(f"device {str(name)!r} asked for but CUDA is not available; use device = \"cpu\"")
    return device
