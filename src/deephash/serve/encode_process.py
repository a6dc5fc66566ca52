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
serves one batch at a time. A child that dies is replaced: the uploads of its batch are answered
:class:`EncoderProcessError` (503, retry), the next batch goes to the new child.
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
            pixels, decoded, errors = [], [], []
            for i, data in enumerate(payload):
                try:
                    pixels.append(_images.decode_image(data, source.input_shape, max_pixels,
                                                       crop_fraction=source.crop_fraction))
                    decoded.append(i)
                except DeephashError as error:
                    errors.append((i, type(error).__name__, str(error)))
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

    async def ask_async(self, message: tuple[str, Any]) -> Any:
        """Send one message and await its answer without blocking the event loop (the pipe is
        watched for the answer); EncoderProcessError if the child fails or ends."""
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fd = self.conn.fileno()
        try:
            self.conn.send(message)
            loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
            try:
                await ready
            finally:
                loop.remove_reader(fd)
            kind, value = self.conn.recv()
        except (EOFError, OSError):
            raise EncoderProcessError("the encoder process ended while encoding this batch; it is restarted: "
                                      "retry the request") from None
        if kind != "ok":
            raise EncoderProcessError(f"the encoder process failed on this batch: {value}")
        return value

    def stop(self) -> None:
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

    Raises:
        DeephashError: a child could not build its encoder (the message says why).
        EncoderProcessError: a child did not start.
    """

    def __init__(self, source: EncoderSource, max_pixels: int = 16_000_000, processes: int = 1) -> None:
        if int(processes) < 1:
            raise DeephashError(f"encoder processes must be >= 1, got {processes}")
        self.source = source
        self.max_pixels = int(max_pixels)
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
            decoded, packed, vectors, errors = await child.ask_async(("uploads", list(uploads)))
        except EncoderProcessError:
            if not child.process.is_alive():
                child = await asyncio.to_thread(self._replace, child)
            raise
        finally:
            self._idle.put_nowait(child)
        outcomes: list[Any] = [None] * len(uploads)
        for row, i in enumerate(decoded):
            outcomes[i] = (packed[row:row + 1], None if vectors is None else vectors[row])
        for i, kind, message in errors:
            outcomes[i] = _UPLOAD_ERRORS.get(kind, DeephashError)(message)
        return outcomes

    def _replace(self, dead: _Child) -> _Child:
        """A new child in the place of one that ended; the dead one stays if no new one starts."""
        dead.stop()
        try:
            fresh = _Child(self._context, self.source, self.max_pixels)
        except DeephashError:
            return dead  # its next batch fails at once and tries again
        self._children[self._children.index(dead)] = fresh
        return fresh

    def close(self) -> None:
        """Stop every child (idempotent)."""
        for child in self._children:
            child.stop()
        self._children = []
