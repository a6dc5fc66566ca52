"""Metrics accumulated during training, with the seed's interface.

``fit`` calls ``metric(outputs, target, loss_outputs)`` after every batch, where ``outputs`` is the
model's output as a tuple, ``target`` is ``(labels,)`` or ``None`` and ``loss_outputs`` is
``(loss,)`` or ``(loss, num_selected)``. Counts stay on the batch's device; ``value()`` is the only
place that synchronises with it.
"""

from __future__ import annotations

from typing import Sequence

import torch

Tensor = torch.Tensor


class Metric:
    """Base class: accumulate over an epoch, read with ``value()``, clear with ``reset()``."""

    def __call__(
        self, outputs: Sequence[Tensor], target: Sequence[Tensor] | None, loss: Sequence
    ) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def value(self) -> float:
        raise NotImplementedError

    def name(self) -> str:
        raise NotImplementedError


class AccumulatedAccuracyMetric(Metric):
    """Classification accuracy in percent, accumulated over the epoch.

    ``outputs[0]`` holds class scores (e.g. log-probabilities) ``float (B, C)``; ``target[0]`` the
    labels ``int64 (B,)``. The prediction is the arg-max over classes.
    """

    def __init__(self) -> None:
        self.reset()

    def __call__(
        self, outputs: Sequence[Tensor], target: Sequence[Tensor] | None, loss: Sequence
    ) -> None:
        if target is None:
            raise ValueError("AccumulatedAccuracyMetric needs labelled batches (x, y)")
        pred = outputs[0].detach().argmax(dim=1)
        labels = target[0].detach().view_as(pred)
        correct = (pred == labels).sum()
        self.correct = correct if isinstance(self.correct, int) else self.correct + correct
        self.total += labels.numel()

    def reset(self) -> None:
        self.correct: Tensor | int = 0
        self.total = 0

    def value(self) -> float:
        """Accuracy in percent; 0.0 before any batch."""
        if self.total == 0:
            return 0.0
        return 100.0 * float(self.correct) / self.total

    def name(self) -> str:
        return "Accuracy"


class AverageNonzeroTripletsMetric(Metric):
    """Average number of pairs/triplets a mining loss used per batch (``loss[1]``).

    ``loss[1]`` may be an int or a 0-d integer tensor (counted on the device, read in ``value()``).
    """

    def __init__(self) -> None:
        self.reset()

    def __call__(
        self, outputs: Sequence[Tensor], target: Sequence[Tensor] | None, loss: Sequence
    ) -> None:
        if len(loss) < 2:
            raise ValueError(
                "AverageNonzeroTripletsMetric needs a loss with a num_selected attribute "
                "(OnlineTripletLoss or OnlineContrastiveLoss)"
            )
        count = loss[1]
        if isinstance(count, Tensor):
            count = count.detach()
        self.total = self.total + count
        self.batches += 1

    def reset(self) -> None:
        self.total: Tensor | int = 0
        self.batches = 0

    def value(self) -> float:
        """Mean count per batch; 0.0 before any batch."""
        if self.batches == 0:
            return 0.0
        return float(self.total) / self.batches

    def name(self) -> str:
        return "Average nonzero triplets"
