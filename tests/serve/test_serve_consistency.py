"""What a client sees while the index changes: a read-only service following a writer's folds, a
write outliving the request deadline, and a random item drawn during a remove.

Oracles: the index folder loaded afresh (``HashIndex.load``) for what a reader must serve; the
number of loads counted by a wrapper around the service's loader; the index itself for whether a
write was applied.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from helpers import png_of, random_code_index

from deephash.retrieval.index import HashIndex
from deephash.retrieval.living import LivingIndex
from deephash.serve import service as service_module
from deephash.serve.app import create_app
from deephash.serve.service import SearchService

BITS = 12
TOKEN = "consistency-token-7d1e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}



def one_code(seed: int) -> np.ndarray:
    return np.packbits(np.random.default_rng(seed).integers(0, 2, (1, BITS)).astype(bool), axis=1)


def test_a_reader_follows_folds_while_the_writer_journal_holds_records(tmp_path, monkeypatch):
    run_dir, index_dir = random_code_index(tmp_path, BITS, 20, seed=3)
    loads = []
    real_load = service_module._load_index
    monkeypatch.setattr(service_module, "_load_index", lambda path: loads.append(path) or real_load(path))
    reader = SearchService.load(index_dir, run_dir)
    assert len(loads) == 1
    writer = LivingIndex(index_dir, fold_every=1000).open()
    try:
        first = int(writer.add(one_code(1), labels=np.array([4]))[0])
        writer.fold()
        second = int(writer.add(one_code(2), labels=np.array([5]))[0])  # after the fold: the journal holds it
        assert reader.reload_if_folded()
        assert len(loads) == 2
        on_disk = HashIndex.load(index_dir)
        np.testing.assert_array_equal(reader.index.ids, on_disk.ids)  # the snapshot with its journal applied
        assert {first, second} <= set(reader.index.ids.tolist())
        assert reader.item(first)[1] == reader.classes[4]
        # Nothing folded since: no reload, no load, however many checks and journal records.
        assert not reader.reload_if_folded()
        third = int(writer.add(one_code(3), labels=np.array([6]))[0])
        assert not reader.reload_if_folded() and not reader.reload_if_folded()
        assert len(loads) == 2 and third not in set(reader.index.ids.tolist())
        writer.fold()
        assert reader.reload_if_folded()
        assert len(loads) == 3 and third in set(reader.index.ids.tolist())
        assert not reader.reload_if_folded() and len(loads) == 3
    finally:
        writer.close(fold=False)


@pytest.mark.parametrize("write", ["add", "remove"])
def test_a_write_outliving_the_request_deadline_is_answered_with_its_outcome(tmp_path, write):
    run_dir, index_dir = random_code_index(tmp_path, BITS, 5, seed=3)
    service = SearchService.load(index_dir, run_dir, writable=True)
    slow = {"add": service.add_item, "remove": service.remove_item}[write]
    finished = []

    def slower(*args):  # outlives the 0.5 s deadline by far, then does the write
        time.sleep(1.5)
        result = slow(*args)
        finished.append(result)
        return result

    setattr(service, f"{write}_item", slower)
    app = create_app(index_dir, service=service, write_token=TOKEN, request_timeout_s=0.5, max_batch=1)
    with TestClient(app) as client:
        if write == "add":
            pixels = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
            answer = client.post("/api/items", files={"image": ("x.png", png_of(pixels), "image/png")},
                                 data={"label": "3"}, headers=AUTH)
            assert answer.status_code == 201, answer.text
            assert finished == [answer.json()["id"]]
            assert answer.json()["id"] in set(service.index.ids.tolist())
        else:
            answer = client.delete("/api/items/2", headers=AUTH)
            assert answer.status_code == 204, answer.text
            assert len(finished) == 1 and 2 not in set(service.index.ids.tolist())
    assert set(HashIndex.load(index_dir).ids.tolist()) == set(service.index.ids.tolist())  # folded at shutdown


def test_a_random_item_is_read_whole_while_a_remove_follows_the_draw(tmp_path, monkeypatch):
    run_dir, index_dir = random_code_index(tmp_path, BITS, 2, seed=3)
    service = SearchService.load(index_dir, run_dir, writable=True)
    labels = dict(zip(service.index.ids.tolist(), (service.label_of(p) for p in range(2))))
    real_reading = service._reading
    removed = []

    @contextlib.contextmanager
    def reading_then_a_remove():  # every item is removed right after the first read section ends
        with real_reading():
            yield
        if not removed:
            removed.extend(sorted(labels))
            for ident in removed:
                service.remove_item(ident)

    monkeypatch.setattr(service, "_reading", reading_then_a_remove)
    app = create_app(index_dir, service=service, write_token=TOKEN, max_batch=1)
    with TestClient(app) as client:
        answer = client.get("/api/items/random")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert removed == sorted(labels) and body["id"] in labels and body["label"] == labels[body["id"]]
        assert client.get("/api/items/random").status_code == 404  # now empty


def test_a_journal_write_that_fails_is_a_503_and_nothing_is_added(tmp_path, monkeypatch):
    import errno
    import os

    from deephash.retrieval import journal as journal_module

    run_dir, index_dir = random_code_index(tmp_path, BITS, 5, seed=3)
    service = SearchService.load(index_dir, run_dir, writable=True)
    before = service.index.ids.tolist()
    real_write, calls = os.write, []

    def full_disk(fd, data):  # the first journal write stores 10 bytes, then the disk is full
        calls.append(fd)
        if len(calls) == 1:
            real_write(fd, bytes(data)[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(journal_module.os, "write", full_disk)
    app = create_app(index_dir, service=service, write_token=TOKEN, max_batch=1)
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    with TestClient(app) as client:
        failed = client.post("/api/items", files={"image": ("x.png", png_of(pixels), "image/png")},
                             data={"label": "3"}, headers=AUTH)
        assert failed.status_code == 503 and "\n" not in failed.json()["detail"], failed.text
        assert service.index.ids.tolist() == before
        retried = client.post("/api/items", files={"image": ("x.png", png_of(pixels), "image/png")},
                              data={"label": "3"}, headers=AUTH)
        assert retried.status_code == 201, retried.text
    assert HashIndex.load(index_dir).ids.tolist() == before + [retried.json()["id"]]
