"""Packages whose public names load on first use (PEP 562): ``import deephash`` and the parts a
server on an exported model needs import no torch until something asks for a name that does."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, str], public: Iterable[str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's module-level ``__getattr__`` and ``__dir__``.

    Args:
        package: the package's ``__name__`` (it must be in ``sys.modules``: call this from its ``__init__``).
        exports: each public name and the module that defines it.
        public: the package's ``__all__``.

    Returns:
        ``__getattr__(name)``: the name from its module (then kept in the package), else the
        sub-module ``package.name`` (``deephash.runs``), else AttributeError; and ``__dir__()``.
    """
    namespace = sys.modules[package].__dict__
    public = list(public)

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is not None:
            value = getattr(importlib.import_module(module), name)
        elif name.startswith("__"):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        else:
            try:
                value = importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as error:
                if error.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(public))

    return __getattr__, __dir__
