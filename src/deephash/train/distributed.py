"""Distributed helpers over ``torch.distributed``: process-group setup, rank queries, global-batch
mining and local process spawning.

Two ways to start a job, both ending in :func:`init_distributed`:

- ``torchrun`` (one or several machines) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR`` and ``MASTER_PORT``; each process calls :func:`init_distributed` itself.
- :func:`spawn_workers` starts ``nproc`` processes on this machine with the same variables set
  (``MASTER_ADDR=127.0.0.1`` and a free loopback port).

Backends: ``gloo`` on CPUs, ``nccl`` on CUDA GPUs (each process uses GPU ``LOCAL_RANK``).

Gradient scale of :class:`GatherLoss`. Let ``z_r`` be rank ``r``'s embeddings, ``W`` the world
size and ``L(z_0, ..., z_{W-1})`` the wrapped loss on the concatenated global batch. Every rank
computes the same ``L``. The gather (:func:`gather_with_grad`, the autograd all_gather of
``torch.distributed.nn.functional``) back-propagates by summing, over all ranks, the gradients
that reach each rank's slice, so owner ``r`` receives
``W * dL/dz_r`` and its local parameter gradient is ``W * dL/dz_r * dz_r/dθ``. DDP then averages
over ranks (sum / W): ``Σ_r dL/dz_r * dz_r/dθ``, the single-process gradient of ``L`` on the
concatenated batch. The factor is therefore exactly 1: the loss must *not* be multiplied by
``W`` (that factor belongs to gathers that keep only the local slice's gradient, as
pytorch-metric-learning's wrapper does, and applied to an autograd gather it doubles the
gradients on two ranks).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from deephash.errors import DeephashError

__all__ = [
    "DistributedError",
    "GatherLoss",
    "barrier",
    "cleanup",
    "free_port",
    "gather_no_grad",
    "gather_with_grad",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "launched_by_torchrun",
    "local_rank",
    "rank",
    "shard_range",
    "spawn_workers",
    "unwrap_loss",
    "world_size",
]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(DeephashError):
    """A distributed job could not start, or one of its processes failed."""


# ------------------------------------------------------------------------------- process group


def launched_by_torchrun() -> bool:
    """True when ``RANK`` and ``WORLD_SIZE`` are set (``torchrun`` or :func:`spawn_workers`)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the job (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's rank on its machine: ``LOCAL_RANK`` (0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0 (and in a non-distributed process): the one that writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> str:
    """Join the process group described by the torchrun environment variables.

    Args:
        backend: ``"gloo"``, ``"nccl"``, or None: nccl when CUDA is available, else gloo.
        timeout_s: seconds a collective may wait for the other ranks before failing.

    Returns:
        The backend in use. A group that is already initialised is kept as it is.

    Raises:
        DistributedError: a required variable is missing or not an integer.
    """
    if is_distributed():
        return str(dist.get_backend())
    missing = [name for name in _ENV if name != "LOCAL_RANK" and name not in os.environ]
    if missing:
        raise DistributedError(
            f"environment variables {', '.join(missing)} are not set; launch with torchrun or --nproc N"
        )
    try:
        global_rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        int(os.environ["MASTER_PORT"])
        local = local_rank()
    except ValueError:
        raise DistributedError(
            "RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be integers "
            f"(got {', '.join(f'{k}={os.environ.get(k)!r}' for k in _ENV)})"
        ) from None
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)  # so that "cuda" means this rank's GPU
    dist.init_process_group(backend, rank=global_rank, world_size=size,
                            timeout=timedelta(seconds=timeout_s))
    return backend


def cleanup() -> None:
    """Leave the process group (no-op when not distributed)."""
    if is_distributed():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(index: int, nproc: int, port: int, backend: str | None, timeout_s: float,
            fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update({"RANK": str(index), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(index),
                       "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    if "OMP_NUM_THREADS" not in os.environ:  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    init_distributed(backend, timeout_s)
    try:
        fn(*args)
    finally:
        cleanup()


def spawn_workers(fn: Callable[..., Any], nproc: int, args: tuple = (), backend: str | None = None,
                  start_method: str = "spawn", timeout_s: float = 1800.0) -> None:
    """Run ``fn(*args)`` in ``nproc`` new local processes joined in one process group.

    Each process gets ``RANK = LOCAL_RANK = 0..nproc-1``, ``WORLD_SIZE = nproc``,
    ``MASTER_ADDR = 127.0.0.1`` and a free ``MASTER_PORT``, and calls :func:`init_distributed`
    before ``fn`` and :func:`cleanup` after. ``fn`` and ``args`` must be picklable (a module-level
    function). Returns when every process has finished; when one fails the others are stopped.

    ``start_method="fork"`` skips re-importing torch in the children (much faster to start) but is
    safe only in a process that has not initialised CUDA or started threads; ``timeout_s`` bounds
    how long a collective waits for a missing rank.

    Raises:
        DistributedError: ``nproc < 1``, or a process failed (the message carries its last line).
    """
    if nproc < 1:
        raise DistributedError(f"--nproc must be at least 1, got {nproc}")
    import torch.multiprocessing as mp

    try:
        mp.start_processes(_worker, args=(nproc, free_port(), backend, timeout_s, fn, tuple(args)),
                           nprocs=nproc, join=True, start_method=start_method)
    except mp.ProcessRaisedException as exc:
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        raise DistributedError(f"a worker failed: {lines[-1].strip() if lines else exc}") from None
    except mp.ProcessExitedException as exc:
        raise DistributedError(f"a worker exited: {exc}") from None


def shard_range(n: int, rank: int, world: int) -> range:
    """The contiguous block of ``range(n)`` that rank ``rank`` of ``world`` handles.

    The first ``n % world`` ranks take one item more; the blocks are disjoint, in rank order,
    and cover ``range(n)``.
    """
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"rank must be in [0, {world}), got {rank}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


# ---------------------------------------------------------------------------- global-batch loss


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for each slice and returns the own one."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        return gather_no_grad(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # sum over ranks (a reduce-scatter, done with the portable all_reduce)
        start = rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated in rank order, ``(W*B, ...)``; gradients flow to the owners.

    The backward pass sums the gradients that every rank's graph sends to each slice and hands
    each owner its slice's sum (as ``torch.distributed.nn.functional.all_gather`` does). Every
    rank must pass a tensor of the same shape.
    """
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated in rank order, without gradients (e.g. labels)."""
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class GatherLoss(nn.Module):
    """Apply a loss to the global batch: every rank's outputs and labels, gathered.

    Called as ``loss(*outputs, labels)`` like the wrapped loss (``outputs`` float ``(B, D)``
    tensors, e.g. embeddings or relaxed codes, and logits; ``labels`` int64 ``(B,)``). With
    ``mine_globally`` and in training mode, each output is gathered with :func:`gather_with_grad`
    (an autograd all_gather: gradients flow back to the rank that made them) and the labels with ``all_gather``, in rank order, so selectors and losses see
    ``(W*B, D)``; the returned loss equals the single-process loss on the concatenated batch and,
    after DDP averages the gradients, so do the parameter gradients (no extra scale, see the
    module docstring). Every rank must hold the same batch size.

    With ``mine_globally=False`` (or in eval mode, or outside a distributed job) the wrapped loss
    runs on the local batch: the returned value is this rank's loss, and after DDP the gradients
    are those of the mean of the ranks' losses.

    Args:
        loss_fn: the loss, e.g. ``OnlineTripletLoss`` or a hashing loss.
        mine_globally: gather before mining (True) or mine on the local batch (False).

    Attributes:
        num_selected: the wrapped loss's ``num_selected`` after the last call (global count when
            gathered), or None.
    """

    def __init__(self, loss_fn: Callable[..., torch.Tensor], mine_globally: bool = True) -> None:
        super().__init__()
        self.loss = loss_fn
        self.mine_globally = mine_globally

    @property
    def num_selected(self) -> Any:
        return getattr(self.loss, "num_selected", None)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        *outputs, labels = inputs
        if self.mine_globally and self.training and world_size() > 1:
            outputs = [gather_with_grad(o) for o in outputs]
            labels = gather_no_grad(labels)
        return self.loss(*outputs, labels)


def unwrap_loss(loss_fn: Any) -> Any:
    """The loss inside any :class:`GatherLoss` wrappers."""
    while isinstance(loss_fn, GatherLoss):
        loss_fn = loss_fn.loss
    return loss_fn
