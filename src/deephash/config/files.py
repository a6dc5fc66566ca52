"""Config files: TOML in and out, and the configs shipped inside the package (``deephash/configs``)."""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import tomllib
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from deephash.config.parse import config_from_dict
from deephash.config.schema import Config
from deephash.errors import ConfigError, NotFoundError

__all__ = ["config_description", "config_to_dict", "dump_config", "load_config", "resolve_config_path",
           "shipped_config", "shipped_config_names", "shipped_configs"]


def _shipped_folder() -> Traversable:
    return importlib.resources.files("deephash") / "configs"


def shipped_config_names() -> list[str]:
    """The names of the configs shipped in the package (``deephash/configs/NAME.toml``), sorted."""
    return sorted(entry.name[: -len(".toml")] for entry in _shipped_folder().iterdir()
                  if entry.name.endswith(".toml") and entry.is_file())


def shipped_config(name: str) -> Traversable:
    """The shipped config file called ``name`` (e.g. ``fashion-mnist-48``).

    Raises:
        NotFoundError: no shipped config has that name; the message lists the shipped names.
    """
    names = shipped_config_names()
    if name not in names:
        raise NotFoundError(f"no shipped config {name!r}; shipped: {', '.join(names)}")
    return _shipped_folder() / f"{name}.toml"


def config_description(text: str) -> str:
    """The one-line description of a config: the first line of its leading ``#`` comment ("" if none)."""
    first = text.lstrip("\ufeff").split("\n", 1)[0].strip()
    return first[1:].strip() if first.startswith("#") else ""


def shipped_configs() -> dict[str, str]:
    """Every shipped config's name mapped to its one-line description, sorted by name."""
    return {name: config_description(shipped_config(name).read_text(encoding="utf-8"))
            for name in shipped_config_names()}


def resolve_config_path(path: str | os.PathLike) -> Path | Traversable:
    """A config file: ``path`` itself if it is a file, else a bare name like ``fashion-mnist-48`` is a
    shipped config (from any working directory, the package's own copy).

    Raises:
        NotFoundError: neither a file nor a shipped name (a bare name's message lists the shipped names).
    """
    path = Path(path)
    if path.is_file():
        return path
    bare = path.suffix == "" and len(path.parts) == 1
    names = shipped_config_names() if bare else []
    if path.name in names:
        return shipped_config(path.name)
    if path.is_dir():
        raise NotFoundError(f"config {path} is a directory, not a TOML file")
    if bare:
        raise NotFoundError(f"config {path} not found: neither a file nor a shipped config ({', '.join(names)})")
    raise NotFoundError(f"config file {path} not found")


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> Config:
    """Read a TOML config, apply ``--set`` overrides, validate.

    Raises:
        NotFoundError: the file does not exist.
        ConfigError: unreadable TOML, unknown key, wrong type, invalid value.
    """
    path = resolve_config_path(path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
    return config_from_dict(table, str(path), overrides)


def config_to_dict(config: Config) -> dict[str, Any]:
    """The config as plain dicts/lists/scalars (what ``dump_config`` writes)."""
    return dataclasses.asdict(config)


def dump_config(config: Config) -> str:
    """The resolved config as TOML text; ``load_config`` of it gives back an equal config."""
    import tomli_w

    return tomli_w.dumps(config_to_dict(config))
