"""The seed's unified training loop for models with 1, 2 or 3 inputs, with or without targets.

A batch is ``(data, target)``: ``data`` a tensor or a tuple/list of tensors (fed as
``model(*data)``), ``target`` a label tensor or an empty list (the triplet datasets' ``[]``, which
the DataLoader collates to ``[]``). The loss is called as ``loss_fn(*outputs, target)``, or
``loss_fn(*outputs)`` without target. Works unchanged with a model wrapped in
``DistributedDataParallel``.

Synchronisation with the device: the loss is summed as a detached tensor and read only every
``log_interval`` steps and at the epoch's end. One boolean is read every step: whether the loss and
the gradients are finite, checked before ``optimizer.step()`` so that a NaN/inf never reaches the
weights (free on the CPU, one small sync per step on a GPU).
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from deephash.devices import resolve_device
from deephash.errors import TrainingDiverged
from deephash.train.callbacks import StopTraining
from deephash.train.metrics import Metric

Tensor = torch.Tensor


def _call(callbacks: Sequence[Any], hook: str, *args: Any) -> None:
    for callback in callbacks:
        method = getattr(callback, hook, None)
        if method is not None:
            method(*args)


def _prepare_batch(
    batch: Any, device: torch.device | str
) -> tuple[tuple[Tensor, ...], Tensor | None]:
    """Split a batch into ``(inputs tuple on device, target on device or None)``."""
    data, target = batch
    target = target if len(target) > 0 else None
    if not isinstance(data, (tuple, list)):
        data = (data,)
    data = tuple(d.to(device, non_blocking=True) for d in data)
    if target is not None:
        target = target.to(device, non_blocking=True)
    return data, target


def _forward(
    model: nn.Module, loss_fn: Any, data: tuple[Tensor, ...], target: Tensor | None
) -> tuple[tuple, tuple[Tensor, ...] | None, tuple]:
    """Run model and loss; return ``(outputs, target tuple or None, loss_outputs)``."""
    outputs = model(*data)
    if not isinstance(outputs, (tuple, list)):
        outputs = (outputs,)
    outputs = tuple(outputs)
    targets = (target,) if target is not None else None
    result = loss_fn(*(outputs + targets)) if targets is not None else loss_fn(*outputs)
    if isinstance(result, (tuple, list)):
        loss_outputs = tuple(result)
    else:
        num_selected = getattr(loss_fn, "num_selected", None)
        loss_outputs = (result,) if num_selected is None else (result, num_selected)
    return outputs, targets, loss_outputs


def _all_finite(loss: Tensor, params: Sequence[Tensor]) -> Tensor:
    """0-d bool tensor: the loss and every gradient are finite (max-abs norm, no overflow)."""
    ok = torch.isfinite(loss.detach())
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        ok = ok & torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=math.inf))
    return ok


def _diverged(
    loss: Tensor, epoch: int, n_epochs: int, step: int, n_steps: int | None
) -> TrainingDiverged:
    """The error for a non-finite loss or gradient (1-based epoch and step in the message)."""
    value = float(loss.detach())
    where = f"epoch {epoch + 1}/{n_epochs}, step {step}" + (f"/{n_steps}" if n_steps else "")
    if math.isfinite(value):
        what = f"gradients became non-finite (loss {value:.6g})"
    else:
        what = f"loss became {value}"
    return TrainingDiverged(
        f"{what} at {where}; stopped before the optimizer step, weights are those of the previous "
        "step (lower the learning rate or check the data)"
    )


def _set_mode(model: nn.Module, loss_fn: Any, train: bool) -> None:
    model.train(train)
    if isinstance(loss_fn, nn.Module):
        loss_fn.train(train)


def train_epoch(
    train_loader: Iterable,
    model: nn.Module,
    loss_fn: Any,
    optimizer: torch.optim.Optimizer,
    device: bool | torch.device | str,
    log_interval: int,
    metrics: Sequence[Metric],
    epoch: int,
    n_epochs: int,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
) -> tuple[float, int]:
    """One pass over ``train_loader`` with an optimizer step per batch.

    Returns:
        ``(mean batch loss, number of images fed)``.

    Raises:
        TrainingDiverged: a loss or gradient is NaN/inf (checked before the optimizer step).
    """
    device = resolve_device(device)
    for metric in metrics:
        metric.reset()
    _set_mode(model, loss_fn, True)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    n_steps = len(train_loader) if hasattr(train_loader, "__len__") else None
    log_interval = max(1, int(log_interval))
    epoch_sum: Tensor | float = 0.0
    interval_sum: Tensor | float = 0.0
    interval_steps = interval_images = total_images = step = 0
    tic = time.perf_counter()
    bar = tqdm(train_loader, total=n_steps, desc=f"epoch {epoch + 1}/{n_epochs}", unit="batch",
               disable=not progress, leave=False, dynamic_ncols=True)
    for step, batch in enumerate(bar, start=1):
        _call(callbacks, "on_batch_start", epoch, step, n_steps)
        data, target = _prepare_batch(batch, device)
        optimizer.zero_grad(set_to_none=True)
        outputs, targets, loss_outputs = _forward(model, loss_fn, data, target)
        loss = loss_outputs[0]
        loss.backward()
        if not bool(_all_finite(loss, params)):
            raise _diverged(loss, epoch, n_epochs, step, n_steps)
        optimizer.step()
        _call(callbacks, "on_batch_end", epoch, step, n_steps)

        for metric in metrics:
            metric(outputs, targets, loss_outputs)
        n_images = sum(int(d.shape[0]) for d in data)
        interval_images += n_images
        total_images += n_images
        interval_sum = interval_sum + loss.detach()
        epoch_sum = epoch_sum + loss.detach()
        interval_steps += 1
        if interval_steps == log_interval or step == n_steps:
            mean_loss = float(interval_sum) / interval_steps
            toc = time.perf_counter()
            speed = interval_images / max(toc - tic, 1e-9)
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{speed:.0f}")
            _call(callbacks, "on_step_end", epoch, step, mean_loss, interval_images)
            interval_sum, interval_steps, interval_images, tic = 0.0, 0, 0, toc
    if interval_steps:  # a loader without len(): report the tail
        mean_loss = float(interval_sum) / interval_steps
        _call(callbacks, "on_step_end", epoch, step, mean_loss, interval_images)
    bar.close()
    return (float(epoch_sum) / step if step else float("nan")), total_images


@torch.no_grad()
def evaluate_epoch(
    val_loader: Iterable,
    model: nn.Module,
    loss_fn: Any,
    device: bool | torch.device | str,
    metrics: Sequence[Metric],
) -> float:
    """Mean batch loss over ``val_loader`` in eval mode, without gradients; updates ``metrics``."""
    device = resolve_device(device)
    for metric in metrics:
        metric.reset()
    _set_mode(model, loss_fn, False)
    total: Tensor | float = 0.0
    steps = 0
    for batch in val_loader:
        data, target = _prepare_batch(batch, device)
        outputs, targets, loss_outputs = _forward(model, loss_fn, data, target)
        total = total + loss_outputs[0].detach()
        steps += 1
        for metric in metrics:
            metric(outputs, targets, loss_outputs)
    return float(total) / steps if steps else float("nan")


def _set_epoch(loader: Any, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on the loader, its sampler or batch sampler where defined."""
    seen: list[Any] = []
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if obj is not None and hasattr(obj, "set_epoch") and not any(obj is o for o in seen):
            seen.append(obj)
            obj.set_epoch(epoch)


def _step_scheduler(scheduler: Any, monitored: float) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(monitored)
    else:
        scheduler.step()


# Long by design: the seed's loop with its signature kept for drop-in use; the per-batch and
# per-epoch work is in train_epoch / evaluate_epoch, what remains is the epoch bookkeeping.
def fit(
    train_loader: Iterable,
    val_loader: Iterable | None,
    model: nn.Module,
    loss_fn: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    n_epochs: int,
    device: bool | torch.device | str,
    log_interval: int,
    metrics: Sequence[Metric] = (),
    start_epoch: int = 0,
    *,
    schedules: Sequence[Any] = (),
    callbacks: Sequence[Any] = (),
    progress: bool = True,
) -> list[dict]:
    """Train ``model`` for epochs ``start_epoch .. n_epochs - 1`` (the seed's ``fit``).

    Each epoch: ``schedule.apply(loss_fn, epoch, n_epochs)`` for every schedule, the callbacks'
    ``on_epoch_start``, ``set_epoch(epoch)`` on the training loader or its (batch) sampler where
    they have one (as ``DistributedSampler`` needs, also on resume), a training pass (one
    optimizer step per batch, each preceded by the callbacks' ``on_batch_start(epoch, step,
    n_steps)``, e.g. a per-batch learning rate, and followed by their ``on_batch_end(epoch, step,
    n_steps)``, e.g. a weight average), then ``scheduler.step()``
    (``step(val_loss or train_loss)`` for ``ReduceLROnPlateau``), then validation when
    ``val_loader`` is given. The model is not moved: put it on ``device`` first.

    Args:
        train_loader: iterable of ``(data, target)`` batches (see the module docstring).
        val_loader: the same for validation, or ``None``.
        model: any module, possibly wrapped in ``DistributedDataParallel``.
        loss_fn: called on the outputs (and target); returns a scalar tensor, or a tuple whose
            first item is the loss. Its ``num_selected`` attribute, if any, is passed to metrics.
        optimizer: stepped once per batch.
        scheduler: an LR scheduler stepped once per epoch after training, or ``None``.
        n_epochs: total number of epochs (including those before ``start_epoch``).
        device: where batches are moved: a str or ``torch.device``, or the seed's ``cuda`` bool
            (``True``: the first CUDA device, ``False``: the CPU).
        log_interval: steps between ``on_step_end`` calls (and reads of the loss).
        metrics: seed-style metrics, reported under ``name()`` (train) and ``"val_" + name()``.
        start_epoch: first epoch to run (0-based; a checkpoint's ``"epoch"`` on resume).
        schedules: objects with ``apply(loss_fn, epoch, n_epochs)``.
        callbacks: objects with optional hooks, see ``deephash.train.callbacks``.
        progress: show a tqdm bar per epoch.

    Returns:
        One dict per epoch run: ``epoch`` (0-based index), ``train_loss``, ``val_loss`` (with a
        validation loader), metric values, ``seconds``, ``images_per_s`` and ``lr`` (the first
        parameter group's learning rate during the epoch).

    Raises:
        TrainingDiverged: a loss or gradient became NaN/inf; the message names epoch and step.
        DeephashError: ``device`` is ``True`` and no CUDA device is available.
        TypeError: ``device`` is neither a bool, a str nor a ``torch.device``.
    """
    device = resolve_device(device)
    history: list[dict] = []
    try:
        for epoch in range(start_epoch, n_epochs):
            for schedule in schedules:
                schedule.apply(loss_fn, epoch, n_epochs)
            _call(callbacks, "on_epoch_start", epoch)
            _set_epoch(train_loader, epoch)
            lr = float(optimizer.param_groups[0]["lr"])
            tic = time.perf_counter()
            train_loss, n_images = train_epoch(
                train_loader, model, loss_fn, optimizer, device, log_interval, metrics,
                epoch, n_epochs, callbacks, progress,
            )
            seconds = time.perf_counter() - tic
            record: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss}
            record.update({metric.name(): metric.value() for metric in metrics})
            if val_loader is not None:
                record["val_loss"] = evaluate_epoch(val_loader, model, loss_fn, device, metrics)
                record.update({"val_" + metric.name(): metric.value() for metric in metrics})
            if scheduler is not None:
                _step_scheduler(scheduler, record.get("val_loss", train_loss))
            record.update(seconds=seconds, images_per_s=n_images / max(seconds, 1e-9), lr=lr)
            history.append(record)
            if progress:
                tqdm.write(_summary(record, n_epochs))
            _call(callbacks, "on_epoch_end", epoch, record)
    except StopTraining:
        pass
    _call(callbacks, "on_train_end", history)
    return history


def _summary(record: dict, n_epochs: int) -> str:
    parts = [f"Epoch {record['epoch'] + 1}/{n_epochs}"]
    for key, value in record.items():
        if key != "epoch" and isinstance(value, float):
            parts.append(f"{key}: {value:.4g}")
    return ". ".join(parts)
