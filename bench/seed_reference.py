"""The seed's original mining and losses (siamese-triplet's utils.py / losses.py), kept as a reference.

Per-pair Python loops over ``itertools.combinations`` of each label group, with numpy on the CPU:
the algorithm ``bench/mining.py`` compares deephash against. Re-written here from the seed's
description; not used by the library. The seed has no batch-hard selector:
``SeedBatchHardTripletSelector`` is the seed's per-pair loop applied to batch-hard mining, and
``SeedAnchorLoopBatchHardTripletSelector`` a stronger loop with one vectorised step per anchor.
"""

from __future__ import annotations

from itertools import combinations, permutations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def pdist(vectors: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance matrix, as in the seed (no clamp)."""
    sq = vectors.pow(2).sum(dim=1)
    return -2 * vectors.mm(vectors.t()) + sq.view(1, -1) + sq.view(-1, 1)


def _pairs(labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    all_pairs = torch.LongTensor(np.array(list(combinations(range(len(labels)), 2))))
    same = labels[all_pairs[:, 0]] == labels[all_pairs[:, 1]]
    return all_pairs[same.nonzero()[0]], all_pairs[(~same).nonzero()[0]]


class SeedAllPositivePairSelector:
    def __init__(self, balance: bool = True) -> None:
        self.balance = balance

    def get_pairs(self, embeddings, labels):
        positive_pairs, negative_pairs = _pairs(labels.cpu().numpy())
        if self.balance:
            negative_pairs = negative_pairs[torch.randperm(len(negative_pairs))[: len(positive_pairs)]]
        return positive_pairs, negative_pairs


class SeedHardNegativePairSelector:
    def get_pairs(self, embeddings, labels):
        distance_matrix = pdist(embeddings.detach().cpu())
        positive_pairs, negative_pairs = _pairs(labels.cpu().numpy())
        negative_distances = distance_matrix[negative_pairs[:, 0], negative_pairs[:, 1]].numpy()
        top = np.argpartition(negative_distances, len(positive_pairs))[: len(positive_pairs)]
        return positive_pairs, negative_pairs[torch.LongTensor(top)]


class SeedAllTripletSelector:
    def get_triplets(self, embeddings, labels):
        labels = labels.cpu().numpy()
        triplets = []
        for label in set(labels):
            label_mask = labels == label
            label_indices = np.where(label_mask)[0]
            if len(label_indices) < 2:
                continue
            negative_indices = np.where(np.logical_not(label_mask))[0]
            anchor_positives = list(combinations(label_indices, 2))
            triplets += [[ap[0], ap[1], n] for ap in anchor_positives for n in negative_indices]
        return torch.LongTensor(np.array(triplets))


def hardest_negative(loss_values, margin):
    hard = np.argmax(loss_values)
    return hard if loss_values[hard] > 0 else None


def random_hard_negative(loss_values, margin):
    hard = np.where(loss_values > 0)[0]
    return np.random.choice(hard) if len(hard) > 0 else None


def semihard_negative(loss_values, margin):
    semihard = np.where(np.logical_and(loss_values < margin, loss_values > 0))[0]
    return np.random.choice(semihard) if len(semihard) > 0 else None


class SeedFunctionNegativeTripletSelector:
    """The seed's loop: for every anchor-positive pair, hinge values against all negatives."""

    def __init__(self, margin, negative_selection_fn):
        self.margin = margin
        self.negative_selection_fn = negative_selection_fn

    def get_triplets(self, embeddings, labels):
        distance_matrix = pdist(embeddings.detach().cpu())
        labels = labels.cpu().numpy()
        triplets = []
        for label in set(labels):
            label_mask = labels == label
            label_indices = np.where(label_mask)[0]
            if len(label_indices) < 2:
                continue
            negative_indices = np.where(np.logical_not(label_mask))[0]
            anchor_positives = np.array(list(combinations(label_indices, 2)))
            ap_distances = distance_matrix[anchor_positives[:, 0], anchor_positives[:, 1]]
            for anchor_positive, ap_distance in zip(anchor_positives, ap_distances):
                loss_values = (
                    ap_distance
                    - distance_matrix[torch.LongTensor(np.array([anchor_positive[0]])), torch.LongTensor(negative_indices)]
                    + self.margin
                )
                hard_negative = self.negative_selection_fn(loss_values.numpy(), self.margin)
                if hard_negative is not None:
                    triplets.append([anchor_positive[0], anchor_positive[1], negative_indices[hard_negative]])
        if len(triplets) == 0:  # the seed's dummy triplet
            triplets.append([anchor_positive[0], anchor_positive[1], negative_indices[0]])
        return torch.LongTensor(np.array(triplets))


class SeedBatchHardTripletSelector:
    """Not in the seed: batch-hard mining in the seed's per-pair loop.

    As the seed's selectors do, it walks every anchor-positive pair of each label (both orders,
    since each anchor needs all its positives) and takes the pair's row of distances to the
    negatives; per anchor it keeps the farthest positive and that row's nearest negative.
    """

    def get_triplets(self, embeddings, labels):
        distance_matrix = pdist(embeddings.detach().cpu())
        labels = labels.cpu().numpy()
        best = {}  # anchor -> (d_ap, positive, negative)
        for label in set(labels):
            label_mask = labels == label
            label_indices = np.where(label_mask)[0]
            negative_indices = np.where(np.logical_not(label_mask))[0]
            if len(label_indices) < 2 or len(negative_indices) == 0:
                continue
            for anchor, positive in permutations(label_indices, 2):
                ap_distance = float(distance_matrix[anchor, positive])
                an_distances = distance_matrix[torch.LongTensor([anchor]), torch.LongTensor(negative_indices)].numpy()
                if anchor not in best or ap_distance > best[anchor][0]:
                    best[anchor] = (ap_distance, positive, negative_indices[np.argmin(an_distances)])
        return torch.LongTensor(np.array([[a, p, n] for a, (_, p, n) in sorted(best.items())]))


class SeedAnchorLoopBatchHardTripletSelector:
    """A stronger loop baseline for batch-hard: one vectorised numpy step per anchor."""

    def get_triplets(self, embeddings, labels):
        distance_matrix = pdist(embeddings.detach().cpu()).numpy()
        labels = labels.cpu().numpy()
        triplets = []
        for anchor in range(len(labels)):
            positives = np.where((labels == labels[anchor]) & (np.arange(len(labels)) != anchor))[0]
            negatives = np.where(labels != labels[anchor])[0]
            if len(positives) and len(negatives):
                p = positives[np.argmax(distance_matrix[anchor, positives])]
                n = negatives[np.argmin(distance_matrix[anchor, negatives])]
                triplets.append([anchor, p, n])
        return torch.LongTensor(np.array(triplets))


class SeedOnlineContrastiveLoss(nn.Module):
    def __init__(self, margin, pair_selector):
        super().__init__()
        self.margin = margin
        self.pair_selector = pair_selector

    def forward(self, embeddings, target):
        positive_pairs, negative_pairs = self.pair_selector.get_pairs(embeddings, target)
        positive_loss = (embeddings[positive_pairs[:, 0]] - embeddings[positive_pairs[:, 1]]).pow(2).sum(1)
        negative_loss = F.relu(
            self.margin - (embeddings[negative_pairs[:, 0]] - embeddings[negative_pairs[:, 1]]).pow(2).sum(1).sqrt()
        ).pow(2)
        return torch.cat([positive_loss, negative_loss], dim=0).mean()


class SeedOnlineTripletLoss(nn.Module):
    def __init__(self, margin, triplet_selector):
        super().__init__()
        self.margin = margin
        self.triplet_selector = triplet_selector

    def forward(self, embeddings, target):
        triplets = self.triplet_selector.get_triplets(embeddings, target)
        ap = (embeddings[triplets[:, 0]] - embeddings[triplets[:, 1]]).pow(2).sum(1)
        an = (embeddings[triplets[:, 0]] - embeddings[triplets[:, 2]]).pow(2).sum(1)
        return F.relu(ap - an + self.margin).mean()


def seed_loss(name: str, margin: float = 1.0) -> nn.Module:
    """The seed's loss + selector for one of deephash's selector names."""
    functions = {"hardest": hardest_negative, "random": random_hard_negative, "semihard": semihard_negative}
    if name in functions:
        return SeedOnlineTripletLoss(margin, SeedFunctionNegativeTripletSelector(margin, functions[name]))
    if name == "all":
        return SeedOnlineTripletLoss(margin, SeedAllTripletSelector())
    if name == "batch-hard":
        return SeedOnlineTripletLoss(margin, SeedBatchHardTripletSelector())
    if name == "batch-hard-anchor-loop":
        return SeedOnlineTripletLoss(margin, SeedAnchorLoopBatchHardTripletSelector())
    if name == "all-positive":
        return SeedOnlineContrastiveLoss(margin, SeedAllPositivePairSelector())
    if name == "hard-negative":
        return SeedOnlineContrastiveLoss(margin, SeedHardNegativePairSelector())
    raise KeyError(name)
