"""``SearchService``: a loaded index, the run's model and the database images, no HTTP.

The web app (:mod:`deephash.serve.app`) is a thin shell over this class: every method here takes
and returns plain Python / numpy values and raises :class:`~deephash.errors.DeephashError`
subclasses for bad input, which the app maps to status codes.

Opened with ``writable=True`` the service holds the index as a
:class:`~deephash.retrieval.living.LivingIndex` (its write lock taken): :meth:`SearchService.add_item`
and :meth:`SearchService.remove_item` are journaled and fsynced before they return, and every read
runs under the living index's read lock, so it sees an item before or after a change, never half.

Opened read-only, :meth:`SearchService.reload_if_folded` swaps in the snapshot on disk when a
writer (another process) has folded its journal into it since (``meta.json``'s ``journal_seq``
and ``changed``), under the service's own read/write lock. The key it compares is the snapshot's
own, read before the load: the loaded index's ``journal_seq`` also counts the journal records
applied on top of the snapshot, so it cannot stand for the snapshot.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deephash.data.images import (  # noqa: F401  (the upload errors are part of the service's interface)
    UPLOAD_FORMATS,
    CorruptImageError,
    ImageTooLargeError,
    UnsupportedImageError,
    decode_image,
    decode_images,
    read_image,
)
from deephash.errors import CodeLengthError, DeephashError, NotFoundError
from deephash.retrieval.codes import n_bytes, padding_is_zero
from deephash.retrieval.index import HashIndex
from deephash.retrieval.item_images import png_bytes
from deephash.retrieval.living import LivingIndex, ReadWriteLock
from deephash.retrieval.search import DEFAULT_SHORTLIST, IdLookup, search
from deephash.serve.encoder import ImageEncoder, TorchEncoder

if TYPE_CHECKING:  # the service itself runs without torch (an ONNX Runtime encoder)
    import torch


@dataclass(frozen=True)
class Hit:
    """One search result: index id, Hamming distance, label (class name, int, list or None)."""

    id: int
    distance: int
    label: Any
    has_image: bool


@dataclass(frozen=True)
class SearchRequest:
    """One search: exactly one of an uploaded image's bytes, a database item's id or a packed
    code uint8 ``(1, ceil(bits/8))``; ``k`` results at most, within ``radius`` when given."""

    k: int = 10
    radius: int | None = None
    image: bytes | None = None
    item: int | None = None
    code: np.ndarray | None = None


@dataclass(frozen=True)
class Answer:
    """A search's hits, nearest first, and the query item's label (an item query; else None)."""

    hits: list[Hit]
    label: Any = None


#: Longest side, in pixels, of a database image as the service shows it.
SHOWN_SIDE = 512


def _load_index(index_dir: Path) -> HashIndex:
    """The saved index in ``index_dir``.

    Raises:
        NotFoundError: no such folder. DataFormatError: not a readable index.
    """
    if not Path(index_dir).is_dir():
        raise NotFoundError(f"index directory {index_dir} does not exist")
    return HashIndex.load(index_dir)


def _path_images(index: HashIndex) -> dict[int, str]:
    """Each item's image file by id, from the index's ``paths`` column (items without one left out)."""
    return {int(i): str(p) for i, p in zip(index.ids.tolist(), index.paths.tolist()) if p}


def snapshot_key(index_dir: Path) -> tuple[int, str | None] | None:
    """``(journal_seq, changed)`` of the snapshot in ``index_dir/meta.json``; None while unreadable
    (a fold swapping the folder)."""
    try:
        meta = json.loads((Path(index_dir) / "meta.json").read_text(encoding="utf-8"))
        changed = meta.get("changed")
        return int(meta.get("journal_seq") or 0), changed if isinstance(changed, str) else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def parse_hex_code(text: str, bits: int) -> np.ndarray:
    """A packed code from its hex string: uint8 ``(1, ceil(bits/8))``.

    Raises:
        CodeLengthError: wrong number of hex digits (names both lengths).
        DeephashError: not hexadecimal, or non-zero padding bits.
    """
    text = text.strip().lower().removeprefix("0x")
    want = 2 * n_bytes(bits)
    if len(text) != want:
        raise CodeLengthError(f"code has {len(text)} hex digits but the index holds {bits}-bit codes ({want} hex digits)")
    try:
        packed = np.frombuffer(bytes.fromhex(text), dtype=np.uint8)[None, :].copy()
    except ValueError:
        raise DeephashError("code is not a hexadecimal string") from None
    if not padding_is_zero(packed, bits):
        raise DeephashError(f"code has non-zero padding bits beyond bit {bits}")
    return packed


class SearchService:
    """Query an index with images or codes, and fetch its database images.

    Args:
        index: a loaded ``HashIndex`` (labels and metadata as ``build_index`` writes them).
        model: the run's hash model (eval mode), or None when ``encoder`` is given.
        input_shape: the model's ``(C, H, W)``.
        images: database images: uint8 ``(N, C, H, W)`` rows addressed by id (a data-set split),
            a dict id -> file path (an image folder), or None.
        classes: class names, ``classes[label]``.
        max_pixels: largest ``width * height`` of an upload.
        seed: seed of the random-item generator.
        living: the open :class:`LivingIndex` holding ``index`` (then items can be added and removed).
        index_dir: the index folder (where added items' images are stored and read).
        encoder: what encodes uploads (an :class:`~deephash.serve.encoder.ImageEncoder`); default
            a :class:`~deephash.serve.encoder.TorchEncoder` over ``model``.
        shortlist: the first stage's size of a two-stage search.
    """

    def __init__(
        self,
        index: Any,
        model: torch.nn.Module | None,
        input_shape: tuple[int, int, int],
        images: torch.Tensor | dict[int, str] | None = None,
        classes: list[str] | None = None,
        max_pixels: int = 16_000_000,
        seed: int = 0,
        model_name: str = "",
        living: LivingIndex | None = None,
        index_dir: str | os.PathLike | None = None,
        encoder: ImageEncoder | None = None,
        shortlist: int = DEFAULT_SHORTLIST,
    ) -> None:
        if encoder is None and model is None:
            raise DeephashError("the search service needs a model or an encoder")
        encoder = encoder or TorchEncoder(model, input_shape, model_name)
        if encoder.bits != index.bits:
            raise CodeLengthError(f"the model makes {encoder.bits}-bit codes but the index holds {index.bits}-bit codes")
        self.index = index
        self.model = model
        self.encoder = encoder
        self.shortlist = int(shortlist)
        self.input_shape = tuple(int(v) for v in encoder.input_shape)
        #: the model view's centre crop of uploads (the encoder's; see ``ImageEncoder``)
        self.crop_fraction = float(getattr(encoder, "crop_fraction", 1.0))
        self.images = images
        self.classes = list(classes or [])
        self.max_pixels = int(max_pixels)
        self.model_name = encoder.name
        self._rng = np.random.default_rng(seed)
        self.living = living
        self.index_dir = Path(index_dir) if index_dir is not None else None
        self._lock = ReadWriteLock()  # a read-only service's, for reload_if_folded
        # the snapshot key of the served index (read-only): read before its load, see reload_if_folded
        self._snapshot: tuple[int, str | None] | None = None
        if living is None and self.index_dir is not None:
            self._snapshot = snapshot_key(self.index_dir)
        self._stored = self._stored_ids()
        self._refresh()

    def _refresh(self, changed: Any = None) -> None:
        """Re-read the index's ids, codes and labels (after a change, under the write lock)."""
        self._ids, self._lookup, self._codes, self._labels = self._columns(self.index)

    @staticmethod
    def _columns(index: HashIndex) -> tuple[np.ndarray, IdLookup, np.ndarray, np.ndarray | None]:
        """What the service reads of an index: ids, their lookup, codes and labels (copies)."""
        ids = np.asarray(index.ids, dtype=np.int64)
        labels = index.labels
        return ids, IdLookup(ids), np.asarray(index.codes), None if labels is None else np.asarray(labels)

    def _stored_ids(self) -> set[int]:
        """Ids whose image is stored in ``INDEX/items/`` (added items), listed once: the service
        keeps the set current on its own adds and removes (it is the index's only writer)."""
        if self.index_dir is None:
            return set()
        from deephash.retrieval.item_images import item_image_path

        folder = item_image_path(self.index_dir, 0).parent
        if not folder.is_dir():
            return set()
        return {int(f.stem) for f in folder.glob("*.png") if f.stem.isdigit()}

    def _reading(self) -> contextlib.AbstractContextManager[None]:
        return self.living.reading() if self.living is not None else self._lock.reading()

    def reload_if_folded(self) -> bool:
        """Read-only: load the snapshot on disk when it differs from the one served (a writer
        folded its journal since), and swap it in between searches. Returns whether it did.

        Raises:
            DeephashError: the new snapshot does not load, or holds codes of another length (the
            old one stays served).
        """
        if self.living is not None or self.index_dir is None:
            return False
        key = snapshot_key(self.index_dir)
        if key is None or key == self._snapshot:
            return False
        index = _load_index(self.index_dir)  # the snapshot with its journal applied
        if snapshot_key(self.index_dir) != key:
            return False  # folded again while loading (the parts may mix): the next call loads the newer one
        if index.bits != self.bits:
            raise CodeLengthError(f"the folded index {self.index_dir} holds {index.bits}-bit codes, not {self.bits}")
        images = _path_images(index) if isinstance(self.images, dict) and index.paths is not None else self.images
        stored, columns = self._stored_ids(), self._columns(index)  # built before the lock: the swap is short
        with self._lock.writing():
            self.images, self.index, self._snapshot, self._stored = images, index, key, stored
            self._ids, self._lookup, self._codes, self._labels = columns
        return True

    @classmethod
    def load(cls, index_dir: str | os.PathLike, run_dir: str | os.PathLike | None = None, max_pixels: int = 16_000_000,
             writable: bool = False, fold_every: int = 1000, encoder: ImageEncoder | None = None) -> SearchService:
        """Open an index folder and the run that built it (model on the CPU), or only the index
        and an ``encoder`` (then nothing is read from a run, and torch is not needed).

        Database images come from the index's ``paths`` column (an image folder) or its metadata's
        ``source = "split:NAME"`` (that split of the run's data set; with a run only), and for
        added items from ``INDEX/items/<id>.png``; they are optional.

        Args:
            run_dir: the run directory (None: ``encoder`` is required).
            writable: open the index for adds and removes (takes its write lock until :meth:`close`).
            fold_every: with ``writable``, fold the journal into a snapshot after this many changes.
            encoder: encodes uploads (default: the run's PyTorch model).

        Raises:
            NotFoundError / DataFormatError: no such index or run. CodeLengthError: the run's
            code length differs from the index's. IndexLockedError: ``writable`` and another
            writer holds the index. DeephashError: neither a run nor an encoder.
        """
        if run_dir is None and encoder is None:
            raise DeephashError("the search service needs a run directory or an encoder")
        index_dir = Path(index_dir)
        model = config = None
        if run_dir is not None:
            from deephash.runs import load_run

            run_dir = Path(run_dir)
            model, config = load_run(run_dir, device="cpu")
        living = LivingIndex(index_dir, fold_every=fold_every, holder="deephash serve").open() if writable else None
        snapshot = None if writable else snapshot_key(index_dir)  # before the load: see reload_if_folded
        index = living.index if living is not None else _load_index(index_dir)
        meta = index.metadata if isinstance(index.metadata, dict) else {}
        images: torch.Tensor | dict[int, str] | None = None
        if index.paths is not None:  # one per index row ("" for an item without a file)
            images = _path_images(index)
        elif str(meta.get("source", "")).startswith("split:") and config is not None:
            from deephash.runs import load_split

            images = load_split(config, str(meta["source"])[len("split:"):], run_dir).data
        if images is not None and not isinstance(images, dict):
            shape = tuple(images.shape[1:])
        elif config is not None:  # an image folder: the size the run's training images had
            from deephash.runs import model_input_shape

            shape = model_input_shape(config, run_dir)
        else:
            shape = tuple(encoder.input_shape)
        classes = (meta.get("classes") or list(getattr(model, "classes", []) or [])
                   or list(getattr(encoder, "classes", []) or []))
        spec = getattr(model, "spec", None)
        name = str(spec.backbone if spec is not None else type(model).__name__) if model is not None else ""
        if encoder is None:  # uploads take the run's model view, as its folders and query files do
            from deephash.runs import eval_crop_fraction

            encoder = TorchEncoder(model, shape, name, crop_fraction=eval_crop_fraction(config))
        try:
            service = cls(index, model, shape, images, classes, max_pixels, seed=config.seed if config is not None else 0,
                          model_name=name, living=living, index_dir=index_dir, encoder=encoder)
        except BaseException:
            if living is not None:
                living.close(fold=False)
            raise
        service._snapshot = snapshot
        return service

    def close(self) -> None:
        """Fold the journal into the snapshot and release the write lock (a writable service)."""
        if self.living is not None:
            self.living.close(fold=True)

    @property
    def writable(self) -> bool:
        """Whether items can be added and removed."""
        return self.living is not None

    # ------------------------------------------------------------------ facts
    @property
    def bits(self) -> int:
        """Code length of the index."""
        return int(self.index.bits)

    def info(self) -> dict[str, Any]:
        """bits, size, model, factory, classes and the model's input shape."""
        return {"bits": self.bits, "size": len(self._ids), "model": self.model_name,
                "factory": str(self.index.factory), "classes": self.classes,
                "input_shape": list(self.input_shape), "has_images": self.images is not None or self.writable}

    def label_of(self, position: int) -> Any:
        """Label of an index row: its class name when known, else the int (a list for multi-hot)."""
        if self._labels is None:
            return None
        value = self._labels[position]
        if value.ndim == 1:
            return [self._name(int(c)) for c in np.flatnonzero(value)]
        return None if int(value) < 0 else self._name(int(value))

    def _name(self, label: int) -> Any:
        return self.classes[label] if 0 <= label < len(self.classes) else label

    def _stored_image(self, ident: int) -> Path | None:
        if self.index_dir is None or ident not in self._stored:
            return None
        from deephash.retrieval.item_images import item_image_path

        path = item_image_path(self.index_dir, ident)
        return path if path.is_file() else None

    def has_image(self, ident: int) -> bool:
        """Whether the database image of this id can be served."""
        if ident in self._stored:  # an added item's image (no file check: searches ask per hit)
            return True
        if isinstance(self.images, dict):
            return ident in self.images
        return self.images is not None and 0 <= ident < len(self.images)

    # ------------------------------------------------------------------ work
    def encode_image(self, data: bytes) -> np.ndarray:
        """The packed code of an uploaded image: uint8 ``(1, ceil(bits/8))``."""
        return self.encode_query(data)[0]

    def encode_query(self, data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
        """An uploaded image's packed code ``(1, B)`` and its re-rank vector float ``(D,)`` (None
        when the model keeps none)."""
        return self._encode_pixels(decode_image(data, self.input_shape, self.max_pixels, crop_fraction=self.crop_fraction))

    def _encode_pixels(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        packed, vectors = self.encoder.encode(image[None])
        return packed, None if vectors is None else vectors[0]

    def item_vector(self, ident: int) -> np.ndarray | None:
        """The stored re-rank vector of an item (None when the index keeps none)."""
        vectors = self.index.rerank_vectors
        position = self._lookup.position(ident)
        return None if vectors is None or position < 0 else vectors[position].astype(np.float32)

    def item(self, ident: int) -> tuple[np.ndarray, Any]:
        """Stored packed code ``(1, B)`` and label of a database item.

        Raises:
            NotFoundError: no item with this id.
        """
        with self._reading():
            position = self._lookup.position(ident)
            if position < 0:
                raise NotFoundError(f"no item with id {ident} in the index")
            return self._codes[position:position + 1].copy(), self.label_of(position)

    def random_item(self) -> tuple[int, Any]:
        """A uniformly drawn item: its id and label, read under one read lock (so a concurrent
        remove cannot take the drawn item away before its label is read).

        Raises:
            NotFoundError: the index is empty.
        """
        with self._reading():
            if len(self._ids) == 0:
                raise NotFoundError("the index is empty")
            position = int(self._rng.integers(len(self._ids)))
            return int(self._ids[position]), self.label_of(position)

    def search(self, packed: np.ndarray, k: int, radius: int | None = None, vector: np.ndarray | None = None,
               shortlist: int | None = None) -> list[Hit]:
        """The ``k`` nearest items of one packed code ``(1, B)``, within ``radius`` when given;
        with the query's re-rank ``vector`` and an index that keeps vectors, a two-stage search
        (``retrieval.search``) over a Hamming shortlist of ``shortlist`` (default: the service's).

        Results are nearest first; fewer than ``k`` when the index is smaller or the radius cuts.
        """
        with self._reading():
            rerank = None if vector is None else vector[None, :]
            (found,) = self._neighbours(packed, int(k), radius, rerank, shortlist or self.shortlist)
        return self._hits(found)

    def _neighbours(self, packed: np.ndarray, k: int, radius: int | None, rerank: np.ndarray | None,
                    shortlist: int) -> list[tuple[list[int], list[int], list[Any]]]:
        """One call of the search engine for ``(n, B)`` codes, under the read lock: each query's
        ids, distances and labels (read now: a change may move the rows once the lock is let go)."""
        found = search(self.index, packed, k, radius, lookup=self._lookup, rerank=rerank, shortlist=shortlist)
        return [(f.ids.tolist(), f.distances.tolist(), [self.label_of(p) for p in f.positions.tolist()]) for f in found]

    def _hits(self, found: tuple[list[int], list[int], list[Any]]) -> list[Hit]:
        """A query's hits from :meth:`_neighbours`' ids, distances and labels (outside the lock)."""
        ids, distances, labels = found
        return [Hit(i, d, label, self.has_image(i)) for i, d, label in zip(ids, distances, labels)]

    def answer(self, request: SearchRequest) -> Answer:
        """One request's answer (the one-at-a-time path: :meth:`answer_batch` of one).

        Raises:
            DeephashError: the request's own error (a refused upload, an unknown item).
        """
        (outcome,) = self.answer_batch([request])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def answer_batch(self, requests: Sequence[SearchRequest]) -> list[Answer | DeephashError]:
        """Answer many searches at once: the uploads decoded and encoded in ONE encoder call, then
        ONE search-engine call per distinct ``(k, radius, re-ranked)`` (one in all when the clients
        ask alike), under one read lock.

        Each answer equals what the request alone gets; a request's bad input (a refused upload,
        an unknown item) becomes its outcome, an exception, and spares the others.
        """
        outcomes, codes, vectors = self._batch_codes(requests)
        files = [i for i, request in enumerate(requests) if request.image is not None]
        pixels, decoded, refused = decode_images([requests[i].image for i in files], self.input_shape, self.max_pixels,
                                                 crop_fraction=self.crop_fraction)
        for position, error in refused.items():
            outcomes[files[position]] = error
        uploads = [files[position] for position in decoded]
        if pixels:
            packed, encoded = self.encoder.encode(np.stack(pixels))
            for row, i in enumerate(uploads):
                codes[i] = packed[row:row + 1]
                vectors[i] = None if encoded is None else encoded[row]
        return self._answer_encoded(requests, outcomes, codes, vectors)

    async def answer_batch_async(self, requests: Sequence[SearchRequest], processes: Any) -> list[Answer | DeephashError]:
        """:meth:`answer_batch` with the uploads decoded and encoded by encoder processes
        (:class:`~deephash.serve.encode_process.EncoderProcesses`), awaited on the event loop; the
        search runs on the loop too when the service is read-only (no write can hold its lock
        for long), in a worker thread when it is writable. Same answers."""
        outcomes, codes, vectors = self._batch_codes(requests)
        files = [i for i, request in enumerate(requests) if request.image is not None]
        if files:
            for i, outcome in zip(files, await processes.encode_uploads([requests[i].image for i in files])):
                if isinstance(outcome, DeephashError):
                    outcomes[i] = outcome
                else:
                    codes[i], vectors[i] = outcome
        if self.writable:
            import asyncio

            return await asyncio.to_thread(self._answer_encoded, requests, outcomes, codes, vectors)
        return self._answer_encoded(requests, outcomes, codes, vectors)

    @staticmethod
    def _batch_codes(requests: Sequence[SearchRequest]) -> tuple[list[Any], list[np.ndarray | None], list[np.ndarray | None]]:
        """A batch's outcomes (none yet), codes (the given ones: code queries) and re-rank vectors."""
        codes: list[np.ndarray | None] = [None] * len(requests)
        for i, request in enumerate(requests):
            if request.code is not None:
                codes[i] = np.asarray(request.code, dtype=np.uint8).reshape(1, -1)
        return [None] * len(requests), codes, [None] * len(requests)

    def _answer_encoded(self, requests: Sequence[SearchRequest], outcomes: list[Any], codes: list[np.ndarray | None],
                        vectors: list[np.ndarray | None]) -> list[Answer | DeephashError]:
        """The rest of a batch once its uploads are encoded: item queries read, then one search per
        distinct ``(k, radius, re-ranked)``, under one read lock."""
        labels: list[Any] = [None] * len(requests)
        found: dict[int, tuple[list[int], list[int], list[Any]]] = {}
        with self._reading():
            stored = self.index.rerank_vectors
            for i, request in enumerate(requests):
                if request.item is None:
                    continue
                position = self._lookup.position(int(request.item))
                if position < 0:
                    outcomes[i] = NotFoundError(f"no item with id {request.item} in the index")
                    continue
                codes[i] = self._codes[position:position + 1].copy()
                vectors[i] = None if stored is None else stored[position].astype(np.float32)
                labels[i] = self.label_of(position)
            groups: dict[tuple[int, int | None, bool], list[int]] = {}
            for i, request in enumerate(requests):
                if outcomes[i] is None:
                    groups.setdefault((int(request.k), request.radius, vectors[i] is not None), []).append(i)
            for (k, radius, reranked), members in groups.items():
                rerank = np.stack([vectors[i] for i in members]) if reranked else None
                answers = self._neighbours(np.concatenate([codes[i] for i in members]), k, radius, rerank, self.shortlist)
                found.update(zip(members, answers))
        for i, neighbours in found.items():
            outcomes[i] = Answer(self._hits(neighbours), labels[i])
        return outcomes  # type: ignore[return-value]

    # ------------------------------------------------------------------ writes
    def _label_value(self, label: str | int | None) -> np.ndarray | None:
        """The stored label of an added item: int64 ``(1,)`` (or ``(1, C)`` multi-hot); -1 / zeros when unknown."""
        if self._labels is None:
            if label not in (None, "") and len(self._ids):
                raise DeephashError("this index keeps no labels: add the item without one")
            return None
        if label in (None, ""):
            number = -1
        elif str(label) in self.classes:
            number = self.classes.index(str(label))
        else:
            try:
                number = int(label)
            except ValueError:
                raise DeephashError(f"label {label!r} is not one of the classes ({', '.join(self.classes)})") from None
            if number < 0 or (self.classes and number >= len(self.classes)):
                raise DeephashError(f"label {number} is out of range (0 .. {max(len(self.classes), 1) - 1})")
        if self._labels.ndim == 2:
            row = np.zeros((1, self._labels.shape[1]), dtype=np.int64)
            if number >= 0:
                row[0, number] = 1
            return row
        return np.array([number], dtype=np.int64)

    def add_item(self, data: bytes, label: str | int | None = None, ident: int | None = None) -> int:
        """Add an uploaded image as a new item (encoded, its image stored); durable when it returns.

        Args:
            data: the image file's bytes (decoded as search uploads are, size limits included).
            label: a class name or number; None for unknown.
            ident: the new id; None: the index's next_id (never one handed out before).

        Returns:
            the new item's id.

        Raises:
            DeephashError: the service is read-only, the id is taken (DuplicateIdError), the label
            is unknown, or the image is refused (as for a search).
        """
        if self.living is None or self.index_dir is None:
            raise DeephashError("this service is read-only")
        if ident is not None and not 0 <= ident < 2**63:
            raise DeephashError(f"id {ident} is outside 0 .. 2**63-1")
        image = decode_image(data, self.input_shape, self.max_pixels, crop_fraction=self.crop_fraction)
        packed, vector = self._encode_pixels(image)
        vectors = None if vector is None or self.index.rerank_vectors is None and self.index.ntotal else vector[None, :]
        labels = self._label_value(label)
        index_dir = self.index_dir
        from deephash.retrieval.item_images import save_item_image

        def store(ids: np.ndarray) -> None:
            save_item_image(index_dir, int(ids[0]), image)  # on disk before the journal makes the item visible

        def applied(ids: np.ndarray) -> None:
            self._stored.update(int(i) for i in ids.tolist())
            self._refresh()

        added = self.living.add(packed, ids=None if ident is None else [int(ident)], labels=labels,
                                before=store, after=applied, rerank=vectors)
        return int(added[0])

    def remove_item(self, ident: int) -> None:
        """Remove an item; durable when it returns.

        Raises:
            NotFoundError: no item with this id. DeephashError: the service is read-only.
        """
        if self.living is None or self.index_dir is None:
            raise DeephashError("this service is read-only")
        if not 0 <= ident < 2**63:
            raise NotFoundError(f"no item with id {ident} in the index")
        index_dir = self.index_dir
        from deephash.retrieval.item_images import drop_item_images

        def applied(ids: np.ndarray) -> None:
            self._stored.difference_update(int(i) for i in ids.tolist())
            self._refresh()
            drop_item_images(index_dir, ids)  # before another writer can give the id to a new item

        self.living.remove([ident], after=applied)

    def image_png(self, ident: int) -> bytes:
        """The database image of an id as PNG bytes.

        Raises:
            NotFoundError: unknown id, or the index has no reachable images.
        """
        with self._reading():
            present = self._lookup.position(ident) >= 0
        stored = self._stored_image(ident) if present else None
        if stored is not None:
            try:
                return stored.read_bytes()  # a PNG written by save_item_image
            except FileNotFoundError:  # removed meanwhile
                raise NotFoundError(f"no image for item {ident}") from None
        if self.images is None:
            raise NotFoundError("this index has no database images to show")
        if not present or not self.has_image(ident):
            raise NotFoundError(f"no image for item {ident}")
        if isinstance(self.images, dict):
            return png_bytes(read_image(self.images[ident]), max_side=SHOWN_SIDE)
        return png_bytes(self.images[ident].numpy(), max_side=SHOWN_SIDE)
