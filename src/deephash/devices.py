"""Device names to ``torch.device``: one rule for configs, ``fit`` and the command line."""

from __future__ import annotations

import torch

from deephash.errors import DeephashError

__all__ = ["resolve_device"]


def resolve_device(device: bool | str | torch.device) -> torch.device:
    """A ``torch.device`` from a config's or the seed's way of naming one.

    Args:
        device: ``"auto"`` (CUDA when available, else the CPU); a device string such as
            ``"cpu"`` or ``"cuda:1"``; a ``torch.device``; or the seed's ``cuda`` flag
            (``True``: the first CUDA device, ``False``: the CPU).

    Raises:
        DeephashError: a CUDA device was asked for but none is available.
        TypeError: any other type (never cast silently: ``Tensor.to(True)`` would cast to bool).
    """
    if isinstance(device, bool):
        if device and not torch.cuda.is_available():
            raise DeephashError("cuda=True but no CUDA device is available; pass False or 'cpu' to train on the CPU")
        return torch.device("cuda", 0) if device else torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a bool (the seed's cuda flag), a str or a torch.device, got {type(device).__name__}")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeephashError(f"device {str(device)!r} asked for but CUDA is not available; use device = \"cpu\"")
    return resolved
