"""Schedules for loss weights: set a loss attribute (e.g. ``quantization_weight``) per epoch.

``fit`` calls ``schedule.apply(loss_fn, epoch, n_epochs)`` at the start of each epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deephash.errors import ConfigError
from deephash.registry import Registry

__all__ = ["SCHEDULES", "Schedule", "LinearRamp", "Constant", "build_schedule", "inner_loss"]

#: Loss-weight schedules by their ``type``.
SCHEDULES: Registry[Schedule] = Registry("schedule type")


def inner_loss(loss_fn: Any, attribute: str) -> Any:
    """The loss that holds ``attribute``: ``loss_fn`` itself, or the first one found by following
    the ``.loss`` of wrappers (the aux-classifier loss, the distributed gather, a cross-batch
    memory); ``loss_fn`` when none holds it."""
    found = loss_fn
    while not hasattr(found, attribute) and hasattr(found, "loss"):
        found = found.loss
    return found if hasattr(found, attribute) else loss_fn


class Schedule:
    """Base class: ``value(epoch, n_epochs)`` says what ``attribute`` should be at ``epoch``."""

    attribute: str

    def value(self, epoch: int, n_epochs: int) -> float:
        raise NotImplementedError

    def apply(self, loss_fn: object, epoch: int, n_epochs: int) -> float:
        """Set ``<attribute>`` of ``loss_fn`` (or of the loss it wraps, see :func:`inner_loss`) to
        ``value(epoch, n_epochs)`` and return that value.

        Raises:
            ConfigError: the loss has no such attribute.
        """
        loss_fn = inner_loss(loss_fn, self.attribute)
        if not hasattr(loss_fn, self.attribute):
            raise ConfigError(
                f"schedule sets {self.attribute!r}, which {type(loss_fn).__name__} does not have"
            )
        value = self.value(epoch, n_epochs)
        setattr(loss_fn, self.attribute, value)
        return value


@SCHEDULES.register("linear")
class LinearRamp(Schedule):
    """Linear ramp from ``start`` at epoch 0 to ``end`` at epoch ``epochs``, constant afterwards.

    With ``epochs=None`` the ramp ends at the last epoch, ``n_epochs − 1`` (a one-epoch run stays
    at ``start``). Epochs count from 0.

    Args:
        attribute: Name of the loss attribute, e.g. "quantization_weight".
        start: Value at epoch 0.
        end: Value at the end of the ramp.
        epochs: Length of the ramp in epochs (>= 1), or None for the whole run.
    """

    def __init__(self, attribute: str, start: float, end: float, epochs: int | None = None) -> None:
        if epochs is not None and epochs < 1:
            raise ConfigError(f"LinearRamp epochs must be >= 1 or None, got {epochs}")
        self.attribute = attribute
        self.start = start
        self.end = end
        self.epochs = epochs

    def value(self, epoch: int, n_epochs: int) -> float:
        span = self.epochs if self.epochs is not None else n_epochs - 1
        if span <= 0:
            return float(self.start)
        frac = min(max(epoch / span, 0.0), 1.0)
        return float(self.start + (self.end - self.start) * frac)

    def __repr__(self) -> str:
        return f"LinearRamp({self.attribute!r}, {self.start}, {self.end}, epochs={self.epochs})"


@SCHEDULES.register("constant")
class Constant(Schedule):
    """Holds ``attribute`` at ``value`` every epoch."""

    def __init__(self, attribute: str, value: float) -> None:
        self.attribute = attribute
        self.constant = value

    def value(self, epoch: int, n_epochs: int) -> float:
        return float(self.constant)

    def __repr__(self) -> str:
        return f"Constant({self.attribute!r}, {self.constant})"


def build_schedule(spec: Mapping[str, Any]) -> Schedule:
    """Build a schedule from a config table.

    ``{"type": "linear", "attribute": "quantization_weight", "start": 1, "end": 16, "epochs": 10}``
    (``epochs`` optional) or ``{"type": "constant", "attribute": ..., "value": ...}``.

    Raises:
        ConfigError: unknown type, unknown key or missing key, naming it.
    """
    params = dict(spec)
    return SCHEDULES.create(params.pop("type", None), **params)
