"""A retrieval loss plus a cross-entropy term on an auxiliary classifier's logits."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["AuxClassificationLoss"]


class AuxClassificationLoss(nn.Module):
    """``loss(u, labels) + weight * cross_entropy(logits, labels)``; the cross-entropy leaves out the
    items labelled -1 (no label).

    Called as ``(u, logits, labels)``: what a model's ``forward_with_logits`` returns, then labels.

    Args:
        loss: the retrieval loss, called on the relaxed codes / embeddings ``u`` float (B, D).
        weight: weight of the cross-entropy term on the aux logits float (B, K).
        label_smoothing: that cross-entropy's label smoothing, in [0, 1).
    """

    def __init__(self, loss: nn.Module, weight: float, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.loss = loss
        self.weight = weight
        self.label_smoothing = label_smoothing

    @property
    def num_selected(self) -> Any:
        return getattr(self.loss, "num_selected", None)

    def forward(self, u: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if labels.ndim == 1:  # items labelled -1 (no label) are left out: the mean of the others, 0 without any
            total = nn.functional.cross_entropy(logits, labels, label_smoothing=self.label_smoothing, ignore_index=-1,
                                                reduction="sum")
            ce = total / (labels >= 0).sum().clamp(min=1)
        else:
            ce = nn.functional.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return self.loss(u, labels) + self.weight * ce
