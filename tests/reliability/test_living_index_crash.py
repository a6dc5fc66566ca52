"""Crash test of the living index: a real ``deephash serve`` subprocess on loopback takes adds and
removes from a client while searches run, and is SIGKILLed at a random moment.

Rounds chain: each round's client (seeded) adds up to 300 items and removes some; the server is
killed after a seeded number of acknowledged writes plus a seeded 0-80 ms (so mid-request, mid-fsync
or mid-fold); the restarted server is checked and serves the next round. After each restart every
acknowledged add is present (same code, label and image, found by a search) and every
acknowledged remove absent; the one write in flight at the kill is either wholly there or wholly
absent; nothing else appears; and the index answers exactly as a brute-force Hamming search over
the expected items. ``DEEPHASH_CRASH_SEEDS=N`` runs seeds 0..N-1 (default 3).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import helpers

from helpers import png_of, tiny_digits_run

from deephash import runs
from deephash.retrieval.index import HashIndex

pytestmark = [pytest.mark.slow]

BITS = 12
CLASSES = [str(d) for d in range(10)]
TOKEN = "crash-test-token-51c3"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
N_ADDS = 300
SEEDS = list(range(int(os.environ.get("DEEPHASH_CRASH_SEEDS", "3"))))
pytestmark.append(pytest.mark.timeout(120 + 60 * len(SEEDS)))


def tiny_run(root: Path) -> tuple[Path, Path]:
    """A tiny CNN on scikit-learn's 8x8 digits, its hash layer's bias centred so that codes vary
    (an untrained one gives every image one code), and an index over the train split."""
    return tiny_digits_run(root, BITS, centred=True)[:2]



def start_server(index_dir: Path, run_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """``deephash serve`` with writes enabled (token from the environment); waits for /healthz."""
    return helpers.start_server(index_dir, run_dir, log, "--token-env", "DEEPHASH_TEST_TOKEN", "--fold-every", "40",
                                env={**os.environ, "DEEPHASH_TEST_TOKEN": TOKEN})


def brute(query: np.ndarray, items: dict[int, bytes]) -> list[tuple[int, int]]:
    q = np.unpackbits(query)[:BITS]
    return sorted((int((np.unpackbits(np.frombuffer(c, np.uint8))[:BITS] != q).sum()), i) for i, c in items.items())


class Round:
    """One seeded client session against a running server, until the server is killed."""

    def __init__(self, seed: int, model, issued: set[int]) -> None:
        self.seed = seed
        self.issued = issued  # every id the index held or an add was answered with, in any round
        self.rng = np.random.default_rng(seed)
        self.pictures = self.rng.integers(0, 256, (N_ADDS, 8, 8), dtype=np.uint8)
        with torch.inference_mode():
            signs = model.encode(torch.from_numpy(self.pictures)[:, None].float() / 255)
        self.codes = np.packbits(signs.numpy() > 0, axis=1)
        self.labels = self.rng.integers(0, 10, N_ADDS)
        self.kill_after = int(self.rng.integers(10, N_ADDS))  # acknowledged writes before the kill
        self.kill_delay = float(self.rng.uniform(0, 0.08))  # an add takes ~50 ms: any phase of the next request
        self.added: dict[int, int] = {}  # id -> picture row, acknowledged and not removed since
        self.removed: set[int] = set()  # acknowledged
        self.in_flight: list[tuple[str, int]] = []  # the write sent when the server died
        self.adds = self.removes = 0
        self.errors: list[str] = []

    def run(self, proc: subprocess.Popen, base: str, present: list[int]) -> None:
        """Write and search until the kill; ``present``: the ids in the index at the start."""
        stop = threading.Event()
        pool = set(present)

        def writer():
            client = httpx.Client(base_url=base, timeout=30)
            row = 0
            while row < N_ADDS and not stop.is_set():
                if self.rng.random() < 0.2 and pool:
                    choices = sorted(self.added) if self.added and self.rng.random() < 0.7 else sorted(pool)
                    victim = int(choices[int(self.rng.integers(len(choices)))])
                    self.in_flight[:] = [("remove", victim)]
                    try:
                        response = client.delete(f"/api/items/{victim}", headers=AUTH)
                    except httpx.HTTPError:
                        return
                    if response.status_code != 204:
                        self.errors.append(response.text)
                        return
                    self.removed.add(victim)
                    self.added.pop(victim, None)
                    pool.discard(victim)
                    self.removes += 1
                else:
                    self.in_flight[:] = [("add", row)]
                    try:
                        response = client.post("/api/items", files={"image": ("a.png", png_of(self.pictures[row]), "image/png")},
                                               data={"label": str(self.labels[row])}, headers=AUTH)
                    except httpx.HTTPError:
                        return
                    if response.status_code != 201:
                        self.errors.append(response.text)
                        return
                    ident = response.json()["id"]
                    if ident in self.issued:  # default ids come from the id mark: never one handed out before
                        self.errors.append(f"id {ident} was handed out twice")
                        return
                    self.issued.add(ident)
                    self.added[ident] = row
                    row += 1
                    self.adds += 1
                self.in_flight.clear()

        def searcher(k: int):
            client = httpx.Client(base_url=base, timeout=30)
            local = np.random.default_rng(self.seed * 100 + k)
            while not stop.is_set():
                query = np.packbits(local.integers(0, 2, (1, BITS)).astype(bool), axis=1)
                try:
                    response = client.post("/api/search", json={"code": query.tobytes().hex(), "k": 20})
                except httpx.HTTPError:
                    return
                distances = [r["distance"] for r in response.json()["results"]] if response.status_code == 200 else None
                if distances is None or distances != sorted(distances) or len(distances) != 20:
                    self.errors.append(f"search answered {response.status_code}: {response.text[:200]}")
                    return

        threads = [threading.Thread(target=writer)] + [threading.Thread(target=searcher, args=(k,)) for k in range(2)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        try:
            while self.adds + self.removes < self.kill_after and threads[0].is_alive():
                time.sleep(0.0005)
            time.sleep(self.kill_delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            self.seconds = time.perf_counter() - started
        finally:
            stop.set()
            for t in threads:
                t.join(60)


def test_acknowledged_writes_survive_sigkill(tmp_path):
    run_dir, index_dir = tiny_run(tmp_path)
    model, _ = runs.load_run(run_dir, device="cpu")
    original = HashIndex.load(index_dir)
    expected = {int(i): c.tobytes() for i, c in zip(original.ids, original.codes)}
    expected_labels = dict(zip(original.ids.tolist(), original.labels.tolist()))
    log = tmp_path / "server.log"
    proc, base = start_server(index_dir, run_dir, log)
    issued = set(expected)
    try:
        for seed in SEEDS:
            r = Round(seed, model, issued)
            r.run(proc, base, sorted(expected))
            assert r.errors == [], r.errors
            for ident, row in r.added.items():
                expected[ident], expected_labels[ident] = r.codes[row].tobytes(), int(r.labels[row])
            for ident in r.removed:
                expected.pop(ident, None)
            proc, base = start_server(index_dir, run_dir, log)
            now = HashIndex.load(index_dir)
            state = {int(i): c.tobytes() for i, c in zip(now.ids, now.codes)}
            extra, missing = set(state) - set(expected), set(expected) - set(state)
            kind, which = r.in_flight[0] if r.in_flight else (None, None)
            if kind == "add":  # acknowledged or not, an add is there wholly or not at all
                assert len(extra) <= 1 and not missing
                for ident in extra:
                    assert state[ident] == r.codes[which].tobytes()
                    issued.add(ident)  # applied though never answered: its id is taken too
                    expected[ident], expected_labels[ident] = r.codes[which].tobytes(), int(r.labels[which])
                    r.added[ident] = which
            elif kind == "remove":
                assert not extra and missing <= {which}
                if missing:  # the unacknowledged remove went through
                    del expected[which]
                    r.added.pop(which, None)
            else:
                assert not extra and not missing
            assert state == expected
            assert dict(zip(now.ids.tolist(), now.labels.tolist())) == {i: expected_labels[i] for i in expected}
            assert httpx.get(f"{base}/api/info", timeout=10).json()["size"] == len(expected)
            queries = np.concatenate([r.codes[:3], np.packbits(r.rng.integers(0, 2, (3, BITS)).astype(bool), axis=1)])
            for query in queries:  # the brute-force oracle
                d, i = now.search(query[None], len(expected))
                assert sorted(zip(d[0].tolist(), i[0].tolist())) == brute(query, expected)
                body = httpx.post(f"{base}/api/search", json={"code": query.tobytes().hex(), "k": 1000, "radius": 2},
                                  timeout=30).json()
                assert sorted((x["distance"], x["id"]) for x in body["results"]) == [b for b in brute(query, expected) if b[0] <= 2][:1000]
            client = httpx.Client(base_url=base, timeout=30)
            for ident in r.rng.permutation(sorted(r.added))[:20].tolist():  # found by its image, with its label and image
                row = r.added[ident]
                body = client.post("/api/search", files={"image": ("q.png", png_of(r.pictures[row]), "image/png")},
                                   data={"k": "1000", "radius": "0"}).json()
                assert ident in [x["id"] for x in body["results"]]
                assert client.post("/api/search", json={"id": ident, "k": 1}).json()["query"]["label"] == CLASSES[int(r.labels[row])]
                image = client.get(f"/api/items/{ident}/image")
                assert image.status_code == 200
                np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.content))), r.pictures[row])
            for ident in sorted(r.removed - set(expected))[:20]:
                assert client.post("/api/search", json={"id": ident, "k": 1}).status_code == 404
                assert client.get(f"/api/items/{ident}/image").status_code == 404
            print(f"seed {seed}: killed after {r.adds} adds and {r.removes} removes acknowledged "
                  f"(armed at {r.kill_after} + {r.kill_delay * 1000:.1f} ms, {r.seconds:.1f} s), in flight: {r.in_flight or 'nothing'}, "
                  f"{'applied' if (extra or (kind == 'remove' and missing)) else 'not applied'}; "
                  f"{len(expected)} items after restart, oracle passed")
    finally:
        proc.terminate()  # a clean shutdown folds the journal into the snapshot
        assert proc.wait(30) in (0, -signal.SIGTERM), log.read_text()[-3000:]  # uvicorn re-raises SIGTERM after its shutdown
    folded = HashIndex.load(index_dir)
    assert {int(i): c.tobytes() for i, c in zip(folded.ids, folded.codes)} == expected
    journal = index_dir / "journal.log"
    assert not journal.exists() or journal.stat().st_size == 0
