"""Tables to a validated :class:`Config`: types checked, names checked against the registries,
cross-field rules, and ``--set key=value`` overrides. Every problem is a one-line
:class:`~deephash.errors.ConfigError` naming the key and the file.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import tomllib
import typing
from pathlib import Path
from typing import Any

from deephash.config.names import check_names
from deephash.config.schema import Config
from deephash.errors import ConfigError

__all__ = ["config_from_dict", "parse_override"]

DEVICES_HINT = '"auto", "cpu", "cuda" or "cuda:N"'


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
    if not config.optimizer.backbone_lr_scale >= 0:
        raise ConfigError(f"optimizer.backbone_lr_scale must be >= 0, got {config.optimizer.backbone_lr_scale} in {source}")
    if not 0 <= config.train.freeze_backbone_epochs < config.train.epochs:
        raise ConfigError(f"train.freeze_backbone_epochs must be in [0, train.epochs = {config.train.epochs}), got "
                          f"{config.train.freeze_backbone_epochs} in {source}")
    problem = config.model.pretrained_problem()
    if problem:
        raise ConfigError(f"{problem}, in {source}")
    if config.train.steps_per_epoch < 0:
        raise ConfigError(f"train.steps_per_epoch must be 0 (whole epochs) or positive, got {config.train.steps_per_epoch} in {source}")
    if config.model.code_rule == "posterior":
        m = config.model
        if (m.head != "hash" or m.aux_classes < 2 or config.train.aux_weight <= 0 or config.loss.name != "csq"
                or not m.code_temperature > 0):
            raise ConfigError(
                "model.code_rule = 'posterior' needs head = 'hash', aux_classes >= 2 with train.aux_weight > 0 (a trained "
                f"classifier), loss.name = 'csq' (its hash centers) and code_temperature > 0 in {source}")
    for key in ("rerank_source", "code_source"):
        if getattr(config.model, key) not in ("features", "map"):
            raise ConfigError(f"model.{key} must be 'features' or 'map', got {getattr(config.model, key)!r} in {source}")
    if config.model.code_rule in ("pca", "itq") and config.model.head != "hash":
        raise ConfigError(f"model.code_rule = {config.model.code_rule!r} makes the codes of a hash head (its bits): set model.head = 'hash', in {source}")
    if not config.model.code_power > 0:
        raise ConfigError(f"model.code_power must be > 0, got {config.model.code_power} in {source}")
    if config.model.code_source == "map" and config.model.code_rule not in ("pca", "itq"):
        raise ConfigError(f"model.code_source = 'map' is read by model.code_rule = 'pca' or 'itq' only, not {config.model.code_rule!r}, in {source}")
    head = config.rerank_head
    joint = config.train.rerank_weight > 0
    if config.model.rerank == "instance" and not joint and head.epochs < 1:
        raise ConfigError("model.rerank = 'instance' trains its own head: set train.rerank_weight > 0 (with the main "
                          f"training) or rerank_head.epochs >= 1 (after it), in {source}")
    if (joint or head.epochs > 0) and config.model.rerank != "instance":
        raise ConfigError(f"train.rerank_weight and rerank_head.epochs train the re-rank head of model.rerank = 'instance', "
                          f"which is not set, in {source}")
    if joint and (config.data.views < 2 or not config.train.rerank_temperature > 0):
        raise ConfigError(f"train.rerank_weight needs data.views >= 2 (with data.augment) and train.rerank_temperature > 0, in {source}")
    if head.epochs > 0 and (head.views < 2 or not head.augment or not head.temperature > 0 or not head.lr > 0):
        raise ConfigError(f"rerank_head needs views >= 2, an augment table, temperature > 0 and lr > 0, in {source}")
    scale = config.train.tanh_scale
    if scale and (len(scale) != 2 or not min(scale) > 0 or config.model.head != "hash"):
        raise ConfigError(f"train.tanh_scale must be [start, end], both > 0, for a hash head; got {scale} in {source}")
    if not 0.0 <= config.train.aux_label_smoothing < 1.0:
        raise ConfigError(f"train.aux_label_smoothing must be in [0, 1), got {config.train.aux_label_smoothing} in {source}")
    if not 0.0 <= config.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {config.train.ema_decay} in {source}")
    if config.data.dataset == "folder" and not config.data.images:
        raise ConfigError(f"data.images must name an image folder when data.dataset = 'folder' in {source}")
    d = config.data
    if d.image_size < 0 or d.channels not in (1, 3) or d.num_workers < 0 or not 0 <= d.max_bad_fraction <= 1:
        raise ConfigError(f"data.image_size must be >= 0 (0: the backbone's), data.channels 1 or 3, data.num_workers >= 0 and "
                          f"data.max_bad_fraction in [0, 1], in {source}")
    if len(d.crop_scale) != 2 or not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1 or not 0 <= d.color_jitter < 1:
        raise ConfigError(f"data.crop_scale must be [low, high] with 0 < low <= high <= 1 and data.color_jitter in [0, 1), in {source}")
    if config.data.views < 1 or (config.data.views > 1 and not config.data.augment):
        raise ConfigError(f"data.views must be >= 1, and views > 1 needs data.augment (else the views are equal), in {source}")
    seen, unseen = config.data.seen_classes, config.data.unseen_classes
    if bool(seen) != bool(unseen):
        raise ConfigError(f"data.seen_classes and data.unseen_classes go together (a class split), in {source}")
    if set(seen) & set(unseen):
        raise ConfigError(f"data.seen_classes and data.unseen_classes share {sorted(set(seen) & set(unseen))}, in {source}")
    duplicates = config.eval.near_duplicates
    if duplicates.n < 0 or duplicates.shift < 0 or not 0 < duplicates.crop <= 1 or duplicates.noise < 0:
        raise ConfigError("eval.near_duplicates needs n >= 0, shift >= 0, 0 < crop <= 1 and noise >= 0, "
                          f"got {duplicates}, in {source}")
    if duplicates.jpeg_quality and (len(duplicates.jpeg_quality) != 2 or not 1 <= min(duplicates.jpeg_quality)
                                    <= max(duplicates.jpeg_quality) <= 100):
        raise ConfigError(f"eval.near_duplicates.jpeg_quality must be [low, high] within 1..100, in {source}")
    memory = config.loss.memory
    if memory.size < 0 or memory.warmup_steps < 0:
        raise ConfigError(f"loss.memory.size and warmup_steps must be >= 0, got {memory.size} and {memory.warmup_steps} in {source}")
    if memory.size > 0 and not config.train.mine_globally:
        raise ConfigError("loss.memory needs train.mine_globally = true: every rank must hold the same memory (the "
                          f"gathered global batch) for rank 0's checkpoint to carry it, in {source}")
    _validate_labels(config, source)
    _validate_pseudo_labels(config, source)
    if config.optimizer.lr <= 0:
        raise ConfigError(f"optimizer.lr must be positive, got {config.optimizer.lr} in {source}")
    check_names(config, source)


def _validate_labels(config: Config, source: str) -> None:
    """``data.labels``: ``"class"``, or ``"none"`` with nothing in training that reads a label;
    ``data.labelled_fraction < 1`` (unless ``data.unlabelled = "drop"`` leaves the rest out) and
    ``data.train_on_database_unlabelled`` with nothing that needs every item's label."""
    labels, fraction = config.data.labels, config.data.labelled_fraction
    if labels not in ("class", "none"):
        raise ConfigError(f"data.labels must be 'class' or 'none', got {labels!r} in {source}")
    if not 0 < fraction <= 1 or (fraction < 1 and labels == "none"):
        raise ConfigError(f"data.labelled_fraction must be in (0, 1], and 1 with data.labels = 'none'; got {fraction} in {source}")
    data = config.data
    if data.unlabelled not in ("keep", "drop"):
        raise ConfigError(f"data.unlabelled must be 'keep' or 'drop', got {data.unlabelled!r} in {source}")
    if data.unlabelled == "drop" and (fraction == 1 or data.train_on_database_unlabelled or data.unlabelled_folder):
        raise ConfigError("data.unlabelled = 'drop' leaves out the images that data.labelled_fraction < 1 leaves "
                          "without labels; it needs a labelled_fraction < 1 and neither train_on_database_unlabelled "
                          f"nor unlabelled_folder, in {source}")
    if data.train_on_database_unlabelled and (not data.seen_classes or data.database_split != data.train_split):
        raise ConfigError("data.train_on_database_unlabelled needs a class split (data.seen_classes) and "
                          f"data.database_split = data.train_split, in {source}")
    if data.train_on_database_unlabelled and data.dataset == "folder":
        raise ConfigError("data.train_on_database_unlabelled works on the in-memory data sets, not a photo folder "
                          f"(data.dataset = 'folder'), in {source}")
    plain_name = Path(data.unlabelled_folder).name == data.unlabelled_folder and not data.unlabelled_folder.startswith(".")
    if data.unlabelled_folder and (data.dataset != "folder" or labels != "class" or not plain_name):
        raise ConfigError("data.unlabelled_folder names a sub-folder (a plain name) of a photo folder with class "
                          f"sub-folders (data.dataset = 'folder', data.labels = 'class'), got {data.unlabelled_folder!r} "
                          f"in {source}")
    if data.unlabelled_folder and data.seen_classes:
        raise ConfigError("data.unlabelled_folder cannot go with a class split (data.seen_classes): its images are of "
                          f"no known class, so the split would leave them out, in {source}")
    all_labelled = ((fraction == 1 or data.unlabelled == "drop") and not data.train_on_database_unlabelled
                    and not data.unlabelled_folder)
    if config.sampler.kind == "labelled-share" and (labels == "none" or all_labelled):
        raise ConfigError("sampler.kind = 'labelled-share' mixes labelled and unlabelled items in every batch; it needs "
                          "data.labelled_fraction < 1 (with data.unlabelled = 'keep'), data.unlabelled_folder or "
                          f"data.train_on_database_unlabelled, in {source}")
    if config.sampler.kind == "labelled-share" and not 0 < config.sampler.labelled_share < 1:
        raise ConfigError(f"sampler.labelled_share must be in (0, 1), got {config.sampler.labelled_share} in {source}")
    if labels == "class" and all_labelled:
        return  # every training item has its label
    if labels == "none":
        key, what = "data.labels", "trains without labels"
    elif fraction < 1:
        key, what = "data.labelled_fraction", f"{fraction} leaves items without labels"
    elif data.unlabelled_folder:
        key, what = "data.unlabelled_folder", "adds items without labels"
    else:
        key, what = "data.train_on_database_unlabelled", "adds items without labels"
    readers = label_readers(config)
    if readers:
        raise ConfigError(f"{key}: {what}, but {readers[0]} needs them, in {source}")


def _validate_pseudo_labels(config: Config, source: str) -> None:
    """``pseudo_labels``: sane values, and, when on, unlabelled images of the labelled classes in
    an in-memory training set, an epoch left to use them, and a loss that reads the labels (and
    does not pseudo-label within the batch as well)."""
    from deephash.losses.registry import loss_needs_labels

    pseudo, data = config.pseudo_labels, config.data
    if pseudo.from_epoch < 0 or pseudo.every < 1 or pseudo.k < 1 or not 0 < pseudo.agreement <= 1:
        raise ConfigError(f"pseudo_labels needs from_epoch >= 0, every >= 1, k >= 1 and agreement in (0, 1], got {pseudo}, "
                          f"in {source}")
    if pseudo.from_epoch == 0:
        return
    if data.dataset == "folder":
        raise ConfigError(f"pseudo_labels works on the in-memory data sets, not a photo folder (data.dataset = 'folder'), in {source}")
    if data.train_on_database_unlabelled:
        raise ConfigError("pseudo_labels cannot go with data.train_on_database_unlabelled: those images are of classes "
                          f"that no labelled image has, so a vote would give them a wrong class, in {source}")
    if data.labels != "class" or data.labelled_fraction == 1 or data.unlabelled != "keep":
        raise ConfigError("pseudo_labels.from_epoch labels the training images that data.labelled_fraction < 1 leaves "
                          f"unlabelled (with data.unlabelled = 'keep'); there are none here, in {source}")
    if not loss_needs_labels(config.loss.name):
        raise ConfigError(f"pseudo_labels: loss.name = {config.loss.name!r} reads no labels, so pseudo labels would change "
                          f"nothing; use one that takes partial labels (e.g. 'contrastive-hash'), in {source}")
    if config.loss.params.get("pseudo_label_threshold"):
        raise ConfigError("pseudo_labels and loss.params.pseudo_label_threshold both label the unlabelled images; "
                          f"choose one, in {source}")
    if pseudo.from_epoch >= config.train.epochs:
        raise ConfigError(f"pseudo_labels.from_epoch = {pseudo.from_epoch} is not before train.epochs = "
                          f"{config.train.epochs}: no epoch would use the labels, in {source}")


def label_readers(config: Config, every_item: bool | None = None) -> list[str]:
    """What in ``config``'s training reads a label that some training items lack: with no label at
    all (``data.labels = "none"``, or ``every_item`` unlabelled, as a folder without class
    sub-folders), a loss that needs labels, a class head and the posterior rule's class centers;
    with some labelled, a loss that does not take partial labels; in both cases a balanced sampler,
    a selector and a memory. Each as the config key to change."""
    from deephash.losses.registry import loss_needs_labels, loss_takes_partial_labels

    none = config.data.labels == "none" or bool(every_item)
    if none:
        loss_reads = (f"loss.name = {config.loss.name!r} (choose one that needs no labels, e.g. 'view-hash')",
                      loss_needs_labels(config.loss.name))
    else:
        loss_reads = (f"loss.name = {config.loss.name!r} (choose one that takes partial labels, e.g. 'contrastive-hash')",
                      not loss_takes_partial_labels(config.loss.name))
    return [key for key, reads in (
        loss_reads,
        (f"sampler.kind = {config.sampler.kind!r} (use 'random' or 'labelled-share')",
         config.sampler.kind not in ("random", "labelled-share")),
        ("train.aux_weight > 0 (a class head)", none and config.model.aux_classes > 0 and config.train.aux_weight > 0),
        ("model.code_rule = 'posterior' (class centers)", none and config.model.code_rule == "posterior"),
        ("a [selector] (label-based mining)", bool(config.selector.name)),
        ("loss.memory (label-based mining)", config.loss.memory.size > 0),
    ) if reads]


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
