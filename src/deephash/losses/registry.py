"""Losses by name: ``@register_loss(name)`` on a class or factory, ``create_loss(name, **params)``."""

from __future__ import annotations

from torch import nn

from deephash.registry import Registry

__all__ = ["LOSSES", "create_loss", "loss_names", "loss_needs_labels", "loss_takes_partial_labels", "register_loss"]

#: Every loss a config can name (``loss.name``); the modules below register theirs.
LOSSES: Registry[nn.Module] = Registry("loss", modules=(
    "deephash.losses.metric", "deephash.losses.online", "deephash.losses.hashing", "deephash.losses.orthohash",
    "deephash.losses.contrastive", "deephash.losses.view_hash"))
register_loss = LOSSES.register


def loss_needs_labels(name: str) -> bool:
    """Whether the loss registered as ``name`` reads class labels (its ``needs_labels``, default True)."""
    return bool(getattr(LOSSES.get(name), "needs_labels", True))


def loss_takes_partial_labels(name: str) -> bool:
    """Whether the loss registered as ``name`` trains on batches where some labels are -1 (no
    label): it needs none, or says so (its ``partial_labels``)."""
    factory = LOSSES.get(name)
    return not loss_needs_labels(name) or bool(getattr(factory, "partial_labels", False))


def loss_names() -> list[str]:
    """The registered loss names, sorted."""
    return LOSSES.names()


def create_loss(name: str, **params: object) -> nn.Module:
    """Build the loss registered as ``name`` with explicit parameters.

    Raises:
        ConfigError: unknown name, or parameters the loss does not take.
    """
    return LOSSES.create(name, **params)
