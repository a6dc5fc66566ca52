"""Group commit: concurrent writes that arrive while one is being made durable go to disk together.

A thread that submits an item while no commit runs commits it at once (alone: no waiting); items
submitted while a commit runs wait, and the first of them to wake up commits all that are waiting
(up to ``max_group``) in one call: one journal record and one ``fsync`` for the group instead of
one each. Every submitter returns only when the commit that holds its item has returned, so an
acknowledged write is as durable as one made alone. The pattern of database write-ahead logs
(PostgreSQL's and MySQL's group commit).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

from deephash.errors import DeephashError

__all__ = ["GroupCommit"]

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Slot(Generic[T]):
    item: T
    done: bool = False
    outcome: Any = None
    error: BaseException | None = field(default=None, repr=False)


class GroupCommit(Generic[T, R]):
    """Commits submitted items in groups, leader-follower style (see the module docstring).

    Args:
        commit: ``items -> outcomes``, one per item in order, run by one thread at a time; if it
            raises, every item of that group gets the exception (the commit must then have
            changed nothing, as a journal append that failed).
        max_group: most items in one call (>= 1).
    """

    def __init__(self, commit: Callable[[Sequence[T]], Sequence[R]], max_group: int = 64) -> None:
        if int(max_group) < 1:
            raise DeephashError(f"max_group must be >= 1, got {max_group}")
        self.commit = commit
        self.max_group = int(max_group)
        self._cond = threading.Condition()
        self._waiting: list[_Slot[T]] = []
        self._committing = False
        #: groups committed and items in them (for /api/health)
        self.groups = 0
        self.items = 0

    def submit(self, item: T) -> R:
        """Commit ``item`` (alone or with others) and return its outcome; raises what its group's
        commit raised."""
        slot = _Slot(item)
        with self._cond:
            self._waiting.append(slot)
            while True:
                while self._committing and not slot.done:
                    self._cond.wait()
                if slot.done:
                    break
                group = self._waiting[: self.max_group]  # FIFO: slot is in it or comes in a later group
                del self._waiting[: len(group)]
                self._committing = True
                self._cond.release()
                try:
                    self._run(group)
                finally:
                    self._cond.acquire()
                    self._committing = False
                    self._cond.notify_all()
        if slot.error is not None:
            raise slot.error
        return slot.outcome

    def _run(self, group: list[_Slot[T]]) -> None:
        try:
            outcomes = list(self.commit([s.item for s in group]))
            if len(outcomes) != len(group):
                raise DeephashError(f"group commit: {len(outcomes)} outcomes for {len(group)} items")
        except BaseException as error:  # noqa: BLE001 - every item of the group learns why
            for s in group:
                s.error, s.done = error, True
            if not isinstance(error, Exception):
                raise
            return
        for s, outcome in zip(group, outcomes):
            s.outcome, s.done = outcome, True
        self.groups += 1
        self.items += len(group)

    def stats(self) -> dict[str, Any]:
        """Groups committed, items in them, and their mean size."""
        with self._cond:
            return {"groups": self.groups, "items": self.items,
                    "mean_group_size": round(self.items / self.groups, 3) if self.groups else 0.0}
