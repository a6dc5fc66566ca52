"""The journal of a living index: adds and removes appended to ``INDEX/journal.log``, replayed on load.

A living index is a :class:`~deephash.retrieval.index.HashIndex` snapshot folder plus this
journal inside it. Every change is one record, appended and fsynced before the change is
acknowledged; loading the folder applies the records newer than the snapshot
(``HashIndex.journal_seq``), and folding saves a new snapshot (atomically) and empties the journal.

Record layout (little-endian): ``b"DHJ1"``, ``uint32`` payload length, ``uint32`` CRC32 of the
payload, then the payload: a UTF-8 JSON header (``op``, ``seq``, ``n``, ``time``, label shape,
paths), a NUL byte, and the raw arrays (ids int64, then for ``add`` codes uint8, labels int64 and
re-rank vectors float16). Every ``add`` names its ids, so replaying the journal also recovers the
index's id mark (``HashIndex.next_id``) when a crash came before the fold.

A record cut short by a crash (the last one, incomplete or failing its checksum with nothing
after it) is dropped with a :class:`TornJournalWarning`; a bad record followed by more data is
corruption, not a crash, and raises :class:`~deephash.errors.DataFormatError`.

Writers take :class:`IndexLock` (``fcntl.flock`` on ``INDEX/.lock``, never blocking) so a running
server and the command line never write one index at the same time.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deephash.errors import DataFormatError, DeephashError, first_line

__all__ = ["JOURNAL_FILE", "LOCK_FILE", "IndexLock", "IndexLockedError", "Journal", "JournalWriteError", "Record",
           "TornJournalWarning", "apply_record", "decode_payload", "encode_record", "read_journal"]

JOURNAL_FILE = "journal.log"
LOCK_FILE = ".lock"
MAGIC = b"DHJ1"
_HEADER = struct.Struct("<4sII")
#: Largest payload a record may declare (a garbled length is refused before anything is read).
MAX_RECORD_BYTES = 1 << 31


class TornJournalWarning(UserWarning):
    """The journal's last record was cut short by a crash and was dropped."""


class IndexLockedError(DeephashError):
    """Another process holds the index's write lock."""


class JournalWriteError(DeephashError):
    """A journal record could not be written (a full disk, a failing fsync): the change was not made."""


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat()


@dataclass(frozen=True)
class Record:
    """One change of a living index.

    Attributes:
        op: ``"add"`` or ``"remove"``.
        seq: the record's sequence number (1, 2, ...; a snapshot holds every record ``<= journal_seq``).
        ids: int64 ``(n,)``.
        codes: packed uint8 ``(n, ceil(bits/8))`` for ``add``, else None.
        labels: int64 ``(n,)`` or ``(n, C)`` for an ``add`` to a labelled index, else None.
        paths: an image path per added item (indexes that keep a paths column), else None.
        time: ISO 8601 UTC time of the change.
        rerank: float16 ``(n, D)`` re-rank vectors for an ``add`` to an index that keeps them, else None.
    """

    op: str
    seq: int
    ids: np.ndarray
    codes: np.ndarray | None = None
    labels: np.ndarray | None = None
    paths: list[str] | None = None
    time: str = field(default_factory=_now)
    rerank: np.ndarray | None = None


def encode_record(record: Record) -> bytes:
    """The bytes of one record: header (magic, length, CRC32) and payload."""
    ids = np.ascontiguousarray(record.ids, dtype="<i8")
    head: dict[str, Any] = {"op": record.op, "seq": int(record.seq), "n": int(ids.shape[0]), "time": record.time}
    blobs = [ids.tobytes()]
    if record.op == "add":
        codes = np.ascontiguousarray(record.codes, dtype=np.uint8)
        head["bytes"] = int(codes.shape[1])
        blobs.append(codes.tobytes())
        if record.labels is not None:
            labels = np.ascontiguousarray(record.labels, dtype="<i8")
            head["label_shape"] = list(labels.shape[1:])
            blobs.append(labels.tobytes())
        if record.paths is not None:
            head["paths"] = [str(p) for p in record.paths]
        if record.rerank is not None:
            vectors = np.ascontiguousarray(record.rerank, dtype="<f2")
            head["rerank_dim"] = int(vectors.shape[1])
            blobs.append(vectors.tobytes())
    elif record.op != "remove":
        raise DeephashError(f"journal op must be 'add' or 'remove', got {record.op!r}")
    payload = json.dumps(head, separators=(",", ":")).encode("utf-8") + b"\0" + b"".join(blobs)
    return _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def decode_payload(payload: bytes) -> Record:
    """The record of a checksum-verified payload (raises DataFormatError when it is inconsistent)."""
    split = payload.find(b"\0")
    try:
        head = json.loads(payload[:split].decode("utf-8"))
        n, op = int(head["n"]), head["op"]
        blob = memoryview(payload)[split + 1:]
        ids = np.frombuffer(blob[:8 * n], dtype="<i8").astype(np.int64)
        if op == "remove":
            return Record("remove", int(head["seq"]), ids, time=head["time"])
        width = int(head["bytes"])
        offset = 8 * n
        codes = np.frombuffer(blob[offset:offset + n * width], dtype=np.uint8).reshape(n, width).copy()
        offset += n * width
        labels = None
        if "label_shape" in head:
            shape = (n, *head["label_shape"])
            count = int(np.prod(shape))
            labels = np.frombuffer(blob[offset:offset + 8 * count], dtype="<i8").astype(np.int64).reshape(shape)
            offset += 8 * count
        rerank = None
        if "rerank_dim" in head:
            dim = int(head["rerank_dim"])
            rerank = np.frombuffer(blob[offset:offset + 2 * n * dim], dtype="<f2").astype(np.float16).reshape(n, dim)
            offset += 2 * n * dim
        if offset != len(blob) or ids.shape != (n,):
            raise ValueError(f"{len(blob)} bytes of arrays, expected {offset}")
        return Record("add", int(head["seq"]), ids, codes, labels, head.get("paths"), head["time"], rerank)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise DataFormatError(f"journal record does not decode: {error}") from None


@dataclass(frozen=True)
class JournalScan:
    """What :func:`read_journal` found: the good records, where they end, and the bytes dropped."""

    records: list[Record]
    end: int
    dropped: int


def read_journal(path: str | os.PathLike) -> JournalScan:
    """Read every complete record of a journal file (an absent file is an empty journal).

    Raises:
        DataFormatError: a record fails its checksum (or magic) and more data follows it.
    Warns:
        TornJournalWarning: the last record is incomplete or fails its checksum; it is dropped.
    """
    path = Path(path)
    data = path.read_bytes() if path.is_file() else b""
    records: list[Record] = []
    offset = 0
    while offset < len(data):
        problem = None
        if len(data) - offset < _HEADER.size:
            problem, record_end = "an incomplete header", len(data)
        else:
            magic, length, crc = _HEADER.unpack_from(data, offset)
            record_end = offset + _HEADER.size + length
            if magic != MAGIC or length > MAX_RECORD_BYTES:
                problem = "a bad header"
                record_end = len(data) if not any(data[offset:]) else offset + _HEADER.size
            elif record_end > len(data):
                problem = f"{len(data) - offset - _HEADER.size} of {length} payload bytes"
            elif zlib.crc32(data[offset + _HEADER.size:record_end]) != crc:
                problem = "a bad checksum"
        if problem is not None:
            if record_end >= len(data) or not any(data[offset:]):
                warnings.warn(f"{path}: dropped a torn last record at byte {offset} ({problem}, "
                              f"{len(data) - offset} bytes): a write that was never acknowledged", TornJournalWarning, stacklevel=2)
                return JournalScan(records, offset, len(data) - offset)
            raise DataFormatError(f"{path}: record at byte {offset} has {problem} and {len(data) - record_end} bytes follow it: "
                                  "the journal is corrupt (not a torn write); restore it or remove it to lose its changes")
        record = decode_payload(data[offset + _HEADER.size:record_end])
        if records and record.seq <= records[-1].seq:
            raise DataFormatError(f"{path}: record at byte {offset} has seq {record.seq} after seq {records[-1].seq}")
        records.append(record)
        offset = record_end
    return JournalScan(records, offset, 0)


def apply_record(index: Any, record: Record) -> None:
    """Apply one record to a ``HashIndex`` (every per-item column, paths included) and advance
    its ``journal_seq`` (and, through ``add``, its ``next_id`` past the record's ids).

    Records at or below the index's ``journal_seq`` are already in it and are skipped, so
    replaying a journal twice changes nothing. An ``add`` of an id already present replaces it.
    Because every ``add`` record names its ids, replaying the journal recovers ``next_id`` even
    when the items were removed again before the snapshot was folded.
    """
    if record.seq <= index.journal_seq:
        return
    index.remove(record.ids)
    if record.op == "add":
        index.add(record.codes, ids=record.ids, labels=record.labels, rerank=record.rerank, paths=record.paths)
    index.journal_seq = record.seq
    index.changed = record.time


class Journal:
    """The append side of a journal file.

    A failed append (a write cut short by a full disk, an fsync that raises) is cut off again:
    the file is truncated back to the end of the good records, so the next append and every load
    see only whole records, and the record's ``seq`` is not used up. When even that truncation
    fails the journal is *broken*: it refuses every later append until the index is reopened
    (whose :func:`read_journal` drops the torn tail).

    Args:
        path: the journal file (created when missing).
        end: byte offset where the good records end (from :func:`read_journal`); anything after
            it (a torn record) is cut off before the first append.
        last_seq: sequence number of the last record already in the journal or the snapshot.
    """

    def __init__(self, path: str | os.PathLike, end: int = 0, last_seq: int = 0) -> None:
        self.path = Path(path)
        self.last_seq = int(last_seq)
        self.records = 0
        self._fd = -1
        self._end = int(end)  # where the good (acknowledged) records end: kept current by every append
        self._broken = ""  # why appends are refused ("" while the journal is usable)
        self._closed = False
        if self.path.exists() and self.path.stat().st_size != end:
            self._file()  # cut the torn tail now

    def _file(self) -> int:
        """The open descriptor, positioned at the end of the good records (the file is created on first use)."""
        if self._closed:
            raise DeephashError(f"journal {self.path} is closed: reopen the index to write to it")
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if os.fstat(self._fd).st_size != self._end:
                os.ftruncate(self._fd, self._end)
                os.fsync(self._fd)
            os.lseek(self._fd, self._end, os.SEEK_SET)
        return self._fd

    @property
    def broken(self) -> str:
        """Why the journal refuses appends (a failed write it could not cut off), or ``""``."""
        return self._broken

    def next_seq(self) -> int:
        """The sequence number the next record gets."""
        return self.last_seq + 1

    def append(self, record: Record) -> None:
        """Write one record and fsync it; when this returns the record survives a crash.

        Raises:
            JournalWriteError: the write or its fsync failed (the record is not in the journal and
                ``last_seq`` is unchanged), or the journal is broken by an earlier such failure.
        """
        if self._broken:
            raise JournalWriteError(f"journal {self.path} refuses writes: {self._broken}; reopen the index")
        if record.seq != self.next_seq():
            raise DeephashError(f"journal record seq {record.seq} is not the next one ({self.next_seq()})")
        data = encode_record(record)
        fd = -1
        try:
            fd = self._file()  # its first open may fail too (a full disk): nothing written then
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        except BaseException as error:
            if fd >= 0:
                self._cut_back(fd, record.seq, error)
            if not isinstance(error, OSError):
                raise
            raise JournalWriteError(f"journal {self.path}: writing record {record.seq} failed ({first_line(error)}); "
                                    "the change was not made") from error
        self._end += len(data)
        self.last_seq = record.seq
        self.records += 1

    def _cut_back(self, fd: int, seq: int, error: BaseException) -> None:
        """Truncate what a failed append left after the good records; if that fails too, break the journal."""
        try:
            os.ftruncate(fd, self._end)
            os.lseek(fd, self._end, os.SEEK_SET)
        except OSError as cut:
            self._broken = (f"writing record {seq} failed ({first_line(error)}) and cutting it off failed too "
                            f"({first_line(cut)})")
            raise JournalWriteError(f"journal {self.path}: {self._broken}; it refuses writes until the index is reopened") from error

    def truncate(self) -> None:
        """Empty the journal (after its records were folded into a snapshot)."""
        if self._fd >= 0 or self.path.exists():
            fd = self._file()
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            self._end = 0
            os.fsync(fd)
        self.records = 0

    def close(self) -> None:
        """Close the file; later appends are refused."""
        self._closed = True
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class IndexLock:
    """The write lock of an index folder: ``fcntl.flock`` on ``INDEX/.lock``, never waiting.

    Args:
        index_dir: the index folder.
        holder: what takes it (written into the file, named in other writers' errors).
    """

    def __init__(self, index_dir: str | os.PathLike, holder: str = "") -> None:
        self.index_dir = Path(index_dir)
        self.holder = holder
        self._fd = -1

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            IndexLockedError: another process holds it (the message names it).
        """
        import fcntl

        fd = os.open(self.index_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise IndexLockedError(f"index {self.index_dir} is locked for writing by {owner}; "
                                   "stop that server or command (or wait for it) and try again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}{f' ({self.holder})' if self.holder else ''}".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the lock back."""
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = -1

    def __enter__(self) -> IndexLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
