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

from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from deephash.errors import DeephashError
from deephash.losses.registry import register_loss

__all__ = ["supcon_loss", "ContrastiveHashLoss", "SupConLoss", "InstanceContrastiveLoss", "in_batch_pseudo_labels",
           "view_ids"]


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (``L_out``) of a batch.

    Args:
        features: float ``(N, D)``; cosine similarity is used (rows are L2-normalised here).
        labels: int ``(N,)``; items with equal labels are positives of each other (use
            `view_ids` for the instance-level / NT-Xent form); a negative label (-1: no label)
            is nobody's positive, so such an item is only a negative of the others.
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
    positive = (labels[:, None] == labels[None, :]) & ~self_mask & (labels >= 0)[:, None]
    n_pos = positive.sum(1)
    per_anchor = -(log_prob.masked_fill(~positive, 0.0)).sum(1) / n_pos.clamp(min=1)
    has = n_pos > 0
    return (per_anchor * has).sum() / has.sum().clamp(min=1)


def view_ids(batch_size: int, n_views: int = 2, device: torch.device | None = None) -> torch.Tensor:
    """Instance ids ``int64 (n_views * batch_size,)`` for views stacked view-major: ``[0..B-1, 0..B-1, ...]``."""
    return torch.arange(batch_size, device=device).repeat(n_views)


def in_batch_pseudo_labels(features: torch.Tensor, labels: torch.Tensor, n_views: int, threshold: float,
                           temperature: float = 0.1) -> torch.Tensor:
    """``labels`` with each unlabelled image given the class of the batch's labelled items it is
    confidently close to (no gradient flows through the choice).

    For every row, the score of class ``c`` is its mean cosine similarity to the batch's labelled
    rows of class ``c``; ``p = softmax(scores / temperature)`` over the classes present. An image's
    ``p`` is the mean over its ``n_views`` views (rows ``i, i + B, ...``, view-major); an unlabelled
    image (label < 0) whose largest ``p`` is at least ``threshold`` takes that class on every view.
    Tensor algebra on the features' device with no host synchronisation: the classes are found as
    each labelled row's first row of its class, the scores as ``(N, N)`` products.

    Args:
        features: float ``(V*B, D)``. labels: int ``(V*B,)``, -1 for no label, equal across an
            image's views. n_views: V. threshold: in (0, 1]. temperature: > 0.

    Returns:
        int64 ``(V*B,)``: the labels, pseudo-labelled images changed; unchanged without labelled rows.
    """
    if not 0 < threshold <= 1 or not temperature > 0:
        raise DeephashError(f"pseudo labels need a threshold in (0, 1] and a temperature > 0, got {threshold} and {temperature}")
    if features.ndim != 2 or labels.shape != features.shape[:1] or len(labels) % n_views:
        raise DeephashError(f"pseudo labels need features (V*B, D) and labels (V*B,) for V = {n_views} views, got "
                            f"{tuple(features.shape)} and {tuple(labels.shape)}")
    labels = labels.long()
    with torch.no_grad():
        z = F.normalize(features.detach().float(), dim=1)
        labelled = labels >= 0
        same = (labels[:, None] == labels[None, :]) & labelled[:, None] & labelled[None, :]  # (N, N) same class
        first = labelled & ~same.tril(-1).any(dim=1)  # each class once: its first labelled row
        # column j: the mean similarity of every row to the labelled rows of j's class
        scores = (z @ z.T) @ same.float() / same.sum(0).clamp(min=1)
        scores = scores.masked_fill(~first, float("-inf")) / temperature  # softmax over the classes present
        p = scores.softmax(dim=1).view(n_views, -1, len(labels)).mean(0)  # (B, N), per image; NaN without labels
        confidence, column = p.max(dim=1)
        take = (confidence >= threshold).repeat(n_views) & ~labelled  # NaN >= threshold is False
        return torch.where(take, labels[column].repeat(n_views), labels)


@register_loss("supcon")
class SupConLoss(nn.Module):
    """`supcon_loss` as a module: ``loss(features (N, D), labels (N,)) -> scalar``.

    Args:
        temperature: softmax temperature t > 0.
    """

    partial_labels: ClassVar[bool] = True

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

    needs_labels: ClassVar[bool] = False

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


@register_loss("contrastive-hash")
class ContrastiveHashLoss(nn.Module):
    """Codes that keep similarity: supervised contrastive on the class labels plus the instance
    (NT-Xent) term over augmented views, on the relaxed codes, plus an optional quantization term.

    ``loss(u (V*B, bits), labels (V*B,)) = supervised_weight · SupCon(u, labels, t_s)
    + instance_weight · NT-Xent(u, views, t_i) + quantization_weight · mean((|u| − 1)²)``, with the
    batch's V views stacked view-major (``data.views``). The class term pulls a class together;
    the instance term keeps each image apart from the others, so the codes keep within-class
    order and carry over to classes training never saw.

    Args:
        n_views: views per image V (a run fills it from ``data.views``).
        supervised_weight, instance_weight: weights of the two terms (either may be 0).
        supervised_temperature, instance_temperature: their softmax temperatures.
        quantization_weight: weight of the pull of ``u`` towards ±1.
        pseudo_label_threshold: 0 (off), or in (0, 1]: unlabelled images that are confidently
            close to one class of the batch's labelled items join the class term with that label
            (`in_batch_pseudo_labels`, at ``pseudo_label_temperature``).

    Items labelled -1 (``data.labelled_fraction``) enter the class term as negatives only (unless
    pseudo-labelled), and the instance term as every item does.
    """

    partial_labels: ClassVar[bool] = True

    def __init__(self, n_views: int = 2, supervised_weight: float = 1.0, instance_weight: float = 1.0,
                 supervised_temperature: float = 0.2, instance_temperature: float = 0.2,
                 quantization_weight: float = 0.0, pseudo_label_threshold: float = 0.0,
                 pseudo_label_temperature: float = 0.1) -> None:
        super().__init__()
        if pseudo_label_threshold and not 0 < pseudo_label_threshold <= 1:
            raise DeephashError(f"contrastive-hash's pseudo_label_threshold must be 0 (off) or in (0, 1], got {pseudo_label_threshold}")
        if not pseudo_label_temperature > 0:
            raise DeephashError(f"contrastive-hash's pseudo_label_temperature must be > 0, got {pseudo_label_temperature}")
        self.pseudo_label_threshold, self.pseudo_label_temperature = pseudo_label_threshold, pseudo_label_temperature
        if n_views < 2 and instance_weight > 0:
            raise DeephashError(f"contrastive-hash's instance term needs n_views >= 2 (data.views), got {n_views}")
        self.n_views = n_views
        self.supervised_weight, self.instance_weight = supervised_weight, instance_weight
        self.supervised_temperature, self.instance_temperature = supervised_temperature, instance_temperature
        self.quantization_weight = quantization_weight

    def forward(self, u: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = u.new_zeros(())
        if self.supervised_weight:
            if self.pseudo_label_threshold:
                labels = in_batch_pseudo_labels(u, labels, self.n_views, self.pseudo_label_threshold,
                                                self.pseudo_label_temperature)
            loss = loss + self.supervised_weight * supcon_loss(u, labels, self.supervised_temperature)
        if self.instance_weight:
            if len(u) % self.n_views:
                raise DeephashError(f"contrastive-hash: {len(u)} rows are not {self.n_views} views of a batch")
            ids = view_ids(len(u) // self.n_views, self.n_views, u.device)
            loss = loss + self.instance_weight * supcon_loss(u, ids, self.instance_temperature)
        if self.quantization_weight:
            loss = loss + self.quantization_weight * (u.abs() - 1).pow(2).mean()
        return loss
