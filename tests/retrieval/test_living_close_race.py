"""A write that waited for the living index's writer lock while close() held it is refused whole.

Oracle: the journal file's bytes and a fresh ``HashIndex.load`` of the folder (nothing appended,
nothing applied).
"""

from __future__ import annotations

import numpy as np
import pytest

from deephash.errors import DeephashError
from deephash.retrieval.index import HashIndex
from deephash.retrieval.journal import JOURNAL_FILE
from deephash.retrieval.living import LivingIndex

BITS = 16


class CloseWinsTheLock:
    """Stands in for ``LivingIndex._writer``: the first write to ask for it finds that close() took
    it first (close runs to its end, then the write gets the real lock)."""

    def __init__(self, living: LivingIndex) -> None:
        self.living, self.real = living, living._writer

    def __enter__(self) -> None:
        self.living._writer = self.real
        self.living.close(fold=False)
        self.real.acquire()

    def __exit__(self, *exc: object) -> None:
        self.real.release()


@pytest.mark.parametrize("write", ["add", "remove"])
def test_a_write_racing_close_raises_one_line_and_appends_nothing(tmp_path, write):
    rng = np.random.default_rng(0)
    index = HashIndex(BITS)
    index.add(np.packbits(rng.integers(0, 2, (6, BITS)).astype(bool), axis=1))
    index.save(tmp_path / "index")
    living = LivingIndex(tmp_path / "index", fold_every=1000).open()
    living.add(np.packbits(rng.integers(0, 2, (1, BITS)).astype(bool), axis=1))  # one record in the journal
    journal = (tmp_path / "index" / JOURNAL_FILE).read_bytes()
    living._writer = CloseWinsTheLock(living)
    with pytest.raises(DeephashError, match="is not open") as raised:
        if write == "add":
            living.add(np.packbits(rng.integers(0, 2, (1, BITS)).astype(bool), axis=1))
        else:
            living.remove([0])
    assert "\n" not in str(raised.value)
    assert (tmp_path / "index" / JOURNAL_FILE).read_bytes() == journal
    again = HashIndex.load(tmp_path / "index")
    assert again.ntotal == 7 and 0 in set(again.ids.tolist())
    with LivingIndex(tmp_path / "index") as reopened:  # the write lock was released by close()
        assert reopened.index.ntotal == 7
