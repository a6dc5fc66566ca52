"""``LivingIndex``: a saved :class:`HashIndex` that takes adds and removes, durably and thread-safely.

Opening one takes the folder's write lock (:class:`~deephash.retrieval.journal.IndexLock`),
loads the snapshot with its journal applied and opens the journal for appending. Each
:meth:`LivingIndex.add` / :meth:`LivingIndex.remove` is validated, appended to the journal and
fsynced, and only then applied in memory, so a change that returned survives ``kill -9``.
:meth:`LivingIndex.fold` saves a snapshot (atomically) and empties the journal; it runs every
``fold_every`` records and at :meth:`LivingIndex.close`.

A fold that fails (a full disk, a failing save) loses nothing and wedges nothing: the old snapshot
and the journal still hold every change (the journal is emptied only after the new snapshot is in
place, and a swap cut half-way is undone at once). :meth:`LivingIndex.fold` raises
:class:`FoldError`; the automatic folds after a write and at :meth:`LivingIndex.close` warn with
:class:`FoldWarning` instead (the write was durable before the fold began) and leave the records to
the next fold; ``close`` always closes the journal and releases the write lock.

A journal write that fails (a full disk, a failing fsync) raises
:class:`~deephash.retrieval.journal.JournalWriteError` and changes nothing: the record is cut off
the journal again and nothing is applied in memory, so the write can be retried. If the cut fails
too, the journal refuses every later write until the index is reopened.

Default ids come from the index's id mark (``HashIndex.next_id``), so the service and the command
line never hand out an id twice, even after the item with the largest id was removed.

Readers (searches) hold :meth:`LivingIndex.reading` while they use the index; the in-memory
change runs under the matching write side, so a search sees an item either before or after a
change, never half-applied. Writers are serialised among themselves; the fsync happens outside
the readers' lock.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from deephash.errors import DeephashError, NotFoundError, first_line
from deephash.retrieval.index import DuplicateIdError, HashIndex
from deephash.retrieval.journal import (
    JOURNAL_FILE,
    IndexLock,
    Journal,
    Record,
    apply_record,
    read_journal,
)

__all__ = ["DuplicateIdError", "FoldError", "FoldWarning", "LivingIndex", "ReadWriteLock"]


class FoldError(DeephashError):
    """Saving the snapshot of a fold failed; every change is still in the old snapshot and the journal."""


class FoldWarning(UserWarning):
    """An automatic fold (after a write, or at close) failed; its records stay in the journal."""


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
        """Fold pending records into the snapshot (unless ``fold=False``), close the journal and
        release the lock. A failed fold warns (:class:`FoldWarning`) and loses nothing: its records
        stay in the journal, applied by every load and folded by the next writer."""
        if self._journal is None:
            return
        with self._writer:
            if self._journal is None:  # closed by another thread while this one waited
                return
            try:
                if fold and self._journal.records:
                    self._fold_warning_on_failure()
            finally:
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
            raise DeephashError(f"the living index {self.path} is not open (closed, or open() not called)")
        return self._journal

    def add(self, codes: np.ndarray, ids: Sequence[int] | np.ndarray | None = None, labels: np.ndarray | None = None,
            paths: Sequence[str] | None = None, before: Callable[[np.ndarray], None] | None = None,
            after: Callable[[np.ndarray], None] | None = None, rerank: np.ndarray | None = None) -> np.ndarray:
        """Add items durably.

        Args:
            codes: packed uint8 ``(n, ceil(bits/8))`` or unpacked ``(n, bits)``.
            ids: int64 ``(n,)`` new ids; default consecutive from the index's ``next_id`` (never an
                id handed out before). An explicit id below the mark that is not present re-adds
                an item under that id (the caller's choice).
            labels: int64 ``(n,)`` / ``(n, C)``, required exactly when the index has labels.
            paths: an image path per item; ``""`` each when omitted from an index that keeps
                paths; refused by a (non-empty) index that keeps none.
            rerank: float ``(n, D)`` re-rank vectors, required exactly when the index keeps them.
            before: called with the ids once they are known and valid, before the journal write
                (e.g. to store the items' images); an exception there cancels the add.
            after: called with the ids under the write lock, right after the change is applied.

        Returns:
            int64 ``(n,)`` the ids added.

        Raises:
            DuplicateIdError: an id is already in the index or given twice. DeephashError: codes,
            ids, labels, vectors or paths of the wrong shape or kind.
        """
        with self._writer:
            journal = self._open_journal()  # under the lock: a write that waited out close() is refused
            rows = self.index.checked_addition(codes, ids, labels, rerank, f"index {self.path}", paths=paths)
            if rows.ids.shape[0] == 0:
                raise DeephashError("nothing to add: no codes given")
            if before is not None:
                before(rows.ids)
            record = Record("add", journal.next_seq(), rows.ids, rows.codes, rows.labels,
                            None if rows.paths is None else rows.paths.tolist(), rerank=rows.rerank)
            self._commit(journal, record, after)
            return rows.ids

    def remove(self, ids: Sequence[int] | np.ndarray, after: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
        """Remove items durably; every id must be in the index (else nothing is removed).

        Returns:
            int64 ``(n,)`` the ids removed.

        Raises:
            NotFoundError: an id is not in the index (the message names the first ones).
        """
        with self._writer:
            journal = self._open_journal()  # under the lock: a write that waited out close() is refused
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
            self._fold_warning_on_failure()  # the change is durable: a failed fold must not fail it

    def fold(self) -> None:
        """Save a snapshot holding every change (atomically) and empty the journal.

        Raises:
            FoldError: the snapshot could not be saved; the old one and the journal still hold
            every change (the journal is not emptied) and the index stays open and writable.
        """
        with self._writer:
            self._open_journal()
            self._fold_locked()

    def _fold_warning_on_failure(self) -> None:
        try:
            self._fold_locked()
        except FoldError as error:
            warnings.warn(str(error), FoldWarning, stacklevel=3)

    def _fold_locked(self) -> None:
        try:
            self.index.save(self.path)  # the journal file is carried into the new folder, then emptied
            self._journal.truncate()
        except Exception as error:  # noqa: BLE001 - whatever failed, the snapshot on disk + the journal hold everything
            _recover_swap(self.path)  # a swap cut between its renames: put the old folder back
            raise FoldError(f"index {self.path}: folding {self._journal.records} journal records into a new snapshot "
                            f"failed ({first_line(error)}); they stay in {JOURNAL_FILE}, applied on every load") from error
