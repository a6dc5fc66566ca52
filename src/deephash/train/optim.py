"""Optimizers and learning-rate schedules by name, as a config's ``[optimizer]`` and ``[scheduler]`` say.

An LR schedule is either epoch-wise (a torch scheduler that ``fit`` steps once per epoch) or
per-batch (a ``fit`` callback with ``on_batch_start``, e.g. :class:`WarmupCosineLR`);
:func:`split_schedule` tells which.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from deephash.errors import ConfigError
from deephash.registry import Registry

__all__ = ["OPTIMIZERS", "SCHEDULERS", "WarmupCosineLR", "create_optimizer", "create_scheduler", "split_schedule"]

#: ``factory(params, lr=, weight_decay=, momentum=) -> Optimizer``.
OPTIMIZERS: Registry[torch.optim.Optimizer] = Registry("optimizer")
#: ``factory(optimizer, lr=, epochs=, **params)`` -> an epoch-wise scheduler, a per-batch callback or None.
SCHEDULERS: Registry[Any] = Registry("scheduler")


@OPTIMIZERS.register("adam")
def _adam(params: Iterable[Any], lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


@OPTIMIZERS.register("adamw")
def _adamw(params: Iterable[Any], lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


@OPTIMIZERS.register("sgd")
def _sgd(params: Iterable[Any], lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def create_optimizer(name: str, params: Iterable[Any], lr: float, weight_decay: float = 0.0,
                     momentum: float = 0.9) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (with ``momentum``) over ``params``."""
    return OPTIMIZERS.create(name, params=params, lr=lr, weight_decay=weight_decay, momentum=momentum)


class WarmupCosineLR:
    """Per-batch learning rate: linear warm-up, then a cosine decay to ``eta_min``.

    A ``fit`` callback (``on_batch_start``), not an epoch-wise scheduler: the rate of step t of T
    (over the whole run) is ``lr·(t+1)/W`` for t < W = ``warmup``·T, then
    ``eta_min + (lr − eta_min)·(1 + cos(π·(t − W)/(T − W)))/2``, times each parameter group's
    ``lr_scale`` (1 when it has none). It is a function of the epoch
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
            group["lr"] = rate * group.get("lr_scale", 1.0)  # e.g. a backbone's optimizer.backbone_lr_scale


@SCHEDULERS.register("none")
def _no_schedule(optimizer: torch.optim.Optimizer, lr: float, epochs: int) -> None:
    return None


@SCHEDULERS.register("cosine")
def _cosine(optimizer: torch.optim.Optimizer, lr: float, epochs: int, **params: Any) -> Any:
    """CosineAnnealingLR over the run (params: ``eta_min``, ``T_max``)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.pop("T_max", epochs), **params)


@SCHEDULERS.register("step")
def _step(optimizer: torch.optim.Optimizer, lr: float, epochs: int, **params: Any) -> Any:
    """StepLR (params: ``step_size``, default a third of the run; ``gamma``)."""
    return torch.optim.lr_scheduler.StepLR(optimizer, **{"step_size": max(1, epochs // 3), **params})


@SCHEDULERS.register("onecycle")
def _onecycle(optimizer: torch.optim.Optimizer, lr: float, epochs: int, **params: Any) -> Any:
    """OneCycleLR with one step per epoch (``max_lr``, the optimizer's rate by default, times each
    parameter group's ``lr_scale``; a list is taken as it is)."""
    peak = params.pop("max_lr", lr)
    if isinstance(peak, (int, float)):
        peak = [peak * group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    params["max_lr"] = peak
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, epochs=epochs, steps_per_epoch=1, **params)


@SCHEDULERS.register("warmup-cosine")
def _warmup_cosine(optimizer: torch.optim.Optimizer, lr: float, epochs: int, warmup: float = 0.1,
                   eta_min: float = 0.0) -> WarmupCosineLR:
    """:class:`WarmupCosineLR`, a per-batch callback (params: ``warmup``, ``eta_min``)."""
    return WarmupCosineLR(optimizer, lr, epochs, float(warmup), float(eta_min))


def create_scheduler(name: str, optimizer: torch.optim.Optimizer, lr: float, epochs: int, **params: Any) -> Any:
    """The LR schedule ``name`` over a run of ``epochs`` (see :data:`SCHEDULERS`).

    Raises:
        ConfigError: unknown name, or parameters the schedule does not take.
    """
    factory = SCHEDULERS.get(name)
    try:
        return factory(optimizer, lr=lr, epochs=epochs, **params)
    except TypeError as exc:
        raise ConfigError(f"scheduler {name!r}: bad parameters {sorted(params)} ({exc})") from None


def split_schedule(schedule: Any) -> tuple[Any, Any]:
    """``(epoch-wise scheduler or None, per-batch callback or None)`` of a created schedule."""
    if schedule is not None and hasattr(schedule, "on_batch_start"):
        return None, schedule
    return schedule, None
