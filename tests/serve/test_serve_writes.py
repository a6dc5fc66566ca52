"""The service's writes (POST /api/items, DELETE /api/items/{id}), their token, and writes racing searches.

Oracle: the index's codes before the change plus the added item's code (computed here from the
model), searched by brute-force Hamming distance.
"""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from helpers import png_of, random_code_index, tiny_digits_run

from deephash import runs
from deephash.retrieval.index import HashIndex
from deephash.retrieval.journal import IndexLockedError
from deephash.runs.index_updates import item_image_path, remove_items
from deephash.serve.app import create_app
from deephash.serve.service import SearchService

BITS = 12
CLASSES = [str(d) for d in range(10)]
TOKEN = "s3cret-token-9f2c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def tiny_run(root: Path, n: int = 300) -> tuple[Path, Path]:
    """An untrained tiny CNN on scikit-learn's 8x8 digits and an index of ``n`` items with the train
    split's metadata but random codes (the untrained model gives most images one code)."""
    return random_code_index(root, BITS, n, seed=7)



def code_of(run_dir: Path, pixels: np.ndarray) -> np.ndarray:
    """The packed code the run's model gives an 8x8 grey image: uint8 (2,)."""
    model, _ = runs.load_run(run_dir, device="cpu")
    with torch.inference_mode():
        sign = model.encode(torch.from_numpy(pixels)[None, None].float() / 255)
    return np.packbits(sign.numpy() > 0, axis=1)[0]


def within(query: np.ndarray, items: dict[int, bytes], radius: int) -> list[tuple[int, int]]:
    """Brute force: sorted (distance, id) of every item within ``radius`` of ``query``."""
    q = np.unpackbits(query)[:BITS]
    out = [(int((np.unpackbits(np.frombuffer(c, np.uint8))[:BITS] != q).sum()), i) for i, c in items.items()]
    return sorted(x for x in out if x[0] <= radius)


def search_radius(client: TestClient, png: bytes, radius: int) -> list[tuple[int, int]]:
    body = client.post("/api/search", files={"image": ("q.png", png, "image/png")},
                       data={"k": "1000", "radius": str(radius)})
    assert body.status_code == 200, body.text
    return sorted((r["distance"], r["id"]) for r in body.json()["results"])


@pytest.fixture()
def tiny(tmp_path):
    run_dir, index_dir = tiny_run(tmp_path)
    index = HashIndex.load(index_dir)
    items = {int(i): c.tobytes() for i, c in zip(index.ids, index.codes)}
    return {"run": run_dir, "index": index_dir, "items": items, "labels": dict(zip(index.ids.tolist(), index.labels.tolist()))}


def test_add_search_delete_through_the_api(tiny):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    png, code = png_of(pixels), code_of(tiny["run"], pixels)
    items = dict(tiny["items"])
    with TestClient(create_app(tiny["index"], tiny["run"], write_token=TOKEN)) as client:
        info = client.get("/api/info").json()
        assert info["writable"] is True and info["size"] == len(items)
        added = client.post("/api/items", files={"image": ("new.png", png, "image/png")}, data={"label": "7"}, headers=AUTH)
        assert added.status_code == 201, added.text
        new = added.json()["id"]
        assert new == max(items) + 1 and added.json()["image_url"] == f"/api/items/{new}/image"
        items[new] = code.tobytes()
        assert client.get("/api/info").json()["size"] == len(items)
        found = search_radius(client, png, 2)
        assert (0, new) in found and found == within(code, items, 2)
        hit = client.post("/api/search", json={"id": new, "k": 1000, "radius": 0}).json()
        assert hit["query"]["label"] == "7" and new in [r["id"] for r in hit["results"]]
        image = client.get(f"/api/items/{new}/image")
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.content))), pixels)

        given = client.post("/api/items", files={"image": ("b.png", png, "image/png")}, data={"id": "5000"}, headers=AUTH)
        assert given.status_code == 201 and given.json()["id"] == 5000
        items[5000] = code.tobytes()
        unlabelled = client.post("/api/search", json={"id": 5000, "k": 1}).json()
        assert unlabelled["query"]["label"] is None
        duplicate = client.post("/api/items", files={"image": ("b.png", png, "image/png")}, data={"id": "5000"}, headers=AUTH)
        assert duplicate.status_code == 409 and "5000" in duplicate.json()["detail"]
        bad_label = client.post("/api/items", files={"image": ("b.png", png, "image/png")}, data={"label": "zebra"}, headers=AUTH)
        assert bad_label.status_code == 422 and "zebra" in bad_label.json()["detail"]
        not_image = client.post("/api/items", files={"image": ("b.png", b"not an image", "image/png")}, headers=AUTH)
        assert not_image.status_code == 415
        assert client.get("/api/info").json()["size"] == len(items)

        assert client.delete(f"/api/items/{new}", headers=AUTH).status_code == 204
        del items[new]
        assert search_radius(client, png, 2) == within(code, items, 2) and (0, new) not in search_radius(client, png, 2)
        assert client.get(f"/api/items/{new}/image").status_code == 404
        assert not item_image_path(tiny["index"], new).exists()
        assert client.delete(f"/api/items/{new}", headers=AUTH).status_code == 404
        assert client.delete(f"/api/items/{10**30}", headers=AUTH).status_code == 404
        with pytest.raises(IndexLockedError, match="deephash serve"):  # the server holds the write lock
            remove_items(tiny["index"], np.array([1]))
    reloaded = HashIndex.load(tiny["index"])  # folded at shutdown
    assert {int(i): c.tobytes() for i, c in zip(reloaded.ids, reloaded.codes)} == items
    assert reloaded.journal_seq == 3 and reloaded.changed is not None
    remove_items(tiny["index"], np.array([1]))  # the lock was released


def test_writes_need_a_configured_server_and_the_right_token(tiny, caplog):
    png = png_of(np.zeros((8, 8), np.uint8))
    with TestClient(create_app(tiny["index"], tiny["run"])) as client:  # no token: read-only
        assert client.get("/api/info").json()["writable"] is False
        for response in (client.post("/api/items", files={"image": ("a.png", png, "image/png")}, headers=AUTH),
                         client.delete("/api/items/3", headers=AUTH)):
            assert response.status_code == 403 and "--token-file" in response.json()["detail"]
        remove_items(tiny["index"], np.array([2]))  # a read-only server takes no lock
    with TestClient(create_app(tiny["index"], tiny["run"], write_token=TOKEN)) as client:
        caplog.set_level(logging.WARNING, logger="deephash.serve")
        attempts = {"none": {}, "wrong": {"Authorization": "Bearer s3cret-token-x"}, "prefix": {"Authorization": "Bearer s3cret"},
                    "basic": {"Authorization": f"Basic {TOKEN}"}, "bare": {"Authorization": TOKEN}}
        for name, headers in attempts.items():
            for response in (client.post("/api/items", files={"image": ("a.png", png, "image/png")}, headers=headers),
                             client.delete("/api/items/3", headers=headers)):
                assert response.status_code == 401, name
                assert response.headers["www-authenticate"] == "Bearer"
        assert client.get("/api/info").json()["size"] == len(tiny["items"]) - 1  # nothing changed
        assert client.post("/api/search", json={"id": 3, "k": 1}).status_code == 200  # reads stay open
        refusals = [r.getMessage() for r in caplog.records if r.name == "deephash.serve"]
        assert len(refusals) == 2 * len(attempts) and all("refused" in m for m in refusals)
        assert not any("s3cret" in m for m in refusals)
    with pytest.raises(Exception, match="empty"):
        create_app(tiny["index"], tiny["run"], write_token="  ")


def test_a_write_racing_8_searches_is_seen_whole_or_not_at_all(tiny):
    """8 threads search around an item that is added and removed 20 times: each answer is exactly
    the brute-force answer without it or with it, with the right labels."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    png, code = png_of(pixels), code_of(tiny["run"], pixels)
    service = SearchService.load(tiny["index"], tiny["run"], writable=True, fold_every=7)
    ident = 90_000
    before = within(code, tiny["items"], 3)
    after = within(code, {**tiny["items"], ident: code.tobytes()}, 3)
    assert before != after
    labels = {**tiny["labels"], ident: 4}
    stop, answers, problems = threading.Event(), [], []

    def searcher():
        while not stop.is_set():
            hits = service.search(code[None], 1000, 3)
            got = sorted((h.distance, h.id) for h in hits)
            answers.append(got == after)
            if got not in (before, after):
                problems.append(got)
            for h in hits:
                if h.label != CLASSES[labels[h.id]]:
                    problems.append((h.id, h.label))

    threads = [threading.Thread(target=searcher) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        for _ in range(20):
            assert service.add_item(png, label="4", ident=ident) == ident
            service.remove_item(ident)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        service.close()
    assert problems == [] and len(answers) > 0
    assert set(HashIndex.load(tiny["index"]).ids.tolist()) == set(tiny["items"])


def test_the_token_comes_from_a_file_or_a_named_environment_variable(tmp_path, monkeypatch):
    from deephash.serve.cli import read_token

    (tmp_path / "token").write_text(f"{TOKEN}\n")
    assert read_token(str(tmp_path / "token"), None) == TOKEN
    monkeypatch.setenv("DEEPHASH_WRITE_TOKEN", TOKEN)
    assert read_token(None, "DEEPHASH_WRITE_TOKEN") == TOKEN
    assert read_token(None, None) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(Exception, match="token file .* is empty"):
        read_token(str(tmp_path / "empty"), None)
    with pytest.raises(Exception, match="environment variable UNSET_17 is empty or unset"):
        read_token(None, "UNSET_17")
    with pytest.raises(Exception, match="cannot read the token file"):
        read_token(str(tmp_path / "absent"), None)
    from deephash.cli import build_parser

    with pytest.raises(SystemExit):  # there is no way to pass the token itself on the command line
        build_parser().parse_args(["serve", "idx", "--run", "run", "--token", TOKEN])


def test_a_writable_server_on_an_index_with_rerank_vectors_folds_and_unlocks_at_sigterm(tmp_path):
    """Bug: every fold of an index that keeps re-rank vectors failed (the second save of the folder
    hard-linked the old rerank.npy over the new one), and so did the shutdown fold, which then
    kept the lock. Here a real server folds after every second write and at SIGTERM."""
    import os
    import signal

    import httpx

    import helpers
    from deephash.retrieval.journal import IndexLock

    run_dir, index_dir, _ = tiny_digits_run(tmp_path, BITS, centred=True, model_extra={"rerank": "head"})
    before = HashIndex.load(index_dir)
    assert before.rerank_vectors is not None
    items = {int(i): c.tobytes() for i, c in zip(before.ids, before.codes)}
    start = max(items) + 1
    proc, base = helpers.start_server(index_dir, run_dir, tmp_path / "serve.log", "--token-env", "DEEPHASH_TEST_TOKEN",
                                      "--fold-every", "2", env={**os.environ, "DEEPHASH_TEST_TOKEN": TOKEN})
    try:
        rng = np.random.default_rng(3)
        pictures = rng.integers(0, 256, (2, 8, 8), dtype=np.uint8)
        added = []
        with httpx.Client(base_url=base, timeout=30) as client:
            for step, pixels in enumerate(pictures):  # add, delete it (the largest id: a fold), add again
                response = client.post("/api/items", files={"image": ("a.png", png_of(pixels), "image/png")},
                                       data={"label": "3"}, headers=AUTH)
                assert response.status_code == 201, response.text
                added.append(response.json()["id"])
                if step == 0:
                    assert client.delete(f"/api/items/{added[0]}", headers=AUTH).status_code == 204
        assert added == [start, start + 1]  # the deleted id is not handed out again
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(30)
    log = (tmp_path / "serve.log").read_text()
    assert status in (0, -signal.SIGTERM) and "Traceback" not in log and "FoldWarning" not in log, log[-3000:]
    after = HashIndex.load(index_dir)  # folded at shutdown: the journal is empty
    assert (index_dir / "journal.log").stat().st_size == 0 and after.journal_seq == 3 and after.next_id == start + 2
    items[start + 1] = code_of(run_dir, pictures[1]).tobytes()
    assert {int(i): c.tobytes() for i, c in zip(after.ids, after.codes)} == items
    assert after.rerank_vectors.shape == (len(items), BITS) and after.labels[-1] == 3
    with IndexLock(index_dir):  # released
        pass
