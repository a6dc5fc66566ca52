"""Distributed training and encoding over ``torch.distributed``: the process group and launching,
the global-batch gather, and the strategy object that the run code is handed."""

from deephash.train.distributed.gather import GatherLoss, gather_no_grad, gather_with_grad, unwrap_loss
from deephash.train.distributed.process_group import (
    DistributedError,
    backend_for,
    barrier,
    cleanup,
    free_port,
    init_distributed,
    is_distributed,
    is_main_process,
    launch,
    launched_by_torchrun,
    local_rank,
    rank,
    shard_range,
    spawn_workers,
    world_size,
)
from deephash.train.distributed.strategy import DDPStrategy, SingleProcess, Strategy, current_strategy

__all__ = [
    "DDPStrategy",
    "DistributedError",
    "GatherLoss",
    "SingleProcess",
    "Strategy",
    "backend_for",
    "barrier",
    "cleanup",
    "current_strategy",
    "free_port",
    "gather_no_grad",
    "gather_with_grad",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "launch",
    "launched_by_torchrun",
    "local_rank",
    "rank",
    "shard_range",
    "spawn_workers",
    "unwrap_loss",
    "world_size",
]
