"""Metric losses (contrastive, triplet, online variants), hashing losses, and a registry."""

from deephash.losses.contrastive import ContrastiveHashLoss, InstanceContrastiveLoss, SupConLoss, supcon_loss
from deephash.losses.metric import ContrastiveLoss, TripletLoss
from deephash.losses.online import OnlineContrastiveLoss, OnlineTripletLoss, batch_all_triplet_loss
from deephash.losses.registry import create_loss, loss_names, loss_needs_labels, register_loss
from deephash.losses.view_hash import ViewHashLoss
from deephash.losses.hashing import (
    BitBalanceLoss,
    CSQLoss,
    DSHLoss,
    DTSHLoss,
    QuantizationLoss,
    bit_balance_loss,
    hash_centers,
    quantization_loss,
)
from deephash.losses.margins import dtsh_selector_margin, selector_margin
from deephash.losses.memory import CrossBatchMemory
from deephash.losses.rerank_term import RerankInstanceLoss
from deephash.losses.orthohash import OrthoHashLoss
from deephash.losses.contrastive import view_ids
from deephash.losses.schedules import Constant, LinearRamp, build_schedule

__all__ = [
    "dtsh_selector_margin",
    "selector_margin",
    "ContrastiveHashLoss",
    "InstanceContrastiveLoss",
    "SupConLoss",
    "supcon_loss",
    "BitBalanceLoss",
    "CSQLoss",
    "Constant",
    "CrossBatchMemory",
    "DSHLoss",
    "DTSHLoss",
    "LinearRamp",
    "OrthoHashLoss",
    "RerankInstanceLoss",
    "view_ids",
    "QuantizationLoss",
    "bit_balance_loss",
    "build_schedule",
    "hash_centers",
    "quantization_loss",
    "ContrastiveLoss",
    "OnlineContrastiveLoss",
    "OnlineTripletLoss",
    "TripletLoss",
    "batch_all_triplet_loss",
    "create_loss",
    "loss_names",
    "loss_needs_labels",
    "ViewHashLoss",
    "register_loss",
]
