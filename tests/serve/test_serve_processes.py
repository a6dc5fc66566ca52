"""Real ``deephash serve`` processes on loopback: batched searches answer as one-at-a-time ones,
``--workers 2`` read-only processes both answer and reload a snapshot folded by a writer, and
``--workers > 1`` with a write token is refused."""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx
import numpy as np
import pytest

from helpers import png_of, start_server, stop, tiny_digits_run

from deephash import runs
from deephash.errors import DeephashError
from deephash.retrieval.living import LivingIndex
from deephash.serve.cli import add_arguments
from deephash.serve.service import SearchRequest, SearchService

pytestmark = [pytest.mark.timeout(300)]



async def searches(base: str, pngs: list[bytes]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        return await asyncio.gather(*(client.post("/api/search", files={"image": ("q.png", p, "image/png")},
                                                  data={"k": "10"}) for p in pngs))


def served_alone(tmp_path, n: int) -> tuple:
    """A tiny digits run, its index, ``n`` query PNGs, the service in this process and its answers."""
    run_dir, index_dir, config = tiny_digits_run(tmp_path, 12, centred=True)
    pixels = runs.load_split(config, "test", run_dir).data[:n].numpy()[:, 0]
    pngs = [png_of(p) for p in pixels]
    alone = SearchService.load(index_dir, run_dir)
    return run_dir, index_dir, pngs, alone, [alone.answer(SearchRequest(k=10, image=p)) for p in pngs]


def test_two_read_only_processes_answer_and_reload_a_fold(tmp_path):
    run_dir, index_dir, pngs, alone, expected = served_alone(tmp_path, 24)
    proc, base = start_server(index_dir, run_dir, tmp_path / "server.log", "--workers", "2", "--max-batch", "8",
                              "--batch-wait-ms", "5", "--reload-s", "0.2")
    try:
        pids: set[int] = set()
        deadline = time.monotonic() + 120
        while len(pids) < 2 and time.monotonic() < deadline:  # each a new connection: either process takes it
            pids.add(httpx.get(f"{base}/api/health", timeout=10).json()["pid"])
            time.sleep(0.05)
        assert len(pids) == 2, f"only {pids} answered"
        frozen = {}
        while len(frozen) < 2 and time.monotonic() < deadline:
            health = httpx.get(f"{base}/api/health", timeout=10).json()
            frozen[health["pid"]] = health["gc_frozen"]
        assert all(count > 10_000 for count in frozen.values()), frozen  # each process froze what it loaded
        for response, answer in zip(asyncio.run(searches(base, pngs)), expected):
            assert [(r["id"], r["distance"]) for r in response.json()["results"]] == [(h.id, h.distance) for h in answer.hits]

        living = LivingIndex(index_dir, holder="test writer").open()  # the one writer, in another process
        try:
            living.add(alone.index.codes[:1], ids=[777_777], labels=np.array([3]))
            living.fold()
        finally:
            living.close()
        size = len(alone.index.ids) + 1
        seen: dict[int, int] = {}
        deadline = time.monotonic() + 60
        while (len(seen) < 2 or set(seen.values()) != {size}) and time.monotonic() < deadline:
            health = httpx.get(f"{base}/api/health", timeout=10).json()
            seen[health["pid"]] = health["size"]
            time.sleep(0.05)
        assert seen == {pid: size for pid in pids}
        found = httpx.post(f"{base}/api/search", json={"id": 777_777, "k": 1}, timeout=10)
        assert found.status_code == 200 and found.json()["query"]["label"] == "3"
    finally:
        stop(proc)


def test_several_processes_with_a_write_token_are_refused(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.setenv("SERVE_TOKEN", "secret-token")
    args = parser.parse_args([str(tmp_path), "--run", str(tmp_path), "--workers", "2", "--token-env", "SERVE_TOKEN"])
    with pytest.raises(DeephashError, match="--workers > 1 serves read-only"):
        args.handler(args)


def test_the_cli_serves_with_encoder_processes(tmp_path):
    run_dir, index_dir, pngs, _, expected = served_alone(tmp_path, 16)
    proc, base = start_server(index_dir, run_dir, tmp_path / "server.log", "--encode-processes", "2", "--max-batch", "8",
                              "--batch-wait-ms", "1000")  # a batch short of 8 waits 1 s for more: 16 at once gather
    try:
        for response, answer in zip(asyncio.run(searches(base, pngs)), expected):
            assert [(r["id"], r["distance"]) for r in response.json()["results"]] == [(h.id, h.distance) for h in answer.hits]
        health = httpx.get(f"{base}/api/health", timeout=10).json()
        assert health["encode_processes"] == 2 and health["batching"]["threads"] == 2
        assert health["batching"]["requests"] == 16 and health["batching"]["largest_batch"] > 1  # gathered
    finally:
        stop(proc)
