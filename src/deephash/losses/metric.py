"""Offline metric losses on explicit pairs and triplets (squared Euclidean, as in the seed)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from deephash.distances import safe_sqrt
from deephash.losses.registry import register_loss


def upcast_half(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32 when it is float16/bfloat16 (losses compute there: margins such as 1e6 and
    squared distances overflow half precision), else ``x`` unchanged; gradients flow back in
    ``x``'s dtype."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def contrastive_terms(
    x1: torch.Tensor, x2: torch.Tensor, target: torch.Tensor, margin: float
) -> torch.Tensor:
    """Per-pair ``½·(t·d² + (1 − t)·relu(margin − d)²)``, ``d`` the Euclidean distance.

    Args:
        x1, x2: float ``(N, D)``.
        target: ``(N,)``, 1 for a same-class pair, 0 otherwise (any numeric or bool dtype).
        margin: Euclidean margin.

    Returns:
        float ``(N,)``; finite gradients also where ``d = 0``.
    """
    return contrastive_from_squared((x1 - x2).pow(2).sum(1), target, margin)


def contrastive_from_squared(squared: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """`contrastive_terms` from squared distances ``d²`` float ``(N,)``; ``target`` ``(N,)``, 1 = same class."""
    t = target.to(squared.dtype)
    return 0.5 * (t * squared + (1 - t) * F.relu(margin - safe_sqrt(squared)).pow(2))


def triplet_terms(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float
) -> torch.Tensor:
    """Per-triplet ``relu(|a − p|² − |a − n|² + margin)``.

    Args:
        anchor, positive, negative: float ``(N, D)``.
        margin: margin in squared-distance units.

    Returns:
        float ``(N,)``.
    """
    d_ap = (anchor - positive).pow(2).sum(1)
    d_an = (anchor - negative).pow(2).sum(1)
    return F.relu(d_ap - d_an + margin)


@register_loss("contrastive")
class ContrastiveLoss(nn.Module):
    """Mean contrastive loss over explicit pairs.

    Args:
        margin: Euclidean distance beyond which different-class pairs cost nothing.
    """

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``x1, x2`` float ``(N, D)``, ``target`` ``(N,)`` 1 = same class → scalar."""
        if len(x1) == 0:
            return (x1.sum() + x2.sum()) * 0
        x1, x2 = upcast_half(x1), upcast_half(x2)
        return contrastive_terms(x1, x2, target, self.margin).mean()


@register_loss("triplet")
class TripletLoss(nn.Module):
    """Mean triplet loss over explicit triplets.

    Args:
        margin: margin in squared-distance units.
    """

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """``anchor, positive, negative`` float ``(N, D)`` → scalar."""
        if len(anchor) == 0:
            return (anchor.sum() + positive.sum() + negative.sum()) * 0
        anchor, positive, negative = upcast_half(anchor), upcast_half(positive), upcast_half(negative)
        return triplet_terms(anchor, positive, negative, self.margin).mean()
