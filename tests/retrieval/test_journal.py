"""The living index's journal and LivingIndex: format, torn tails, bad checksums, replay, folding, the lock.

The oracle is a plain dict ``id -> (code, label)`` updated by the same operations, and a
brute-force Hamming distance over it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import warnings

import numpy as np
import pytest

from deephash._io import atomic_replace_dir
from deephash.errors import DataFormatError, DeephashError, NotFoundError
from deephash.retrieval.index import HashIndex
from deephash.retrieval.item_images import item_image_path, save_item_image
from deephash.retrieval.journal import (
    JOURNAL_FILE,
    IndexLock,
    IndexLockedError,
    JournalWriteError,
    Record,
    TornJournalWarning,
    apply_record,
    encode_record,
    read_journal,
)
from deephash.retrieval.living import DuplicateIdError, LivingIndex, ReadWriteLock

BITS = 12
NB = 2


def random_codes(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.packbits(rng.integers(0, 2, (n, BITS)).astype(bool), axis=1)


def make_index(path, rng, n=20, factory="BFlat", backend=None) -> dict:
    index = HashIndex(BITS, factory=factory, metadata={"classes": ["a", "b", "c"]}, backend=backend)
    codes, labels = random_codes(rng, n), rng.integers(0, 3, n)
    index.add(codes, labels=labels)
    index.save(path)
    return {i: (codes[i].tobytes(), int(labels[i])) for i in range(n)}


def state(index: HashIndex) -> dict:
    return {int(i): (c.tobytes(), int(l)) for i, c, l in zip(index.ids, index.codes, index.labels)}


def brute(query: np.ndarray, oracle: dict) -> list[tuple[int, int]]:
    """(distance, id) of every item, sorted: the oracle of a full k-NN list."""
    bits = np.unpackbits(query)[:BITS]
    out = []
    for ident, (code, _) in oracle.items():
        out.append((int((np.unpackbits(np.frombuffer(code, np.uint8))[:BITS] != bits).sum()), ident))
    return sorted(out)


def records(rng) -> list[Record]:
    return [Record("add", 1, np.array([100, 101]), random_codes(rng, 2), np.array([0, 2])),
            Record("remove", 2, np.array([3])),
            Record("add", 3, np.array([102]), random_codes(rng, 1), np.array([[1, 0, 1]]), paths=["x/y.png"])]


def test_records_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    written = records(rng)
    (tmp_path / "j").write_bytes(b"".join(encode_record(r) for r in written))
    scan = read_journal(tmp_path / "j")
    assert scan.dropped == 0 and scan.end == (tmp_path / "j").stat().st_size
    for got, want in zip(scan.records, written, strict=True):
        assert (got.op, got.seq, got.time, got.paths) == (want.op, want.seq, want.time, want.paths)
        np.testing.assert_array_equal(got.ids, want.ids)
        for name in ("codes", "labels"):
            if getattr(want, name) is None:
                assert getattr(got, name) is None
            else:
                np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    assert read_journal(tmp_path / "absent").records == []


def test_every_torn_tail_is_dropped_and_cut_before_the_next_append(tmp_path):
    rng = np.random.default_rng(1)
    blobs = [encode_record(r) for r in records(rng)]
    whole = b"".join(blobs)
    good = len(blobs[0]) + len(blobs[1])
    for cut in range(good + 1, len(whole)):  # every prefix of the last record
        (tmp_path / "j").write_bytes(whole[:cut])
        with pytest.warns(TornJournalWarning, match="torn last record"):
            scan = read_journal(tmp_path / "j")
        assert [r.seq for r in scan.records] == [1, 2] and scan.end == good and scan.dropped == cut - good
    (tmp_path / "j").write_bytes(whole[:good] + b"\0" * 4096)  # a zero-filled block after a crash
    with pytest.warns(TornJournalWarning):
        assert [r.seq for r in read_journal(tmp_path / "j").records] == [1, 2]


def test_bad_checksum_last_is_torn_but_in_the_middle_is_corruption(tmp_path):
    rng = np.random.default_rng(2)
    blobs = [bytearray(encode_record(r)) for r in records(rng)]
    last = [bytes(b) for b in blobs]
    flipped = bytearray(last[2])
    flipped[-1] ^= 0x01
    (tmp_path / "j").write_bytes(last[0] + last[1] + bytes(flipped))
    with pytest.warns(TornJournalWarning, match="bad checksum"):
        assert [r.seq for r in read_journal(tmp_path / "j").records] == [1, 2]
    middle = bytearray(last[1])
    middle[-1] ^= 0x80
    (tmp_path / "j").write_bytes(last[0] + bytes(middle) + last[2])
    with pytest.raises(DataFormatError, match="corrupt"):
        read_journal(tmp_path / "j")


def test_replay_is_idempotent_and_load_applies_the_journal(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "idx"
    oracle = make_index(path, rng)
    recs = [Record("add", 1, np.array([100, 101]), random_codes(rng, 2), np.array([0, 2])),
            Record("remove", 2, np.array([3, 100])),
            Record("add", 3, np.array([3]), random_codes(rng, 1), np.array([1]))]
    (path / JOURNAL_FILE).write_bytes(b"".join(encode_record(r) for r in recs))
    oracle[100] = (recs[0].codes[0].tobytes(), 0)
    oracle[101] = (recs[0].codes[1].tobytes(), 2)
    del oracle[3], oracle[100]
    oracle[3] = (recs[2].codes[0].tobytes(), 1)
    loaded = HashIndex.load(path)
    assert state(loaded) == oracle and loaded.journal_seq == 3 and loaded.changed == recs[2].time
    for record in recs:  # a second replay changes nothing
        apply_record(loaded, record)
    assert state(loaded) == oracle and len(loaded) == len(oracle)
    loaded.save(path)  # a fold cut before the journal was emptied: the snapshot already holds 1..3
    assert (path / JOURNAL_FILE).stat().st_size > 0
    again = HashIndex.load(path)
    assert state(again) == oracle and again.journal_seq == 3


@pytest.mark.parametrize("factory,backend", [("BFlat", "torch"), ("BFlat", "faiss"), ("BHash8", "faiss")])
def test_living_index_matches_the_oracle_through_adds_removes_folds_and_reopen(tmp_path, factory, backend):
    rng = np.random.default_rng(4)
    path = tmp_path / "idx"
    oracle = make_index(path, rng, n=30, factory=factory, backend=backend)
    living = LivingIndex(path, fold_every=4, backend=backend).open()
    mark = max(oracle) + 1
    for step in range(15):
        if step % 3 == 2:
            gone = np.array([max(oracle), rng.choice(sorted(oracle)[:-1])])  # the largest id must not come back
            living.remove(gone)
            for g in gone.tolist():
                del oracle[g]
        else:
            codes, labels = random_codes(rng, 3), rng.integers(0, 3, 3)
            new = living.add(codes, labels=labels)
            assert new.tolist() == list(range(mark, mark + 3))  # from the mark, never a removed id
            mark += 3
            oracle.update({int(i): (c.tobytes(), int(l)) for i, c, l in zip(new, codes, labels)})
        assert state(living.index) == oracle
    assert 0 < living.pending < 4  # folded every 4 records, the rest still in the journal
    living.close(fold=False)  # as after a crash: the last records only in the journal
    reopened = HashIndex.load(path, backend=backend)
    assert state(reopened) == oracle and reopened.next_id == mark
    for query in random_codes(rng, 5 if factory == "BFlat" else 0):  # BHash is approximate
        d, i = reopened.search(query[None], len(oracle))
        assert sorted(zip(d[0].tolist(), i[0].tolist())) == brute(query, oracle)


def test_duplicate_and_missing_ids_write_nothing(tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "idx"
    oracle = make_index(path, rng)
    with LivingIndex(path) as living:
        with pytest.raises(DuplicateIdError, match="id 7 is already in index"):
            living.add(random_codes(rng, 2), ids=[50, 7], labels=[0, 0])
        with pytest.raises(DuplicateIdError, match="given twice"):
            living.add(random_codes(rng, 2), ids=[50, 50], labels=[0, 0])
        with pytest.raises(NotFoundError, match="id 99 not in index"):
            living.remove([1, 99])
        with pytest.raises(Exception, match="has labels"):
            living.add(random_codes(rng, 1))
        assert living.pending == 0 and state(living.index) == oracle
    assert not (path / JOURNAL_FILE).exists() or (path / JOURNAL_FILE).stat().st_size == 0
    assert state(HashIndex.load(path)) == oracle


def test_lock_is_exclusive_survives_folds_and_is_released(tmp_path):
    rng = np.random.default_rng(6)
    path = tmp_path / "idx"
    make_index(path, rng)
    living = LivingIndex(path, fold_every=1, holder="test server").open()
    living.add(random_codes(rng, 1), labels=[0])  # folds: the folder is swapped, the lock file carried over
    with pytest.raises(IndexLockedError, match=rf"locked for writing by pid {os.getpid()} \(test server\)"):
        IndexLock(path).acquire()
    with pytest.raises(IndexLockedError):
        LivingIndex(path).open()
    living.close()
    with IndexLock(path):
        pass


def test_a_swap_cut_between_its_renames_is_recovered(tmp_path):
    rng = np.random.default_rng(7)
    path = tmp_path / "idx"
    oracle = make_index(path, rng)
    with LivingIndex(path, fold_every=100) as living:
        new = living.add(random_codes(rng, 1), labels=[2])
        oracle[int(new[0])] = (living.index.codes[-1].tobytes(), 2)
        living.close(fold=False)
    shutil.move(path, path.with_name("idx.old"))  # killed after `INDEX -> INDEX.old`, before `tmp -> INDEX`
    with LivingIndex(path) as living:
        assert state(living.index) == oracle


def test_read_write_lock_excludes_readers_while_writing():
    lock = ReadWriteLock()
    inside, release, seen = threading.Event(), threading.Event(), []

    def writer():
        with lock.writing():
            inside.set()
            release.wait(10)
            seen.append("write done")

    t = threading.Thread(target=writer)
    t.start()
    inside.wait(10)
    reader = threading.Thread(target=lambda: lock.reading().__enter__() or seen.append("read"))
    reader.start()
    reader.join(0.2)
    assert seen == []  # the reader waits for the writer
    release.set()
    t.join(10)
    reader.join(10)
    assert seen == ["write done", "read"]


def test_living_index_never_hands_out_an_id_twice_across_a_crash_a_fold_and_a_restart(tmp_path):
    """Bug: default ids followed the largest present id, so removing it gave its id out again."""
    rng = np.random.default_rng(8)
    path = tmp_path / "idx"
    oracle = make_index(path, rng, n=5)  # ids 0 .. 4
    issued = list(oracle)
    living = LivingIndex(path, fold_every=100).open()
    for _ in range(2):  # add, then remove the largest id
        issued += living.add(random_codes(rng, 1), labels=[1]).tolist()
        living.remove([max(living.index.ids)])
    assert issued == [0, 1, 2, 3, 4, 5, 6]
    living.close(fold=False)  # a crash before the fold: the adds and removes only in the journal
    with LivingIndex(path) as reopened:  # replayed from the journal
        assert reopened.index.next_id == 7 and reopened.pending == 4
        issued += reopened.add(random_codes(rng, 1), labels=[2]).tolist()
        reopened.fold()
        reopened.remove([7])
        reopened.fold()  # a snapshot with the item gone and the journal empty
        assert reopened.pending == 0
    assert HashIndex.load(path).next_id == 8
    assert json.loads((path / "meta.json").read_text())["next_id"] == 8
    with LivingIndex(path) as restarted:
        issued += restarted.add(random_codes(rng, 2), labels=[0, 0]).tolist()
        assert restarted.index.ids.tolist() == [0, 1, 2, 3, 4, 8, 9]
    assert issued == list(range(10))  # every default id once, none twice


def _cut_swap(tmp_dir, final_dir, **_):
    """A swap that dies between its renames: the old folder moved aside, the new one not in place."""
    os.replace(final_dir, final_dir.with_name(final_dir.name + ".old"))
    raise OSError(28, "No space left on device")


def _failing_save(self, path):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("failure", ["save", "swap"])
def test_a_failed_fold_loses_nothing_and_leaves_the_journal_and_lock_usable(tmp_path, monkeypatch, failure):
    """Bug: a fold that failed left close() with the journal open and the lock held."""
    rng = np.random.default_rng(9)
    path = tmp_path / "idx"
    oracle = make_index(path, rng)
    if failure == "save":
        monkeypatch.setattr(HashIndex, "save", _failing_save)
    else:
        monkeypatch.setattr("deephash.retrieval.index.atomic_replace_dir", _cut_swap)
    living = LivingIndex(path, fold_every=2).open()
    codes = random_codes(rng, 3)
    first = living.add(codes[:1], labels=[0])
    with pytest.warns(UserWarning, match="folding 2 journal records .* failed .*No space left.* stay in journal.log"):
        second = living.add(codes[1:], labels=[1, 2])  # the automatic fold fails: the add still stands
    oracle.update({int(first[0]): (codes[0].tobytes(), 0), int(second[0]): (codes[1].tobytes(), 1),
                   int(second[1]): (codes[2].tobytes(), 2)})
    assert state(living.index) == oracle and living.pending == 2 and path.is_dir()
    with pytest.raises(DeephashError, match="stay in journal.log"):
        living.fold()
    with pytest.warns(UserWarning, match="folding 3 journal records"):
        living.remove([0])
    del oracle[0]
    with pytest.warns(UserWarning, match="folding 3 journal records"):
        living.close()
    with IndexLock(path):  # released
        pass
    monkeypatch.undo()
    assert state(HashIndex.load(path)) == oracle  # every change is in the journal
    with LivingIndex(path) as again:  # the next writer works and folds them
        assert again.pending == 3
        again.remove([1])
        del oracle[1]
    assert (path / JOURNAL_FILE).stat().st_size == 0 and not path.with_name("idx.old").exists()
    loaded = HashIndex.load(path)
    assert state(loaded) == oracle and loaded.journal_seq == 4 and loaded.next_id == 23


def _fail_once(monkeypatch, name, error, before=None):
    """Make ``os.<name>`` raise ``error`` on its next call only (``before`` runs first, with its arguments)."""
    real = getattr(os, name)

    def failing(*args):
        monkeypatch.setattr(os, name, real)
        if before is not None:
            before(*args)
        raise error

    monkeypatch.setattr(os, name, failing)


def _partial_write(fd, data):
    os.write(fd, bytes(data[:10]))  # os.write is the real one again here


def _load_strictly(path) -> HashIndex:
    """HashIndex.load with every warning an error: no torn record, nothing dropped."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return HashIndex.load(path)


@pytest.mark.parametrize("failure", ["write", "fsync"])
def test_a_failed_journal_write_changes_nothing_and_the_journal_stays_appendable(tmp_path, monkeypatch, failure):
    """Bug: a write cut short by a full disk (or a failing fsync) left its bytes in the journal: the
    next record went after them and the index no longer loaded (or two records had one seq)."""
    rng = np.random.default_rng(10)
    path = tmp_path / "idx"
    oracle = make_index(path, rng, n=5)  # ids 0 .. 4
    codes = random_codes(rng, 4)
    living = LivingIndex(path, fold_every=100).open()
    first = living.add(codes[:1], labels=[0])
    living.remove([2])
    oracle[int(first[0])] = (codes[0].tobytes(), 0)
    del oracle[2]
    size = (path / JOURNAL_FILE).stat().st_size
    if failure == "write":
        _fail_once(monkeypatch, "write", OSError(errno.ENOSPC, "No space left on device"), _partial_write)
    else:
        _fail_once(monkeypatch, "fsync", OSError(errno.EIO, "Input/output error"))
    message = "No space left" if failure == "write" else "Input/output error"
    with pytest.raises(JournalWriteError, match=f"^journal .*: writing record 3 failed .*{message}.*the change was not made$"):
        living.add(codes[1:3], labels=[1, 2])
    assert state(living.index) == oracle and living.pending == 2 and living.index.next_id == 6
    assert (path / JOURNAL_FILE).stat().st_size == size  # the failed record's bytes are cut off
    retried = living.add(codes[1:3], labels=[1, 2])  # the same write again: it goes where the failed one began
    living.remove([0])
    oracle.update({int(retried[0]): (codes[1].tobytes(), 1), int(retried[1]): (codes[2].tobytes(), 2)})
    del oracle[0]
    journal = living._journal
    living.close(fold=False)  # the changes only in the journal
    with pytest.raises(DeephashError, match="is closed: reopen the index"):  # never reopens its file by itself
        journal.append(Record("remove", journal.next_seq(), np.array([1])))
    assert [r.seq for r in read_journal(path / JOURNAL_FILE).records] == [1, 2, 3, 4]
    loaded = _load_strictly(path)
    assert state(loaded) == oracle and loaded.journal_seq == 4 and loaded.next_id == 8
    with LivingIndex(path) as reopened:
        later = reopened.add(codes[3:], labels=[0])
    oracle[int(later[0])] = (codes[3].tobytes(), 0)
    issued = [*range(5), *first.tolist(), *retried.tolist(), *later.tolist()]
    assert issued == list(range(9))  # every acknowledged id once, none twice
    assert state(_load_strictly(path)) == oracle


def test_a_failed_write_that_cannot_be_cut_off_breaks_the_journal_until_reopened(tmp_path, monkeypatch):
    rng = np.random.default_rng(11)
    path = tmp_path / "idx"
    oracle = make_index(path, rng, n=5)
    codes = random_codes(rng, 3)
    living = LivingIndex(path, fold_every=100).open()
    first = living.add(codes[:1], labels=[0])
    oracle[int(first[0])] = (codes[0].tobytes(), 0)
    _fail_once(monkeypatch, "write", OSError(errno.ENOSPC, "No space left on device"), _partial_write)
    _fail_once(monkeypatch, "ftruncate", OSError(errno.EIO, "Input/output error"))
    with pytest.raises(JournalWriteError, match="writing record 2 failed .*No space left.* cutting it off failed too "
                                                ".*Input/output error.*refuses writes until the index is reopened$"):
        living.add(codes[1:2], labels=[1])
    for write in (lambda: living.add(codes[1:2], labels=[1]), lambda: living.remove([1])):  # refused, disk fine or not
        with pytest.raises(JournalWriteError, match="refuses writes: writing record 2 failed .*; reopen the index$"):
            write()
    assert state(living.index) == oracle and living.pending == 1
    living.close(fold=False)
    reopened = LivingIndex(path)
    with pytest.warns(TornJournalWarning, match="10 bytes"):  # the failed write's 10 bytes: a torn tail, dropped
        reopened.open()
    try:
        assert state(reopened.index) == oracle and reopened.pending == 1
        again = reopened.add(codes[1:2], labels=[1])
    finally:
        reopened.close()
    oracle[int(again[0])] = (codes[1].tobytes(), 1)
    assert state(_load_strictly(path)) == oracle and int(again[0]) == int(first[0]) + 1


def _synced_inodes(monkeypatch) -> list[int]:
    """Record the inode of every ``os.fsync`` from now on (the fsync still runs)."""
    synced: list[int] = []
    real = os.fsync

    def recording(fd):
        synced.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return synced


def _fold_with_images(tmp_path, monkeypatch, n_images: int) -> tuple[list[int], dict]:
    """Fold an index holding ``n_images`` stored item images; the inodes fsynced during the fold and
    the inodes of the folder's files afterwards, by kind."""
    rng = np.random.default_rng(12)
    path = tmp_path / f"idx{n_images}"
    make_index(path, rng, n=3)
    pictures = rng.integers(0, 256, (n_images, 1, 4, 4), dtype=np.uint8)

    def store(ids):
        for ident, picture in zip(ids.tolist(), pictures):
            save_item_image(path, ident, picture)

    with LivingIndex(path, fold_every=1000) as living:
        ids = living.add(random_codes(rng, n_images), labels=np.zeros(n_images, np.int64), before=store)
        synced = _synced_inodes(monkeypatch)
        living.fold()
        monkeypatch.undo()
    saved = [p for p in path.iterdir() if p.is_file() and p.name not in (JOURNAL_FILE, ".lock")]
    inodes = {"saved": {p.stat().st_ino for p in saved}, "folders": {p.stat().st_ino for p in (path, path / "items", tmp_path)},
              "images": {item_image_path(path, i).stat().st_ino for i in ids.tolist()}}
    assert len(saved) >= 4 and len(inodes["images"]) == n_images
    return synced, inodes


def test_a_fold_syncs_what_it_wrote_and_the_folders_but_not_the_carried_over_images(tmp_path, monkeypatch):
    """Bug: every fold fsynced every stored item image again (hard links of files already durable)."""
    counts = []
    for n_images in (2, 24):
        synced, inodes = _fold_with_images(tmp_path, monkeypatch, n_images)
        assert inodes["saved"] <= set(synced) and inodes["folders"] <= set(synced)
        assert not inodes["images"] & set(synced)
        counts.append(len(synced))
    assert counts[0] == counts[1]  # constant in the number of images


def test_atomic_replace_dir_syncs_every_file_by_default(tmp_path, monkeypatch):
    new, final = tmp_path / "new", tmp_path / "final"
    (new / "sub").mkdir(parents=True)
    for name in ("a", "sub/b"):
        (new / name).write_bytes(b"x")
    final.mkdir()
    (final / "old").write_bytes(b"y")
    synced = _synced_inodes(monkeypatch)
    atomic_replace_dir(new, final)
    monkeypatch.undo()
    expected = {p.stat().st_ino for p in (final, final / "a", final / "sub", final / "sub" / "b", tmp_path)}
    assert expected <= set(synced) and sorted(p.name for p in final.iterdir()) == ["a", "sub"]


def test_a_journal_file_that_cannot_be_created_is_a_journal_write_error_and_nothing_changes(tmp_path, monkeypatch):
    """The first write of a fresh index opens (creates) journal.log: on a full disk that open fails,
    before anything is written; it must be the same one-line JournalWriteError (the service's 503)."""
    rng = np.random.default_rng(11)
    path = tmp_path / "idx"
    oracle = make_index(path, rng, n=3)
    living = LivingIndex(path, fold_every=100).open()
    assert not (path / JOURNAL_FILE).exists()
    _fail_once(monkeypatch, "open", OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(JournalWriteError, match="writing record 1 failed .*No space left.*the change was not made$"):
        living.add(random_codes(rng, 1), labels=[0])
    assert state(living.index) == oracle and living.pending == 0 and living.index.next_id == 3
    added = living.add(code := random_codes(rng, 1), labels=[1])  # the next write creates the file
    oracle[int(added[0])] = (code[0].tobytes(), 1)
    living.close(fold=False)
    assert added.tolist() == [3] and state(_load_strictly(path)) == oracle
