"""Encoder processes (``deephash serve --encode-processes N``): the event-loop batcher's rules,
answers equal to the in-process service's, a dead child answered 503 and replaced, an exported
model's children without torch; and the one-pass multipart form parser against httpx's encoder."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from helpers import png_of, tiny_digits_run

from deephash import runs
from deephash.errors import DeephashError
from deephash.runs.export import export_run
from deephash.serve.app import create_app
from deephash.serve.batcher import AsyncBatcher, QueueFullError
from deephash.serve.form import FormError, parse_form

BITS = 12


# ------------------------------------------------------------------------------ the event-loop batcher


class Recorder:
    """An async batch function that records its batches and how many ran at once; an item < 0 is
    that item's own error, the item 99 fails the whole batch."""

    def __init__(self, hold_s: float = 0.02) -> None:
        self.batches: list[list[int]] = []
        self.running = self.most_running = 0
        self.hold_s = hold_s

    async def __call__(self, items):
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        self.batches.append(list(items))
        await asyncio.sleep(self.hold_s)
        self.running -= 1
        if 99 in items:
            raise RuntimeError("the whole batch failed")
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]


def test_the_async_batcher_gathers_bounds_and_keeps_errors_apart():
    async def scenario():
        process = Recorder()
        batcher = AsyncBatcher(process, max_batch=4, wait_s=0.01, max_queue=6, concurrency=1)
        first = [asyncio.ensure_future(batcher.submit(i)) for i in (1, -2, 3, 4, 5, 6)]
        await asyncio.sleep(0)  # all six queued: one batch of 4 starts at once (full), 2 wait
        with pytest.raises(QueueFullError):  # 2 waiting + 4 more would pass max_queue = 6
            await asyncio.gather(*[batcher.submit(i) for i in (7, 8, 9, 10, 11)])
        outcomes = await asyncio.gather(*first, return_exceptions=True)
        assert outcomes[0] == 10 and outcomes[2:] == [30, 40, 50, 60]
        assert isinstance(outcomes[1], ValueError) and str(outcomes[1]) == "bad -2"
        assert process.batches[0] == [1, -2, 3, 4] and all(len(b) <= 4 for b in process.batches)
        assert process.most_running == 1
        failing = await asyncio.gather(batcher.submit(98), batcher.submit(99), return_exceptions=True)
        assert all(isinstance(o, RuntimeError) for o in failing)  # one batch: both get its error
        stats = batcher.stats()
        assert stats["shed"] >= 1 and stats["largest_batch"] == 4 and stats["threads"] == 1
        assert stats["requests"] == sum(len(b) for b in process.batches)
        await batcher.aclose()
        with pytest.raises(DeephashError, match="shutting down"):
            await batcher.submit(1)

    asyncio.run(scenario())


def test_the_async_batcher_waits_for_more_then_runs_batches_side_by_side():
    async def scenario():
        process = Recorder(hold_s=0.05)
        batcher = AsyncBatcher(process, max_batch=8, wait_s=60, max_queue=64, concurrency=2)
        first = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 8)]
        await asyncio.sleep(0.05)
        assert process.batches == []  # a batch not full waits (up to wait_s) for more
        assert await batcher.submit(8) == 80 and process.batches == [list(range(1, 9))]  # full: it starts at once
        assert [f.result() for f in first] == [10, 20, 30, 40, 50, 60, 70]
        batcher.wait_s = 0.001
        results = await asyncio.gather(*[batcher.submit(i) for i in range(2, 26)])
        assert results == [i * 10 for i in range(2, 26)]
        assert process.most_running == 2  # two slots: two batches at once, never more
        assert sorted(i for b in process.batches[1:] for i in b) == list(range(2, 26))
        waiting = [asyncio.ensure_future(batcher.submit(i)) for i in range(30, 33)]
        await asyncio.sleep(0)
        await batcher.aclose()  # answers what waits before it returns
        assert [w.result() for w in waiting] == [300, 310, 320]

    asyncio.run(scenario())


# ------------------------------------------------------------------------------ the form parser


def _multipart(data: dict, files: dict) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/", data=data, files=files)
    return request.read(), request.headers["content-type"]


def test_the_form_parser_reads_what_httpx_encodes():
    png = png_of(np.arange(64, dtype=np.uint8).reshape(8, 8))
    body, kind = _multipart({"k": "7", "radius": "2", "label": "héllo"}, {"image": ("q.png", png, "image/png")})
    fields, files = parse_form(body, kind)
    assert fields == {"k": "7", "radius": "2", "label": "héllo"} and files == {"image": png}
    body, kind = _multipart({}, {"image": ("a.bin", bytes(range(256)) * 40, "application/octet-stream")})
    assert parse_form(body, kind) == ({}, {"image": bytes(range(256)) * 40})  # any bytes, CRLF included



def _starlette_form(body: bytes, content_type: str) -> tuple[dict, dict]:
    """What Starlette's own streamed form parser reads from the same body (the oracle)."""
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartParser

    async def stream():
        yield body

    async def read():
        form = await MultiPartParser(Headers({"content-type": content_type}), stream()).parse()
        fields, files = {}, {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                files[key] = await value.read()
            else:
                fields[key] = value
        return fields, files

    return asyncio.run(read())


@pytest.mark.parametrize("body, kind", [
    (b"--x\r\nContent-Disposition: form-data; name=k\r\n\r\n3\r\n--x\r\nContent-Disposition: form-data; name=k"
     b"\r\n\r\n5\r\n--x\r\nContent-Disposition: form-data; name=label\r\n\r\ncaf\xe9\r\n--x--\r\n",
     "multipart/form-data; boundary=x"),  # a repeated field, a Latin-1 value
    (b"--x\r\nContent-Disposition: form-data; name=label\r\n\r\ncaf\xe9\r\n--x\r\nContent-Disposition: form-data; "
     b"name=image; filename=\"\"\r\n\r\n\r\n--x--\r\n", "multipart/form-data; charset=latin-1; boundary=x"),  # charset, empty file
    (*_multipart({"k": "4"}, {"image": ("q.png", b"\x89PNG\r\n--x\r\n", "image/png")}),),
])
def test_the_form_parser_reads_as_starlettes_form_does(body, kind):
    assert parse_form(body, kind) == _starlette_form(body, kind)


@pytest.mark.parametrize("make, message", [
    (lambda: (b"--x\r\nContent-Disposition: form-data\r\n\r\nv\r\n--x--\r\n", "multipart/form-data; boundary=x"), "no name"),
    (lambda: (b"garbage", "multipart/form-data"), "boundary"),
    (lambda: _multipart({}, {"image": ("a", b"1", "x"), "other": ("b", b"2", "x")}), "too many files"),
    (lambda: _multipart({str(i): "v" for i in range(9)}, {"image": ("a", b"1", "x")}), "too many fields"),
])
def test_the_form_parser_refuses_bad_forms(make, message):
    body, kind = make()
    with pytest.raises(FormError, match=message):
        parse_form(body, kind)


# ------------------------------------------------------------------------------ the service


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode-processes")
    run_dir, index_dir, config = tiny_digits_run(root, BITS, centred=True, model_extra={"rerank": "head"})
    pixels = runs.load_split(config, "test", run_dir).data[:12].numpy()[:, 0]
    return {"root": root, "run": run_dir, "index": index_dir, "pngs": [png_of(p) for p in pixels]}


def _search(client, png: bytes | None = None, item: int | None = None, k: int = 6):
    if png is not None:
        return client.post("/api/search", files={"image": ("q.png", png, "image/png")}, data={"k": str(k)})
    return client.post("/api/search", json={"id": item, "k": k})


def _answers(app, pngs):
    with TestClient(app) as client:
        got = [_search(client, png).json()["results"] for png in pngs]
        got.append(_search(client, item=3).json()["results"])
        refused = [_search(client, data) for data in (b"not an image at all", pngs[0][:60])]
        return got, [(r.status_code, r.json()["detail"]) for r in refused]


def test_encoder_processes_answer_as_the_service_in_process(digits):
    want = _answers(create_app(digits["index"], digits["run"]), digits["pngs"])
    app = create_app(digits["index"], digits["run"], encode_processes=2)
    assert app.state.encoder_processes.processes == 2
    got = _answers(app, digits["pngs"])
    assert got == want  # hits (ids, distances, labels; two-stage re-ranked) and the refused uploads' errors
    assert [status for status, _ in got[1]] == [415, 400]  # not an image; a truncated PNG


def test_a_dead_encoder_process_is_answered_503_and_replaced(digits):
    app = create_app(digits["index"], digits["run"], encode_processes=1)
    with TestClient(app) as client:
        (child,) = app.state.encoder_processes._children
        assert _search(client, digits["pngs"][0]).status_code == 200
        os.kill(child.process.pid, signal.SIGKILL)
        child.process.join(10)
        failed = _search(client, digits["pngs"][0])
        assert failed.status_code == 503 and "encoder process ended" in failed.json()["detail"]
        assert _search(client, item=3).status_code == 200  # searches without an upload go on
        again = _search(client, digits["pngs"][0])  # the next batch starts a new child first
        assert again.status_code == 200 and len(again.json()["results"]) == 6
        (fresh,) = app.state.encoder_processes._children
        assert fresh is not child and fresh.process.is_alive()
    assert not fresh.process.is_alive()  # shutdown stops the children


def test_a_child_that_cannot_be_restarted_is_retried_by_the_next_batch(digits, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(digits["run"], run_dir)
    app = create_app(digits["index"], run_dir, encode_processes=1)
    with TestClient(app) as client:
        (child,) = app.state.encoder_processes._children
        os.kill(child.process.pid, signal.SIGKILL)
        child.process.join(10)
        assert _search(client, digits["pngs"][1]).status_code == 503
        run_dir.rename(tmp_path / "away")  # a new child cannot load the run now
        refused = _search(client, digits["pngs"][1])
        assert refused.status_code == 503 and "could not be restarted" in refused.json()["detail"]
        (tmp_path / "away").rename(run_dir)
        again = _search(client, digits["pngs"][1])
        assert again.status_code == 200 and len(again.json()["results"]) == 6


def test_encoder_processes_refuse_what_they_cannot_build(digits):
    with pytest.raises(DeephashError, match="run or an exported model"):
        create_app(digits["index"], encoder=create_app(digits["index"], digits["run"]).state.service.encoder,
                   encode_processes=1)
    with pytest.raises(DeephashError, match=">= 0"):
        create_app(digits["index"], digits["run"], encode_processes=-1)


#: An exported model served with encoder processes in a fresh interpreter: answers, and whether
#: torch was imported in the server or in its child (read from the child's memory map).
ONNX_CLIENT = """
import json, sys
from pathlib import Path
from fastapi.testclient import TestClient
from deephash.serve.app import create_app

index, model, png = sys.argv[1:]
app = create_app(index, model_dir=model, encode_processes=1)
with TestClient(app) as client:
    found = client.post("/api/search", files={"image": ("q.png", Path(png).read_bytes(), "image/png")}, data={"k": "4"})
    (child,) = app.state.encoder_processes._children
    maps = Path(f"/proc/{child.process.pid}/maps").read_text()
    print(json.dumps({"status": found.status_code, "results": found.json()["results"], "torch": "torch" in sys.modules,
                      "child_torch": "libtorch" in maps, "child_onnxruntime": "onnxruntime" in maps}))
"""


def test_an_exported_models_encoder_processes_run_without_torch(digits, tmp_path):
    export_run(digits["run"], tmp_path / "onnx")
    png = tmp_path / "q.png"
    png.write_bytes(digits["pngs"][0])
    done = subprocess.run([sys.executable, "-c", ONNX_CLIENT, str(digits["index"]), str(tmp_path / "onnx"), str(png)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["status"] == 200 and len(report["results"]) == 4
    assert report["torch"] is False and report["child_torch"] is False and report["child_onnxruntime"] is True


def test_a_hung_child_is_killed_after_the_batch_timeout_and_replaced(digits):
    from deephash.serve.encode_process import EncoderProcessError, EncoderProcesses, EncoderSource

    service = create_app(digits["index"], digits["run"]).state.service
    source = EncoderSource(tuple(service.input_shape), service.crop_fraction, run_dir=str(digits["run"]))
    processes = EncoderProcesses(source, processes=1, timeout_s=2.0)
    try:
        (child,) = processes._children

        async def twice():
            os.kill(child.process.pid, signal.SIGSTOP)  # alive, but it will never answer
            with pytest.raises(EncoderProcessError, match="no answer within 2 s"):
                await processes.encode_uploads([digits["pngs"][2]])
            return await processes.encode_uploads([digits["pngs"][2], b"junk"])

        (code, vector), refused = asyncio.run(twice())
        assert not child.process.is_alive() and processes._children[0] is not child
        want_code, want_vector = service.encode_query(digits["pngs"][2])
        assert np.array_equal(code, want_code) and np.allclose(vector, want_vector)
        assert isinstance(refused, DeephashError) and "image" in str(refused).lower()
    finally:
        processes.close()
