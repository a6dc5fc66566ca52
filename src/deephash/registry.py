"""One registry mechanism for everything chosen by name (timm's ``register_model`` + ``create_model``).

A :class:`Registry` maps names to factories of one kind: backbones, heads, code rules, re-rank
vectors, losses, selectors, loss-weight schedules, augmentations, data sets, split protocols, batch
samplers, optimizers, LR schedulers. A factory registers itself
with the decorator where it is defined; configs and the command line create by name; ``names()``
feeds config validation and help texts. Every lookup or construction problem is a one-line
:class:`~deephash.errors.ConfigError` that names the kind, the name and the choices.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from deephash.errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class Registry(Generic[T]):
    """Named factories of one kind.

    Args:
        kind: what the registry holds, singular, for messages (``"loss"``, ``"backbone"``).
        modules: modules imported before the first lookup, whose decorators register the built-in
            entries (so a registry is complete however it is reached, without import cycles).
    """

    def __init__(self, kind: str, modules: Iterable[str] = ()) -> None:
        self.kind = kind
        self._modules = tuple(modules)
        self._factories: dict[str, Callable[..., T]] = {}
        self._loaded = not self._modules

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._modules:
                importlib.import_module(module)

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator registering a class or factory under ``name``.

        Raises:
            ConfigError: ``name`` is already taken.
        """

        def decorator(factory: F) -> F:
            if name in self._factories:
                raise ConfigError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = factory
            return factory

        return decorator

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._load()
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._factories

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered as ``name``.

        Raises:
            ConfigError: unknown name (the message lists the choices).
        """
        self._load()
        if name not in self._factories:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}")
        return self._factories[name]

    def accepts(self, name: str, parameter: str) -> bool:
        """Whether the factory of ``name`` takes a keyword parameter called ``parameter``."""
        return parameter in inspect.signature(self.get(name)).parameters

    def create(self, name: str, /, **params: Any) -> T:
        """Build the entry registered as ``name`` with explicit keyword parameters.

        Raises:
            ConfigError: unknown name, or parameters the factory does not take.
        """
        factory = self.get(name)
        try:
            inspect.signature(factory).bind(**params)
        except TypeError as error:
            raise ConfigError(f"{self.kind} {name!r}: bad parameters {sorted(params)} ({error})") from None
        return factory(**params)
