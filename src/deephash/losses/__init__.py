"""Metric losses (contrastive, triplet, online variants), hashing losses, and a registry."""

from deephash.losses.metric import ContrastiveLoss, TripletLoss
from deephash.losses.online import OnlineContrastiveLoss, OnlineTripletLoss, batch_all_triplet_loss
from deephash.losses.registry import create_loss, loss_names, register_loss

__all__ = [
    "ContrastiveLoss",
    "OnlineContrastiveLoss",
    "OnlineTripletLoss",
    "TripletLoss",
    "batch_all_triplet_loss",
    "create_loss",
    "loss_names",
    "register_loss",
]
