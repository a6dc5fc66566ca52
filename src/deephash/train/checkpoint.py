"""Checkpoints that resume a run exactly: weights, optimizer, scheduler, history and RNG states.

A checkpoint is a ``torch.save`` file written atomically and holding only tensors and plain
containers, so it loads with ``torch.load(weights_only=True)``:

``{"format": "deephash-checkpoint", "version": 1, "epoch": next epoch to run (int),
"model": state_dict, "optimizer": state_dict | None, "scheduler": state_dict | None,
"history": list of dicts, "rng": {"torch": uint8 tensor, "cuda": [uint8 tensors]} | None,
"generators": [uint8 tensors], "extra": dict}``

Resuming from a checkpoint saved at the end of epoch ``e`` (``epoch = e + 1``) with the same
data, sampler and augmentation generators reproduces the uninterrupted run bit for bit on the CPU.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from deephash._io import atomic_write_bytes
from deephash.errors import ConfigError, DataFormatError, NotFoundError, first_line

FORMAT = "deephash-checkpoint"
VERSION = 1
_PLAIN = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel``/``DataParallel``/``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _plain(value: Any, where: str) -> Any:
    """Return ``value`` as weights_only-loadable data (numpy/0-d scalars to Python numbers)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if type(value) in _PLAIN:
        return value
    if isinstance(value, dict):
        plain = {k: _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
        if isinstance(value, OrderedDict):  # a state_dict: keep its version metadata
            plain = OrderedDict(plain)
            if hasattr(value, "_metadata"):
                plain._metadata = _plain(value._metadata, f"{where}._metadata")
        return plain
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalar
        return value.item()
    raise TypeError(
        f"checkpoint entry {where} is a {type(value).__name__}; only tensors, numbers, strings "
        "and lists/dicts of them can be stored (they must load with weights_only=True)"
    )


def checkpoint_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    epoch: int,
    history: Sequence[dict],
    extra: dict | None = None,
    rng: bool = True,
    *,
    generators: Sequence[torch.Generator] = (),
) -> dict:
    """The checkpoint dict (see the module docstring) without writing it."""
    rng_state = None
    if rng:
        rng_state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng_state["cuda"] = list(torch.cuda.get_rng_state_all())
    state = {
        "format": FORMAT,
        "version": VERSION,
        "epoch": int(epoch),
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "history": list(history),
        "rng": rng_state,
        "generators": [g.get_state() for g in generators],
        "extra": dict(extra or {}),
    }
    return _plain(state, "checkpoint")


def checkpoint_bytes(state: dict) -> bytes:
    """Serialise a checkpoint dict with ``torch.save``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    epoch: int,
    history: Sequence[dict],
    extra: dict | None = None,
    rng: bool = True,
    *,
    generators: Sequence[torch.Generator] = (),
) -> None:
    """Write a checkpoint to ``path`` atomically (a reader sees the old or the new file).

    Args:
        path: the file to write; its folder is created.
        model: the model (wrappers such as DDP are unwrapped, so keys carry no ``module.``).
        optimizer: its state is saved when given.
        scheduler: an LR scheduler whose state is saved when given.
        epoch: the next epoch to run (number of epochs done).
        history: ``fit``'s per-epoch records so far.
        extra: more plain data to keep (tensors, numbers, strings, lists/dicts of them).
        rng: also save the global torch RNG state (and CUDA's when in use).
        generators: ``torch.Generator`` objects (sampler, augmentation) whose states are saved,
            in order; ``load_checkpoint`` restores them in the same order.

    Raises:
        TypeError: something in ``history``/``extra`` cannot be loaded with weights_only=True.
    """
    state = checkpoint_state(model, optimizer, scheduler, epoch, history, extra, rng,
                             generators=generators)
    atomic_write_bytes(path, checkpoint_bytes(state))


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load and validate a checkpoint file without applying it.

    Raises:
        NotFoundError: ``path`` does not exist.
        DataFormatError: the file is corrupt, truncated, not a deephash checkpoint, or holds
            objects other than tensors and plain data (refused by ``weights_only=True``).
    """
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols in junk files
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to parse is a bad file
        if "weights_only" in str(error) or "Weights only" in str(error):
            reason = "holds objects other than tensors and plain data (refused by weights_only)"
        else:
            first = first_line(error) if str(error).strip() else ""
            reason = f"is corrupt or truncated ({type(error).__name__}: {first[:120]})"
        raise DataFormatError(f"checkpoint {path} {reason}") from None
    _validate(state, path)
    return state


def _validate(state: Any, path: Path) -> None:
    def bad(what: str) -> DataFormatError:
        return DataFormatError(f"checkpoint {path} is not a valid deephash checkpoint: {what}")

    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise bad("missing format marker")
    version = state.get("version")
    if not isinstance(version, int) or not 1 <= version <= VERSION:
        raise bad(f"unsupported version {version!r} (this deephash reads up to {VERSION})")
    if not isinstance(state.get("epoch"), int) or state["epoch"] < 0:
        raise bad("'epoch' is not a non-negative int")
    model = state.get("model")
    if not isinstance(model, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()
    ):
        raise bad("'model' is not a state_dict of tensors")
    for key in ("optimizer", "scheduler"):
        if state.get(key) is not None and not isinstance(state[key], dict):
            raise bad(f"'{key}' is not a dict")
    if not isinstance(state.get("history"), list) or not all(
        isinstance(r, dict) for r in state["history"]
    ):
        raise bad("'history' is not a list of dicts")
    rng = state.get("rng")
    if rng is not None and not (isinstance(rng, dict) and _is_state(rng.get("torch"))):
        raise bad("'rng' does not hold a torch RNG state")
    if rng is not None and not all(_is_state(s) for s in rng.get("cuda", [])):
        raise bad("'rng' holds a CUDA RNG state that is not a uint8 tensor")
    generators = state.get("generators")
    if not isinstance(generators, list) or not all(_is_state(g) for g in generators):
        raise bad("'generators' is not a list of uint8 tensors")
    if not isinstance(state.get("extra"), dict):
        raise bad("'extra' is not a dict")


def _is_state(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    map_location: Any = "cpu",
    *,
    generators: Sequence[torch.Generator] = (),
    rng: bool = True,
) -> dict:
    """Restore a checkpoint into ``model`` (and optimizer, scheduler, RNG states); return it.

    Call it after building the model, optimizer, sampler and augmentations (building them may
    draw random numbers); the global RNG state is restored last. Continue with
    ``fit(..., start_epoch=state["epoch"])``.

    Args:
        path: a file written by ``save_checkpoint``.
        model: receives the weights (DDP and other wrappers are unwrapped).
        optimizer: receives the optimizer state when given.
        scheduler: receives the scheduler state when given.
        map_location: passed to ``torch.load``.
        generators: restored from the saved generator states, in the order they were saved.
        rng: restore the global torch (and CUDA) RNG state when the checkpoint has one.

    Returns:
        The checkpoint dict (``"epoch"``, ``"history"``, ``"extra"``, ...).

    Raises:
        NotFoundError, DataFormatError: see ``read_checkpoint``; also when the checkpoint does
            not fit the model, optimizer or generators.
    """
    path = Path(path)
    state = read_checkpoint(path, map_location)
    generators = list(generators)
    if len(generators) != len(state["generators"]):
        raise DataFormatError(
            f"checkpoint {path} holds {len(state['generators'])} generator states but "
            f"{len(generators)} generators were given"
        )
    _apply(path, "model", lambda: unwrap_model(model).load_state_dict(state["model"]))
    if optimizer is not None:
        if state["optimizer"] is None:
            raise DataFormatError(f"checkpoint {path} holds no optimizer state")
        _apply(path, "optimizer", lambda: optimizer.load_state_dict(state["optimizer"]))
    if scheduler is not None:
        if state["scheduler"] is None:
            raise DataFormatError(f"checkpoint {path} holds no scheduler state")
        _apply(path, "scheduler", lambda: scheduler.load_state_dict(state["scheduler"]))
    for generator, saved in zip(generators, state["generators"]):
        _apply(path, "generator", lambda: generator.set_state(saved))
    if rng and state["rng"] is not None:
        _apply(path, "RNG", lambda: torch.set_rng_state(state["rng"]["torch"]))
        cuda_states = state["rng"].get("cuda", [])
        if torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count() > 0:
            _apply(path, "CUDA RNG", lambda: torch.cuda.set_rng_state_all(cuda_states))
    return state


def _apply(path: Path, what: str, action: Any) -> None:
    try:
        action()
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as error:
        message = re.sub(r"\s+", " ", str(error)).strip()
        if len(message) > 200:
            message = message[:200] + "..."
        raise DataFormatError(f"checkpoint {path} does not fit the {what}: {message}") from None


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """``directory/last.pt`` when it exists, else ``None`` (temporary files are ignored)."""
    last = Path(directory) / "last.pt"
    return last if last.is_file() else None


class CheckpointCallback:
    """``fit`` callback writing ``last.pt`` every ``every`` epochs and ``best.pt`` on improvement.

    Both files are full checkpoints (either can be resumed), written atomically, only when
    ``is_main_process`` (rank 0 under DDP). The RNG states are captured at the end of the epoch,
    after validation and the scheduler step, so resuming continues exactly where the run was.

    Args:
        directory: folder for ``last.pt`` and ``best.pt`` (created).
        model, optimizer, scheduler: what to save (scheduler may be ``None``).
        every: save ``last.pt`` after every ``every``-th epoch (and always after the last one run).
        monitor: record key deciding ``best.pt`` (e.g. ``"val_loss"``), or ``None`` for no best.
        mode: ``"min"`` or ``"max"``: which direction is an improvement.
        generators: sampler/augmentation generators saved with each checkpoint.
        is_main_process: write files only when true.
        history: records of earlier epochs (a resumed run's ``state["history"]``).
        extra: plain data stored in every checkpoint (e.g. the resolved config), or a function
            returning it at each save (state that changes during training, e.g. a weight average).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scheduler: Any,
        every: int = 1,
        monitor: str | None = "val_loss",
        mode: str = "min",
        generators: Sequence[torch.Generator] = (),
        is_main_process: bool = True,
        history: Sequence[dict] = (),
        extra: dict | Callable[[], dict] | None = None,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.directory = Path(directory)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.every, self.monitor, self.mode = every, monitor, mode
        self.generators = list(generators)
        self.is_main_process = is_main_process
        self.history = [dict(r) for r in history]
        self.extra = extra
        self.best = _best_of(self.history, monitor, mode)
        self._last_saved_epoch: int | None = None
        self._in_epoch = False

    @property
    def last_path(self) -> Path:
        return self.directory / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.directory / "best.pt"

    def _extra(self) -> dict | None:
        return self.extra() if callable(self.extra) else self.extra

    def on_epoch_start(self, epoch: int) -> None:
        self._in_epoch = True

    def on_epoch_end(self, epoch: int, record: dict) -> None:
        self._in_epoch = False
        self.history.append(dict(record))
        improved = False
        if self.monitor is not None:
            if self.monitor not in record:
                raise ConfigError(
                    f"CheckpointCallback monitors {self.monitor!r}, which the epoch record lacks "
                    f"(keys: {', '.join(record)}); pass monitor=None or a validation loader"
                )
            value = float(record[self.monitor])
            improved = _better(value, self.best, self.mode)
            if improved:
                self.best = value
        due = (epoch + 1) % self.every == 0
        if not (due or improved) or not self.is_main_process:
            return
        data = checkpoint_bytes(
            checkpoint_state(self.model, self.optimizer, self.scheduler, epoch + 1, self.history,
                             self._extra(), generators=self.generators)
        )
        if due:
            atomic_write_bytes(self.last_path, data)
            self._last_saved_epoch = epoch
        if improved:
            atomic_write_bytes(self.best_path, data)

    def on_train_end(self, history: list[dict]) -> None:
        # Stopped mid-epoch (StopTraining): the weights no longer match the last record.
        if not self.is_main_process or not history or self._in_epoch:
            return
        last_epoch = history[-1]["epoch"]
        if self._last_saved_epoch != last_epoch:
            save_checkpoint(self.last_path, self.model, self.optimizer, self.scheduler,
                            last_epoch + 1, self.history, self._extra(), generators=self.generators)
            self._last_saved_epoch = last_epoch


def _better(value: float, best: float | None, mode: str) -> bool:
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best if mode == "min" else value > best


def _best_of(history: Sequence[dict], monitor: str | None, mode: str) -> float | None:
    best = None
    for record in history:
        value = record.get(monitor) if monitor is not None else None
        if value is not None and _better(float(value), best, mode):
            best = float(value)
    return best
