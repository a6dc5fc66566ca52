"""Hash codes learned without labels: NT-Xent between augmented views on the relaxed codes.

The self-supervised objective of contrastive unsupervised hashing (CIBHash, Qiu et al. 2021, in its
relaxed form): every image comes as V augmented views stacked view-major (``data.views``); the
views of one image are each other's positives and every other row of the batch a negative, on the
cosine similarity of the relaxed codes ``u`` (the hash head's tanh outputs), so the codes keep what
survives the augmentations and tell images apart. A quantization term pulls ``u`` to ±1 and a bit
balance term keeps each bit +1 on half of the batch (GreedyHash / BiHalf's aim of even bits).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from deephash.errors import DeephashError
from deephash.losses.contrastive import supcon_loss, view_ids
from deephash.losses.hashing import bit_balance_loss, quantization_loss
from deephash.losses.registry import register_loss

__all__ = ["ViewHashLoss"]


@register_loss("view-hash")
class ViewHashLoss(nn.Module):
    """``loss(u (V*B, bits)[, labels]) = NT-Xent(u, views, temperature)
    + quantization_weight · mean((|u| − 1)²) + balance_weight · mean_bits(mean_batch(u)²)``.

    Labels are never read (``needs_labels = False``): a config with ``data.labels = "none"`` trains
    with it, and a labelled batch's labels are ignored.

    Args:
        n_views: views per image V >= 2 (a run fills it from ``data.views``).
        temperature: the NT-Xent softmax temperature, > 0.
        quantization_weight: weight of the pull of ``u`` towards ±1, >= 0.
        balance_weight: weight of the bit balance term, >= 0.
    """

    needs_labels: ClassVar[bool] = False

    def __init__(self, n_views: int = 2, temperature: float = 0.3, quantization_weight: float = 0.1,
                 balance_weight: float = 0.0) -> None:
        super().__init__()
        if n_views < 2:
            raise DeephashError(f"view-hash needs n_views >= 2 (data.views, with data.augment), got {n_views}")
        if not temperature > 0 or quantization_weight < 0 or balance_weight < 0:
            raise DeephashError(f"view-hash needs temperature > 0 and weights >= 0, got {temperature}, "
                                f"{quantization_weight}, {balance_weight}")
        self.n_views = n_views
        self.temperature = temperature
        self.quantization_weight = quantization_weight
        self.balance_weight = balance_weight

    def forward(self, u: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if u.ndim != 2 or len(u) % self.n_views:
            raise DeephashError(f"view-hash: {tuple(u.shape)} rows are not {self.n_views} views of a batch of codes")
        loss = supcon_loss(u, view_ids(len(u) // self.n_views, self.n_views, u.device), self.temperature)
        if self.quantization_weight:
            loss = loss + self.quantization_weight * quantization_loss(u)
        if self.balance_weight:
            loss = loss + self.balance_weight * bit_balance_loss(u)
        return loss
