"""Pretrained starting points: a backbone's weights from a local file, a timm model's input settings.

``model.pretrained_path`` names a state dict saved by anyone (timm, torchvision, a run of ours,
whose ``model.pt`` keeps the backbone's tensors under ``backbone.``):
``.safetensors`` is read with safetensors (no code can run), anything else with
``torch.load(weights_only=True)``. A checkpoint that wraps the state dict (``{"state_dict": ...}``,
``{"model": ...}``) or keeps DDP's ``module.`` prefix is unwrapped. The backbone must find every
one of its tensors in the file, at its shape; tensors it has no use for (a classifier) are left.

``model.pretrained`` on a ``timm:<model>`` backbone also fixes what the weights expect as input:
:func:`timm_input_config` reads timm's pretrained configuration (mean, std, input size), which a
run uses where its config leaves ``model.mean`` / ``model.std`` empty and ``data.image_size`` 0.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deephash.errors import DeephashError, NotFoundError, first_line
from deephash.models.backbones import import_timm

__all__ = ["load_backbone_weights", "load_state_dict_file", "timm_input_config"]

#: Keys under which a training checkpoint commonly keeps the model's state dict.
_WRAPPERS = ("state_dict", "model", "model_state_dict", "module")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: ``name -> tensor``, unwrapped (see the module's docstring).

    Raises:
        NotFoundError: the file does not exist.
        DeephashError: it is not a weights file (a pickle that needs code, a torn file, no tensors).
    """
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"pretrained weights {path} do not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every reader's own error becomes one line naming the file
        raise DeephashError(f"{path} is not a readable weights file: {first_line(exc)}") from None
    while isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DeephashError(f"{path} holds no state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> list[str]:
    """Copy a weights file into ``backbone``; returns the file's names the backbone has no use for.

    Raises:
        DeephashError: the file lacks some of the backbone's tensors, or has one at another shape
            (the message names the first).
    """
    state = load_state_dict_file(path)
    own = backbone.state_dict()
    if any(name not in state for name in own) and all(f"backbone.{name}" in state for name in own):
        state = {name: state[f"backbone.{name}"] for name in own}  # a deephash model.pt or checkpoint
    missing = [name for name in own if name not in state]
    if missing:
        raise DeephashError(f"{path} lacks {len(missing)} of the backbone's {len(own)} tensors, e.g. {missing[0]!r}; "
                            "is it the same architecture?")
    wrong = next((name for name in own if tuple(state[name].shape) != tuple(own[name].shape)), None)
    if wrong is not None:
        raise DeephashError(f"{path}: tensor {wrong!r} has shape {tuple(state[wrong].shape)}, the backbone's is "
                            f"{tuple(own[wrong].shape)}")
    backbone.load_state_dict({name: state[name] for name in own})
    return sorted(set(state) - set(own))


def timm_input_config(model_name: str) -> dict[str, Any]:
    """What timm's pretrained weights of ``model_name`` expect: ``{"mean": [...], "std": [...],
    "image_size": int}`` (the keys timm's pretrained configuration has; empty without one).

    A model that timm knows no pretrained configuration for (a custom or hub-only name) gives an
    empty dict: the run then takes the mean and std of its images and 224 px.

    Raises:
        DeephashError: timm is not installed.
    """
    timm = import_timm(model_name)
    try:
        values = {key: timm.get_pretrained_cfg_value(model_name, key) for key in ("mean", "std", "input_size")}
    except RuntimeError:  # no pretrained configuration registered for this name
        return {}
    out: dict[str, Any] = {key: [float(v) for v in values[key]] for key in ("mean", "std") if values[key] is not None}
    if values["input_size"] is not None:
        out["image_size"] = int(values["input_size"][-1])
    return out
