"""How training and encoding run: in one process, or as one rank of a DDP job (Lightning's strategies).

A :class:`Strategy` answers every question that differs between the two, so nothing above
``train/`` asks whether it is distributed: which batches this process draws, how the model and
the loss are wrapped, how per-rank results are put together, and who writes files.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from deephash.data.samplers import BATCH_SAMPLERS
from deephash.train.distributed.gather import GatherLoss
from deephash.train.distributed.process_group import barrier, is_distributed, rank, shard_range, world_size

__all__ = ["DDPStrategy", "SingleProcess", "Strategy", "current_strategy"]


class Strategy:
    """One process does everything (the base class: rank 0 of a world of 1)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and shows progress."""
        return self.rank == 0

    def batch_sampler(self, kind: str, labels: torch.Tensor, *, n_classes: int, n_samples: int, batch_size: int,
                      generator: torch.Generator, seed: int, labelled_share: float) -> torch.utils.data.Sampler:
        """This process's training batches of ``sampler.kind`` (see ``deephash.data.BATCH_SAMPLERS``)."""
        return BATCH_SAMPLERS.create(kind, labels=labels, n_classes=n_classes, n_samples=n_samples,
                                     batch_size=batch_size, labelled_share=labelled_share, generator=generator,
                                     seed=seed, rank=self.rank, world=self.world_size)

    def wrap(self, model: nn.Module, loss_fn: Any, n_views: int = 1, find_unused: bool = False) -> tuple[nn.Module, Any]:
        """The model and loss that ``fit`` drives (unchanged here); ``n_views``: views per image in
        a batch; ``find_unused``: some parameters get no gradient in some steps (a frozen backbone)."""
        return model, loss_fn

    def map_shards(self, n_items: int, fn: Callable[[range], tuple[np.ndarray | None, ...]]
                   ) -> tuple[np.ndarray | None, ...]:
        """``fn(range(n_items))``: the whole job's arrays (a tuple of ``(n, ...)`` arrays or None) in item order."""
        return fn(range(n_items))

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every process (this one's, here)."""
        return tensor

    def barrier(self) -> None:
        """Wait for every process (nothing to wait for here)."""


SingleProcess = Strategy


class DDPStrategy(Strategy):
    """One rank of a ``torch.distributed`` job.

    Args:
        mine_globally: gather every rank's outputs and labels before the loss, so selectors and
            losses mine the global batch (:class:`GatherLoss`); False: each rank's batch alone.
    """

    def __init__(self, mine_globally: bool = True) -> None:
        self.rank, self.world_size, self.mine_globally = rank(), world_size(), mine_globally

    def wrap(self, model: nn.Module, loss_fn: Any, n_views: int = 1, find_unused: bool = False) -> tuple[nn.Module, Any]:
        """DistributedDataParallel and :class:`GatherLoss` (which keeps the ``n_views`` views of a
        batch view-major in the global batch). ``find_unused``: DDP looks for the parameters that
        got no gradient in a step (``find_unused_parameters``), as a backbone frozen for the first
        epochs needs; it costs a walk over the autograd graph every step of the run.

        Call after the checkpoint has been loaded: DDP copies rank 0's weights to every rank. On
        CUDA, BatchNorm layers become ``SyncBatchNorm`` (statistics of the global batch); on the
        CPU each rank normalises with its own batch's statistics and DDP broadcasts rank 0's
        running buffers. Loss-weight schedules reach the loss through the gather (they follow
        ``.loss``).
        """
        if self.world_size == 1:
            return model, loss_fn
        device = next(model.parameters()).device
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [device.index] if device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)
        return ddp, GatherLoss(loss_fn, self.mine_globally, n_views)

    def map_shards(self, n_items: int, fn: Callable[[range], tuple[np.ndarray | None, ...]]
                   ) -> tuple[np.ndarray | None, ...]:
        """Rank ``r`` computes ``fn`` on its contiguous shard (:func:`shard_range`); rank 0 gathers
        the shards in rank order and joins each array, so its result equals one process's; other
        ranks get a tuple of None."""
        part = fn(shard_range(n_items, self.rank, self.world_size))
        shards: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(part, shards, dst=0)
        if shards is None:
            return (None,) * len(part)
        shards = [s for s in shards if len(s[1])] or shards[:1]
        return tuple(None if s0 is None else np.concatenate([s[i] for s in shards]) for i, s0 in enumerate(shards[0]))

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every process (received in place: same shape and dtype on each)."""
        dist.broadcast(tensor, src=0)
        return tensor

    def barrier(self) -> None:
        barrier()


def current_strategy(mine_globally: bool = True) -> Strategy:
    """:class:`DDPStrategy` inside an initialised process group, else :class:`SingleProcess`."""
    return DDPStrategy(mine_globally) if is_distributed() else SingleProcess()
