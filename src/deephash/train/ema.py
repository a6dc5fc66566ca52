"""An exponential moving average of a model's weights, kept during training (a ``fit`` callback).

After every optimizer step each floating-point entry of the state dict (parameters and buffers
such as BatchNorm's running statistics) moves towards the model's value:
``ema = decay * ema + (1 - decay) * value``; integer buffers (``num_batches_tracked``) are copied.
The first update copies the weights. :meth:`WeightAverage.copy_to` writes the average into a
model of the same architecture (the run's saved model). The state is plain tensors, stored in a
checkpoint's ``extra`` so that a resumed run continues the same average.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from deephash.train.checkpoint import unwrap_model


class WeightAverage:
    """EMA of ``model``'s state dict, updated by ``on_batch_end`` (one call per optimizer step).

    Args:
        model: the trained model (DDP/compile wrappers are unwrapped).
        decay: weight of the old average per step, in [0, 1); 0.998 averages over roughly the
            last 500 steps (1 / (1 - decay)).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.model = unwrap_model(model)
        self.decay = float(decay)
        self.average: OrderedDict[str, torch.Tensor] = OrderedDict(
            (k, v.detach().clone()) for k, v in self.model.state_dict().items())
        self.steps = 0
        self._split()

    def _split(self) -> None:
        live = self.model.state_dict()
        floats = [k for k, v in self.average.items() if v.is_floating_point()]
        self._avg_f = [self.average[k] for k in floats]
        self._live_f = [live[k] for k in floats]
        self._ints = [(self.average[k], live[k]) for k, v in self.average.items() if not v.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average one step towards the model's current weights."""
        if self.steps == 0:
            torch._foreach_copy_(self._avg_f, self._live_f)
        else:
            torch._foreach_lerp_(self._avg_f, self._live_f, 1.0 - self.decay)
        for average, live in self._ints:
            average.copy_(live)
        self.steps += 1

    def on_batch_end(self, epoch: int, step: int, n_steps: int | None) -> None:
        self.update()

    def state_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint: the averaged tensors and the number of updates."""
        return {"average": self.average, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (same architecture)."""
        saved = state["average"]
        if set(saved) != set(self.average):
            raise KeyError("the saved weight average does not match the model's state dict keys")
        with torch.no_grad():
            for key, value in self.average.items():
                value.copy_(saved[key])
        self.steps = int(state["steps"])

    def copy_to(self, model: nn.Module) -> nn.Module:
        """Load the average into ``model`` (returned); a no-op before the first update."""
        if self.steps:
            unwrap_model(model).load_state_dict(self.average)
        return model
