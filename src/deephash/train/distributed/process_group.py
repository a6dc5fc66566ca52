"""The process group: joining it (torchrun or spawned local workers), rank queries, launching a job.

Two ways to start a job, both ending in :func:`init_distributed`:

- ``torchrun`` (one or several machines) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR`` and ``MASTER_PORT``; each process calls :func:`init_distributed` itself.
- :func:`spawn_workers` starts ``nproc`` processes on this machine with the same variables set
  (``MASTER_ADDR=127.0.0.1`` and a free loopback port).

:func:`launch` picks between them (or a plain call) so one code path serves ``--nproc 1``,
``--nproc N`` and ``torchrun``. Backends: ``gloo`` on CPUs, ``nccl`` on CUDA GPUs (each process
uses GPU ``LOCAL_RANK``).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from deephash.errors import DeephashError

__all__ = [
    "DistributedError",
    "backend_for",
    "barrier",
    "cleanup",
    "free_port",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "launch",
    "launched_by_torchrun",
    "local_rank",
    "rank",
    "shard_range",
    "spawn_workers",
    "world_size",
]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(DeephashError):
    """A distributed job could not start, or one of its processes failed."""


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
    safe only in a process that has not initialised CUDA, started threads or used MKL's OpenMP
    pool (seen: a forked child's first float64 matrix product deadlocked); ``timeout_s`` bounds
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
