"""Group commit of the service's adds: adds that arrive while one commits go to disk together, each
acknowledged only once its group is durable, each stored as it would be alone.

Oracles: the commit calls recorded item by item (groups, order, outcomes); for the service, the
code the run's model gives each image alone, the journal records read back from disk, and the
index reloaded from its folder after the server closes.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from helpers import png_of
from test_serve_writes import code_of, tiny_run

from deephash.errors import DeephashError
from deephash.retrieval.index import HashIndex
from deephash.retrieval.item_images import item_image_path
from deephash.retrieval.journal import read_journal
from deephash.retrieval.living import JOURNAL_FILE
from deephash.serve.group_commit import GroupCommit
from deephash.serve.service import SearchService


def _wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _blocked_first_commit(max_group: int, n_more: int, fail_group: int | None = None):
    """Submit 1 item whose commit blocks until ``n_more`` others wait, then release it; returns
    the groups committed and each item's outcome (or exception)."""
    groups: list[list[int]] = []
    release = threading.Event()

    def commit(items):
        if not groups:
            release.wait(30)
        groups.append(list(items))
        if fail_group is not None and len(groups) - 1 == fail_group:
            raise OSError(f"disk full in group {fail_group}")
        return [10 * i for i in items]

    committer = GroupCommit(commit, max_group=max_group)
    outcomes: dict[int, object] = {}

    def submit(item: int) -> None:
        try:
            outcomes[item] = committer.submit(item)
        except Exception as error:  # noqa: BLE001 - recorded for the assertions
            outcomes[item] = error

    first = threading.Thread(target=submit, args=(0,))
    first.start()
    _wait_until(lambda: committer._committing)
    others = []
    for item in range(1, n_more + 1):  # one at a time, so the waiting order is known
        others.append(threading.Thread(target=submit, args=(item,)))
        others[-1].start()
        _wait_until(lambda: len(committer._waiting) == item)
    release.set()
    for thread in [first, *others]:
        thread.join(30)
    return committer, groups, outcomes


def test_adds_waiting_behind_a_commit_go_together_in_arrival_order():
    committer, groups, outcomes = _blocked_first_commit(max_group=64, n_more=7)
    assert groups == [[0], [1, 2, 3, 4, 5, 6, 7]]
    assert outcomes == {i: 10 * i for i in range(8)}
    assert committer.stats() == {"groups": 2, "items": 8, "mean_group_size": 4.0}


def test_a_group_holds_at_most_max_group_items():
    _, groups, outcomes = _blocked_first_commit(max_group=3, n_more=7)
    assert groups == [[0], [1, 2, 3], [4, 5, 6], [7]]
    assert outcomes == {i: 10 * i for i in range(8)}


def test_a_failed_commit_fails_its_group_only():
    committer, groups, outcomes = _blocked_first_commit(max_group=3, n_more=7, fail_group=1)
    assert groups == [[0], [1, 2, 3], [4, 5, 6], [7]]
    assert all(isinstance(outcomes[i], OSError) and "group 1" in str(outcomes[i]) for i in (1, 2, 3))
    assert {i: outcomes[i] for i in (0, 4, 5, 6, 7)} == {i: 10 * i for i in (0, 4, 5, 6, 7)}
    assert committer.stats()["groups"] == 3  # the failed group is not counted


def test_an_add_alone_commits_at_once_and_the_outcomes_must_match_the_items():
    calls = []
    committer = GroupCommit(lambda items: calls.append(list(items)) or ["ok"] * len(items))
    assert committer.submit("a") == "ok" and committer.submit("b") == "ok"
    assert calls == [["a"], ["b"]]
    broken = GroupCommit(lambda items: [])
    with pytest.raises(DeephashError, match="0 outcomes for 1 items"):
        broken.submit("a")
    with pytest.raises(DeephashError, match="max_group must be >= 1"):
        GroupCommit(lambda items: items, max_group=0)


def test_concurrent_service_adds_share_one_journal_record_and_each_is_stored_as_alone(tmp_path, monkeypatch):
    run_dir, index_dir = tiny_run(tmp_path)
    service = SearchService.load(index_dir, run_dir, writable=True, fold_every=1000)
    before = HashIndex.load(index_dir)
    rng = np.random.default_rng(4)
    pixels = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(6)]
    labels = ["3", None, "7", "0", None, "9"]

    import deephash.retrieval.item_images as item_images
    save = item_images.save_item_image
    release = threading.Event()
    first = []

    def slow_first_save(folder, ident, image):
        if not first:
            first.append(ident)
            release.wait(30)  # the first add's commit holds here while the others arrive
        save(folder, ident, image)

    monkeypatch.setattr(item_images, "save_item_image", slow_first_save)
    given: dict[int, int] = {}

    def add(i: int) -> None:
        given[i] = service.add_item(png_of(pixels[i]), label=labels[i])

    threads = [threading.Thread(target=add, args=(0,))]
    threads[0].start()
    _wait_until(lambda: bool(first))
    for i in range(1, 6):
        threads.append(threading.Thread(target=add, args=(i,)))
        threads[-1].start()
        _wait_until(lambda: len(service.adds._waiting) == i)
    release.set()
    for thread in threads:
        thread.join(30)
    records = read_journal(index_dir / JOURNAL_FILE).records
    assert [len(r.ids) for r in records] == [1, 5]  # durable on disk before close, in two records
    assert service.adds.stats()["groups"] == 2
    assert sorted(given.values()) == list(range(int(before.ids.max()) + 1, int(before.ids.max()) + 7))
    service.close()

    after = HashIndex.load(index_dir)
    rows = {int(i): r for r, i in enumerate(after.ids.tolist())}
    assert len(after.ids) == len(before.ids) + 6
    for i, ident in given.items():
        assert np.array_equal(after.codes[rows[ident]], code_of(run_dir, pixels[i]))  # as encoded alone
        expected = -1 if labels[i] is None else int(labels[i])
        assert int(after.labels[rows[ident]]) == expected
        assert item_image_path(index_dir, ident).is_file()
