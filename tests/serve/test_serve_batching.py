"""Dynamic batching of the search service: the batcher's rules (size, queue bound, errors kept
apart), batched answers equal to one-at-a-time answers and to a brute-force search (two-stage
re-ranking included), and over HTTP: one batch for concurrent uploads, 503 + Retry-After past
``max_queue`` searches at once, and recovery; an encoder without a run (numpy only)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from helpers import DIGIT_CLASSES, png_of, tiny_digits_run

from deephash import runs
from deephash.errors import DeephashError, NotFoundError
from deephash.retrieval.index import HashIndex
from deephash.serve.app import create_app
from deephash.serve.batcher import DynamicBatcher, QueueFullError
from deephash.serve.encoder import ImageEncoder, TorchEncoder
from deephash.serve.service import SearchRequest, SearchService, UnsupportedImageError

BITS = 12


def digits_run(root: Path, rerank: str | None) -> tuple[Path, Path]:
    """A tiny CNN on 8x8 digits with its hash bias centred (codes vary, many ties at 12 bits),
    ``rerank`` vectors kept or not, and an index of its train split."""
    run_dir, index_dir, _ = tiny_digits_run(root, BITS, centred=True, model_extra={"rerank": rerank} if rerank else None)
    return run_dir, index_dir
@pytest.fixture(scope="module", params=[None, "head"], ids=["codes", "two-stage"])
def tiny(request, tmp_path_factory):
    run_dir, index_dir = digits_run(tmp_path_factory.mktemp("batching"), request.param)
    index = HashIndex.load(index_dir)
    assert (index.rerank_vectors is not None) == (request.param is not None)
    _, config = runs.load_run(run_dir, device="cpu")
    pixels = runs.load_split(config, "test", run_dir).data[:40].numpy()[:, 0]
    return {"run": run_dir, "index": index_dir, "db": index, "pixels": pixels}



def brute_force(service: SearchService, code: np.ndarray, vector: np.ndarray | None, k: int,
                radius: int | None) -> list[tuple[int, int]]:
    """``(id, distance)`` of the answer by a full scan: Hamming distances by unpacked bits; with
    vectors, the nearest ``shortlist`` codes and every code tied with the last, ranked by the
    Euclidean distance of the vectors, then Hamming distance, then id."""
    db = service.index
    bits = np.unpackbits(db.codes, axis=1)[:, :BITS]
    distance = (bits != np.unpackbits(code.reshape(1, -1), axis=1)[:, :BITS]).sum(axis=1)
    ids = np.asarray(db.ids)
    keep = np.ones(len(ids), bool)
    if vector is not None:
        cut = np.sort(distance)[min(service.shortlist, len(ids)) - 1]
        keep &= distance <= cut
    if radius is not None:
        keep &= distance <= radius
    rows = np.flatnonzero(keep)
    if vector is not None:
        score = np.sqrt(((db.rerank_vectors[rows].astype(np.float32) - vector[None]) ** 2).sum(axis=1))
        order = sorted(rows.tolist(), key=lambda r: (score[rows.tolist().index(r)], distance[r], ids[r]))
    else:
        order = sorted(rows.tolist(), key=lambda r: (distance[r], ids[r]))
    return [(int(ids[r]), int(distance[r])) for r in order[:k]]


def mixed_requests(tiny: dict) -> list[SearchRequest]:
    """Uploads, item queries and hex-code queries of several k and radii, a corrupt upload and an
    unknown item."""
    pngs = [png_of(p) for p in tiny["pixels"]]
    ids = tiny["db"].ids
    out = [SearchRequest(k=10, image=pngs[i]) for i in range(12)]
    out += [SearchRequest(k=5, radius=3, image=pngs[12 + i]) for i in range(4)]
    out += [SearchRequest(k=7, item=int(ids[i * 13])) for i in range(6)]
    out += [SearchRequest(k=10, code=tiny["db"].codes[i * 7:i * 7 + 1].copy()) for i in range(4)]
    out += [SearchRequest(k=10, image=b"not an image"), SearchRequest(k=10, item=10**9)]
    return out


def test_a_batch_answers_each_request_as_it_alone_and_as_brute_force(tiny):
    service = SearchService.load(tiny["index"], tiny["run"])
    requests = mixed_requests(tiny)
    batched = service.answer_batch(requests)
    assert len(batched) == len(requests)
    for request, got in zip(requests, batched):
        if request.image == b"not an image":
            assert isinstance(got, UnsupportedImageError)
            continue
        if request.item == 10**9:
            assert isinstance(got, NotFoundError)
            continue
        assert got == service.answer(request)  # hits (ids, distances, labels) and the query's label
        if request.image is not None:
            code, vector = service.encode_query(request.image)
        elif request.item is not None:
            code, vector = service.item(request.item)[0], service.item_vector(request.item)
        else:
            code, vector = request.code, None
        expected = brute_force(service, code, vector, request.k, request.radius)
        assert [(h.id, h.distance) for h in got.hits] == expected
        if request.item is not None:
            position = int(np.flatnonzero(tiny["db"].ids == request.item)[0])
            assert got.label == DIGIT_CLASSES[int(tiny["db"].labels[position])]


def test_the_encoder_batch_equals_the_images_one_at_a_time(tiny):
    model, _ = runs.load_run(tiny["run"], device="cpu")
    encoder = TorchEncoder(model, (1, 8, 8))
    assert isinstance(encoder, ImageEncoder)
    images = tiny["pixels"][:, None]
    codes, vectors = encoder.encode(images)
    assert codes.dtype == np.uint8 and codes.shape == (40, 2)
    singles = [encoder.encode(images[i:i + 1]) for i in range(40)]
    assert np.array_equal(codes, np.concatenate([c for c, _ in singles]))
    if vectors is not None:
        assert vectors.dtype == np.float32 and vectors.shape[0] == 40
        np.testing.assert_allclose(vectors, np.concatenate([v for _, v in singles]), rtol=1e-5, atol=1e-5)


def _eager_reference(model: torch.nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Codes and vectors computed apart from the encoder: the model's own pass on pixels / 255,
    the sign (0 -> +1) by hand, packed most significant bit first."""
    with torch.no_grad():
        out, vectors = model.encode_with_rerank(torch.from_numpy(images).float() / 255)
    bits = out.numpy() >= 0
    return np.packbits(bits, axis=1, bitorder="big"), None if vectors is None else vectors.numpy()


@pytest.mark.parametrize("trace", [True, False], ids=["traced", "eager"])
def test_the_encoder_gives_the_models_own_codes_traced_or_not(tiny, trace):
    model, _ = runs.load_run(tiny["run"], device="cpu")
    encoder = TorchEncoder(model, (1, 8, 8), trace=trace)
    assert (encoder.graph is not None) == trace  # this model traces to one graph
    images = tiny["pixels"][:, None]
    for n in (1, 2, 7, 40):  # batch sizes other than the trace's own
        codes, vectors = encoder.encode(images[:n])
        want_codes, want_vectors = _eager_reference(model, images[:n])
        assert np.array_equal(codes, want_codes)
        if want_vectors is None:
            assert vectors is None
        else:
            assert vectors.dtype == np.float32 and np.array_equal(vectors, want_vectors)  # bit for bit


class _BatchSizeBranch(torch.nn.Module):
    """A model whose Python looks at the batch size: a trace records one branch only."""

    bits = 4

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x.flatten(1))
        return -out if x.shape[0] == 2 else out  # 2 is the trace's own batch size


class _NotTraceable(_BatchSizeBranch):
    """A model that fails under the tracer (as one using an op the tracer cannot record would)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            raise RuntimeError("this op cannot be traced")
        return self.linear(x.flatten(1))


@pytest.mark.parametrize("model_class", [_BatchSizeBranch, _NotTraceable])
def test_a_model_that_does_not_trace_alike_is_served_eagerly(model_class, caplog):
    torch.manual_seed(0)
    model = model_class().eval()
    with caplog.at_level("WARNING", logger="deephash.serve"):
        encoder = TorchEncoder(model, (1, 8, 8))
    assert encoder.graph is None and "does not trace" in caplog.text
    images = np.random.default_rng(0).integers(0, 256, (5, 1, 8, 8), dtype=np.uint8)
    for n in (1, 2, 5):
        with torch.no_grad():
            out = model(torch.from_numpy(images[:n]).float() / 255).numpy()
        codes, vectors = encoder.encode(images[:n])
        assert vectors is None and np.array_equal(codes, np.packbits(out >= 0, axis=1, bitorder="big"))


# ------------------------------------------------------------------------------ the batcher


class Gate:
    """A batch function that records its batches and holds the first one until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, items):
        self.batches.append(list(items))
        self.entered.set()
        self.release.wait(30)
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]


async def until(condition, seconds: float = 30) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_batches_close_at_max_batch_and_errors_stay_with_their_request():
    async def scenario():
        gate = Gate()
        batcher = DynamicBatcher(gate, max_batch=4, wait_s=0.0, max_queue=100, threads=1).start()
        try:
            first = asyncio.ensure_future(batcher.submit(1))
            await until(gate.entered.is_set)  # the worker holds batch [1]
            rest = [asyncio.ensure_future(batcher.submit(i)) for i in (2, -3, 4, 5, 6, 7, 8, 9)]
            await until(lambda: batcher.depth == 8)
            gate.release.set()
            assert await first == 10
            outcomes = await asyncio.gather(*rest, return_exceptions=True)
        finally:
            batcher.close()
        assert gate.batches == [[1], [2, -3, 4, 5], [6, 7, 8, 9]]
        assert [o if isinstance(o, int) else str(o) for o in outcomes] == [20, "bad -3", 40, 50, 60, 70, 80, 90]
        stats = batcher.stats()
        assert (stats["batches"], stats["requests"], stats["largest_batch"], stats["shed"]) == (3, 9, 4, 0)
        assert stats["mean_batch_size"] == 3.0 and stats["batch_sizes"] == {"1": 1, "4": 2}

    asyncio.run(scenario())


def test_a_full_queue_refuses_at_once_and_recovers():
    async def scenario():
        gate = Gate()
        batcher = DynamicBatcher(gate, max_batch=8, wait_s=0.0, max_queue=3, threads=1).start()
        try:
            held = asyncio.ensure_future(batcher.submit(1))
            await until(gate.entered.is_set)
            queued = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3, 4)]
            await until(lambda: batcher.depth == 3)
            with pytest.raises(QueueFullError, match="queue is full"):
                await batcher.submit(5)  # refused without waiting: the worker is still held
            assert batcher.stats()["queue_depth"] == 3 and batcher.stats()["shed"] == 1
            gate.release.set()
            assert await held == 10 and await asyncio.gather(*queued) == [20, 30, 40]
            assert await batcher.submit(6) == 60  # room again
        finally:
            batcher.close()
        assert gate.batches == [[1], [2, 3, 4], [6]]

    asyncio.run(scenario())


def test_two_threads_run_two_batches_at_once():
    """While one thread holds its batch, the other takes the next one."""
    async def scenario():
        gate = Gate()
        running = threading.Semaphore(0)

        def process(items):
            running.release()
            return gate(items)

        batcher = DynamicBatcher(process, max_batch=2, wait_s=0.0, max_queue=10, threads=2).start()
        try:
            first = asyncio.ensure_future(batcher.submit(1))
            await until(gate.entered.is_set)
            second = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]
            await until(lambda: len(gate.batches) == 2)  # the second thread took [2, 3] while [1] is held
            assert not first.done()
            gate.release.set()
            assert await first == 10 and await asyncio.gather(*second) == [20, 30]
        finally:
            batcher.close()
        assert sorted(gate.batches) == [[1], [2, 3]] and batcher.stats()["threads"] == 2

    asyncio.run(scenario())


def test_a_batch_waits_for_more_only_until_full():
    """With a wait far longer than the test, a batch that fills closes at once."""
    async def scenario():
        seen = []
        batcher = DynamicBatcher(lambda items: seen.append(list(items)) or list(items), max_batch=3, wait_s=600,
                                 max_queue=10).start()
        try:
            got = await asyncio.wait_for(asyncio.gather(*(batcher.submit(i) for i in range(3))), timeout=60)
        finally:
            batcher.close()
        assert got == [0, 1, 2] and seen == [[0, 1, 2]]

    asyncio.run(scenario())


def test_bad_settings_are_refused():
    for kwargs, message in (({"max_batch": 0}, "max_batch"), ({"wait_s": -1}, "wait"), ({"max_queue": 0}, "max_queue"),
                            ({"threads": 0}, "worker thread")):
        with pytest.raises(DeephashError, match=message):
            DynamicBatcher(lambda items: items, **kwargs)


# ------------------------------------------------------------------------------ over HTTP


async def post_all(app, bodies: list[dict]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await asyncio.gather(*(client.post("/api/search", **body) for body in bodies))


def test_concurrent_uploads_share_one_batch_and_get_the_one_at_a_time_answers(tiny):
    bodies = [{"files": {"image": ("q.png", png_of(p), "image/png")}, "data": {"k": "10"}} for p in tiny["pixels"][:16]]
    bodies += [{"json": {"id": int(tiny["db"].ids[5]), "k": 4}}, {"json": {"code": "abc", "k": 4}}]
    one = create_app(tiny["index"], tiny["run"], max_batch=1)
    alone = asyncio.run(post_all(one, bodies))
    batched_app = create_app(tiny["index"], tiny["run"], max_batch=17, batch_wait_ms=600_000)
    batched = asyncio.run(post_all(batched_app, bodies))
    assert [r.status_code for r in alone] == [200] * 17 + [422]
    assert [r.status_code for r in batched] == [200] * 17 + [422]  # a bad code never reaches the queue
    for a, b in zip(alone[:17], batched[:17]):
        assert a.json()["results"] == b.json()["results"] and a.json()["query"] == b.json()["query"]
    transport = httpx.ASGITransport(app=batched_app)

    async def health():
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return (await client.get("/api/health")).json()

    batching = asyncio.run(health())["batching"]
    assert batching["batch_sizes"] == {"17": 1} and batching["queue_depth"] == 0 and batching["max_batch"] == 17


class HeldService(SearchService):
    """Holds its first batch until released."""

    gate: Gate

    def answer_batch(self, requests):
        self.gate.entered.set()
        self.gate.release.wait(30)
        return super().answer_batch(requests)


def test_past_max_queue_searches_are_answered_503_with_retry_after_then_recover(tiny):
    """One search held in its batch and two waiting make three admitted: the fourth is refused."""
    service = SearchService.load(tiny["index"], tiny["run"])
    service.__class__ = HeldService
    service.gate = Gate()
    app = create_app(tiny["index"], tiny["run"], service=service, max_batch=4, batch_wait_ms=0, max_queue=3,
                     batch_threads=1)
    body = {"json": {"code": "0000", "k": 3}}

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            held = asyncio.ensure_future(client.post("/api/search", **body))
            await until(service.gate.entered.is_set)
            queued = [asyncio.ensure_future(client.post("/api/search", **body)) for _ in range(2)]
            await until(lambda: app.state.batcher.depth == 2)
            refused = await client.post("/api/search", **body)
            depth = (await client.get("/api/health")).json()["batching"]
            service.gate.release.set()
            answers = [await held] + list(await asyncio.gather(*queued))
            after = await client.post("/api/search", **body)
            return refused, depth, answers, after

    refused, depth, answers, after = asyncio.run(scenario())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "limit of 3 searches at once" in refused.json()["detail"]
    assert refused.headers["x-content-type-options"] == "nosniff" and "content-security-policy" in refused.headers
    assert depth["queue_depth"] == 2 and depth["shed"] == 1 and depth["admitted"] == 3
    assert [a.status_code for a in answers] == [200, 200, 200] and after.status_code == 200
    assert answers[0].json()["results"] == after.json()["results"]


class ThresholdEncoder:
    """A numpy encoder (no torch): bit j is whether pixel ``PIXELS[j]`` is over 127."""

    bits = BITS
    input_shape = (1, 8, 8)
    name = "threshold"
    PIXELS = np.arange(0, 64, 5)[:BITS]

    def __init__(self) -> None:
        self.calls: list[int] = []

    def encode(self, images):
        self.calls.append(len(images))
        bits = images.reshape(len(images), -1)[:, self.PIXELS] > 127
        return np.packbits(bits, axis=1, bitorder="big"), None


def test_an_encoder_without_a_run_serves_and_is_called_once_per_batch(tiny):
    encoder = ThresholdEncoder()
    assert isinstance(encoder, ImageEncoder)
    service = SearchService.load(tiny["index"], None, encoder=encoder)
    assert service.info()["model"] == "threshold" and service.info()["classes"] == DIGIT_CLASSES
    requests = [SearchRequest(k=6, image=png_of(p)) for p in tiny["pixels"][:9]]
    answers = service.answer_batch(requests)
    assert encoder.calls == [9]
    for pixels, answer in zip(tiny["pixels"][:9], answers):
        code = np.packbits(pixels.reshape(-1)[ThresholdEncoder.PIXELS] > 127, bitorder="big")
        assert [(h.id, h.distance) for h in answer.hits] == brute_force(service, code, None, 6, None)
    with pytest.raises(DeephashError, match="run directory or an encoder"):
        SearchService.load(tiny["index"], None)
