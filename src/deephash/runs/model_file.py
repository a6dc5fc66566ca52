"""``model.pt``: write a run's trained model, and load it back with its resolved config."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from deephash._io import atomic_torch_save
from deephash.config import Config, config_from_dict, config_to_dict
from deephash.devices import resolve_device
from deephash.errors import DataFormatError, DeephashError, NotFoundError, first_line
from deephash.models import build_model, channels_last_on_cpu, model_spec
from deephash.runs.layout import CHECKPOINT_DIR, MODEL_FILE

__all__ = ["is_hash_model", "load_run", "save_model"]


def save_model(path: Path, model: nn.Module, config: Config, classes: list[str]) -> None:
    """Write ``model.pt`` atomically: spec, state dict (CPU), resolved config, class names."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({"spec": model_spec(model), "state_dict": state, "config": config_to_dict(config),
                       "classes": list(classes)}, path)


def load_run(run_dir: str | os.PathLike, device: str | torch.device | None = None) -> tuple[nn.Module, Config]:
    """The trained model of a run (eval mode) and its resolved config.

    Args:
        run_dir: a run directory written by ``train_run``.
        device: where to put the model; default: the config's device (``auto``: CUDA if present).

    Raises:
        NotFoundError: no such run directory or no ``model.pt`` in it.
        DataFormatError: ``model.pt`` is corrupt.
    """
    run_dir = Path(run_dir)
    path = run_dir / MODEL_FILE
    if not run_dir.is_dir():
        raise NotFoundError(f"run directory {run_dir} does not exist")
    if not path.is_file():
        hint = " (training did not finish: resume it with `deephash train RUN --resume`)" if (run_dir / CHECKPOINT_DIR).is_dir() else ""
        raise NotFoundError(f"{run_dir} is not a finished run: no {MODEL_FILE}{hint}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        config = config_from_dict(saved["config"], str(path))
        model = build_model(saved["spec"], weights=False)  # every weight is in the file
        model.load_state_dict(saved["state_dict"])
    except DeephashError:
        raise
    except Exception as exc:  # corrupt zip, missing keys, mismatched tensors
        raise DataFormatError(f"{path} is not a deephash model file ({first_line(exc)})") from None
    model.classes = list(saved.get("classes", []))
    target = resolve_device(config.device) if device is None else torch.device(device)
    return channels_last_on_cpu(model.to(target)).eval(), config


def is_hash_model(model: nn.Module) -> bool:
    """Whether ``model`` makes hash codes (a ``bits`` attribute that is set)."""
    return getattr(model, "bits", None) is not None
