"""Uploads decoded and encoded in child processes, each with its own interpreter and GIL.

Why: in one process the server's event loop (HTTP, JSON: Python under the GIL) and the batch
threads share one GIL; a batch thread lets it go for every Pillow call, forward pass and FAISS
search and then waits for the busy event loop to hand it back. With ``deephash serve
--encode-processes N`` the event loop hands each batch's upload bytes to one of N children over a
pipe and awaits the answer without blocking (:class:`~deephash.serve.batcher.AsyncBatcher`): no
thread of the server waits for the GIL to encode, and the model's compute can use more than the
one core a process's batch threads reach. The parent keeps HTTP, the index and the search (one
FAISS call per batch), so writes and their guarantees are untouched. What it gains, and where it
does not (16 requests in flight on 2 cores): BENCHMARKS, "Search service".

Each child builds its encoder from an :class:`EncoderSource` (the run folder: PyTorch; an export
folder: ONNX Runtime, no torch) with one compute thread, is started with ``spawn`` (nothing
inherited from the parent's threads), decodes with the service's rule (``decode_image``) and
serves one batch at a time. A child that dies, or hangs past ``timeout_s``, is killed and its
batch answered :class:`EncoderProcessError` (503, retry) at once; the next batch that would go to
it starts a new child first (and is refused 503 in turn while none starts). A batch the child
itself reports as failed (not a refused upload: an error of the model) is a RuntimeError (500).
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deephash.data import images as _images
from deephash.errors import DeephashError, first_line

__all__ = ["EncoderProcessError", "EncoderProcesses", "EncoderSource"]

#: Seconds a new child may take to load its model and answer that it is ready.
START_TIMEOUT_S = 300.0
#: Seconds a child may take to answer one batch before it is killed and replaced.
BATCH_TIMEOUT_S = 120.0
#: The upload errors a child sends back by name, re-raised as themselves in the parent.
_UPLOAD_ERRORS = {cls.__name__: cls for cls in (_images.CorruptImageError, _images.ImageTooLargeError,
                                                 _images.UnsupportedImageError, DeephashError)}


class EncoderProcessError(DeephashError):
    """An encoder process failed or ended while it held a batch (the server answers 503: retry)."""


@dataclass(frozen=True)
class EncoderSource:
    """What a child process builds its encoder from: exactly one of a run folder (its PyTorch
    model) or an export folder (``deephash export``; ONNX Runtime, no torch); with the model view
    of the parent's service (``input_shape``, ``crop_fraction``) and its name."""

    input_shape: tuple[int, int, int]
    crop_fraction: float = 1.0
    run_dir: str | None = None
    model_dir: str | None = None
    name: str = ""

    def build(self) -> Any:
        """The encoder, in the calling process, with one compute thread."""
        if (self.run_dir is None) == (self.model_dir is None):
            raise DeephashError("an encoder process needs a run folder or an exported model folder, exactly one")
        if self.model_dir is not None:
            from deephash.serve.onnx_encoder import OnnxEncoder

            return OnnxEncoder(self.model_dir, threads=1)
        import torch

        from deephash.runs import load_run
        from deephash.serve.encoder import TorchEncoder

        torch.set_num_threads(1)
        model, _ = load_run(self.run_dir, device="cpu")
        return TorchEncoder(model.eval(), self.input_shape, self.name, crop_fraction=self.crop_fraction)


def _child(conn: Any, source: EncoderSource, max_pixels: int) -> None:
    """A child's loop: build the encoder, say ``("ready", bits)``, then answer each message
    ``("uploads", [bytes])`` with ``("ok", (decoded rows, packed codes, vectors, errors))`` until
    ``None`` or the pipe closes."""
    try:
        encoder = source.build()
    except BaseException as error:  # noqa: BLE001 (told to the parent, which raises it)
        conn.send(("failed", f"{type(error).__name__}: {first_line(error)}"))
        return
    conn.send(("ready", int(encoder.bits)))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        kind, payload = message
        try:
            pixels, decoded, refused = _images.decode_images(payload, source.input_shape, max_pixels,
                                                             crop_fraction=source.crop_fraction)
            errors = [(i, type(error).__name__, str(error)) for i, error in refused.items()]
            packed, vectors = encoder.encode(np.stack(pixels)) if pixels else (None, None)
            conn.send(("ok", (decoded, packed, vectors, errors)))
        except Exception as error:  # noqa: BLE001 (the batch fails, the child goes on)
            conn.send(("error", f"{type(error).__name__}: {first_line(error)}"))


class _Child:
    """One child process and the parent's end of its pipe."""

    def __init__(self, context: Any, source: EncoderSource, max_pixels: int) -> None:
        self.conn, child_end = context.Pipe()
        self.process = context.Process(target=_child, args=(child_end, source, max_pixels),
                                       name="deephash-encoder", daemon=True)
        self.process.start()
        child_end.close()
        if not self.conn.poll(START_TIMEOUT_S):
            self.stop()
            raise EncoderProcessError(f"the encoder process did not start within {START_TIMEOUT_S:g} s")
        try:
            kind, value = self.conn.recv()
        except (EOFError, OSError):
            self.stop()
            raise EncoderProcessError(f"the encoder process ended while starting (exit code {self.process.exitcode})") from None
        if kind != "ready":
            self.stop()
            raise DeephashError(f"the encoder process could not build its encoder: {value}")
        self.bits = int(value)
        self.broken = False

    async def ask_async(self, message: tuple[str, Any], timeout_s: float) -> Any:
        """Send one message and await its answer without blocking the event loop (the message is
        written by a worker thread, the pipe watched for the answer).

        Raises:
            EncoderProcessError: the child ended, or gave no answer within ``timeout_s`` (then
                it is killed); either way it is marked ``broken``, to be replaced.
            RuntimeError: the child answered that the batch failed (it goes on serving).
            asyncio.CancelledError: the caller was cancelled (the child, whose answer would come
                to the next batch, is killed and marked broken).
        """
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        try:
            fd = self.conn.fileno()
            await asyncio.to_thread(self.conn.send, message)  # a large batch: not on the event loop
            loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
            try:
                await asyncio.wait_for(ready, timeout_s)
            finally:
                loop.remove_reader(fd)
            kind, value = self.conn.recv()
        except asyncio.TimeoutError:  # before OSError: TimeoutError is one
            self.kill()
            raise EncoderProcessError(f"the encoder process gave no answer within {timeout_s:g} s; it is "
                                      "restarted: retry the request") from None
        except (EOFError, OSError, ValueError):
            self.kill()
            raise EncoderProcessError("the encoder process ended while encoding this batch; it is restarted: "
                                      "retry the request") from None
        except asyncio.CancelledError:
            self.kill()
            raise
        if kind != "ok":
            raise RuntimeError(f"the encoder process failed on this batch: {value}")
        return value

    def kill(self) -> None:
        """End the child at once and mark it broken."""
        self.broken = True
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()

    def stop(self) -> None:
        """Ask the child to end; kill it after 5 s."""
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class EncoderProcesses:
    """Child processes that decode and encode uploads, awaited on the event loop.

    Args:
        source: what each child builds its encoder from.
        max_pixels: largest ``width * height`` of an upload (as the service's).
        processes: children (>= 1): batches encoded at once.
        timeout_s: longest wait for a child's answer to one batch; past it the child is killed
            and replaced (a hung child cannot hold its slot for ever).

    Raises:
        DeephashError: a child could not build its encoder (the message says why).
        EncoderProcessError: a child did not start.
    """

    def __init__(self, source: EncoderSource, max_pixels: int = 16_000_000, processes: int = 1,
                 timeout_s: float = BATCH_TIMEOUT_S) -> None:
        if int(processes) < 1:
            raise DeephashError(f"encoder processes must be >= 1, got {processes}")
        self.source = source
        self.max_pixels = int(max_pixels)
        self.timeout_s = float(timeout_s)
        self._context = multiprocessing.get_context("spawn")
        self._children: list[_Child] = []
        try:
            for _ in range(int(processes)):
                self._children.append(_Child(self._context, source, self.max_pixels))
        except BaseException:
            self.close()
            raise
        self.bits = self._children[0].bits
        self._idle: asyncio.Queue[_Child] | None = None  # made on the event loop that uses it

    @property
    def processes(self) -> int:
        """Child processes running."""
        return len(self._children)

    async def encode_uploads(self, uploads: Sequence[bytes]) -> list[tuple[np.ndarray, np.ndarray | None] | DeephashError]:
        """Decode (the service's rule: ``decode_image`` at the source's shape and crop) and encode
        uploaded files in one child: per upload, its packed code ``(1, B)`` and re-rank vector
        ``(D,)`` (or None), or the upload's own error (a refused image).

        Raises:
            EncoderProcessError: the child failed or ended on this batch (it is replaced).
        """
        if self._idle is None:
            self._idle = asyncio.Queue()
            for child in self._children:
                self._idle.put_nowait(child)
        child = await self._idle.get()
        try:
            if child.broken:  # its last batch failed: replace it first (it may fail again: then 503)
                child = await asyncio.to_thread(self._replace, child)
            decoded, packed, vectors, errors = await child.ask_async(("uploads", list(uploads)), self.timeout_s)
        finally:
            self._idle.put_nowait(child)
        outcomes: list[Any] = [None] * len(uploads)
        for row, i in enumerate(decoded):
            outcomes[i] = (packed[row:row + 1], None if vectors is None else vectors[row])
        for i, kind, message in errors:
            outcomes[i] = _UPLOAD_ERRORS.get(kind, DeephashError)(message)
        return outcomes

    def _replace(self, broken: _Child) -> _Child:
        """A new child in the place of a broken one.

        Raises:
            EncoderProcessError: no new child started (the broken one stays in its place, and the
            next batch that takes it tries again).
        """
        broken.kill()
        try:
            fresh = _Child(self._context, self.source, self.max_pixels)
        except Exception as error:  # noqa: BLE001 (any failure to start: this batch is refused, the next retries)
            raise EncoderProcessError(f"the encoder process could not be restarted ({first_line(error)}): "
                                      "retry the request") from None
        self._children[self._children.index(broken)] = fresh
        return fresh

    def close(self) -> None:
        """Stop every child (idempotent)."""
        for child in self._children:
            child.stop()
        self._children = []
