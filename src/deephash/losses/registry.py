"""Build losses by name: ``@register_loss(name)`` on a class or factory, ``create_loss(name, **params)``."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch.nn as nn

from deephash.errors import ConfigError

_LOSSES: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register_loss(name: str) -> Callable[[F], F]:
    """Decorator that registers a loss class (or a factory returning a loss module) under ``name``.

    Raises:
        ValueError: ``name`` is already registered.
    """

    def decorator(factory: F) -> F:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        _LOSSES[name] = factory
        return factory

    return decorator


def loss_names() -> list[str]:
    """The registered loss names, sorted."""
    return sorted(_LOSSES)


def create_loss(name: str, **params: object) -> nn.Module:
    """Build the loss registered as ``name`` with explicit parameters.

    Raises:
        ConfigError: unknown name, or parameters the loss does not take.
    """
    if name not in _LOSSES:
        raise ConfigError(f"unknown loss {name!r}; choose one of {', '.join(loss_names())}")
    try:
        return _LOSSES[name](**params)
    except TypeError as error:
        raise ConfigError(f"loss {name!r}: bad parameters {sorted(params)} ({error})") from None
