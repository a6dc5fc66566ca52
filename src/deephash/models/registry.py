"""Backbones by name (timm style): ``@register_backbone(name)`` and ``create_backbone(name)``.

A backbone maps float images (B, C, H, W) to features (B, F) and exposes ``out_features = F``.
Names of the form ``"timm:<model>"`` build a timm model (imported lazily).
"""

from __future__ import annotations

from typing import Callable, TypeVar

from torch import nn

from deephash.errors import ConfigError

__all__ = ["register_backbone", "create_backbone", "list_backbones"]

_BACKBONES: dict[str, Callable[..., nn.Module]] = {}
F = TypeVar("F", bound=Callable[..., nn.Module])


def register_backbone(name: str) -> Callable[[F], F]:
    """Decorator registering a backbone factory ``factory(in_channels=..., **params)`` under ``name``."""

    def decorator(factory: F) -> F:
        if name in _BACKBONES:
            raise ConfigError(f"backbone {name!r} is already registered")
        _BACKBONES[name] = factory
        return factory

    return decorator


def _ensure_builtin() -> None:
    from deephash.models import backbones  # noqa: F401  (registers the built-in backbones)


def list_backbones() -> list[str]:
    """Registered backbone names, sorted (``timm:<model>`` names are not listed)."""
    _ensure_builtin()
    return sorted(_BACKBONES)


def create_backbone(name: str, in_channels: int = 1, **params: object) -> nn.Module:
    """Build the backbone registered as ``name``.

    Args:
        name: A registered name, or ``"timm:<model>"``.
        in_channels: Image channels C.
        **params: Keyword parameters of that backbone's factory.

    Returns:
        A module mapping (B, C, H, W) to (B, out_features).

    Raises:
        ConfigError: unknown name or parameter.
    """
    _ensure_builtin()
    if name.startswith("timm:"):
        from deephash.models.backbones import timm_backbone

        return timm_backbone(name[len("timm:"):], in_channels=in_channels, **params)
    if name not in _BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {list_backbones()} or 'timm:<model>'")
    try:
        return _BACKBONES[name](in_channels=in_channels, **params)
    except TypeError as exc:  # an unknown keyword for this factory
        raise ConfigError(f"bad parameters for backbone {name!r}: {exc}") from exc
