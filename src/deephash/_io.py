"""Atomic file writes: a temporary file in the same folder, fsync, then ``os.replace``.

A reader sees either the old file or the complete new one, never a torn write, even when the
writing process is killed half-way.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

import numpy as np


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", sync: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success move it onto ``path`` atomically.

    Args:
        path: final file path; its folder is created when missing.
        mode: ``"wb"`` or ``"w"``.
        sync: fsync the file and its folder (False: still atomic for readers and against a killed
            process, but not against a power cut until the caller syncs, e.g. once after many files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
        if sync:
            _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, sync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (``sync``: as in :func:`atomic_write`)."""
    with atomic_write(path, "wb", sync=sync) as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (load it back with ``weights_only=True``)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_savez(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """``np.savez`` to ``path`` atomically; arrays must not need pickling."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_bytes(path, buffer.getvalue())


def atomic_replace_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike,
                       written: Iterable[str | os.PathLike] | None = None) -> None:
    """Move a fully written folder ``tmp_dir`` onto ``final_dir``, replacing any old one.

    Before the move, the files' data and every folder under ``tmp_dir`` (its own entries) are
    fsynced, so the new folder survives a power cut once it is in place. The old folder is renamed
    aside first and removed only after the new one is in place, so an interruption leaves either
    the old or the new folder under ``final_dir`` (or the old one under ``final_dir + '.old'``).

    Args:
        tmp_dir: the new folder, beside ``final_dir``.
        final_dir: where it goes.
        written: the files whose data to fsync (the caller's new files); default every file under
            ``tmp_dir``. Pass them when the other files are hard links of files already durable
            (an index's journal and item images): their data is on disk, only their folder entries
            are new, and the folders are always synced.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    files = (child for child in tmp_dir.rglob("*") if child.is_file()) if written is None else map(Path, written)
    for child in files:
        with open(child, "rb") as handle:
            os.fsync(handle.fileno())
    for folder, _, _ in os.walk(tmp_dir):
        _fsync_dir(Path(folder))
    old = final_dir.with_name(final_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)
    if old.exists():
        shutil.rmtree(old)
