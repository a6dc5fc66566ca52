"""The distributed parts of the experiment runner: launching, per-rank batches, DDP wrapping and
sharded encoding.

:mod:`deephash.experiment` calls these at a few points; each is a no-op (or the single-process
behaviour) outside a distributed job, so one code path serves ``--nproc 1``, ``--nproc N`` and
``torchrun``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from deephash.errors import DeephashError
from deephash.train.distributed import (
    DistributedError,
    GatherLoss,
    cleanup,
    init_distributed,
    is_distributed,
    is_main_process,
    launched_by_torchrun,
    rank,
    shard_range,
    spawn_workers,
    unwrap_loss,
    world_size,
)

__all__ = [
    "DistributedRandomBatchSampler",
    "ThroughGather",
    "backend_for",
    "encode_sharded",
    "launch",
    "train_batch_sampler",
    "wrap_for_training",
]


# ---------------------------------------------------------------------------------------- launch


def backend_for(device: str) -> str:
    """``"nccl"`` when a config's ``device`` resolves to CUDA, else ``"gloo"``."""
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


def _call(fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    fn(*args, **kwargs)


def launch(fn: Callable[..., Any], nproc: int = 1, args: Sequence[Any] = (), kwargs: dict | None = None, *,
           backend: str | None = None, result: Any = None) -> Any:
    """Run ``fn(*args, **kwargs)`` on every rank of a job, or once.

    - Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set): join the process group here, call ``fn``,
      leave the group. ``nproc`` must then be 1 (torchrun chose the processes).
    - ``nproc > 1``: spawn ``nproc`` local processes (:func:`~deephash.train.distributed.spawn_workers`),
      each calling ``fn``; ``fn`` and the arguments must be picklable.
    - Otherwise: call ``fn`` in this process.

    Returns:
        ``fn``'s result in a single process and on rank 0 under torchrun; None on other torchrun
        ranks; ``result`` after spawned workers finished.

    Raises:
        DistributedError: ``--nproc`` together with torchrun, ``nproc < 1``, or a worker failed.
    """
    kwargs = dict(kwargs or {})
    if nproc < 1:
        raise DistributedError(f"--nproc must be at least 1, got {nproc}")
    if is_distributed():  # already inside a job (e.g. a caller that initialised it)
        value = fn(*args, **kwargs)
        return value if is_main_process() else None
    if launched_by_torchrun():
        if nproc > 1:
            raise DistributedError("--nproc starts processes on one machine; under torchrun use --nproc-per-node")
        init_distributed(backend)
        try:
            value = fn(*args, **kwargs)
            return value if is_main_process() else None
        finally:
            cleanup()
    if nproc == 1:
        return fn(*args, **kwargs)
    spawn_workers(_call, nproc, (fn, tuple(args), kwargs), backend=backend)
    return result


# -------------------------------------------------------------------------------------- training


class DistributedRandomBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Shuffled full batches of ``batch_size`` for one rank: the random sampler of a DDP job.

    Every rank draws the same permutation from a generator seeded with ``seed + epoch``, cuts it
    into ``num_replicas × len(self)`` full batches (the rest of the epoch is dropped, so every rank
    has batches of one size) and keeps every ``num_replicas``-th, starting at its rank. Call
    :meth:`set_epoch` every epoch.
    """

    def __init__(self, n_items: int, batch_size: int, num_replicas: int, rank: int, seed: int = 0) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise DeephashError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        if batch_size < 1:
            raise DeephashError(f"batch_size must be positive, got {batch_size}")
        self.n_items, self.batch_size = n_items, batch_size
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose batches the next iteration yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_items // (self.batch_size * self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        n = len(self) * self.num_replicas
        order = torch.randperm(self.n_items, generator=generator)[: n * self.batch_size]
        yield from order.reshape(n, self.batch_size)[self.rank :: self.num_replicas].tolist()


def train_batch_sampler(config: Any, labels: torch.Tensor) -> Any:
    """This rank's batch sampler for ``config.sampler`` (call only inside a distributed job).

    ``balanced``: :class:`~deephash.data.samplers.DistributedBalancedBatchSampler`; ``random``:
    :class:`DistributedRandomBatchSampler`; both seeded with ``config.seed``, disjoint per rank.
    """
    from deephash.data.samplers import DistributedBalancedBatchSampler

    s = config.sampler
    if s.kind == "balanced":
        return DistributedBalancedBatchSampler(labels, s.n_classes, s.n_samples, world_size(), rank(),
                                               seed=config.seed)
    return DistributedRandomBatchSampler(len(labels), s.batch_size, world_size(), rank(), seed=config.seed)


class ThroughGather:
    """Applies a loss schedule to the loss inside a :class:`GatherLoss`."""

    def __init__(self, schedule: Any) -> None:
        self.schedule = schedule

    def apply(self, loss_fn: Any, epoch: int, n_epochs: int) -> Any:
        return self.schedule.apply(unwrap_loss(loss_fn), epoch, n_epochs)


def wrap_for_training(model: nn.Module, loss_fn: Any, schedules: Sequence[Any],
                      mine_globally: bool = True) -> tuple[nn.Module, Any, list[Any]]:
    """DDP model, :class:`GatherLoss` and schedules that reach through it (unchanged when not distributed).

    Call after the checkpoint has been loaded: DDP copies rank 0's weights to every rank. On CUDA,
    BatchNorm layers become ``SyncBatchNorm`` (statistics of the global batch); on the CPU each rank
    normalises with its own batch's statistics and DDP broadcasts rank 0's running buffers.

    Returns:
        ``(model for fit, loss for fit, schedules for fit)``.
    """
    if not is_distributed() or world_size() == 1:
        return model, loss_fn, list(schedules)
    device = next(model.parameters()).device
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return ddp, GatherLoss(loss_fn, mine_globally), [ThroughGather(s) for s in schedules]


# -------------------------------------------------------------------------------------- encoding


def encode_sharded(model: nn.Module, dataset: Any, batch_size: int = 1024) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``experiment.encode`` over the whole dataset, each rank encoding one contiguous shard.

    Rank ``r`` encodes items ``shard_range(N, r, W)``; rank 0 gathers the shards (in rank order,
    so the result is in dataset order) and returns the full arrays, identical to a single-process
    ``encode``; the other ranks return ``(None, None)``. Outside a distributed job this is ``encode``.
    """
    from deephash.experiment import encode

    if world_size() == 1:
        return encode(model, dataset, batch_size)
    part = shard_range(len(dataset), rank(), world_size())
    codes, labels = encode(model, dataset.subset(torch.arange(part.start, part.stop)), batch_size)
    shards: list[Any] | None = [None] * world_size() if is_main_process() else None
    dist.gather_object((codes, labels), shards, dst=0)
    if shards is None:
        return None, None
    shards = [s for s in shards if len(s[1])] or shards[:1]
    return np.concatenate([s[0] for s in shards]), np.concatenate([s[1] for s in shards])

