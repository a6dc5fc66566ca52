"""``HashIndex``: a Hamming index over FAISS's binary indexes, with ids, labels and metadata.

FAISS needs a dimension divisible by 8; codes are packed to whole bytes with zero padding bits in
both queries and database, so the padded dimension leaves every distance unchanged. The codes FAISS
holds are padded further, with zero bytes, to the next width FAISS has a Hamming computer of its
own for (4, 8, 16, 20, 32 or 64 bytes; whole 64-bit words above: ``faiss_bytes``; the index's own
``codes`` column keeps ``ceil(bits/8)`` bytes): 48-bit codes held as 8 bytes are searched 3.5x
faster than as 6 (BENCHMARKS, "Search service, third pass"), and zero bytes on both sides change
no distance. The folder format is 2 since this padding; a format-1 folder (``index.faiss`` of
``d = 8 * ceil(bits/8)``) still loads: a ``BFlat`` one is rebuilt padded from the codes, another
factory's is kept as it is and searched at its own width. Older deephash refuses format 2.

Factories (FAISS's strings): ``"BFlat"`` exact; ``"BHash<b>"`` and ``"BHash<nh>x<b>"`` (multi-hash)
look up buckets of ``b`` bits; ``"BIVF<nlist>"`` inverted file, trained on the codes of the first
``add`` unless :meth:`HashIndex.train` was called before. Without FAISS (or with
``backend="torch"``) only ``"BFlat"`` is available, through the exact torch search.

The index keeps its own copy of the packed codes (``N * ceil(bits/8)`` bytes), so ``remove`` works
for every factory (hash indexes are rebuilt) and a saved index can be reopened without FAISS.

Per-item columns: ids, codes and the optional labels, re-rank vectors and paths (the image file
of each item, ``""`` for an item without one). Row ``i`` of every column describes the item
``ids[i]``; ``_append_rows`` and ``_keep_rows`` are the one place that adds and removes rows, so
the columns cannot drift apart. Each column is saved as its own ``.npy`` file (``_COLUMN_FILES``).

Ids: :attr:`HashIndex.next_id` is the smallest id never handed out (a high-water mark, saved as
``meta.json["next_id"]``). Default ids start there, so an id is never given out twice, even after
the item holding the largest id was removed. An explicit id above the mark advances it; an
explicit id below it that is not present is allowed (a caller re-adding a removed item under its
old id, on purpose) and leaves the mark where it is.

A saved folder may also hold a journal of later adds and removes (:mod:`deephash.retrieval.journal`):
:meth:`HashIndex.load` applies it, and :meth:`HashIndex.save` keeps every file it does not own
(the journal, the write lock, stored item images) across the atomic swap of the folder.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deephash._io import atomic_replace_dir
from deephash.errors import CodeLengthError, DataFormatError, DeephashError, NotFoundError, first_line
from deephash.retrieval.codes import n_bytes, pack_codes, padding_is_zero
from deephash._tensors import as_numpy

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 2
#: Folder formats this version reads (1: index.faiss at 8 * ceil(bits/8), before the padding).
READABLE_FORMATS = (1, 2)
_META_KEYS = {"format_version": int, "bits": int, "factory": str, "count": int, "created": str, "deephash_version": str}
#: The per-item columns and their files; ``ids`` and ``codes`` always exist, the others when kept.
_COLUMN_FILES = {"ids": "ids.npy", "codes": "codes.npy", "labels": "labels.npy", "rerank": "rerank.npy",
                 "paths": "paths.npy"}
#: Every file :meth:`HashIndex.save` may write (whether or not this save writes it): never carried over.
_OWN_FILES = frozenset({"meta.json", "index.faiss", *_COLUMN_FILES.values()})
#: One past the largest id an int64 holds: the highest ``next_id`` can go.
_ID_LIMIT = 2**63


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link every file of ``old`` the index does not own, and ``new`` does not have, into
    ``new`` (same inodes: open journal handles and held locks stay valid after the swap, and the
    files' data, fsynced when they were written, is not synced again: only the new folder entries are)."""
    if not old.is_dir():
        return
    import shutil

    for entry in old.iterdir():
        if entry.name in _OWN_FILES or os.path.lexists(new / entry.name):
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name, copy_function=os.link)
        elif entry.is_file():
            os.link(entry, new / entry.name)


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise DeephashError("this HashIndex needs FAISS: pip install faiss-cpu (or use factory='BFlat', backend='torch')") from None
    return faiss


def faiss_available() -> bool:
    """Whether ``import faiss`` succeeds."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class DuplicateIdError(DeephashError):
    """An added id is already in the index (or given twice)."""


@dataclass(frozen=True)
class ItemRows:
    """Checked rows to add (:meth:`HashIndex.checked_addition`): one value per item in each column.

    Attributes:
        ids: int64 ``(n,)``.
        codes: packed uint8 ``(n, ceil(bits/8))``.
        labels: int64 ``(n,)`` or ``(n, C)``, or None.
        rerank: float16 ``(n, D)``, or None.
        paths: unicode ``(n,)`` image paths (``""``: no file), or None.
    """

    ids: np.ndarray
    codes: np.ndarray
    labels: np.ndarray | None = None
    rerank: np.ndarray | None = None
    paths: np.ndarray | None = None


#: Code widths, in bytes, for which FAISS has a Hamming computer of its own (faster than its generic one).
FAISS_FAST_BYTES = (4, 8, 16, 20, 32, 64)


def faiss_bytes(bits: int) -> int:
    """Bytes per code in the FAISS index: ``ceil(bits/8)`` rounded up to the next width FAISS has
    its own Hamming computer for (``FAISS_FAST_BYTES``), and above 64 bytes to whole 64-bit words."""
    size = n_bytes(bits)
    return next((width for width in FAISS_FAST_BYTES if width >= size), 8 * ((size + 7) // 8))


def check_factory_fits(factory: str, bits: int) -> None:
    """Refuse a hash factory whose tables need more bits than the codes have (FAISS's own check
    sees the padded width, where the extra tables would hash only zero padding).

    Raises:
        DeephashError: ``BHash<b>`` with ``b > bits`` or ``BHash<nh>x<b>`` with ``nh * b > bits``.
    """
    match = re.fullmatch(r"BHash(?:(\d+)x)?(\d+)", factory)
    if match is None:
        return
    tables, width = int(match.group(1) or 1), int(match.group(2))
    if tables * width > int(bits):
        raise DeephashError(f"index factory {factory!r} hashes {tables * width} bits, but the codes have {bits}")


class HashIndex:
    """Hamming index of packed binary codes with user ids and optional labels.

    Args:
        bits: code length in bits (``>= 1``).
        factory: FAISS binary index factory string (see the module docstring).
        metadata: free JSON-serialisable description of the model that made the codes; saved as
            ``meta.json["model"]``.
        backend: ``"faiss"``, ``"torch"`` (exact, ``"BFlat"`` only) or ``None`` (FAISS when
            importable, else torch).
    """

    def __init__(self, bits: int, factory: str = "BFlat", metadata: Any = None, backend: str | None = None) -> None:
        if int(bits) < 1:
            raise DeephashError(f"bits must be >= 1, got {bits}")
        if backend is None:
            backend = "faiss" if faiss_available() else "torch"
        if backend not in ("faiss", "torch"):
            raise DeephashError(f"backend must be 'faiss' or 'torch', got {backend!r}")
        if backend == "torch" and factory != "BFlat":
            raise DeephashError(f"index factory {factory!r} needs FAISS (pip install faiss-cpu); the torch backend only does 'BFlat'")
        self.bits = int(bits)
        self.factory = factory
        self.metadata = metadata
        self.backend = backend
        self.n_bytes = n_bytes(self.bits)
        self._codes = np.zeros((0, self.n_bytes), dtype=np.uint8)
        self._ids = np.zeros(0, dtype=np.int64)
        self._labels: np.ndarray | None = None
        self._rerank: np.ndarray | None = None
        self._paths: np.ndarray | None = None
        self._next_id = 0
        self._faiss_index: Any = self._new_faiss_index() if backend == "faiss" else None
        #: Sequence number of the last journal record this index holds (0: none).
        self.journal_seq = 0
        #: ISO 8601 UTC time of the last journaled change, or None.
        self.changed: str | None = None

    # ------------------------------------------------------------------ state
    @property
    def ntotal(self) -> int:
        """Number of codes in the index."""
        return int(self._ids.shape[0])

    def __len__(self) -> int:
        return self.ntotal

    @property
    def ids(self) -> np.ndarray:
        """int64 ``(ntotal,)`` ids in insertion order."""
        return self._ids.copy()

    @property
    def codes(self) -> np.ndarray:
        """Packed uint8 ``(ntotal, ceil(bits/8))`` codes in insertion order."""
        return self._codes.copy()

    @property
    def labels(self) -> np.ndarray | None:
        """int64 ``(ntotal,)`` or ``(ntotal, C)`` labels, or ``None`` when none were added."""
        return None if self._labels is None else self._labels.copy()

    @property
    def rerank_vectors(self) -> np.ndarray | None:
        """float16 ``(ntotal, D)`` re-rank vectors (two-stage search), or ``None`` when none were added."""
        return self._rerank

    @property
    def paths(self) -> np.ndarray | None:
        """unicode ``(ntotal,)`` image path of each item (``""``: none), or ``None`` when the index keeps no paths."""
        return None if self._paths is None else self._paths.copy()

    @property
    def next_id(self) -> int:
        """The smallest id never handed out: default ids start here (``meta.json["next_id"]``)."""
        return self._next_id

    @property
    def rerank_bytes_per_item(self) -> int:
        """Bytes each item's re-rank vector takes (0 without vectors); its code takes ``n_bytes``."""
        return 0 if self._rerank is None else int(self._rerank.shape[1] * self._rerank.itemsize)

    @property
    def is_trained(self) -> bool:
        """Whether the index can accept codes (only ``BIVF`` needs training)."""
        return self._faiss_index is None or bool(self._faiss_index.is_trained)

    def _new_faiss_index(self) -> Any:
        faiss = _import_faiss()
        check_factory_fits(self.factory, self.bits)
        try:
            inner = faiss.index_binary_factory(faiss_bytes(self.bits) * 8, self.factory)
        except RuntimeError as error:
            raise DeephashError(f"unknown binary index factory {self.factory!r}: {str(error).splitlines()[-1]}") from None
        index = faiss.IndexBinaryIDMap2(inner)
        index.own_fields = True
        inner.this.disown()
        return index

    def _faiss_rows(self, packed: np.ndarray) -> np.ndarray:
        """Packed codes ``(N, n_bytes)`` zero-padded to the FAISS index's own width."""
        width = self._faiss_index.d // 8
        if packed.shape[1] == width:
            return packed
        rows = np.zeros((packed.shape[0], width), dtype=np.uint8)
        rows[:, :packed.shape[1]] = packed
        return rows

    # ------------------------------------------------------------------ input
    def _packed(self, codes: torch.Tensor | np.ndarray, what: str) -> np.ndarray:
        """Packed uint8 codes from packed uint8 or unpacked (N, bits) input (bool or integer {0, 1}
        bits, ±1 or real-valued signs: as :func:`~deephash.retrieval.codes.pack_codes`)."""
        array = as_numpy(codes)
        if array.ndim == 1:
            array = array[None, :]
        if array.ndim != 2:
            raise DeephashError(f"{what} must be 2-D, got shape {array.shape}")
        if array.dtype != np.uint8:
            if array.shape[1] != self.bits:
                raise CodeLengthError(f"{what} have {array.shape[1]} bits but the index holds {self.bits}-bit codes")
            return pack_codes(array)
        if array.shape[1] != self.n_bytes:
            raise CodeLengthError(
                f"{what} have {array.shape[1]} bytes ({array.shape[1] * 8} bits) "
                f"but the index holds {self.bits}-bit codes ({self.n_bytes} bytes)"
            )
        if not padding_is_zero(array, self.bits):
            raise DeephashError(f"{what} have non-zero padding bits beyond bit {self.bits}")
        return np.ascontiguousarray(array)

    # ------------------------------------------------------------------ building
    def train(self, codes: torch.Tensor | np.ndarray) -> None:
        """Train the index (``BIVF`` only; a no-op for the others) on packed ``(N, B)`` codes."""
        packed = self._packed(codes, "training codes")
        if self._faiss_index is None or self._faiss_index.is_trained:
            return
        try:
            self._faiss_index.train(self._faiss_rows(packed))
        except RuntimeError as error:
            raise DeephashError(f"training {self.factory} on {len(packed)} codes failed: {str(error).splitlines()[-1]}") from None

    def add(
        self,
        codes: torch.Tensor | np.ndarray,
        ids: torch.Tensor | np.ndarray | None = None,
        labels: torch.Tensor | np.ndarray | None = None,
        rerank: torch.Tensor | np.ndarray | None = None,
        paths: Any = None,
    ) -> None:
        """Add codes.

        Args:
            codes: packed uint8 ``(N, ceil(bits/8))``, or unpacked ``(N, bits)``: bool or integer
                {0, 1} bits, ±1 or real-valued signs (0 ↦ +1; floats holding only 0 and 1 are
                refused: pass bits as bool), as :func:`~deephash.retrieval.codes.pack_codes`.
            ids: int64 ``(N,)`` unique ids; default consecutive from :attr:`next_id` (never an id
                handed out before). An explicit id above the mark advances it; one below it that is
                not present is allowed (re-adding a removed item under its old id).
            labels: int ``(N,)`` or ``(N, C)``; either every ``add`` has labels or none does.
            rerank: float ``(N, D)`` vectors for a two-stage search (kept as float16; FAISS's
                ``IndexRefine`` pattern, see ``retrieval.search``); every ``add`` or none.
            paths: ``N`` image paths (strings); an index that keeps paths gets ``""`` (no file)
                for an add without them; one that keeps none (and is not empty) refuses them.
        """
        self._append_rows(self.checked_addition(codes, ids, labels, rerank, paths=paths))

    def checked_addition(self, codes: Any, ids: Any = None, labels: Any = None, rerank: Any = None,
                         name: str = "the index", paths: Any = None) -> ItemRows:
        """What `add` would add, checked and converted, without changing the index: the
        :class:`ItemRows` (default ids: consecutive from :attr:`next_id`). The arguments are
        `add`'s (codes: packed uint8, or unpacked bits / signs as `add` says); ``name`` is how
        messages call the index. An empty index takes the columns of its next add (labels, vectors, paths).

        Raises:
            DuplicateIdError: an id given twice or already in the index. DeephashError: ids, labels,
            vectors or paths of the wrong shape or kind, labels / vectors given where earlier adds
            gave none (or the reverse), paths given to an index that keeps none, no ids left.
        """
        packed = self._packed(codes, "codes")
        n = packed.shape[0]
        if ids is None:
            if self._next_id + n > _ID_LIMIT:
                raise DeephashError(f"no ids left in {name}: the next id would be {self._next_id} and ids stop at 2**63-1")
            id_array = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        else:
            id_array = as_numpy(ids).astype(np.int64).reshape(-1)
            if id_array.shape[0] != n:
                raise DeephashError(f"{id_array.shape[0]} ids for {n} codes")
            if (id_array < 0).any():
                raise DeephashError(f"ids must be >= 0 (-1 means 'no result'), got {int(id_array.min())}")
            values, counts = np.unique(id_array, return_counts=True)
            if (counts > 1).any():
                raise DuplicateIdError(f"id {int(values[counts > 1][0])} is given twice (ids must be unique)")
            taken = id_array[np.isin(id_array, self._ids)]
            if taken.size:
                raise DuplicateIdError(f"id {int(taken[0])} is already in {name}"
                                       f"{f' ({taken.size} ids are)' if taken.size > 1 else ''}; nothing was added (ids must be unique)")
        filled = self.ntotal > 0  # an empty index takes the columns of this add
        if filled and (labels is None) != (self._labels is None):
            want = "has labels: give a label for every item" if labels is None else "has no labels: give none"
            raise DeephashError(f"{name} {want} (either every add() passes labels or none does)")
        label_array = None
        if labels is not None:
            label_array = as_numpy(labels).astype(np.int64)
            if label_array.shape[:1] != (n,) or label_array.ndim not in (1, 2):
                raise DeephashError(f"labels of shape {label_array.shape} do not match {n} codes")
            if filled and label_array.shape[1:] != self._labels.shape[1:]:
                raise DeephashError(f"labels of shape {label_array.shape} do not match the index's {self._labels.shape[1:]}")
        if filled and (rerank is None) != (self._rerank is None):
            want = "keeps re-rank vectors: give one per item" if rerank is None else "keeps no re-rank vectors: give none"
            raise DeephashError(f"{name} {want} (either every add() passes re-rank vectors or none does)")
        vectors = None
        if rerank is not None:
            vectors = as_numpy(rerank).astype(np.float16)
            if vectors.ndim != 2 or vectors.shape[0] != n:
                raise DeephashError(f"re-rank vectors of shape {vectors.shape} do not match {n} codes")
            if filled and vectors.shape[1] != self._rerank.shape[1]:
                raise DeephashError(f"re-rank vectors have {vectors.shape[1]} values but the index keeps {self._rerank.shape[1]}")
        return ItemRows(id_array, packed, label_array, vectors, self._checked_paths(paths, n, name))

    def _checked_paths(self, paths: Any, n: int, name: str) -> np.ndarray | None:
        """unicode ``(n,)`` paths of an add: ``""`` each when the index keeps paths and none are given."""
        if paths is None:
            return np.full(n, "", dtype=np.str_) if self.ntotal and self._paths is not None else None
        if self.ntotal and self._paths is None:
            raise DeephashError(f"{name} keeps no paths: give none")
        array = np.array([str(p) for p in (paths.tolist() if isinstance(paths, np.ndarray) else paths)], dtype=np.str_)
        if array.shape != (n,):
            raise DeephashError(f"{array.shape[0]} paths for {n} codes")
        return array

    def _append_rows(self, rows: ItemRows) -> None:
        """Add checked rows to every column (and FAISS) and advance :attr:`next_id`; with
        :meth:`_keep_rows`, the one place that changes the columns."""
        n = rows.ids.shape[0]
        if self._faiss_index is not None and n:
            if not self._faiss_index.is_trained:
                self.train(rows.codes)
            self._faiss_index.add_with_ids(self._faiss_rows(rows.codes), rows.ids)
        empty = self.ntotal == 0
        for column in _COLUMN_FILES:
            old, new = getattr(self, f"_{column}"), getattr(rows, column)
            if empty and column not in ("ids", "codes"):
                setattr(self, f"_{column}", new)  # an empty index takes the columns of this add
            elif new is not None:
                setattr(self, f"_{column}", np.concatenate([old, new]))
        if n:
            self._next_id = max(self._next_id, int(rows.ids.max()) + 1)

    def _keep_rows(self, keep: np.ndarray) -> None:
        """Keep the rows where the bool ``(ntotal,)`` mask ``keep`` is True, in every column."""
        for column in _COLUMN_FILES:
            old = getattr(self, f"_{column}")
            if old is not None:
                setattr(self, f"_{column}", old[keep])

    def remove(self, ids: torch.Tensor | np.ndarray | list[int]) -> int:
        """Remove the items with these ids (unknown ids are ignored); returns how many were removed.
        Their ids are not handed out again (:attr:`next_id` stays)."""
        id_array = np.asarray(as_numpy(ids), dtype=np.int64).reshape(-1)
        keep = ~np.isin(self._ids, id_array)
        removed = int((~keep).sum())
        if removed == 0:
            return 0
        self._keep_rows(keep)
        if self._faiss_index is not None:
            try:
                self._faiss_index.remove_ids(_import_faiss().IDSelectorBatch(id_array))
            except RuntimeError:  # hash indexes cannot remove: rebuild from the kept codes
                self._faiss_index = self._new_faiss_index()
                if self.ntotal:
                    self._faiss_index.add_with_ids(self._faiss_rows(self._codes), self._ids)
        return removed

    # ------------------------------------------------------------------ search
    def search(self, codes: torch.Tensor | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest codes of each query.

        Args:
            codes: queries, packed uint8 ``(nq, ceil(bits/8))`` or unpacked ``(nq, bits)``.
            k: neighbours per query (``>= 1``).

        Returns:
            ``(D, I)``: int32 ``(nq, k)`` Hamming distances and int64 ``(nq, k)`` ids, nearest
            first; both ``-1`` where fewer than ``k`` results exist. The exact indexes break ties
            by insertion order in the torch backend; FAISS's order within a tie is its own.
        """
        if int(k) < 1:
            raise DeephashError(f"k must be >= 1, got {k}")
        packed = self._packed(codes, "query codes")
        k = int(k)
        if self._faiss_index is None:
            from deephash.retrieval.hamming import hamming_knn  # the torch backend: torch only here

            distances, positions = hamming_knn(packed, self._codes, k)
            found = positions >= 0
            return distances, np.where(found, self._ids[np.maximum(positions, 0)], -1)
        distances, labels = self._faiss_index.search(self._faiss_rows(packed), k)
        missing = labels < 0
        distances = distances.astype(np.int32)
        distances[missing] = -1
        return distances, labels.astype(np.int64)

    def range_search(self, codes: torch.Tensor | np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every code within Hamming distance ``<= radius`` (inclusive) of each query.

        Returns:
            ``(lims, D, I)``: int64 ``(nq + 1,)`` offsets, int32 distances and int64 ids; the
            results of query ``i`` are ``D[lims[i]:lims[i+1]]``, ``I[lims[i]:lims[i+1]]``, sorted by
            distance then id.
        """
        packed = self._packed(codes, "query codes")
        radius = int(radius)
        nq = packed.shape[0]
        if radius < 0 or self.ntotal == 0:
            return np.zeros(nq + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64)
        if self._faiss_index is None:
            from deephash.retrieval.hamming import hamming_range

            lims, distances, positions = hamming_range(packed, self._codes, radius)
            ids = self._ids[positions]
        else:  # FAISS's binary radius is strict (d < radius)
            lims, distances, ids = self._faiss_index.range_search(self._faiss_rows(packed), radius + 1)
            lims, distances, ids = lims.astype(np.int64), distances.astype(np.int32), ids.astype(np.int64)
        query = np.repeat(np.arange(nq), np.diff(lims))
        order = np.lexsort((ids, distances, query))
        return lims, distances[order], ids[order]

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Write the index to the folder ``path`` atomically (replacing any old one).

        Files: ``meta.json`` (format_version, bits, factory, count, created (ISO 8601 UTC),
        deephash_version, model, journal_seq, changed, next_id), a ``.npy`` per column
        (``_COLUMN_FILES``): ``codes.npy``, ``ids.npy``, ``labels.npy`` (when labels were added),
        ``rerank.npy`` (float16 re-rank vectors, when added), ``paths.npy`` (unicode image paths,
        when kept), and ``index.faiss`` (FAISS backend). Other files of an existing folder (a
        journal, a lock file, item images) are kept.
        """
        from deephash._version import __version__

        final = Path(path)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        try:
            meta = {
                "format_version": FORMAT_VERSION,
                "bits": self.bits,
                "factory": self.factory,
                "count": self.ntotal,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                "deephash_version": __version__,
                "model": self.metadata,
                "journal_seq": self.journal_seq,
                "changed": self.changed,
                "next_id": self._next_id,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
            for column, name in _COLUMN_FILES.items():
                if (array := getattr(self, f"_{column}")) is not None:
                    np.save(tmp / name, array)
            if self._faiss_index is not None:
                data = _import_faiss().serialize_index_binary(self._faiss_index)
                (tmp / "index.faiss").write_bytes(data.tobytes())
            written = [tmp / name for name in _OWN_FILES if (tmp / name).exists()]
            _carry_over(final, tmp)
            atomic_replace_dir(tmp, final, written=written)  # the carried-over files are durable already
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # Long by design: one check per file and field of an untrusted folder, each with its own
    # one-line message; splitting it would scatter the file format over several functions.
    @classmethod
    def load(cls, path: str | os.PathLike, backend: str | None = None) -> HashIndex:
        """Read an index written by :meth:`save`, with the changes of its journal applied.

        Args:
            path: the index folder.
            backend: as in the constructor; ``None`` uses FAISS when importable and the folder has
                ``index.faiss``, else the torch search (``BFlat`` only).

        Raises:
            NotFoundError: the folder does not exist.
            DataFormatError: a file is missing, unreadable or inconsistent (named in the message).
        """
        from deephash.retrieval.journal import JOURNAL_FILE, apply_record, read_journal

        index = cls._load_snapshot(path, backend)
        for record in read_journal(Path(path) / JOURNAL_FILE).records:
            try:
                apply_record(index, record)
            except DeephashError as error:
                raise DataFormatError(f"index folder {path}: journal record {record.seq} does not apply: {first_line(error)}") from None
        return index

    @classmethod
    def _load_snapshot(cls, path: str | os.PathLike, backend: str | None) -> HashIndex:
        folder = Path(path)
        if not folder.is_dir():
            raise NotFoundError(f"index folder {folder} does not exist")

        def bad(problem: str) -> DataFormatError:
            return DataFormatError(f"index folder {folder}: {problem}")

        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise bad("missing meta.json")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise bad(f"meta.json is not valid JSON ({error})") from None
        if not isinstance(meta, dict):
            raise bad("meta.json must hold an object")
        for key, kind in _META_KEYS.items():
            if key not in meta:
                raise bad(f"meta.json lacks '{key}'")
            if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
                raise bad(f"meta.json '{key}' must be {kind.__name__}, got {type(meta[key]).__name__}")
        if meta["format_version"] not in READABLE_FORMATS:
            raise bad(f"format_version {meta['format_version']} is not supported (this deephash reads "
                      f"{', '.join(map(str, READABLE_FORMATS))})")
        bits, count = meta["bits"], meta["count"]
        if bits < 1 or count < 0:
            raise bad(f"meta.json has bits={bits}, count={count}")
        for key in ("journal_seq", "next_id"):  # optional: folders written before them lack them
            value = meta.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _ID_LIMIT):
                raise bad(f"meta.json '{key}' must be int in 0 .. 2**63, got {value!r:.40}")

        def read(name: str, dtype: type, shape: tuple[int, ...] | None) -> np.ndarray:
            file = folder / name
            if not file.is_file():
                raise bad(f"missing {name}")
            try:
                array = np.load(file, allow_pickle=False)
            except Exception as error:  # noqa: BLE001 - numpy's header parser raises SyntaxError, TokenError...
                raise bad(f"{name} is not a readable .npy file ({first_line(error)})") from None
            right_type = array.dtype.kind == "U" if dtype is np.str_ else array.dtype == dtype
            if not right_type or (shape is not None and array.shape != shape):
                want = f"{np.dtype(dtype).name} {shape}" if shape else np.dtype(dtype).name
                raise bad(f"{name} holds {array.dtype} {array.shape}, expected {want}")
            return array

        codes = read("codes.npy", np.uint8, (count, n_bytes(bits)))
        ids = read("ids.npy", np.int64, (count,))
        if not padding_is_zero(codes, bits):
            raise bad("codes.npy has non-zero padding bits")
        if np.unique(ids).shape[0] != count:
            raise bad("ids.npy holds duplicate ids")
        labels = None
        if (folder / "labels.npy").exists():
            labels = read("labels.npy", np.int64, None)
            if labels.ndim not in (1, 2) or labels.shape[0] != count:
                raise bad(f"labels.npy has shape {labels.shape}, expected ({count},) or ({count}, C)")
        rerank = None
        if (folder / "rerank.npy").exists():
            rerank = read("rerank.npy", np.float16, None)
            if rerank.ndim != 2 or rerank.shape[0] != count:
                raise bad(f"rerank.npy has shape {rerank.shape}, expected ({count}, D)")
        metadata = meta.get("model")
        paths = None
        if isinstance(metadata, dict) and "paths" in metadata:  # folders written before paths.npy: migrate
            metadata = dict(metadata)
            old_paths = metadata.pop("paths")
            if old_paths is not None and not (folder / "paths.npy").exists():
                if not isinstance(old_paths, list) or len(old_paths) != count or not all(isinstance(p, str) for p in old_paths):
                    raise bad(f"meta.json 'model.paths' must be a list of {count} strings")
                paths = np.array(old_paths, dtype=np.str_).reshape(count)
        if (folder / "paths.npy").exists():
            paths = read("paths.npy", np.str_, None)
            if paths.shape != (count,):
                raise bad(f"paths.npy has shape {paths.shape}, expected ({count},)")
        next_id = int(ids.max()) + 1 if count else 0
        if meta.get("next_id") is not None:
            if meta["next_id"] < next_id:
                raise bad(f"meta.json next_id {meta['next_id']} is not above the largest id {next_id - 1}")
            next_id = meta["next_id"]
        has_faiss_file = (folder / "index.faiss").is_file()
        if backend is None:
            backend = "faiss" if has_faiss_file and faiss_available() else "torch"
        if backend == "faiss" and not has_faiss_file:
            raise bad("missing index.faiss")
        try:
            index = cls(bits, meta["factory"], metadata=metadata, backend=backend)
        except DeephashError as error:
            raise bad(str(error)) from None
        index._codes, index._ids, index._labels, index._rerank, index._paths = codes, ids, labels, rerank, paths
        index._next_id = next_id
        index.journal_seq = int(meta.get("journal_seq") or 0)
        index.changed = meta.get("changed") if isinstance(meta.get("changed"), str) else None
        if backend == "faiss":
            faiss = _import_faiss()
            raw = np.fromfile(folder / "index.faiss", dtype=np.uint8)
            try:
                loaded = faiss.deserialize_index_binary(raw)
            except RuntimeError:
                raise bad("index.faiss is not a readable FAISS binary index") from None
            if loaded.d % 8 or loaded.d < n_bytes(bits) * 8 or loaded.ntotal != count:
                raise bad(f"index.faiss holds {loaded.ntotal} codes of {loaded.d} bits, meta.json says {count} of {bits}")
            if not isinstance(loaded, faiss.IndexBinaryIDMap2):
                raise bad("index.faiss is not an id-mapped binary index")
            if not np.array_equal(faiss.vector_to_array(loaded.id_map), ids):
                raise bad("index.faiss ids differ from ids.npy")
            index._faiss_index = loaded
            if loaded.d != faiss_bytes(bits) * 8 and index.factory == "BFlat":  # written unpadded: rebuild, exact
                index._faiss_index = index._new_faiss_index()
                if count:
                    index._faiss_index.add_with_ids(index._faiss_rows(codes), ids)
        return index
