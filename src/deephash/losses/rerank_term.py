"""A loss plus the instance (NT-Xent) term on a re-rank head's vectors over augmented views."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deephash.errors import DeephashError
from deephash.losses.contrastive import supcon_loss, view_ids

__all__ = ["RerankInstanceLoss"]


class RerankInstanceLoss(nn.Module):
    """``loss(*outputs, labels) + weight · NT-Xent(z, views, temperature)``.

    Called as ``(*outputs, z, labels)``: what a model's ``training_outputs(..., rerank=True)``
    returns, then labels. ``z`` float ``(V*B, D_r)`` are the re-rank head's vectors of the batch's
    V views stacked view-major (``data.views``); the instance term makes the views of one image
    each other's nearest among all rows, so the vectors tell near-duplicates apart from the rest
    of their class, whatever the codes do. ``outputs`` go to ``loss`` unchanged.

    Args:
        loss: the retrieval loss (possibly an :class:`~deephash.losses.aux.AuxClassificationLoss`).
        weight: weight of the instance term, > 0.
        temperature: its softmax temperature, > 0.
        n_views: views per image V >= 2.
    """

    def __init__(self, loss: nn.Module, weight: float, temperature: float = 0.2, n_views: int = 2) -> None:
        super().__init__()
        if n_views < 2:
            raise DeephashError(f"the re-rank head's instance term needs n_views >= 2 (data.views), got {n_views}")
        if not weight > 0 or not temperature > 0:
            raise DeephashError(f"the re-rank instance term needs weight > 0 and temperature > 0, got {weight} and {temperature}")
        self.loss = loss
        self.weight = weight
        self.temperature = temperature
        self.n_views = n_views

    @property
    def num_selected(self) -> Any:
        return getattr(self.loss, "num_selected", None)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        *outputs, z, labels = inputs
        if len(z) % self.n_views:
            raise DeephashError(f"re-rank instance term: {len(z)} rows are not {self.n_views} views of a batch")
        ids = view_ids(len(z) // self.n_views, self.n_views, z.device)
        return self.loss(*outputs, labels) + self.weight * supcon_loss(z, ids, self.temperature)
