"""Config to objects: the model, the loss (with its selector), the optimizer and LR schedule, the loaders.

Every name is looked up in its registry; the parameters come from the config, with the values a
component needs from elsewhere (code length, number of classes, the selector's margin and random
generator) filled in only when it takes them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from deephash.config import Config
from deephash.data import BatchLoader
from deephash.data.photos import ImageFolder, StreamLoader
from deephash.data.augment import build_augment
from deephash.errors import ConfigError
from deephash.losses.aux import AuxClassificationLoss
from deephash.losses.memory import CrossBatchMemory
from deephash.losses.margins import selector_margin
from deephash.losses.registry import LOSSES
from deephash.losses.rerank_term import RerankInstanceLoss
from deephash.losses.schedules import LinearRamp, Schedule
from deephash.mining import create_selector
from deephash.models.pretrained import timm_input_config
from deephash.runs.data import DATASET_SHAPES
from deephash.train.optim import create_optimizer, create_scheduler

__all__ = ["build_loss", "build_optimizer", "build_scheduler", "loss_schedules", "make_loader", "model_for_data",
           "training_outputs", "with_pretrained_inputs"]

_SELECTOR_KEYS = ("selector", "triplet_selector", "pair_selector")


def model_for_data(config: Config, in_channels: int, mean: list[float], std: list[float]) -> Config:
    """``config`` with the model's input channels, and its normalisation when unset, from the data."""
    model = dataclasses.replace(config.model, in_channels=in_channels, mean=config.model.mean or mean,
                                std=config.model.std or std)
    return dataclasses.replace(config, model=model)


def with_pretrained_inputs(config: Config) -> Config:
    """``config`` with what a pretrained timm backbone's weights expect filled in where it is left
    open: ``model.mean``/``model.std`` (empty) and ``data.image_size`` (0) from timm's pretrained
    configuration (``model.pretrained``, or a ``model.pretrained_path`` for a ``timm:`` backbone);
    otherwise unchanged (the mean and std then come from the training images, the size is 224)."""
    m = config.model
    if not (m.backbone.startswith("timm:") and (m.pretrained or m.pretrained_path)):
        return config
    if m.mean and m.std and (config.data.image_size or config.data.dataset != "folder"):
        return config
    expected = timm_input_config(m.backbone[len("timm:"):])
    channels = config.data.channels if config.data.dataset == "folder" else DATASET_SHAPES.get(config.data.dataset, (3,))[0]
    if channels == 1:  # grey images into an RGB-pretrained network: one value, the mean of the three
        expected = {**expected, **{k: [sum(expected[k]) / len(expected[k])] for k in ("mean", "std") if k in expected}}
    model = dataclasses.replace(m, mean=m.mean or expected.get("mean", []), std=m.std or expected.get("std", []))
    data = dataclasses.replace(config.data, image_size=config.data.image_size or expected.get("image_size", 0))
    return dataclasses.replace(config, model=model, data=data)


def build_loss(config: Config, n_classes: int, selector_generator: torch.Generator | None = None) -> nn.Module:
    """The configured loss; ``bits``/``n_classes``/``seed``/``n_views``/a selector are filled in when the loss takes them.

    ``[selector]`` builds a selector object (given the loss's ``margin`` when the selector takes
    one, and ``selector_generator`` when it draws at random) passed as the loss's ``selector``
    (``online-*``), ``triplet_selector`` (``dtsh``) or ``pair_selector`` parameter. With an aux
    classifier and ``train.aux_weight > 0`` the loss is wrapped in :class:`AuxClassificationLoss`;
    with ``loss.memory.size > 0`` the mining loss inside is a :class:`CrossBatchMemory`; with
    ``train.rerank_weight > 0`` the outermost wrapper adds the re-rank head's instance term
    (:class:`RerankInstanceLoss`). `training_outputs` says what the model must return for it.
    """
    name = config.loss.name
    params = dict(config.loss.params)
    width = config.model.bits if config.model.head == "hash" else config.model.embedding_dim
    for key, value in (("bits", width), ("n_classes", n_classes), ("seed", config.seed), ("n_views", config.data.views)):
        if key not in params and LOSSES.accepts(name, key):
            params[key] = value
    if config.selector.name:
        key = next((k for k in _SELECTOR_KEYS if LOSSES.accepts(name, k)), None)
        if key is None:
            raise ConfigError(f"loss {name!r} takes no selector; remove the [selector] table")
        params[key] = create_selector(config.selector.name, default_margin=selector_margin(name, params),
                                      generator=selector_generator, **config.selector.params)
    loss = LOSSES.create(name, **params)
    if config.loss.memory.size > 0:
        loss = CrossBatchMemory(loss, config.loss.memory.size, width, config.loss.memory.warmup_steps)
    if config.model.aux_classes and config.train.aux_weight > 0:
        loss = AuxClassificationLoss(loss, config.train.aux_weight, config.train.aux_label_smoothing)
    if config.train.rerank_weight > 0:
        loss = RerankInstanceLoss(loss, config.train.rerank_weight, config.train.rerank_temperature, config.data.views)
    return loss


def training_outputs(loss: nn.Module) -> dict[str, bool]:
    """What ``RetrievalModel.training_outputs`` must return for the loss `build_loss` made: class
    logits for an :class:`AuxClassificationLoss`, re-rank vectors for a :class:`RerankInstanceLoss`."""
    rerank = isinstance(loss, RerankInstanceLoss)
    inner = loss.loss if rerank else loss
    return {"logits": isinstance(inner, AuxClassificationLoss), "rerank": rerank}


def build_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (with momentum) over ``model``'s parameters, as ``[optimizer]`` says. With
    ``backbone_lr_scale`` other than 1, two parameter groups: the rest at ``lr`` first (the rate
    the training log shows), then the backbone's at ``lr · scale``, each group's ``lr_scale``
    telling a schedule its share."""
    o = config.optimizer
    backbone = getattr(model, "backbone", None)
    if o.backbone_lr_scale == 1 or backbone is None:
        params: Any = model.parameters()
    else:
        own = {id(p) for p in backbone.parameters()}
        params = [{"params": [p for p in model.parameters() if id(p) not in own], "lr": o.lr, "lr_scale": 1.0},
                  {"params": list(backbone.parameters()), "lr": o.lr * o.backbone_lr_scale, "lr_scale": o.backbone_lr_scale}]
    return create_optimizer(o.name, params, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)


def build_scheduler(config: Config, optimizer: torch.optim.Optimizer) -> Any:
    """The ``[scheduler]``: an epoch-wise torch scheduler, a per-batch callback (``warmup-cosine``)
    or None (see ``deephash.train.optim``)."""
    return create_scheduler(config.scheduler.name, optimizer, lr=config.optimizer.lr, epochs=config.train.epochs,
                            **config.scheduler.params)


def loss_schedules(config: Config) -> list[Schedule]:
    """The ``[[schedules]]``: loss attributes ramped over the epochs."""
    return [LinearRamp(r.attribute, r.start, r.end, r.epochs or None) for r in config.schedules]


def make_loader(dataset: Any, batches: Any, device: torch.device, config: Config,
                generator: torch.Generator | None) -> BatchLoader | StreamLoader:
    """A ``BatchLoader`` (in-memory data) or a ``StreamLoader`` (a photo folder, decoded in
    ``data.num_workers`` processes) with the configured augmentation; a training loader
    (``generator`` given) of a photo folder also draws random resized crops, flips and jitter."""
    augment = None
    if generator is not None and config.data.augment:
        augment = build_augment(dict(config.data.augment), generator=generator)
    if isinstance(dataset, ImageFolder):
        return StreamLoader(dataset, batches, device, augment=augment, views=config.data.views,
                            num_workers=config.data.num_workers, random_crops=generator is not None, generator=generator)
    return BatchLoader(dataset, batches, device, augment=augment, views=config.data.views)
