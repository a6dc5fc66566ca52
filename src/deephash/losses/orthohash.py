"""OrthoHash: one cosine-similarity softmax loss towards class hash centers.

Hoe et al., "One Loss for All: Deep Hashing with a Single Cosine Similarity based Learning
Objective", NeurIPS 2021. The relaxed code u is scored against every class center c_k by cosine
similarity; a softmax cross-entropy with an additive margin pulls u towards its own center and
ranks the other centers by how likely their class is. Because cos(b, c_k) = 1 − 2·d_H(b, c_k)/bits
for binary b, the learned ranking of classes is exactly a ranking by Hamming distance: a query
whose first guess is wrong still finds its true class among the next centers, which is what mean
average precision rewards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deephash.losses.hashing import _check_bits, hash_centers, quantization_loss
from deephash.losses.metric import upcast_half
from deephash.losses.registry import register_loss


@register_loss("orthohash")
class OrthoHashLoss(nn.Module):
    """Cross-entropy over ``scale · (cos(u, c_k) − margin·[k = y])``, plus optional quantization.

    Args:
        bits: Code length.
        n_classes: Number of classes K (one ±1 center each, from `hash_centers`).
        scale: Softmax temperature s (the paper uses 8).
        margin: Additive cosine margin m on the true class (the paper uses 0.2–0.5).
        quantization_weight: λ of ``mean((|u| − 1)²)``; 0 disables it.
        label_smoothing: Passed to ``F.cross_entropy``.
        seed: Seed of random centers (used when bits is not a power of two).
        min_distance: Passed to `hash_centers`.

    Attributes:
        centers: float (K, bits) ±1 buffer.
    """

    centers: torch.Tensor

    def __init__(
        self,
        bits: int,
        n_classes: int,
        scale: float = 8.0,
        margin: float = 0.2,
        quantization_weight: float = 0.0,
        label_smoothing: float = 0.0,
        seed: int = 0,
        min_distance: int | None = None,
    ) -> None:
        super().__init__()
        self.bits = bits
        self.n_classes = n_classes
        self.scale = scale
        self.margin = margin
        self.quantization_weight = quantization_weight
        self.label_smoothing = label_smoothing
        self.register_buffer("centers", hash_centers(n_classes, bits, seed=seed, min_distance=min_distance))

    def logits(self, u: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each code to each center: float (B, K) in [−1, 1]."""
        return F.normalize(u, dim=1) @ (self.centers.to(u.dtype) / self.bits**0.5).T

    def forward(self, u: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``u`` float (B, bits) relaxed codes, ``labels`` int64 (B,) -> scalar."""
        _check_bits(u, self.bits)
        u = upcast_half(u)
        cosine = self.logits(u)
        cosine = cosine - self.margin * F.one_hot(labels, self.n_classes).to(cosine.dtype)
        loss = F.cross_entropy(self.scale * cosine, labels, label_smoothing=self.label_smoothing)
        if self.quantization_weight:
            loss = loss + self.quantization_weight * quantization_loss(u)
        return loss
