"""Callbacks for ``fit``: hooks, a history recorder and an append-only JSONL log.

A callback is any object with some of these methods (all optional), called in list order:

- ``on_epoch_start(epoch)``: ``epoch`` is the 0-based epoch index.
- ``on_batch_start(epoch, step, n_steps)`` / ``on_batch_end(epoch, step, n_steps)``: before the
  forward pass / after the optimizer step of every batch (``step`` 1-based, ``n_steps`` the
  loader's length or ``None``).
- ``on_step_end(epoch, step, loss_value, n_images)``: every ``log_interval`` steps and after the
  epoch's last step; ``step`` counts the batches done in this epoch (1-based), ``loss_value`` is
  the mean batch loss since the previous call, ``n_images`` the images fed since then.
- ``on_epoch_end(epoch, record)``: ``record`` is the epoch's history entry.
- ``on_train_end(history)``: once, with the records of the epochs run by this ``fit`` call.

Raising :class:`StopTraining` from a hook ends training cleanly; ``fit`` returns its history.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from deephash.errors import DataFormatError, NotFoundError


class StopTraining(Exception):
    """Raised by a callback to end ``fit`` early (not an error)."""


class Callback:
    """Base class with empty hooks; subclassing it is optional."""

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def on_step_end(self, epoch: int, step: int, loss_value: float, n_images: int) -> None:
        pass

    def on_epoch_end(self, epoch: int, record: dict) -> None:
        pass

    def on_train_end(self, history: list[dict]) -> None:
        pass


class History(Callback):
    """Collects epoch records; starts from ``records`` (e.g. a checkpoint's history on resume)."""

    def __init__(self, records: list[dict] | tuple = ()) -> None:
        self.records: list[dict] = [dict(r) for r in records]

    def on_epoch_end(self, epoch: int, record: dict) -> None:
        self.records.append(dict(record))


class FreezeBackbone(Callback):
    """The first ``n_epochs`` epochs train the rest of the model on a frozen ``backbone``: its
    parameters get no gradient (so the optimizer leaves them, weight decay included) and its
    BatchNorm layers keep their running statistics (eval mode, set before every batch, since
    ``fit`` puts the whole model in training mode each epoch). Later epochs train it again; the
    state follows the epoch alone, so a resumed run freezes exactly as an uninterrupted one."""

    def __init__(self, backbone: Any, n_epochs: int) -> None:
        self.backbone, self.n_epochs, self.frozen = backbone, n_epochs, False

    def on_epoch_start(self, epoch: int) -> None:
        self.frozen = epoch < self.n_epochs
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(not self.frozen)

    def on_batch_start(self, epoch: int, step: int, n_steps: int | None) -> None:
        if self.frozen:
            self.backbone.eval()


def _json_value(value: Any) -> Any:
    """Plain JSON: non-finite floats become strings ("nan", "inf", "-inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


class JsonlLogger(Callback):
    """Appends one JSON object per line: ``{"type": "step", ...}`` and ``{"type": "epoch", ...}``.

    Each line is flushed and fsynced as it is written. A torn last line (the writer was killed
    mid-line) is cut off before the first new line is appended, so a resumed run keeps the file
    valid.

    Args:
        path: the ``.jsonl`` file (created with its folder when missing).
        is_main_process: write only when true (rank 0 under DDP).
    """

    def __init__(self, path: str | os.PathLike, is_main_process: bool = True) -> None:
        self.path = Path(path)
        self.is_main_process = is_main_process
        self._repaired = False

    def _repair_tail(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb+") as handle:
            data = handle.read()
            if data and not data.endswith(b"\n"):
                handle.truncate(data.rfind(b"\n") + 1)
                handle.flush()
                os.fsync(handle.fileno())

    def write(self, entry: dict) -> None:
        """Append ``entry`` as one line (no-op off the main process)."""
        if not self.is_main_process:
            return
        if not self._repaired:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._repair_tail()
            self._repaired = True
        line = json.dumps({k: _json_value(v) for k, v in entry.items()}, allow_nan=False)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def on_step_end(self, epoch: int, step: int, loss_value: float, n_images: int) -> None:
        self.write(
            {"type": "step", "epoch": epoch, "step": step, "loss": loss_value, "images": n_images}
        )

    def on_epoch_end(self, epoch: int, record: dict) -> None:
        self.write({"type": "epoch", **record})


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL log; a torn final line is skipped, any other bad line is an error.

    Raises:
        NotFoundError: the file does not exist.
        DataFormatError: a line other than the last is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"log file {path} does not exist")
    lines = path.read_bytes().split(b"\n")
    torn_tail = lines[-1] != b""  # no newline after the last line: possibly cut mid-write
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError("not an object")
        except ValueError:
            if torn_tail and number == len(lines):
                break
            raise DataFormatError(f"{path}, line {number}: not a JSON object") from None
        entries.append(entry)
    return entries
