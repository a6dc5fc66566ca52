"""Contrastive losses on batches of views: supervised contrastive (SupCon) and its instance form (NT-Xent).

Khosla et al., "Supervised Contrastive Learning" (NeurIPS 2020), eq. 2 (``L_out``): for each anchor
``i`` with at least one positive,

    l_i = -1/|P(i)| * sum_{p in P(i)} log( exp(s_ip / t) / sum_{a != i} exp(s_ia / t) ),

where ``s`` is the cosine similarity, ``P(i)`` the other items sharing ``i``'s label and ``t`` the
temperature. Labels that are instance ids (two augmented views of each image share an id) give
SimCLR's NT-Xent loss (Chen et al. 2020), the instance-level term of CIBHash-style hashing.
The loss is the mean of ``l_i`` over anchors with a positive (0 when none has one).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from deephash.errors import DeephashError
from deephash.losses.registry import register_loss

__all__ = ["supcon_loss", "SupConLoss", "InstanceContrastiveLoss", "view_ids"]


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (``L_out``) of a batch.

    Args:
        features: float ``(N, D)``; cosine similarity is used (rows are L2-normalised here).
        labels: int ``(N,)``; items with equal labels are positives of each other (use
            `view_ids` for the instance-level / NT-Xent form).
        temperature: ``t > 0``.

    Returns:
        A scalar tensor: the mean over anchors that have at least one positive.
    """
    if features.ndim != 2 or labels.ndim != 1 or len(labels) != len(features):
        raise DeephashError(f"supcon_loss needs features (N, D) and labels (N,), got {tuple(features.shape)} and {tuple(labels.shape)}")
    if not temperature > 0:
        raise DeephashError(f"supcon_loss needs a temperature > 0, got {temperature}")
    z = F.normalize(features.float(), dim=1)
    logits = z @ z.T / temperature
    n = len(z)
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = positive.sum(1)
    per_anchor = -(log_prob.masked_fill(~positive, 0.0)).sum(1) / n_pos.clamp(min=1)
    has = n_pos > 0
    return (per_anchor * has).sum() / has.sum().clamp(min=1)


def view_ids(batch_size: int, n_views: int = 2, device: torch.device | None = None) -> torch.Tensor:
    """Instance ids ``int64 (n_views * batch_size,)`` for views stacked view-major: ``[0..B-1, 0..B-1, ...]``."""
    return torch.arange(batch_size, device=device).repeat(n_views)


@register_loss("supcon")
class SupConLoss(nn.Module):
    """`supcon_loss` as a module: ``loss(features (N, D), labels (N,)) -> scalar``.

    Args:
        temperature: softmax temperature t > 0.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return supcon_loss(features, labels, self.temperature)


@register_loss("instance-contrastive")
class InstanceContrastiveLoss(nn.Module):
    """NT-Xent over views stacked view-major: ``loss(features (V*B, D)) -> scalar``; labels are ignored.

    Args:
        temperature: softmax temperature t > 0.
        n_views: views per image V (the batch is ``[view 1 of all B images, view 2 of all, ...]``).
    """

    def __init__(self, temperature: float = 0.2, n_views: int = 2) -> None:
        super().__init__()
        if n_views < 2:
            raise DeephashError(f"instance-contrastive needs n_views >= 2, got {n_views}")
        self.temperature = temperature
        self.n_views = n_views

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if len(features) % self.n_views:
            raise DeephashError(f"instance-contrastive: {len(features)} rows are not {self.n_views} views of a batch")
        ids = view_ids(len(features) // self.n_views, self.n_views, features.device)
        return supcon_loss(features, ids, self.temperature)
