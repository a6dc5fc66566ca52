"""Experiment configuration: a typed TOML schema with defaults, validation and ``--set`` overrides.

A config is a tree of dataclasses. Every key a TOML file may hold is a field below; an unknown key
or a value of the wrong type is a one-line :class:`~deephash.errors.ConfigError` naming the key and
the file. ``dump_config`` writes the resolved config (every default filled in) back to TOML, which is
what a run directory keeps as ``config.toml``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.resources
import os
import tomllib
import typing
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from deephash.errors import ConfigError, NotFoundError
from deephash.models.spec import ModelSpec

#: The model section is the model spec (one schema): ``[model]`` of a config is a ``ModelSpec``.
ModelConfig = ModelSpec
DEVICES_HINT = '"auto", "cpu", "cuda" or "cuda:N"'


@dataclass
class DataConfig:
    """Where the images come from and which splits play which role.

    ``protocol = "deephash-cifar10"`` pools the dataset's train and test images and draws
    DeepHash-pytorch's split (100 queries and 500 training images per class, the rest database),
    seeded by ``seed``; the split is saved as ``RUN_DIR/split.npz`` and can be reused with
    ``split_file``. Its split names are ``query``, ``train`` and ``database``.
    """

    dataset: str = "fashion-mnist"
    root: str = ""
    images: str = ""
    train_split: str = "train"
    query_split: str = "test"
    database_split: str = "train"
    protocol: str = ""
    split_file: str = ""
    limit: int = 0
    augment: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    """A loss from the ``create_loss`` registry and its parameters."""

    name: str = "csq"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class SelectorConfig:
    """A pair/triplet selector from ``create_selector`` (``name = ""``: none)."""

    name: str = ""
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class SamplerConfig:
    """Batches: ``balanced`` = n_classes × n_samples per batch; ``random`` = batch_size shuffled."""

    kind: str = "balanced"
    n_classes: int = 10
    n_samples: int = 25
    batch_size: int = 256


@dataclass
class OptimizerConfig:
    """``adam``, ``adamw`` or ``sgd``."""

    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9


@dataclass
class SchedulerConfig:
    """Learning-rate schedule: ``none``, ``cosine``, ``step``, ``onecycle`` (epoch-wise, params passed on) or
    ``warmup-cosine`` (every batch; params ``warmup`` share of the steps, ``eta_min``)."""

    name: str = "none"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScheduleConfig:
    """A loss attribute ramped linearly from ``start`` to ``end`` over ``epochs`` (0 = all)."""

    attribute: str = "quantization_weight"
    start: float = 0.0
    end: float = 0.0
    epochs: int = 0


@dataclass
class TrainConfig:
    """Training loop settings.

    ``aux_weight``: weight of a cross-entropy term on the aux classifier (``model.aux_classes``).
    ``aux_label_smoothing``: label smoothing of that cross-entropy, in [0, 1).
    ``ema_decay``: keep an exponential moving average of the weights, updated after every
    optimizer step with this decay in [0, 1), and save it as the run's model (0 = off).
    ``final_epochs_no_augment``: the last N epochs train without augmentation.
    ``eval_every``: compute the loss on the query split every N epochs (0 = never).
    ``num_threads``: torch CPU threads (0 = leave torch's default).
    ``mine_globally``: under DDP, mine and apply the loss on the global batch (every rank's
    outputs gathered, gradients flowing back); false: on each rank's local batch.
    """

    epochs: int = 10
    log_interval: int = 50
    aux_weight: float = 0.0
    aux_label_smoothing: float = 0.0
    ema_decay: float = 0.0
    final_epochs_no_augment: int = 0
    eval_every: int = 0
    num_threads: int = 0
    mine_globally: bool = True


@dataclass
class EvalConfig:
    """Retrieval evaluation: ``ks`` for mAP@k/P@k, Hamming ``radius`` for P@r, ``knn_k`` neighbours."""

    ks: list[int] = field(default_factory=lambda: [100, 1000])
    radius: int = 2
    knn_k: int = 10


@dataclass
class Config:
    """A whole experiment."""

    name: str = "experiment"
    seed: int = 0
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSpec = field(default_factory=ModelSpec)
    loss: LossConfig = field(default_factory=LossConfig)
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    schedules: list[ScheduleConfig] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _choices() -> dict[str, list[str]]:
    """Keys whose value must be a registered name, and the names: read from the registries when a
    config is validated (so ``import deephash.config`` itself stays light)."""
    from deephash.data.datasets import DATASETS
    from deephash.data.samplers import BATCH_SAMPLERS
    from deephash.data.splits import SPLIT_PROTOCOLS
    from deephash.losses.registry import LOSSES
    from deephash.mining.selectors import SELECTORS
    from deephash.models.heads import HEADS
    from deephash.models.retrieval_model import CODE_RULES
    from deephash.train.optim import OPTIMIZERS, SCHEDULERS

    return {
        "data.dataset": DATASETS.names(),
        "data.protocol": ["", *SPLIT_PROTOCOLS.names()],
        "sampler.kind": BATCH_SAMPLERS.names(),
        "optimizer.name": OPTIMIZERS.names(),
        "scheduler.name": SCHEDULERS.names(),
        "model.head": HEADS.names(),
        "model.code_rule": CODE_RULES.names(),
        "loss.name": LOSSES.names(),
        "selector.name": ["", *SELECTORS.names()],
    }


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "table"
    if dataclasses.is_dataclass(tp):
        return "table"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(tp, str(tp))


def _value_name(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {value!r}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"{type(value).__name__} {value!r}"


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against type ``tp`` (ints accepted for floats) and return it converted."""

    def bad() -> ConfigError:
        name = _type_name(tp)
        article = "an" if name[0] in "aeiou" else "a"
        return ConfigError(f"{key} must be {article} {name}, got {_value_name(value)} in {source}")

    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return _build(tp, value, key, source)
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise bad()
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        return copy.deepcopy(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is int or tp is str or tp is bool:
        if type(value) is not tp:
            raise bad()
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # pragma: no cover - schema bug


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, valid: list[str], prefix: str, source: str) -> ConfigError:
    full = f"{prefix}{key}"
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown key '{full}' in {source}{hint}")


def _build(cls: type, table: dict[str, Any], prefix: str, source: str) -> Any:
    types_ = _field_types(cls)
    pre = f"{prefix}." if prefix else ""
    for key in table:
        if key not in types_:
            raise _unknown_key(key, list(types_), pre, source)
    values = {k: _convert(v, types_[k], f"{pre}{k}", source) for k, v in table.items()}
    obj = cls(**values)
    choices_of = _choices()
    for k in values:
        choices = choices_of.get(f"{pre}{k}")
        if choices and values[k] not in choices:
            shown = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"{pre}{k} must be one of {shown}, got {values[k]!r} in {source}")
    return obj


def _validate(config: Config, source: str) -> None:
    """Cross-field checks that a type cannot express."""
    device = config.device
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"device must be {DEVICES_HINT}, got {device!r} in {source}")
    if config.model.head == "hash" and config.model.bits < 8:
        raise ConfigError(f"model.bits must be at least 8 for a hash head, got {config.model.bits} in {source}")
    if config.model.head != "hash" and config.model.embedding_dim < 1:
        raise ConfigError(f"model.embedding_dim must be positive, got {config.model.embedding_dim} in {source}")
    for key, value in (
        ("train.epochs", config.train.epochs),
        ("sampler.n_classes", config.sampler.n_classes),
        ("sampler.n_samples", config.sampler.n_samples),
        ("sampler.batch_size", config.sampler.batch_size),
    ):
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value} in {source}")
    if config.model.code_rule == "posterior":
        m = config.model
        if (m.head != "hash" or m.aux_classes < 2 or config.train.aux_weight <= 0 or config.loss.name != "csq"
                or not m.code_temperature > 0):
            raise ConfigError(
                "model.code_rule = 'posterior' needs head = 'hash', aux_classes >= 2 with train.aux_weight > 0 (a trained "
                f"classifier), loss.name = 'csq' (its hash centers) and code_temperature > 0 in {source}")
    if not 0.0 <= config.train.aux_label_smoothing < 1.0:
        raise ConfigError(f"train.aux_label_smoothing must be in [0, 1), got {config.train.aux_label_smoothing} in {source}")
    if not 0.0 <= config.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {config.train.ema_decay} in {source}")
    if config.data.dataset == "folder" and not config.data.images:
        raise ConfigError(f"data.images must name an image folder when data.dataset = 'folder' in {source}")
    if config.optimizer.lr <= 0:
        raise ConfigError(f"optimizer.lr must be positive, got {config.optimizer.lr} in {source}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``key.path=value``; the value is a TOML literal, else taken as a plain string.

    Returns:
        (key path as a list of names, value).
    """
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = (part.strip() for part in text.split("=", 1))
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def _apply_override(table: dict[str, Any], path: list[str], value: Any, text: str) -> None:
    node = table
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {text}: '{part}' is not a table")
        node = child
    node[path[-1]] = value


def config_from_dict(table: dict[str, Any], source: str = "<dict>", overrides: list[str] = ()) -> Config:
    """Build and validate a :class:`Config` from a TOML-like table plus ``key=value`` overrides."""
    table = copy.deepcopy(table)
    for text in overrides:
        path, value = parse_override(text)
        _apply_override(table, path, value, text)
    source_desc = source if not overrides else f"{source} (with --set)"
    config = _build(Config, table, "", source_desc)
    _validate(config, source_desc)
    return config


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


__all__ = [
    "Config",
    "DataConfig",
    "ModelSpec",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "OptimizerConfig",
    "SamplerConfig",
    "ScheduleConfig",
    "SchedulerConfig",
    "SelectorConfig",
    "TrainConfig",
    "config_description",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_override",
    "resolve_config_path",
    "shipped_config",
    "shipped_config_names",
    "shipped_configs",
]
