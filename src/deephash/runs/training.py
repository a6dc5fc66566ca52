"""``deephash train``: train as a config says and write the run directory, or resume it."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deephash._io import atomic_write_text
from deephash.config import Config, dump_config, load_config
from deephash.devices import resolve_device
from deephash.errors import ConfigError, DataFormatError, DeephashError, NotFoundError
from deephash.config.parse import label_readers
from deephash.losses.schedules import inner_loss
from deephash.models import build_model, channels_last_on_cpu
from deephash.models.pca_codes import PROJECTION_RULES, fit_pca_codes
from deephash.runs.components import (build_loss, build_optimizer, build_scheduler, loss_schedules, make_loader, model_for_data,
                                      training_outputs, with_pretrained_inputs)
from deephash.runs.data import load_split, training_stats
from deephash.runs.layout import CHECKPOINT_DIR, CONFIG_FILE, LOG_FILE, MODEL_FILE, SKIPPED_FILE
from deephash.runs.model_file import save_model
from deephash.runs.rerank_head import train_rerank_head
from deephash.data.samplers import FirstBatches, RandomBatchSampler
from deephash.train.callbacks import FreezeBackbone, JsonlLogger, read_jsonl
from deephash.train.checkpoint import CheckpointCallback, load_checkpoint
from deephash.train.distributed import Strategy, current_strategy
from deephash.train.continuation import TanhContinuation
from deephash.train.ema import WeightAverage
from deephash.train.fit import fit
from deephash.train.pseudo_labels import PseudoLabels
from deephash.train.optim import split_schedule

__all__ = ["train_run"]


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


class _TrainingView(nn.Module):
    """What the loss takes, from one backbone pass: forward -> (head output[, class logits][, re-rank vectors])."""

    def __init__(self, model: nn.Module, logits: bool, rerank: bool) -> None:
        super().__init__()
        self.model = model
        self.logits, self.rerank = logits, rerank

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model.training_outputs(x, logits=self.logits, rerank=self.rerank)


class _AugmentOff:
    """Turns the loader's augmentation (and a photo loader's random crops) off for the last ``n_last`` epochs."""

    def __init__(self, loader: Any, n_epochs: int, n_last: int) -> None:
        self.loader, self.augment, self.first_plain = loader, loader.augment, n_epochs - n_last
        self.random_crops = getattr(loader, "random_crops", False)

    def on_epoch_start(self, epoch: int) -> None:
        self.loader.augment = None if epoch >= self.first_plain else self.augment
        if self.random_crops:
            self.loader.random_crops = epoch < self.first_plain


class _ValidateEvery:
    """A validation loader that yields batches only every ``n``-th epoch (``fit`` then records
    ``val_loss = nan`` for the other epochs)."""

    def __init__(self, loader: Any, n: int) -> None:
        self.loader, self.n, self.epoch = loader, n, 0

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if (self.epoch + 1) % self.n == 0:
            yield from self.loader


def _check_resume_config(config: Config, run_dir: Path) -> None:
    """Refuse to resume a run with a config other than the one it was started with."""
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.is_file():
        raise NotFoundError(f"cannot resume: {saved_path} does not exist")
    saved = load_config(saved_path)
    model = dataclasses.replace(config.model, mean=config.model.mean or saved.model.mean,
                                std=config.model.std or saved.model.std, in_channels=saved.model.in_channels)
    if dump_config(dataclasses.replace(config, model=model)) != dump_config(saved):
        raise ConfigError(f"cannot resume {run_dir}: the config differs from {saved_path}; resume with the same config")


def _prepare_dir(config: Config, run_dir: Path, resume: bool) -> Path:
    """The checkpoint to resume from (checked), or a refusal to overwrite a finished run."""
    last = run_dir / CHECKPOINT_DIR / "last.pt"
    if resume:
        _check_resume_config(config, run_dir)
        if not last.is_file():
            raise NotFoundError(f"cannot resume: {last} does not exist")
    elif last.exists() or (run_dir / MODEL_FILE).exists():
        raise DeephashError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    return last


def _validation_loader(config: Config, run_dir: Path, device: torch.device) -> _ValidateEvery | None:
    """Batches of the query split for ``train.eval_every`` (None when 0)."""
    if config.train.eval_every <= 0:
        return None
    s = config.sampler
    val_set = load_split(config, config.data.query_split, run_dir)
    size = s.n_classes * s.n_samples if s.kind == "balanced" else s.batch_size
    batches = RandomBatchSampler(len(val_set), size, torch.Generator().manual_seed(config.seed + 3))
    return _ValidateEvery(make_loader(val_set, batches, device, config, None), config.train.eval_every)


def train_run(config: Config, out_dir: str | os.PathLike, resume: bool = False, progress: bool = True,
              callbacks: Sequence[Any] = (), strategy: Strategy | None = None) -> Path:
    """Train as ``config`` says and write the run directory ``out_dir``.

    Args:
        config: the experiment.
        out_dir: run directory; created. Refused if it already holds a run, unless ``resume``.
        resume: continue from ``out_dir/checkpoints/last.pt`` (same config, same seed: the same
            weights as an uninterrupted run on the CPU).
        progress: tqdm progress bars.
        callbacks: extra ``fit`` callbacks, called after the logger and the checkpointer.
        strategy: how the run is spread over processes; default: one process, or this rank's
            share inside an initialised ``torch.distributed`` job (``--nproc``, torchrun).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        DeephashError: bad config, no data, an existing run without ``resume``, or divergence.
    """
    strategy = strategy or current_strategy(config.train.mine_globally)
    progress = progress and strategy.is_main  # only rank 0 writes files and shows progress
    run_dir = Path(out_dir)
    config = with_pretrained_inputs(config)  # what pretrained weights expect, where the config leaves it open
    last = _prepare_dir(config, run_dir, resume)
    if config.train.num_threads > 0:
        torch.set_num_threads(config.train.num_threads)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    generators = _Generators(config.seed, device)
    run_dir.mkdir(parents=True, exist_ok=True)

    train_set = load_split(config, config.data.train_split, run_dir, training=True)
    unlabelled = int((train_set.targets < 0).sum())
    readers = label_readers(config, every_item=unlabelled == len(train_set.targets)) if unlabelled else []
    if readers:  # e.g. a folder without class sub-folders: the config's checks could not know
        raise DeephashError(f"{train_set.name}: {unlabelled} of {len(train_set.targets)} training images have no label "
                            f"(no class sub-folder), but {readers[0]} needs them; without labels use "
                            "data.labels = 'none' and a loss that needs none (e.g. view-hash)")
    config = model_for_data(config, int(train_set.data.shape[1]), *training_stats(train_set, seed=config.seed))
    if strategy.is_main:
        atomic_write_text(run_dir / CONFIG_FILE, dump_config(config))

    n_classes = len(train_set.classes) if train_set.classes else int(train_set.targets.max()) + 1
    model = channels_last_on_cpu(build_model(config.model, weights=not resume).to(device))  # resumed: from the checkpoint
    loss_fn = build_loss(config, n_classes, generators.selector).to(device)
    if config.model.code_rule == "posterior":  # the codes are drawn from the loss's class hash centers
        model.set_code_centers(inner_loss(loss_fn, "centers").centers)
    optimizer = build_optimizer(config, model)
    scheduler, per_batch = split_schedule(build_scheduler(config, optimizer))
    outputs = training_outputs(loss_fn)
    trained = _TrainingView(model, **outputs) if any(outputs.values()) else model

    s = config.sampler
    batches = strategy.batch_sampler(s.kind, train_set.targets, n_classes=s.n_classes, n_samples=s.n_samples,
                                     batch_size=s.batch_size, generator=generators.sampler, seed=config.seed,
                                     labelled_share=s.labelled_share)
    if config.train.steps_per_epoch:
        batches = FirstBatches(batches, config.train.steps_per_epoch)
    loader = make_loader(train_set, batches, device, config, generators.augment)
    if len(loader) == 0:
        raise DeephashError(f"{len(train_set)} training images make no batch of the sampler's size; lower the sampler's sizes")
    val_loader = _validation_loader(config, run_dir, device)

    history: list[dict] = []
    start_epoch = 0
    average = WeightAverage(model, config.train.ema_decay) if config.train.ema_decay > 0 else None
    pseudo = _pseudo_labels(config, train_set, model, strategy) if config.pseudo_labels.from_epoch > 0 else None
    if resume:
        state = load_checkpoint(last, model, optimizer, scheduler, generators=generators.all())
        start_epoch, history = int(state["epoch"]), list(state["history"])
        if average is not None:
            _restore_average(average, state, last)
        if config.loss.memory.size > 0:
            _restore_loss_state(loss_fn, state, last)
        if pseudo is not None:
            _restore_pseudo_labels(pseudo, state, last)
        _trim_log(run_dir / LOG_FILE, start_epoch)

    unwrapped_loss = loss_fn
    trained, loss_fn = strategy.wrap(trained, loss_fn, config.data.views,
                                     find_unused=config.train.freeze_backbone_epochs > 0)  # after loading: DDP copies rank 0's weights
    hooks = _hooks(config, run_dir, strategy, model, optimizer, scheduler, generators, history, average, per_batch,
                   loader, val_loader, unwrapped_loss, pseudo)
    try:
        fit(loader, val_loader, trained, loss_fn, optimizer, scheduler, config.train.epochs, device,
            config.train.log_interval, start_epoch=start_epoch, schedules=loss_schedules(config),
            callbacks=[*hooks, *callbacks], progress=progress)
    finally:
        if strategy.is_main:
            _write_skipped(run_dir, train_set, val_loader)

    classes = list(train_set.classes) if train_set.classes else [str(i) for i in range(n_classes)]
    if average is not None:
        average.copy_to(model)
    if config.model.code_rule in PROJECTION_RULES:  # PCA hashing / ITQ of the trained backbone, fitted on the training images
        fit_pca_codes(model, train_set.data, seed=config.seed)
    if config.rerank_head.epochs > 0:  # after the main training: the codes are final, the head learns on them
        train_rerank_head(config, model, train_set, device, run_dir, progress, strategy.is_main)
    if strategy.is_main:
        save_model(run_dir / MODEL_FILE, model, config, classes)
    strategy.barrier()  # under DDP every rank returns once the run directory is complete
    return run_dir


def _write_skipped(run_dir: Path, train_set: Any, val_loader: Any) -> None:
    """``RUN_DIR/skipped.txt``: the photo files training skipped (only when there are some)."""
    found: dict[str, str] = {}
    for dataset in (train_set, getattr(getattr(val_loader, "loader", None), "dataset", None)):
        found.update(getattr(getattr(dataset, "bad_files", None), "found", {}))
    if found:
        atomic_write_text(run_dir / SKIPPED_FILE, "".join(f"{p}\t{r}\n" for p, r in found.items()))


def _hooks(config: Config, run_dir: Path, strategy: Strategy, model: nn.Module, optimizer: torch.optim.Optimizer,
           scheduler: Any, generators: _Generators, history: list[dict], average: WeightAverage | None,
           per_batch: Any, loader: Any, val_loader: Any, loss_fn: nn.Module, pseudo: PseudoLabels | None) -> list[Any]:
    """``fit``'s callbacks in the order they run: validation switch, pseudo labels, augmentation
    switch, per-batch LR, weight average, then the logger and the checkpointer (rank 0 writes)."""
    hooks: list[Any] = [
        JsonlLogger(run_dir / LOG_FILE, is_main_process=strategy.is_main),
        CheckpointCallback(run_dir / CHECKPOINT_DIR, model, optimizer, scheduler,
                           monitor="val_loss" if val_loader is not None else "train_loss",
                           generators=generators.all(), history=history, is_main_process=strategy.is_main,
                           extra=_checkpoint_extra(average, loss_fn if config.loss.memory.size > 0 else None, pseudo)),
    ]
    if average is not None:
        hooks.insert(0, average)
    if config.train.tanh_scale:
        hooks.insert(0, TanhContinuation(model.head, *config.train.tanh_scale, n_epochs=config.train.epochs))
    if per_batch is not None:
        hooks.insert(0, per_batch)
    if config.train.freeze_backbone_epochs > 0:
        hooks.insert(0, FreezeBackbone(model.backbone, config.train.freeze_backbone_epochs))
    if config.train.final_epochs_no_augment > 0 and (loader.augment is not None or getattr(loader, "random_crops", False)):
        hooks.insert(0, _AugmentOff(loader, config.train.epochs, config.train.final_epochs_no_augment))
    if pseudo is not None:
        hooks.insert(0, pseudo)
    if val_loader is not None:
        hooks.insert(0, val_loader)
    return hooks


def _pseudo_labels(config: Config, train_set: Any, model: nn.Module, strategy: Strategy) -> PseudoLabels:
    """Self-training's relabelling, voting with the hash head's tanh codes at scale 1 (not the
    continuation's current β, so a resumed run votes as an uninterrupted one)."""
    pseudo = config.pseudo_labels
    device = next(model.parameters()).device
    return PseudoLabels(train_set, model, lambda x: model.relaxed(x, scale=1.0), pseudo.from_epoch, pseudo.k,
                        pseudo.agreement, device, batch_size=config.sampler.batch_size,
                        broadcast=strategy.broadcast if strategy.world_size > 1 else None, is_main=strategy.is_main,
                        every=pseudo.every)


def _checkpoint_extra(average: WeightAverage | None, loss_fn: nn.Module | None, pseudo: PseudoLabels | None) -> Any:
    """What the checkpoints carry besides the model and optimizer: the weight average, the loss's
    state (its cross-batch memory) and the last vote's pseudo labels, each only when there is one;
    None when none."""
    if average is None and loss_fn is None and pseudo is None:
        return None

    def extra() -> dict[str, Any]:
        out: dict[str, Any] = {}
        if average is not None:
            out["weight_average"] = average.state_dict()
        if loss_fn is not None:
            out["loss_state"] = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in loss_fn.state_dict().items()}
        if pseudo is not None:
            out["pseudo_labels"] = pseudo.state_dict()
        return out

    return extra


def _restore_loss_state(loss_fn: nn.Module, state: dict, path: Path) -> None:
    """Continue the loss's state (its cross-batch memory) stored in a checkpoint's ``extra``."""
    saved = state["extra"].get("loss_state")
    if not isinstance(saved, dict):
        raise DataFormatError(f"checkpoint {path} holds no loss state, but loss.memory is set")
    try:
        loss_fn.load_state_dict(saved)
    except (KeyError, RuntimeError, TypeError, ValueError) as error:
        raise DataFormatError(f"checkpoint {path} holds a loss state that does not fit the loss ({error})") from None


def _restore_pseudo_labels(pseudo: PseudoLabels, state: dict, path: Path) -> None:
    """Continue from the last vote's pseudo labels stored in a checkpoint's ``extra``. A checkpoint
    written before the first vote, or by a version without them, holds none: a run resumed from it
    at a vote's epoch votes; between two votes, the first epoch raises DeephashError."""
    saved = state["extra"].get("pseudo_labels")
    if saved is not None and not isinstance(saved, dict):
        raise DataFormatError(f"checkpoint {path} holds pseudo labels that are not a dict")
    try:
        pseudo.load_state_dict(saved or {})
    except DeephashError as error:
        raise DataFormatError(f"checkpoint {path} holds pseudo labels that do not fit the training set ({error})") from None


def _restore_average(average: WeightAverage, state: dict, path: Path) -> None:
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
    if not path.is_file():
        return
    entries = read_jsonl(path)
    kept = [e for e in entries if int(e.get("epoch", 0)) < start_epoch]
    if len(kept) != len(entries) or not path.read_bytes().endswith(b"\n"):
        atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in kept))
