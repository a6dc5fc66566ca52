"""Experiments end to end: train a run directory, load it back, encode, evaluate, index, search.

The command line is a thin shell over these functions. A run directory holds:

- ``config.toml``: the resolved config (every default filled in, ``model.mean``/``std`` computed);
- ``metrics.jsonl``: one JSON line per log interval (``type = "step"``) and per epoch (``"epoch"``);
- ``checkpoints/last.pt`` and ``checkpoints/best.pt`` (lowest training or validation loss): model,
  optimizer, scheduler, loss state, epoch, history and every random generator's state;
- ``model.pt``: ``{"spec", "state_dict", "config", "classes"}``, primitives and tensors only, so it
  loads with ``torch.load(weights_only=True)``;
- ``split.npz`` under a split protocol (e.g. DeepHash-pytorch's ``cifar10``): the seeded index lists;
- ``metrics.json`` after ``evaluate``, and ``report.html`` after ``report``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deephash._io import atomic_savez, atomic_torch_save, atomic_write_text
from deephash.config import Config, config_from_dict, config_to_dict, dump_config
from deephash.errors import CodeLengthError, ConfigError, DataFormatError, DeephashError, NotFoundError

#: Split protocols: name -> (queries per class, training images per class); the rest is database.
PROTOCOLS: dict[str, tuple[int, int]] = {"deephash-cifar10": (100, 500)}
PROTOCOL_SPLITS = ("query", "train", "database")
MODEL_FILE = "model.pt"
CHECKPOINT_DIR = "checkpoints"


# ------------------------------------------------------------------------------------------ device


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise ``torch.device(name)``.

    Raises:
        DeephashError: a CUDA device was asked for but none is available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeephashError(f"device {name!r} asked for but CUDA is not available; use device = \"cpu\"")
    return device


# -------------------------------------------------------------------------------------------- data


def protocol_split(labels: np.ndarray, n_query: int, n_train: int, seed: int) -> dict[str, np.ndarray]:
    """A seeded per-class split: ``n_query`` queries and ``n_train`` training items per class.

    Args:
        labels: int64 ``(N,)``.
        n_query: queries drawn per class.
        n_train: training items drawn per class (after the queries).
        seed: seed of the permutation.

    Returns:
        ``{"query", "train", "database"}``: sorted int64 index arrays, disjoint, covering ``0..N-1``
        (the database is every item that is neither query nor training item).
    """
    labels = np.asarray(labels, dtype=np.int64)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).numpy()
    order = perm[np.argsort(labels[perm], kind="stable")]  # grouped by class, random within
    grouped = labels[order]
    rank = np.arange(len(order)) - np.searchsorted(grouped, grouped, side="left")
    return {
        "query": np.sort(order[rank < n_query]),
        "train": np.sort(order[(rank >= n_query) & (rank < n_query + n_train)]),
        "database": np.sort(order[rank >= n_query + n_train]),
    }


def _load_source(config: Config, split: str):
    """One split of the configured data set as an ArrayDataset (no protocol, no limit)."""
    from deephash.data.datasets import ImageFolder, load_dataset

    data = config.data
    if data.dataset == "folder":
        folder = Path(data.images)
        return ImageFolder(folder / split if (folder / split).is_dir() else folder, train=split == "train")
    return load_dataset(data.dataset, split, root=data.root or None)


def _protocol_indices(config: Config, pooled_labels: np.ndarray, run_dir: Path | None) -> dict[str, np.ndarray]:
    """The split lists: from ``data.split_file``, else ``run_dir/split.npz``, else drawn (and saved)."""
    candidates = [Path(config.data.split_file)] if config.data.split_file else []
    if run_dir is not None:
        candidates.append(run_dir / "split.npz")
    for path in candidates:
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as stored:
                    split = {name: stored[name].astype(np.int64) for name in PROTOCOL_SPLITS}
            except (KeyError, ValueError, OSError, EOFError) as exc:
                raise DataFormatError(f"split file {path}: not a split of {PROTOCOL_SPLITS} ({exc})") from None
            top = max((int(v.max()) for v in split.values() if v.size), default=-1)
            if top >= len(pooled_labels):
                raise DataFormatError(f"split file {path} indexes item {top} of {len(pooled_labels)}")
            return split
        if path == Path(config.data.split_file):
            raise NotFoundError(f"split file {path} not found (data.split_file)")
    n_query, n_train = PROTOCOLS[config.data.protocol]
    split = protocol_split(pooled_labels, n_query, n_train, config.seed)
    if run_dir is not None:
        atomic_savez(run_dir / "split.npz", **split, protocol=np.array(config.data.protocol), seed=np.array(config.seed))
    return split


def load_split(config: Config, split: str, run_dir: str | os.PathLike | None = None):
    """The images of one split, as the config says (protocol and ``data.limit`` applied).

    Args:
        config: the experiment config.
        split: a split of the data set (``train``/``test``), or ``query``/``train``/``database``
            under a protocol.
        run_dir: where a protocol's ``split.npz`` is kept (read, or written when drawn).

    Returns:
        An ``ArrayDataset``: uint8 images ``(N, C, H, W)``, int64 targets ``(N,)``.

    Raises:
        NotFoundError: no data found. DeephashError: unknown split, or an empty split.
    """
    from deephash.data.datasets import ArrayDataset

    run_dir = Path(run_dir) if run_dir is not None else None
    if config.data.protocol:
        if split not in PROTOCOL_SPLITS:
            raise DeephashError(f"split {split!r} is not one of protocol {config.data.protocol}'s {PROTOCOL_SPLITS}")
        parts = [_load_source(config, name) for name in ("train", "test")]
        pooled = ArrayDataset(
            torch.cat([p.data for p in parts]), torch.cat([p.targets for p in parts]), parts[0].classes,
            name=f"{config.data.dataset}/{config.data.protocol}",
        )
        indices = _protocol_indices(config, pooled.targets.numpy(), run_dir)[split]
        dataset = pooled.subset(torch.from_numpy(indices))
        dataset.name, dataset.train = f"{pooled.name}/{split}", split == "train"
    else:
        dataset = _load_source(config, split)
    if config.data.limit > 0 and len(dataset) > config.data.limit:
        dataset = dataset.subset(torch.arange(config.data.limit))
    if len(dataset) == 0:
        raise NotFoundError(f"no images in split {split!r} of {config.data.dataset}")
    return dataset


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images ``(N, C, H, W)`` scaled to [0, 1]."""
    x = images.to(torch.float64).div(255).transpose(0, 1).reshape(images.shape[1], -1)
    return [round(float(v), 6) for v in x.mean(dim=1)], [round(max(float(v), 1e-6), 6) for v in x.std(dim=1)]


# ------------------------------------------------------------------------------------------ models


def model_spec_from_config(config: Config, in_channels: int) -> dict[str, Any]:
    """The ``build_model`` spec for ``config.model`` and images of ``in_channels`` channels."""
    m = config.model
    return {
        "backbone": m.backbone,
        "backbone_params": dict(m.backbone_params),
        "in_channels": in_channels,
        "head": m.head,
        "bits": m.bits,
        "embedding_dim": m.embedding_dim,
        "normalize": m.normalize,
        "mean": list(m.mean) or [0.0] * in_channels,
        "std": list(m.std) or [1.0] * in_channels,
        "aux_classes": m.aux_classes or None,
        "code_rule": m.code_rule,
        "code_temperature": m.code_temperature,
    }


class _WithLogits(nn.Module):
    """Training view of a model with an aux classifier: forward -> (head output, class logits)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_with_logits(x)


class AuxClassificationLoss(nn.Module):
    """``loss(u, labels) + weight * cross_entropy(logits, labels)``.

    Args:
        loss: the retrieval loss, called on the relaxed codes / embeddings ``u`` float (B, D).
        weight: weight of the cross-entropy term on the aux logits float (B, K).
        label_smoothing: that cross-entropy's label smoothing, in [0, 1).
    """

    def __init__(self, loss: nn.Module, weight: float, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.loss = loss
        self.weight = weight
        self.label_smoothing = label_smoothing

    @property
    def num_selected(self) -> Any:
        return getattr(self.loss, "num_selected", None)

    def forward(self, u: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = nn.functional.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return self.loss(u, labels) + self.weight * ce


class _InnerSchedule:
    """Applies a schedule to the retrieval loss inside an :class:`AuxClassificationLoss`."""

    def __init__(self, schedule: Any) -> None:
        self.schedule = schedule

    def apply(self, loss_fn: Any, epoch: int, n_epochs: int) -> Any:
        return self.schedule.apply(getattr(loss_fn, "loss", loss_fn), epoch, n_epochs)


def build_loss(config: Config, n_classes: int, selector_generator: torch.Generator | None = None) -> nn.Module:
    """The configured loss; ``bits``/``n_classes``/a selector are filled in when the loss takes them.

    ``[selector]`` builds a selector object (given the loss's ``margin`` when the selector takes
    one, and ``selector_generator`` when it draws at random) passed as the loss's ``selector``
    (``online-*``) or ``triplet_selector`` (``dtsh``) parameter.
    """
    import inspect

    import deephash.losses.hashing  # noqa: F401  (registers the hashing losses)
    from deephash.losses import create_loss
    from deephash.losses.registry import _LOSSES
    from deephash.mining import create_selector
    from deephash.mining.selectors import SELECTORS

    name = config.loss.name
    params = dict(config.loss.params)
    factory = _LOSSES.get(name)
    accepted = set(inspect.signature(factory).parameters) if factory is not None else set()
    if "bits" in accepted and "bits" not in params:
        params["bits"] = config.model.bits if config.model.head == "hash" else config.model.embedding_dim
    if "n_classes" in accepted and "n_classes" not in params:
        params["n_classes"] = n_classes
    if "seed" in accepted and "seed" not in params:
        params["seed"] = config.seed
    if config.selector.name:
        selector_params = dict(config.selector.params)
        cls = SELECTORS.get(config.selector.name)
        takes = set(inspect.signature(cls).parameters) if cls is not None else set()
        if "margin" in takes and "margin" not in selector_params and "margin" in params:
            selector_params["margin"] = params["margin"]
        if "generator" in takes and selector_generator is not None:
            selector_params["generator"] = selector_generator
        selector = create_selector(config.selector.name, **selector_params)
        key = next((k for k in ("selector", "triplet_selector", "pair_selector") if k in accepted), None)
        if key is None:
            raise ConfigError(f"loss {name!r} takes no selector; remove the [selector] table")
        params[key] = selector
    loss = create_loss(name, **params)
    if config.model.aux_classes and config.train.aux_weight > 0:
        loss = AuxClassificationLoss(loss, config.train.aux_weight, config.train.aux_label_smoothing)
    return loss


def build_optimizer(config: Config, params: Any) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (with momentum) as ``[optimizer]`` says."""
    o = config.optimizer
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


class WarmupCosineLR:
    """Per-batch learning rate: linear warm-up, then a cosine decay to ``eta_min``.

    A ``fit`` callback (``on_batch_start``), not an epoch-wise scheduler: the rate of step t of T
    (over the whole run) is ``lr·(t+1)/W`` for t < W = ``warmup``·T, then
    ``eta_min + (lr − eta_min)·(1 + cos(π·(t − W)/(T − W)))/2``. It is a function of the epoch
    and the step alone, so a resumed run gets exactly the rates of an uninterrupted one.

    Args:
        optimizer: whose parameter groups get the rate.
        lr: peak rate (``optimizer.lr`` of the config).
        n_epochs: epochs of the run.
        warmup: share of all steps spent warming up, in [0, 1).
        eta_min: final rate.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, n_epochs: int, warmup: float = 0.1,
                 eta_min: float = 0.0) -> None:
        if not 0 <= warmup < 1:
            raise ConfigError(f"scheduler warmup-cosine: warmup must be in [0, 1), got {warmup}")
        self.optimizer, self.lr, self.n_epochs, self.warmup, self.eta_min = optimizer, lr, n_epochs, warmup, eta_min

    def rate(self, epoch: int, step: int, n_steps: int) -> float:
        """Rate of ``step`` (1-based) of ``epoch`` (0-based), ``n_steps`` steps an epoch."""
        total = max(1, self.n_epochs * n_steps)
        t, warm = epoch * n_steps + step - 1, int(self.warmup * total)
        if t < warm:
            return self.lr * (t + 1) / warm
        progress = min(1.0, (t - warm) / max(1, total - warm))
        return self.eta_min + (self.lr - self.eta_min) * 0.5 * (1 + math.cos(math.pi * progress))

    def on_batch_start(self, epoch: int, step: int, n_steps: int | None) -> None:
        rate = self.rate(epoch, step, n_steps or 1)
        for group in self.optimizer.param_groups:
            group["lr"] = rate


def build_scheduler(config: Config, optimizer: torch.optim.Optimizer) -> Any:
    """An epoch-wise LR scheduler (``fit`` steps it once per epoch), or None.

    ``cosine``: CosineAnnealingLR over ``train.epochs`` (params: ``eta_min``); ``step``: StepLR
    (params: ``step_size``, ``gamma``); ``onecycle``: OneCycleLR with one step per epoch (params:
    ``max_lr`` defaults to ``optimizer.lr``, ``pct_start``, ...). ``warmup-cosine`` changes the
    rate every batch: it is a `WarmupCosineLR` callback (params: ``warmup``, ``eta_min``), and
    this returns None for it.
    """
    s, epochs = config.scheduler, config.train.epochs
    params = dict(s.params)
    if s.name == "warmup-cosine":
        return None
    try:
        if s.name == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.pop("T_max", epochs), **params)
        if s.name == "step":
            return torch.optim.lr_scheduler.StepLR(optimizer, **{"step_size": max(1, epochs // 3), **params})
        if s.name == "onecycle":
            params.setdefault("max_lr", config.optimizer.lr)
            return torch.optim.lr_scheduler.OneCycleLR(optimizer, epochs=epochs, steps_per_epoch=1, **params)
    except TypeError as exc:
        raise ConfigError(f"scheduler {s.name!r}: bad parameters {sorted(s.params)} ({exc})") from None
    return None


def build_batch_scheduler(config: Config, optimizer: torch.optim.Optimizer) -> WarmupCosineLR:
    """The `WarmupCosineLR` callback of a ``warmup-cosine`` config."""
    params = dict(config.scheduler.params)
    unknown = sorted(set(params) - {"warmup", "eta_min"})
    if unknown:
        raise ConfigError(f"scheduler warmup-cosine: unknown parameter {unknown[0]!r}; known: warmup, eta_min")
    return WarmupCosineLR(optimizer, config.optimizer.lr, config.train.epochs,
                          float(params.get("warmup", 0.1)), float(params.get("eta_min", 0.0)))


class RandomBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Shuffled batches of ``batch_size`` indices from ``generator``; a last batch of < 2 is dropped."""

    def __init__(self, n_items: int, batch_size: int, generator: torch.Generator) -> None:
        self.n_items, self.batch_size, self.generator = n_items, batch_size, generator

    def __len__(self) -> int:
        full, rest = divmod(self.n_items, self.batch_size)
        return full + (rest >= 2)

    def __iter__(self):
        order = torch.randperm(self.n_items, generator=self.generator)
        for batch in order.split(self.batch_size)[: len(self)]:
            yield batch.tolist()


# ---------------------------------------------------------------------------------------- training


class _Generators:
    """Every random generator of a run, seeded from ``config.seed``: batches (CPU), augmentation
    and selector draws (on the training device)."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.sampler = torch.Generator().manual_seed(seed)
        self.augment = torch.Generator(device=device).manual_seed(seed + 1)
        self.selector = torch.Generator(device=device).manual_seed(seed + 2)

    def all(self) -> list[torch.Generator]:
        """In the order the checkpoints store them."""
        return [self.sampler, self.augment, self.selector]


class _AugmentSwitch:
    """Turns the loader's augmentation off for the last ``n_last`` epochs."""

    def __init__(self, loader: Any, n_epochs: int, n_last: int) -> None:
        self.loader, self.augment, self.first_plain = loader, loader.augment, n_epochs - n_last

    def on_epoch_start(self, epoch: int) -> None:
        self.loader.augment = None if epoch >= self.first_plain else self.augment


def _check_resume_config(config: Config, run_dir: Path) -> None:
    """Refuse to resume a run with a config other than the one it was started with."""
    from deephash.config import load_config

    saved_path = run_dir / "config.toml"
    if not saved_path.is_file():
        raise NotFoundError(f"cannot resume: {saved_path} does not exist")
    saved = load_config(saved_path)
    model = dataclasses.replace(config.model, mean=config.model.mean or saved.model.mean,
                                std=config.model.std or saved.model.std)
    if dump_config(dataclasses.replace(config, model=model)) != dump_config(saved):
        raise ConfigError(f"cannot resume {run_dir}: the config differs from {saved_path}; resume with the same config")


def train_run(
    config: Config,
    out_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
) -> Path:
    """Train as ``config`` says and write the run directory ``out_dir``.

    Args:
        config: the experiment.
        out_dir: run directory; created. Refused if it already holds a run, unless ``resume``.
        resume: continue from ``out_dir/checkpoints/last.pt`` (same config, same seed: the same
            weights as an uninterrupted run on the CPU).
        progress: tqdm progress bars.
        callbacks: extra ``fit`` callbacks, called after the logger and the checkpointer.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        DeephashError: bad config, no data, an existing run without ``resume``, or divergence.
    """
    from deephash.data.samplers import BalancedBatchSampler
    from deephash.losses.schedules import LinearRamp
    from deephash.models import build_model
    from deephash.train.callbacks import JsonlLogger
    from deephash.train.checkpoint import CheckpointCallback, load_checkpoint
    from deephash.train.ema import WeightAverage
    from deephash.train.fit import fit
    from deephash.train import distributed_runner
    from deephash.train.distributed import barrier, is_distributed, is_main_process

    main = is_main_process()  # under DDP (--nproc, torchrun) only rank 0 writes files and shows progress
    progress = progress and main
    run_dir = Path(out_dir)
    last = run_dir / CHECKPOINT_DIR / "last.pt"
    if resume:
        _check_resume_config(config, run_dir)
        if not last.is_file():
            raise NotFoundError(f"cannot resume: {last} does not exist")
    elif last.exists() or (run_dir / MODEL_FILE).exists():
        raise DeephashError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    if config.train.num_threads > 0:
        torch.set_num_threads(config.train.num_threads)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    generators = _Generators(config.seed, device)
    run_dir.mkdir(parents=True, exist_ok=True)

    train_set = load_split(config, config.data.train_split, run_dir)
    if not config.model.mean or not config.model.std:
        mean, std = channel_stats(train_set.data)
        config = dataclasses.replace(config, model=dataclasses.replace(
            config.model, mean=config.model.mean or mean, std=config.model.std or std))
    if main:
        atomic_write_text(run_dir / "config.toml", dump_config(config))

    n_classes = len(train_set.classes) if train_set.classes else int(train_set.targets.max()) + 1
    model = fast_layout(build_model(model_spec_from_config(config, int(train_set.data.shape[1]))).to(device))
    loss_fn = build_loss(config, n_classes, generators.selector).to(device)
    if config.model.code_rule == "posterior":  # the codes are drawn from the loss's class hash centers
        model.set_code_centers(getattr(loss_fn, "loss", loss_fn).centers)
    optimizer = build_optimizer(config, model.parameters())
    scheduler = build_scheduler(config, optimizer)
    schedules = [LinearRamp(r.attribute, r.start, r.end, r.epochs or None) for r in config.schedules]
    trained = model
    if isinstance(loss_fn, AuxClassificationLoss):
        trained, schedules = _WithLogits(model), [_InnerSchedule(s) for s in schedules]

    s = config.sampler
    if s.kind == "balanced":
        batches = BalancedBatchSampler(train_set.targets, s.n_classes, s.n_samples, generator=generators.sampler)
    else:
        batches = RandomBatchSampler(len(train_set), s.batch_size, generators.sampler)
    if is_distributed():  # disjoint, seeded batches per rank
        batches = distributed_runner.train_batch_sampler(config, train_set.targets)
    loader = _make_loader(train_set, batches, device, config, generators.augment)
    if len(loader) == 0:
        raise DeephashError(f"{len(train_set)} training images make no batch of the sampler's size; lower the sampler's sizes")
    val_loader = None
    if config.train.eval_every > 0:
        val_set = load_split(config, config.data.query_split, run_dir)
        val_batches = RandomBatchSampler(len(val_set), s.n_classes * s.n_samples if s.kind == "balanced" else s.batch_size,
                                         torch.Generator().manual_seed(config.seed + 3))
        val_loader = _EveryN(_make_loader(val_set, val_batches, device, config, None), config.train.eval_every)

    history: list[dict] = []
    start_epoch = 0
    average = WeightAverage(model, config.train.ema_decay) if config.train.ema_decay > 0 else None
    if resume:
        state = load_checkpoint(last, model, optimizer, scheduler, generators=generators.all())
        start_epoch, history = int(state["epoch"]), list(state["history"])
        if average is not None:
            _restore_average(average, state, last)
        _trim_log(run_dir / "metrics.jsonl", start_epoch)

    trained, loss_fn, schedules = distributed_runner.wrap_for_training(  # DDP + global-batch loss
        trained, loss_fn, schedules, config.train.mine_globally)
    monitor = "val_loss" if val_loader is not None else "train_loss"
    hooks: list[Any] = [
        JsonlLogger(run_dir / "metrics.jsonl", is_main_process=main),
        CheckpointCallback(run_dir / CHECKPOINT_DIR, model, optimizer, scheduler, monitor=monitor,
                           generators=generators.all(), history=history, is_main_process=main,
                           extra=None if average is None else lambda: {"weight_average": average.state_dict()}),
    ]
    if average is not None:
        hooks.insert(0, average)
    if config.scheduler.name == "warmup-cosine":
        hooks.insert(0, build_batch_scheduler(config, optimizer))
    if config.train.final_epochs_no_augment > 0 and loader.augment is not None:
        hooks.insert(0, _AugmentSwitch(loader, config.train.epochs, config.train.final_epochs_no_augment))
    if val_loader is not None:
        hooks.insert(0, val_loader)
    fit(loader, val_loader, trained, loss_fn, optimizer, scheduler, config.train.epochs, device,
        config.train.log_interval, start_epoch=start_epoch, schedules=schedules,
        callbacks=[*hooks, *callbacks], progress=progress)

    classes = list(train_set.classes) if train_set.classes else [str(i) for i in range(n_classes)]
    if average is not None:
        average.copy_to(model)
    if main:
        save_model(run_dir / MODEL_FILE, model, config, classes)
    barrier()  # under DDP every rank returns once the run directory is complete
    return run_dir


def _restore_average(average: Any, state: dict, path: Path) -> None:
    """Continue the weight average stored in a checkpoint's ``extra``."""
    saved = state["extra"].get("weight_average")
    if not isinstance(saved, dict):
        raise DataFormatError(f"checkpoint {path} holds no weight average, but train.ema_decay is set")
    try:
        average.load_state_dict(saved)
    except (KeyError, RuntimeError, TypeError) as error:
        raise DataFormatError(f"checkpoint {path} holds a weight average that does not fit the model ({error})") from None


def _trim_log(path: Path, start_epoch: int) -> None:
    """Drop log lines of epochs after the checkpoint (a run killed mid-epoch logged some steps)."""
    from deephash.train.callbacks import read_jsonl

    if not path.is_file():
        return
    entries = read_jsonl(path)
    kept = [e for e in entries if int(e.get("epoch", 0)) < start_epoch]
    if len(kept) != len(entries) or not path.read_bytes().endswith(b"\n"):
        atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in kept))


def _make_loader(dataset: Any, batches: Any, device: torch.device, config: Config, generator: torch.Generator | None) -> Any:
    """A ``BatchLoader`` with the configured augmentation (none when ``generator`` is None)."""
    from deephash.data import BatchLoader

    augment = None
    if generator is not None and config.data.augment:
        from deephash.data.augment import build_augment

        augment = build_augment(dict(config.data.augment), generator=generator)
    return BatchLoader(dataset, batches, device, augment=augment)


class _EveryN:
    """A validation loader that yields batches only every ``n``-th epoch (``fit`` then records
    ``val_loss = nan`` for the other epochs)."""

    def __init__(self, loader: Any, n: int) -> None:
        self.loader, self.n, self.epoch = loader, n, 0

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if (self.epoch + 1) % self.n == 0:
            yield from self.loader


def save_model(path: Path, model: nn.Module, config: Config, classes: list[str]) -> None:
    """Write ``model.pt`` atomically: spec, state dict (CPU), resolved config, class names."""
    from deephash.models import model_spec

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({"spec": model_spec(model), "state_dict": state, "config": config_to_dict(config),
                       "classes": list(classes)}, path)


# ------------------------------------------------------------------------------------- loading runs


def load_run(run_dir: str | os.PathLike, device: str | torch.device | None = None) -> tuple[nn.Module, Config]:
    """The trained model of a run (eval mode) and its resolved config.

    Args:
        run_dir: a run directory written by :func:`train_run`.
        device: where to put the model; default: the config's device (``auto``: CUDA if present).

    Raises:
        NotFoundError: no such run directory or no ``model.pt`` in it.
        DataFormatError: ``model.pt`` is corrupt.
    """
    from deephash.models import build_model

    run_dir = Path(run_dir)
    path = run_dir / MODEL_FILE
    if not run_dir.is_dir():
        raise NotFoundError(f"run directory {run_dir} does not exist")
    if not path.is_file():
        hint = " (training did not finish: resume it with `deephash train RUN --resume`)" if (run_dir / CHECKPOINT_DIR).is_dir() else ""
        raise NotFoundError(f"{run_dir} is not a finished run: no {MODEL_FILE}{hint}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        config = config_from_dict(saved["config"], str(path))
        model = build_model(saved["spec"])
        model.load_state_dict(saved["state_dict"])
    except DeephashError:
        raise
    except Exception as exc:  # corrupt zip, missing keys, mismatched tensors
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataFormatError(f"{path} is not a deephash model file ({message})") from None
    model.classes = list(saved.get("classes", []))
    target = resolve_device(config.device) if device is None else torch.device(device)
    return fast_layout(model.to(target)).eval(), config


def fast_layout(model: nn.Module) -> nn.Module:
    """The model in channels-last memory layout when it lives on the CPU (in place; returned).

    oneDNN's CPU convolutions run faster on NHWC tensors: measured here, fmnist-cnn trains about
    1.5x and encodes about 1.7x faster (BENCHMARKS.md). Values are unchanged; inputs are converted
    in ``RetrievalModel.features``. Other devices keep their layout.
    """
    if next(model.parameters()).device.type == "cpu":
        model.to(memory_format=torch.channels_last)
        model.channels_last = True
    return model


# ----------------------------------------------------------------------------------------- encoding


def _is_hash(model: nn.Module) -> bool:
    return getattr(model, "bits", None) is not None


@torch.inference_mode()
def encode(model: nn.Module, dataset: Any, batch_size: int = 1024,
           device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Codes (hash model) or embeddings of every image of ``dataset``, in order.

    Args:
        model: a RetrievalModel; put in eval mode here.
        dataset: an ``ArrayDataset`` (uint8 images ``(N, C, H, W)``, int64 targets).
        batch_size: images per forward pass.
        device: where to run; default the model's device.

    Returns:
        ``(codes, labels)``: packed uint8 ``(N, ceil(bits/8))`` for a hash model, else float32
        embeddings ``(N, D)``; int64 labels ``(N,)``.
    """
    from deephash.retrieval.codes import pack_codes

    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval().to(device)
    outputs = []
    for start in range(0, len(dataset), batch_size):
        x = dataset.data[start:start + batch_size].to(device).float().div_(255)
        outputs.append(model(x).float().cpu())
    out = torch.cat(outputs) if outputs else torch.empty(0, getattr(model, "embedding_dim", 0))
    labels = dataset.targets.numpy().astype(np.int64)
    if _is_hash(model):
        return pack_codes(out), labels
    return out.numpy().astype(np.float32), labels


def encode_split(run_dir: str | os.PathLike, model: nn.Module, config: Config, split: str,
                 dataset: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`encode` of one split of a run's data, cached in ``run_dir/codes/SPLIT.npz``.

    The cache records the SHA-256 of ``model.pt``; a cache written by another model (a retrained
    or resumed run) is ignored and replaced, so ``evaluate``, ``index build`` and ``report`` encode
    each split once per model. Written atomically, read with ``allow_pickle=False``.

    Returns:
        ``(codes, labels)`` as :func:`encode` returns them.
    """
    run_dir = Path(run_dir)
    stamp = _model_digest(run_dir)
    cache = run_dir / "codes" / f"{split}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as stored:
                if str(stored["model_sha256"]) == stamp:
                    return stored["codes"], stored["labels"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # a stale or torn cache is simply rebuilt
    dataset = dataset if dataset is not None else load_split(config, split, run_dir)
    codes, labels = encode(model, dataset)
    atomic_savez(cache, codes=codes, labels=labels, model_sha256=np.str_(stamp))
    return codes, labels


def _model_digest(run_dir: Path) -> str:
    digest = hashlib.sha256()
    with open(run_dir / "model.pt", "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _encode_sharded(model: nn.Module, dataset: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """:func:`encode` sharded over the ranks of a distributed job; ``(None, None)`` off rank 0."""
    from deephash.train.distributed_runner import encode_sharded

    return encode_sharded(model, dataset)


def _source_dataset(config: Config, run_dir: Path, split: str | None, images: str | os.PathLike | None):
    """A split of the run's data (protocol and limit applied), or an image folder sized for the model."""
    if images is None:
        return load_split(config, split, run_dir)
    from deephash.data.datasets import ImageFolder

    channels, height, width = model_input_shape(config, run_dir)
    return ImageFolder(images, image_size=(height, width), grayscale=channels == 1, train=False)


def encode_run(run_dir: str | os.PathLike, split: str | None = None, images: str | os.PathLike | None = None,
               out: str | os.PathLike = "codes.npz") -> Path:
    """Encode a split (or an image folder) with a run's model and write a code file.

    A hash model writes the code file of the retrieval contract (``codes`` packed uint8,
    ``labels``, ``bits``); an embedding model writes ``embeddings`` float32 ``(N, D)`` and
    ``labels`` instead.
    """
    from deephash.retrieval.codes import save_codes

    run_dir = Path(run_dir)
    model, config = load_run(run_dir)
    dataset = _source_dataset(config, run_dir, split, images)
    codes, labels = _encode_sharded(model, dataset)
    if codes is None:  # another rank of a distributed job: rank 0 writes
        return Path(out)
    out = Path(out)
    if _is_hash(model):
        save_codes(out, codes, labels, model.bits)
    else:
        atomic_savez(out, embeddings=codes, labels=labels)
    return out


# --------------------------------------------------------------------------------------- evaluation


def evaluate_run(run_dir: str | os.PathLike, query: str | None = None, database: str | None = None,
                 ks: Sequence[int] | None = None) -> dict[str, Any]:
    """Retrieval metrics of a run's model: queries ranked against a database, Hamming distances.

    Writes ``run_dir/metrics.json`` (atomically) with the metrics and the protocol: data set,
    splits and their sizes, the tie rules, the cut-offs and the radius.

    Returns:
        The dict written.
    """
    from deephash.retrieval.metrics import evaluate_codes, evaluate_embeddings

    run_dir = Path(run_dir)
    model, config = load_run(run_dir)
    query = query or config.data.query_split
    database = database or config.data.database_split
    ks = [int(k) for k in (ks or config.eval.ks)]
    q_set, db_set = load_split(config, query, run_dir), load_split(config, database, run_dir)
    tic = time.perf_counter()
    q_codes, q_labels = encode_split(run_dir, model, config, query, q_set)
    db_codes, db_labels = encode_split(run_dir, model, config, database, db_set)
    encode_seconds = time.perf_counter() - tic
    if _is_hash(model):
        metrics = evaluate_codes(q_codes, q_labels, db_codes, db_labels, model.bits, ks=ks,
                                 radius=config.eval.radius, knn_k=config.eval.knn_k, splits=(query, database))
        kind = f"hamming ranking of {model.bits}-bit codes"
    else:
        metrics = evaluate_embeddings(q_codes, q_labels, db_codes, db_labels, ks=ks, knn_k=config.eval.knn_k,
                                      splits=(query, database))
        kind = f"euclidean ranking of {q_codes.shape[1]}-d embeddings"
    result = {
        "protocol": {
            "dataset": config.data.dataset,
            "split_protocol": config.data.protocol or "the data set's own splits",
            "query_split": query, "n_query": len(q_set),
            "database_split": database, "n_database": len(db_set),
            "ranking": kind,
            "relevance": "same label",
            "ties": "tie-aware = expected AP over random orders within tied distances; "
                    "stable = ties broken by database order",
            "ks": ks, "radius": config.eval.radius, "knn_k": config.eval.knn_k,
        },
        "metrics": _jsonable(metrics),
        "encode_seconds": round(encode_seconds, 3),
    }
    atomic_write_text(run_dir / "metrics.json", json.dumps(result, indent=2) + "\n")
    return result


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else repr(float(value))
    if isinstance(value, np.integer):
        return int(value)
    return value


def format_metrics(result: dict[str, Any]) -> str:
    """:func:`evaluate_run`'s result as a table: one row per metric, one column per tie rule."""
    p = result["protocol"]
    rows: dict[str, dict[str, float]] = {}
    for key, value in result["metrics"].items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        base, _, rule = key.rpartition("/")
        if rule not in ("tie-aware", "stable"):
            base, rule = key, "value"
        rows.setdefault(base, {})[rule] = float(value)
    columns = [c for c in ("tie-aware", "stable", "value") if any(c in r for r in rows.values())]
    width = max([len(k) for k in rows] + [6])
    lines = [f"{p['dataset']}: {p['n_query']} queries ({p['query_split']}) vs {p['n_database']} "
             f"database items ({p['database_split']}), {p['ranking']}",
             f"  {'metric':<{width}}" + "".join(f"  {c:>9}" for c in columns)]
    for name, values in rows.items():
        cells = "".join(f"  {values[c]:>9.4f}" if c in values else f"  {'-':>9}" for c in columns)
        lines.append(f"  {name:<{width}}{cells}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ index, search


def build_index(run_dir: str | os.PathLike, split: str | None = None, images: str | os.PathLike | None = None,
                out: str | os.PathLike = "index", factory: str = "BFlat") -> Path:
    """Encode a split (or an image folder) with a run's hash model and save a :class:`HashIndex`.

    The index metadata records the run, the source (split or folder) and, for folders, the path
    of every item, so :func:`search` can name them.
    """
    from deephash.retrieval.index import HashIndex

    run_dir = Path(run_dir)
    model, config = load_run(run_dir)
    if not _is_hash(model):
        raise DeephashError(f"{run_dir} holds an embedding model; a Hamming index needs a hash model (model.head = 'hash')")
    dataset = _source_dataset(config, run_dir, split, images)
    from deephash.train.distributed import is_distributed

    if images is None and not is_distributed():
        codes, labels = encode_split(run_dir, model, config, split, dataset)
    else:
        codes, labels = _encode_sharded(model, dataset)
    if codes is None:  # another rank of a distributed job: rank 0 writes
        return Path(out)
    metadata: dict[str, Any] = {
        "run": str(run_dir.resolve()),
        "source": f"images:{Path(images).resolve()}" if images is not None else f"split:{split}",
        "classes": list(getattr(model, "classes", []) or dataset.classes or []),
    }
    if dataset.paths is not None:
        metadata["paths"] = list(dataset.paths)
    index = HashIndex(model.bits, factory=factory, metadata=metadata)
    index.add(codes, labels=labels)
    out = Path(out)
    index.save(out)
    return out


def _load_index(index_dir: str | os.PathLike):
    from deephash.retrieval.index import HashIndex

    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        raise NotFoundError(f"index directory {index_dir} does not exist")
    return HashIndex.load(index_dir)


def index_info(index_dir: str | os.PathLike) -> dict[str, Any]:
    """What an index holds: bits, items, factory, the run that made it, the source, the classes."""
    index = _load_index(index_dir)
    meta = dict(index.metadata) if isinstance(index.metadata, dict) else {"model": index.metadata}
    info: dict[str, Any] = {"bits": index.bits, "items": len(index), "factory": index.factory}
    paths, classes = meta.pop("paths", None), meta.pop("classes", None)
    info.update(meta)
    if classes:
        info["classes"] = ", ".join(classes)
    if paths:
        info["paths"] = f"{len(paths)} image files"
    return info


def _query_images(config: Config, run_dir: Path, items: Sequence[str], shape: tuple[int, ...]) -> tuple[torch.Tensor, list[Any]]:
    """Query images from files or ``SPLIT:N`` references: uint8 ``(Q, C, H, W)`` and their labels."""
    from deephash.data.sources import read_image

    images, labels, splits = [], [], {}
    for item in items:
        split, _, number = item.rpartition(":")
        if split and number.isdigit() and not Path(item).exists():
            if split not in splits:
                splits[split] = load_split(config, split, run_dir)
            dataset = splits[split]
            i = int(number)
            if i >= len(dataset):
                raise DeephashError(f"{item}: split {split!r} has {len(dataset)} items")
            images.append(dataset.data[i])
            labels.append(int(dataset.targets[i]))
        else:
            mode = "L" if shape[0] == 1 else "RGB"
            images.append(torch.from_numpy(read_image(item, mode=mode, size=tuple(shape[1:])).copy()))
            labels.append(None)
    return torch.stack(images), labels


def search(index_dir: str | os.PathLike, run_dir: str | os.PathLike, images: Sequence[str], k: int = 10,
           radius: int | None = None) -> list[dict[str, Any]]:
    """Encode query images with a run's model and look up their nearest items in an index.

    Args:
        index_dir: directory written by :func:`build_index`.
        run_dir: the run whose model built the index.
        images: image files, or ``SPLIT:N`` (item N of a split of the run's data set).
        k: results per query (ignored with ``radius``).
        radius: return every item within this Hamming distance (inclusive) instead.

    Returns:
        One dict per query: ``query``, ``label``, ``hits``: a list of ``{rank, id, distance,
        label, class, path}`` (``path`` None unless the index was built from an image folder).

    Raises:
        CodeLengthError: the run's code length differs from the index's.
    """
    from deephash.retrieval.codes import pack_codes

    run_dir = Path(run_dir)
    index = _load_index(index_dir)
    model, config = load_run(run_dir)
    if not _is_hash(model):
        raise DeephashError(f"{run_dir} holds an embedding model; search needs the hash model that built the index")
    if model.bits != index.bits:
        raise CodeLengthError(f"{run_dir} makes {model.bits}-bit codes but index {index_dir} holds {index.bits}-bit codes")
    shape = tuple(model_input_shape(config, run_dir))
    queries, query_labels = _query_images(config, run_dir, images, shape)
    device = next(model.parameters()).device
    with torch.inference_mode():
        codes = pack_codes(model(queries.to(device).float().div_(255)).cpu())
    meta = index.metadata if isinstance(index.metadata, dict) else {}
    classes, paths = meta.get("classes") or getattr(model, "classes", []), meta.get("paths")
    labels = index.labels
    if radius is not None:
        lims, dist, ids = index.range_search(codes, radius)
        rows = [(dist[lims[q]:lims[q + 1]], ids[lims[q]:lims[q + 1]]) for q in range(len(codes))]
        rows = [(d[np.argsort(d, kind="stable")], i[np.argsort(d, kind="stable")]) for d, i in rows]
    else:
        dist, ids = index.search(codes, k)
        rows = list(zip(dist, ids))
    ordinal = _id_positions(index)
    results = []
    for item, q_label, (d_row, i_row) in zip(images, query_labels, rows):
        hits = []
        for rank, (distance, ident) in enumerate(zip(d_row.tolist(), i_row.tolist()), start=1):
            if ident < 0:
                break
            pos = ordinal(ident)
            label = int(labels[pos]) if labels is not None and pos is not None else None
            hits.append({
                "rank": rank, "id": int(ident), "distance": int(distance), "label": label,
                "class": classes[label] if label is not None and label < len(classes) else None,
                "path": paths[pos] if paths is not None and pos is not None else None,
            })
        results.append({"query": item, "label": q_label,
                        "class": classes[q_label] if q_label is not None and q_label < len(classes) else None,
                        "hits": hits})
    return results


def _id_positions(index: Any):
    """A function mapping an index id to its row (for its label and path)."""
    lookup = {int(v): i for i, v in enumerate(np.asarray(index.ids).tolist())}
    return lookup.get


def model_input_shape(config: Config, run_dir: Path) -> tuple[int, int, int]:
    """``(C, H, W)`` of the images the run's model was trained on."""
    if config.data.dataset in ("fashion-mnist", "mnist"):
        return (1, 28, 28)
    if config.data.dataset == "cifar10":
        return (3, 32, 32)
    if config.data.dataset == "digits":
        return (1, 8, 8)
    return tuple(load_split(config, config.data.train_split, run_dir).data.shape[1:])


__all__ = [
    "AuxClassificationLoss",
    "RandomBatchSampler",
    "build_index",
    "build_loss",
    "build_optimizer",
    "build_scheduler",
    "channel_stats",
    "encode",
    "encode_run",
    "evaluate_run",
    "format_metrics",
    "index_info",
    "load_run",
    "load_split",
    "model_spec_from_config",
    "protocol_split",
    "resolve_device",
    "save_model",
    "search",
    "train_run",
]
