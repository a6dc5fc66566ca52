"""Continuation (HashNet): sharpen the hash head's tanh during training, per batch."""

from __future__ import annotations

from torch import nn

from deephash.errors import ConfigError

__all__ = ["TanhContinuation"]


class TanhContinuation:
    """A ``fit`` callback: before each batch, set ``head.scale`` (β in ``tanh(β·a)``) linearly from
    ``start`` at the first step to ``end`` at the last.

    A rising β makes the relaxed codes the loss sees approach the ±1 codes search uses, so the
    loss optimises what is evaluated late in training while early training keeps smooth
    gradients (Cao et al., HashNet, 2017). β depends on the step alone, so a resumed run
    continues it exactly.

    Args:
        head: a module with a float ``scale`` attribute (``HashHead``).
        start, end: β at the first and at the last step, > 0.
        n_epochs: epochs of the run.
    """

    def __init__(self, head: nn.Module, start: float, end: float, n_epochs: int) -> None:
        if not hasattr(head, "scale"):
            raise ConfigError(f"tanh continuation needs a hash head, got {type(head).__name__}")
        if not start > 0 or not end > 0:
            raise ConfigError(f"tanh continuation needs start > 0 and end > 0, got {start} and {end}")
        self.head, self.start, self.end, self.n_epochs = head, float(start), float(end), n_epochs

    def value(self, epoch: int, step: int, n_steps: int) -> float:
        """β at ``step`` (1-based) of ``epoch`` (0-based), ``n_steps`` steps an epoch."""
        total = max(1, self.n_epochs * n_steps)
        frac = min(1.0, max(0.0, (epoch * n_steps + step - 1) / max(1, total - 1)))
        return self.start + (self.end - self.start) * frac

    def on_batch_start(self, epoch: int, step: int, n_steps: int | None) -> None:
        self.head.scale = self.value(epoch, step, n_steps or 1)
