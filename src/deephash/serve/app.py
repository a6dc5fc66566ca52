"""The HTTP search service: a FastAPI shell over :class:`~deephash.serve.service.SearchService`.

Endpoints: ``POST /api/search`` (an uploaded image, a hex code or a database item id),
``GET /api/items/random``, ``GET /api/items/{id}/image`` (PNG), ``GET /api/info``, ``GET /healthz``,
``GET /api/health`` (batch-size statistics and queue depth),
``GET /`` (the page, with its files under ``/static``) and FastAPI's ``/openapi.json`` and ``/docs``.

Writes: ``POST /api/items`` (multipart ``image``, optional ``label`` and ``id``) -> 201 ``{"id": ...}``
and ``DELETE /api/items/{id}`` -> 204 / 404. They need ``Authorization: Bearer <token>`` (compared
in constant time; 401 when missing or wrong, logged without the token) and a server started with
a token (else 403, saying how). A write is journaled and fsynced before its answer.

Every request passes :class:`RequestGuard`: a body over ``max_upload_bytes`` is refused with 413
(declared ``Content-Length`` and the bytes actually streamed are both counted), and a request
still running after ``request_timeout_s`` is answered 503. The model runs in worker threads.
A write is the exception once it has begun: the deadline covers reading its body and waiting for
a worker thread, then it is lifted, and the write runs to its end and is answered with its real
outcome (201 / 204 / its error), however long it took. So a write answered 503 "stopped" never
began, and retrying it cannot duplicate an item; a write is never abandoned half-way.

Searches are batched dynamically (:mod:`deephash.serve.batcher`): concurrent searches wait at most
``batch_wait_ms`` after the first for up to ``max_batch`` of them, then a batch thread decodes
them, encodes them in one forward pass and searches them in one call of the search engine; each
request gets the answer it would get alone. Past ``max_queue`` searches admitted at once (being
read, waiting or in a batch) a search is answered 503 with ``Retry-After`` before its body is
read. ``max_batch=1`` is the one-at-a-time path: each search runs its own forward pass and search
in the worker-thread pool, with no queue of its own.

A read-only server checks the index folder every ``reload_s`` seconds and swaps in the snapshot
that a writer (another process) folded since: several read-only processes can serve one index
while one writable process takes the writes (see ``deephash serve --workers``).
"""

from __future__ import annotations

import contextlib
import gc
import hmac
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, ValidationError, model_validator

from deephash.errors import DeephashError, NotFoundError
from deephash.retrieval.journal import JournalWriteError
from deephash.retrieval.living import DuplicateIdError
from deephash.serve.batcher import AsyncBatcher, DynamicBatcher, QueueFullError
from deephash.serve.encode_process import EncoderProcessError
from deephash.serve.encoder import ImageEncoder
from deephash.serve.form import FormError, parse_form
from deephash.serve.service import (
    CorruptImageError,
    ImageTooLargeError,
    SearchRequest,
    SearchService,
    UnsupportedImageError,
    parse_hex_code,
)

MAX_K = 1000
LOG = logging.getLogger("deephash.serve")
WRITES_DISABLED = ("writes are disabled on this server: start `deephash serve` with --token-file FILE or "
                   "--token-env NAME (a secret that clients send as 'Authorization: Bearer <token>')")
STATIC_DIR = Path(__file__).parent / "static"
#: The ASGI scope key under which :class:`RequestGuard` leaves the request's deadline (a cancel scope).
DEADLINE = "deephash.deadline"
_CSP = "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; connect-src 'self'"


# ------------------------------------------------------------------------------ request guard


class BodyTooLarge(HTTPException):
    """Raised from inside ``receive`` when the streamed body passes the limit (becomes a 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over the limit of {limit} bytes")


async def _send_json(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """Pure ASGI middleware: body-size limit (413) and a per-request deadline (503).

    The deadline's cancel scope is left in the ASGI scope under :data:`DEADLINE`, so that a write
    can lift it once it begins.

    Args:
        app: the wrapped ASGI app.
        max_bytes: largest request body, in bytes.
        timeout_s: seconds a request may take, reading its body included.
    """

    def __init__(self, app: Any, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)
        self.timeout_s = float(timeout_s)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _send_json(send, 413, f"request body of {declared.decode(errors='replace')} bytes is over the limit of {self.max_bytes} bytes")
            return
        received = 0
        started = False

        async def guarded_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            with anyio.fail_after(self.timeout_s) as deadline:
                scope[DEADLINE] = deadline  # a write lifts it once it begins (see _write_in_thread)
                await self.app(scope, guarded_receive, tracked_send)
        except BodyTooLarge as error:
            if started:
                raise
            await _send_json(send, 413, error.detail)
        except TimeoutError:
            if started:
                raise
            await _send_json(send, 503, f"request took longer than {self.timeout_s:g} s and was stopped")


class SecurityHeaders:
    """Pure ASGI middleware (no per-request task, unlike ``@app.middleware``): adds
    Content-Security-Policy and X-Content-Type-Options to every response that has none."""

    HEADERS = ((b"content-security-policy", _CSP.encode()), (b"x-content-type-options", b"nosniff"))

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in self.HEADERS if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


# ------------------------------------------------------------------------------ schemas


class SearchOptions(BaseModel):
    """Search options (form fields of an upload)."""

    k: int = Field(10, ge=1, le=MAX_K, description="number of results")
    radius: int | None = Field(None, ge=0, description="only results within this Hamming distance")


class SearchParams(SearchOptions):
    """The JSON body of ``POST /api/search``: a hex ``code`` or an item ``id``, and options."""

    code: str | None = Field(None, description="packed code as hex, most significant bit first")
    id: int | None = Field(None, description="search with the stored code of this database item")

    @model_validator(mode="after")
    def _one_query(self) -> SearchParams:
        if (self.code is None) == (self.id is None):
            raise ValueError("give exactly one of 'code' and 'id' (or upload a multipart 'image')")
        return self


class Result(BaseModel):
    id: int
    distance: int
    label: Any = None
    image_url: str | None = None


class Query(BaseModel):
    id: int | None = None
    label: Any = None
    image_url: str | None = None


class SearchResponse(BaseModel):
    results: list[Result]
    bits: int
    took_ms: float
    query: Query


class Info(BaseModel):
    bits: int
    size: int
    model: str
    factory: str
    classes: list[str]
    input_shape: list[int]
    has_images: bool
    max_k: int
    writable: bool = Field(description="whether POST /api/items and DELETE /api/items/{id} are enabled (with a token)")


class Added(BaseModel):
    id: int
    image_url: str | None = None


class Item(BaseModel):
    id: int
    label: Any = None
    image_url: str | None = None


_ERRORS = {413: "body or image too large", 415: "not a supported image", 400: "corrupt image or body",
           422: "bad parameters or code length", 404: "unknown item", 503: "timed out"}
_SEARCH_BODY = {
    "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary"},
            "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10},
            "radius": {"type": "integer", "minimum": 0}}}},
        "application/json": {"schema": None},  # SearchParams, filled in below
    }},
}


_SEARCH_BODY["requestBody"]["content"]["application/json"]["schema"] = SearchParams.model_json_schema()


# ------------------------------------------------------------------------------ the app


def _status(error: DeephashError) -> int:
    for kind, status in ((ImageTooLargeError, 413), (UnsupportedImageError, 415), (CorruptImageError, 400),
                         (NotFoundError, 404), (DuplicateIdError, 409), (QueueFullError, 503), (EncoderProcessError, 503),
                         (JournalWriteError, 503)):  # the write was not kept (disk full?): retry later
        if isinstance(error, kind):
            return status
    return 422  # a code of the wrong length or bad hex: an unprocessable value


def _watch_folds(service: SearchService, every_s: float, stop: threading.Event) -> None:
    """Until ``stop``: every ``every_s`` seconds, swap in the snapshot a writer folded (read-only)."""
    while not stop.wait(every_s):
        try:
            if service.reload_if_folded():
                LOG.info("reloaded the index: %d items (journal_seq %d)", len(service.index.ids), service.index.journal_seq)
        except (DeephashError, OSError) as error:  # a half-swapped folder: the next check retries
            LOG.warning("index reload failed, still serving the previous snapshot: %s", error)


# Long by design: FastAPI routes are closures over the one service and its limits, so every
# endpoint is defined inside this factory (as FastAPI's own examples do); each route is short.
def create_app(
    index_dir: str | os.PathLike,
    run_dir: str | os.PathLike | None = None,
    max_upload_bytes: int = 10_000_000,
    max_pixels: int = 16_000_000,
    request_timeout_s: float = 30.0,
    service: SearchService | None = None,
    write_token: str | None = None,
    fold_every: int = 1000,
    max_batch: int = 32,
    batch_wait_ms: float = 0.0,
    max_queue: int = 128,
    reload_s: float = 2.0,
    encoder: ImageEncoder | None = None,
    batch_threads: int = 2,
    model_dir: str | os.PathLike | None = None,
    encode_processes: int = 0,
) -> FastAPI:
    """The search web app over an index folder and the run whose model built it.

    Args:
        index_dir: folder written by ``deephash index build``.
        run_dir: the run directory of the model (None: ``encoder`` encodes the uploads).
        max_upload_bytes: largest request body (413 above it).
        max_pixels: largest ``width * height`` of an uploaded image (413 above it).
        request_timeout_s: seconds before a request is answered 503 (a write that has begun is not
            stopped: it is answered with its outcome when done).
        service: an already loaded service (then the folders are not read).
        write_token: the secret that enables writes (None: read-only; writes answer 403). With it
            the index is opened for writing and its write lock held until shutdown.
        fold_every: fold the journal into a snapshot after this many writes (and at shutdown).
        max_batch: most searches in one batch (1: the one-at-a-time path, no batching).
        batch_wait_ms: how long a batch waits for more searches after its first one arrived.
        max_queue: most searches admitted at once (reading their body, waiting for a batch or in
            one); beyond it a search is answered 503 with Retry-After before its body is read.
        reload_s: read-only: seconds between checks for a snapshot folded by a writer (0: never).
        encoder: encodes uploads (an ``ImageEncoder``; default: the run's PyTorch model).
        batch_threads: threads running batches (each one batch at a time).
        model_dir: an exported model (``deephash export RUN --format onnx``): its ``OnnxEncoder``
            encodes uploads instead of the run's model, and the process never imports torch (a path,
            not an encoder, so that it travels to ``--workers`` processes).
        encode_processes: decode and encode uploads in this many child processes
            (:mod:`deephash.serve.encode_process`; each builds the model of ``run_dir`` or
            ``model_dir`` with one thread); 0: in the batch threads of this process.
    """
    if write_token is not None and not write_token.strip():
        raise DeephashError("the write token is empty")
    if write_token is not None and not (write_token.strip().isascii() and write_token.strip().isprintable()):
        raise DeephashError("the write token must be printable ASCII (it travels in an HTTP header)")
    token = write_token.strip().encode() if write_token is not None else None
    if service is None and model_dir is not None:
        if run_dir is not None or encoder is not None:
            raise DeephashError("serve takes a run directory, an encoder or an exported model folder, not two (--run or --model)")
        from deephash.serve.onnx_encoder import OnnxEncoder

        encoder = OnnxEncoder(model_dir)
    service = service or SearchService.load(index_dir, run_dir, max_pixels=max_pixels, writable=token is not None,
                                            fold_every=fold_every, encoder=encoder)
    processes = None
    if int(encode_processes) > 0:
        if run_dir is None and model_dir is None:
            raise DeephashError("encoder processes build the model of a run or an exported model folder: give one")
        if int(max_batch) < 1:
            raise DeephashError(f"max_batch must be >= 1, got {max_batch}")
        from deephash.serve.encode_process import EncoderProcesses, EncoderSource

        source = EncoderSource(tuple(service.input_shape), service.crop_fraction, name=service.model_name,
                               run_dir=None if run_dir is None else str(run_dir),
                               model_dir=None if model_dir is None else str(model_dir))
        try:
            processes = EncoderProcesses(source, service.max_pixels, int(encode_processes))
        except BaseException:
            service.close()
            raise
    elif int(encode_processes) < 0:
        raise DeephashError(f"encode_processes must be >= 0, got {encode_processes}")
    writable = token is not None and service.writable
    workers = anyio.CapacityLimiter(max(1, min(4, os.cpu_count() or 1)))
    batcher: DynamicBatcher | AsyncBatcher | None = None
    if processes is not None:  # batches of any size (1 included) go to the encoder processes
        def answer_in_processes(requests: list[SearchRequest]) -> Any:
            return service.answer_batch_async(requests, processes)

        batcher = AsyncBatcher(answer_in_processes, max_batch, batch_wait_ms / 1000, max_queue, processes.processes)
    elif int(max_batch) > 1:
        batcher = DynamicBatcher(service.answer_batch, max_batch, batch_wait_ms / 1000, max_queue, batch_threads).start()
    elif int(max_batch) < 1:
        raise DeephashError(f"max_batch must be >= 1, got {max_batch}")
    admitted = 0  # searches past admission and not yet answered (read on the event loop only)

    stop_watching = threading.Event()
    if not service.writable and reload_s > 0:
        threading.Thread(target=_watch_folds, args=(service, float(reload_s), stop_watching),
                         name="deephash-reload", daemon=True).start()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        try:
            yield
        finally:
            stop_watching.set()
            if isinstance(batcher, AsyncBatcher):
                await batcher.aclose()  # answer the queued searches first
            elif batcher is not None:
                batcher.close()
            if processes is not None:
                processes.close()
            service.close()  # fold the journal into the snapshot, release the write lock

    app = FastAPI(title="deephash search", version="1", description="Hamming search over a deephash index.",
                  lifespan=lifespan)
    app.state.service = service
    app.state.batcher = batcher
    app.state.encoder_processes = processes
    app.add_middleware(RequestGuard, max_bytes=max_upload_bytes, timeout_s=request_timeout_s)

    @app.exception_handler(DeephashError)
    async def _user_error(request: Request, error: DeephashError) -> JSONResponse:
        status = _status(error)
        headers = {"Retry-After": "1"} if status == 503 else None
        return JSONResponse({"detail": str(error)}, status_code=status, headers=headers)

    app.add_middleware(SecurityHeaders)  # outermost: the guard's own answers get them too

    def image_url(ident: int) -> str | None:
        return f"/api/items/{ident}/image" if service.has_image(ident) else None

    async def in_thread(func: Any, *args: Any) -> Any:
        return await anyio.to_thread.run_sync(func, *args, abandon_on_cancel=True, limiter=workers)

    async def write_in_thread(request: Request, func: Any, *args: Any) -> Any:
        """Run a write in a worker thread to its end and return its outcome: the request's deadline
        covers waiting for the thread; once the write begins the deadline is lifted and the thread
        is never abandoned (a write answered "stopped" never began, so a retry cannot duplicate it)."""
        async with workers:
            deadline = request.scope.get(DEADLINE)
            if deadline is not None:
                if deadline.cancel_called:  # the deadline passed while waiting: stop before the write
                    await anyio.lowlevel.checkpoint()
                deadline.deadline = math.inf
            return await anyio.to_thread.run_sync(func, *args)

    def check_write(request: Request) -> None:
        """403 unless writes are enabled; 401 unless the bearer token matches (constant time)."""
        if not writable:
            raise HTTPException(403, WRITES_DISABLED)
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
            client = request.client.host if request.client else "?"
            LOG.warning("refused %s %s from %s: %s bearer token", request.method, request.url.path, client,
                        "wrong" if scheme.lower() == "bearer" and given else "no")
            raise HTTPException(401, "a write needs the header 'Authorization: Bearer <token>' with the server's token",
                                headers={"WWW-Authenticate": "Bearer"})

    def invalid(errors: list) -> HTTPException:
        return HTTPException(422, [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in errors])

    @app.post("/api/search", response_model=SearchResponse, openapi_extra=_SEARCH_BODY,
              responses={s: {"description": d} for s, d in _ERRORS.items()})
    async def search(request: Request) -> JSONResponse:
        """Search with an uploaded image (multipart field ``image``), a hex ``code`` or an item ``id``."""
        nonlocal admitted
        if batcher is not None and admitted >= max_queue:  # shed before reading the body
            raise batcher.refuse(f"the server is at its limit of {max_queue} searches at once: retry shortly")
        admitted += 1
        try:
            return await answer_search(request)
        finally:
            admitted -= 1

    async def answer_search(request: Request) -> JSONResponse:
        started = time.perf_counter()
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        params: SearchOptions
        if kind == "multipart/form-data":
            try:
                fields, files = parse_form(await request.body(), request.headers["content-type"])
            except FormError as error:
                raise HTTPException(400, str(error)) from None
            try:
                params = SearchOptions.model_validate({"k": fields.get("k") or 10, "radius": fields.get("radius") or None})
            except ValidationError as error:
                raise invalid(error.errors()) from None
            if "image" not in files:
                raise HTTPException(422, "multipart form needs a file field 'image'")
            query = SearchRequest(params.k, params.radius, image=files["image"])
        elif kind == "application/json":
            try:
                params = SearchParams.model_validate_json(await request.body())
            except ValidationError as error:
                raise invalid(error.errors()) from None
            if params.code is not None:
                query = SearchRequest(params.k, params.radius, code=parse_hex_code(params.code, service.bits))
            else:
                query = SearchRequest(params.k, params.radius, item=params.id)
        else:
            raise HTTPException(415, "send multipart/form-data with a file field 'image', "
                                     "or application/json with 'code' or 'id'")
        answer = await (batcher.submit(query) if batcher is not None else in_thread(service.answer, query))
        about = {"id": None, "label": None, "image_url": None}
        if query.item is not None:
            about = {"id": query.item, "label": answer.label, "image_url": image_url(query.item)}
        return JSONResponse({  # built here as SearchResponse says (skipping its validation: a hot path)
            "results": [{"id": h.id, "distance": h.distance, "label": h.label,
                         "image_url": f"/api/items/{h.id}/image" if h.has_image else None} for h in answer.hits],
            "bits": service.bits, "took_ms": round((time.perf_counter() - started) * 1000, 3), "query": about,
        })

    @app.get("/api/items/random", response_model=Item)
    async def random_item() -> dict[str, Any]:
        """A random database item (for the page's "random item" button)."""
        ident, label = await in_thread(service.random_item)  # one read lock, off the event loop
        return {"id": ident, "label": label, "image_url": image_url(ident)}

    @app.get("/api/items/{ident}/image", response_class=Response, responses={200: {"content": {"image/png": {}}}, 404: {}})
    async def item_image(ident: int) -> Response:
        """The database image of an item, as PNG."""
        png = await in_thread(service.image_png, ident)
        cache = "no-cache" if writable else "public, max-age=3600"  # an id can be removed and added again
        return Response(png, media_type="image/png", headers={"Cache-Control": cache})

    write_errors = {401: {"description": "missing or wrong token"}, 403: {"description": "writes disabled"}}

    @app.post("/api/items", status_code=201, response_model=Added, responses={
        **write_errors, 409: {"description": "id already in the index"}, 413: {}, 415: {}, 422: {}},
        openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["image"], "properties": {
                "image": {"type": "string", "format": "binary"}, "label": {"type": "string"},
                "id": {"type": "integer", "minimum": 0}}}}}}})
    async def add_item(request: Request) -> dict[str, Any]:
        """Add an uploaded image to the index (needs the token); durable when answered."""
        check_write(request)
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
            raise HTTPException(415, "send multipart/form-data with a file field 'image' (and optional 'label', 'id')")
        try:
            fields, files = parse_form(await request.body(), request.headers["content-type"])
        except FormError as error:
            raise HTTPException(400, str(error)) from None
        label, ident = fields.get("label"), fields.get("id")
        if "image" not in files:
            raise HTTPException(422, "multipart form needs a file field 'image'")
        if ident not in (None, "") and not ident.strip().isdigit():
            raise HTTPException(422, "'id' must be a non-negative integer")
        new = await write_in_thread(request, service.add_item, files["image"], label or None,
                                    int(ident) if ident not in (None, "") else None)
        return {"id": new, "image_url": image_url(new)}

    @app.delete("/api/items/{ident}", status_code=204, response_class=Response,
                responses={**write_errors, 404: {"description": "unknown item"}})
    async def delete_item(ident: int, request: Request) -> Response:
        """Remove an item (needs the token); durable when answered."""
        check_write(request)
        await write_in_thread(request, service.remove_item, ident)
        return Response(status_code=204)

    @app.get("/api/info", response_model=Info)
    async def info() -> dict[str, Any]:
        """What the index holds: bits, size, model, factory, class names, whether it takes writes."""
        return {**service.info(), "max_k": MAX_K, "writable": writable}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: 200 while the server answers."""
        return {"status": "ok"}

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        """Liveness, the process id, the search batching (batch sizes, queue depth, requests shed),
        the encoder processes and the objects frozen out of the garbage collector's reach."""
        if batcher is not None:
            batching = {**batcher.stats(), "admitted": admitted}
        else:
            batching = {"max_batch": 1, "queue_depth": 0, "shed": 0, "mean_batch_size": 1.0}
        return {"status": "ok", "pid": os.getpid(), "size": service.info()["size"], "batching": batching,
                "gc_frozen": gc.get_freeze_count(),  # objects a full collection skips (`deephash serve` freezes the loaded ones)
                "encode_processes": 0 if processes is None else processes.processes}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


__all__ = ["MAX_K", "RequestGuard", "SearchParams", "create_app"]
