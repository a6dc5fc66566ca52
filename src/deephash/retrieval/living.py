"""``LivingIndex``: a saved :class:`HashIndex` that takes adds and removes, durably and thread-safely.

Opening one takes the folder's write lock (:class:`~deephash.retrieval.journal.IndexLock`),
loads the snapshot with its journal applied and opens the journal for appending. Each
:meth:`LivingIndex.add` / :meth:`LivingIndex.remove` is validated, appended to the journal and
fsynced, and only then applied in memory, so a change that returned survives ``kill -9``.
:meth:`LivingIndex.fold` saves a snapshot (atomically) and empties the journal; it runs every
``fold_every`` records and at :meth:`LivingIndex.close`.

Readers (searches) hold :meth:`LivingIndex.reading` while they use the index; the in-memory
change runs under the matching write side, so a search sees an item either before or after a
change, never half-applied. Writers are serialised among themselves; the fsync happens outside
the readers' lock.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from deephash.errors import DeephashError, NotFoundError
from deephash.retrieval.index import DuplicateIdError, HashIndex
from deephash.retrieval.journal import (
    JOURNAL_FILE,
    IndexLock,
    Journal,
    Record,
    apply_record,
    read_journal,
)

__all__ = ["DuplicateIdError", "LivingIndex", "ReadWriteLock"]


class ReadWriteLock:
    """Many readers or one writer; a waiting writer goes before new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the read side."""
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the write side."""
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


def _recover_swap(path: Path) -> None:
    """Undo a snapshot swap cut between its two renames: ``INDEX`` gone, ``INDEX.old`` complete."""
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.is_dir():
        os.replace(old, path)


class LivingIndex:
    """A writable, journaled index folder.

    Args:
        path: the index folder (written by ``HashIndex.save`` / ``deephash index build``).
        fold_every: fold the journal into a new snapshot after this many records (>= 1).
        holder: who writes (named in the lock file and in other writers' errors).
        backend: as in ``HashIndex.load``.
    """

    def __init__(self, path: str | os.PathLike, fold_every: int = 1000, holder: str = "",
                 backend: str | None = None) -> None:
        if int(fold_every) < 1:
            raise DeephashError(f"fold_every must be >= 1, got {fold_every}")
        self.path = Path(path)
        self.fold_every = int(fold_every)
        self.holder = holder
        self.backend = backend
        self.index: HashIndex | None = None
        self.lock = ReadWriteLock()
        self._writer = threading.Lock()
        self._file_lock = IndexLock(self.path, holder)
        self._journal: Journal | None = None

    # ------------------------------------------------------------------ open / close
    def open(self) -> LivingIndex:
        """Take the write lock, load snapshot + journal, cut a torn last record; returns self.

        Raises:
            NotFoundError: no index folder. IndexLockedError: another writer holds it.
        """
        _recover_swap(self.path)
        if not self.path.is_dir():
            raise NotFoundError(f"index directory {self.path} does not exist")
        self._file_lock.acquire()
        try:
            self.index = HashIndex.load(self.path, backend=self.backend)
            scan = read_journal(self.path / JOURNAL_FILE)
            self._journal = Journal(self.path / JOURNAL_FILE, scan.end, self.index.journal_seq)
            self._journal.records = len(scan.records)
        except BaseException:
            self._file_lock.release()
            raise
        return self

    def close(self, fold: bool = True) -> None:
        """Fold pending records into the snapshot (unless ``fold=False``) and release the lock."""
        if self._journal is None:
            return
        with self._writer:
            if fold and self._journal.records:
                self._fold_locked()
            self._journal.close()
            self._journal = None
            self._file_lock.release()

    def __enter__(self) -> LivingIndex:
        return self.open()

    def __exit__(self, kind: object, *exc: object) -> None:
        self.close(fold=True)

    # ------------------------------------------------------------------ reading
    def reading(self) -> contextlib.AbstractContextManager[None]:
        """Hold while reading :attr:`index`: no change is applied meanwhile."""
        return self.lock.reading()

    @property
    def pending(self) -> int:
        """Journal records not yet folded into the snapshot."""
        return self._journal.records if self._journal is not None else 0

    # ------------------------------------------------------------------ writing
    def _open_journal(self) -> Journal:
        if self._journal is None or self.index is None:
            raise DeephashError("the living index is not open (call open() first)")
        return self._journal

    def add(self, codes: np.ndarray, ids: Sequence[int] | np.ndarray | None = None, labels: np.ndarray | None = None,
            paths: Sequence[str] | None = None, before: Callable[[np.ndarray], None] | None = None,
            after: Callable[[np.ndarray], None] | None = None, rerank: np.ndarray | None = None) -> np.ndarray:
        """Add items durably.

        Args:
            codes: packed uint8 ``(n, ceil(bits/8))`` or unpacked ``(n, bits)``.
            ids: int64 ``(n,)`` new ids; default consecutive after the largest id.
            labels: int64 ``(n,)`` / ``(n, C)``, required exactly when the index has labels.
            paths: an image path per item (kept when the index keeps paths).
            rerank: float ``(n, D)`` re-rank vectors, required exactly when the index keeps them.
            before: called with the ids once they are known and valid, before the journal write
                (e.g. to store the items' images); an exception there cancels the add.
            after: called with the ids under the write lock, right after the change is applied.

        Returns:
            int64 ``(n,)`` the ids added.

        Raises:
            DuplicateIdError: an id is already in the index or given twice. DeephashError: codes,
            ids or labels of the wrong shape or kind.
        """
        journal = self._open_journal()
        with self._writer:
            index = self.index
            packed, id_array, label_array, vectors = index.checked_addition(codes, ids, labels, rerank, f"index {self.path}")
            n = packed.shape[0]
            if n == 0:
                raise DeephashError("nothing to add: no codes given")
            keeps_paths = isinstance(index.metadata, dict) and index.metadata.get("paths") is not None
            path_list = None
            if keeps_paths:
                path_list = [str(p) for p in paths] if paths is not None else [""] * n
                if len(path_list) != n:
                    raise DeephashError(f"{len(path_list)} paths for {n} codes")
            if before is not None:
                before(id_array)
            record = Record("add", journal.next_seq(), id_array, packed, label_array, path_list, rerank=vectors)
            self._commit(journal, record, after)
            return id_array

    def remove(self, ids: Sequence[int] | np.ndarray, after: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
        """Remove items durably; every id must be in the index (else nothing is removed).

        Returns:
            int64 ``(n,)`` the ids removed.

        Raises:
            NotFoundError: an id is not in the index (the message names the first ones).
        """
        journal = self._open_journal()
        with self._writer:
            id_array = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
            if id_array.size == 0:
                raise DeephashError("nothing to remove: no ids given")
            missing = id_array[~np.isin(id_array, self.index._ids)]
            if missing.size:
                shown = ", ".join(str(int(i)) for i in missing[:5]) + (" ..." if missing.size > 5 else "")
                raise NotFoundError(f"{'id' if missing.size == 1 else 'ids'} {shown} not in index {self.path}; nothing was removed")
            self._commit(journal, Record("remove", journal.next_seq(), id_array), after)
            return id_array

    def _commit(self, journal: Journal, record: Record, after: Callable[[np.ndarray], None] | None) -> None:
        journal.append(record)  # durable from here on
        with self.lock.writing():
            apply_record(self.index, record)
            if after is not None:
                after(record.ids)
        if journal.records >= self.fold_every:
            self._fold_locked()

    def fold(self) -> None:
        """Save a snapshot holding every change (atomically) and empty the journal."""
        self._open_journal()
        with self._writer:
            self._fold_locked()

    def _fold_locked(self) -> None:
        self.index.save(self.path)  # the journal file is carried into the new folder, then emptied
        self._journal.truncate()
