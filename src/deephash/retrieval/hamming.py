"""Exact Hamming search in torch: XOR + popcount on 64-bit words, chunked to bound memory.

Used by :class:`~deephash.retrieval.index.HashIndex` when FAISS is absent and by the metrics.
Ties are broken by database position (lower first), so results are deterministic.
"""

from __future__ import annotations

import numpy as np
import torch

from deephash.errors import CodeLengthError, DeephashError

_M1 = 0x5555555555555555
_M2 = 0x3333333333333333
_M4 = 0x0F0F0F0F0F0F0F0F
_H01 = 0x0101010101010101
CHUNK_ELEMENTS = 1 << 18  # words per temporary (2 MiB of int64: stays in cache)


def _as_tensor(codes: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(codes)
    if tensor.dtype != torch.uint8 or tensor.dim() != 2:
        raise DeephashError(f"{name} must be packed uint8 (N, bytes), got {tensor.dtype} {tuple(tensor.shape)}")
    return tensor


def as_words(packed: torch.Tensor) -> torch.Tensor:
    """View packed uint8 ``(N, B)`` codes as int64 ``(N, ceil(B/8))`` words (zero padded)."""
    spare = (-packed.shape[1]) % 8
    if spare:
        packed = torch.nn.functional.pad(packed, (0, spare))
    return packed.contiguous().view(torch.int64)


def _popcount_(x: torch.Tensor) -> torch.Tensor:
    """Population count of each int64 in place (SWAR); values end up in ``0..64``."""
    x -= (x >> 1) & _M1
    x.copy_((x & _M2) + ((x >> 2) & _M2))
    x += x >> 4
    x &= _M4
    x *= _H01  # wraps around: the top byte holds the sum of the eight byte counts
    x >>= 56
    return x


def word_distances(q_words: torch.Tensor, db_words: torch.Tensor) -> torch.Tensor:
    """Hamming distances between int64 word codes, int32 ``(nq, n)``; chunked over both sides."""
    nq, n, width = q_words.shape[0], db_words.shape[0], q_words.shape[1]
    out = torch.empty((nq, n), dtype=torch.int32, device=q_words.device)
    db_step = max(1, min(n, CHUNK_ELEMENTS // max(width, 1)))
    q_step = max(1, CHUNK_ELEMENTS // (db_step * max(width, 1)))
    for d0 in range(0, n, db_step):
        db_chunk = db_words[d0 : d0 + db_step]
        for q0 in range(0, nq, q_step):
            x = q_words[q0 : q0 + q_step, None, :] ^ db_chunk[None, :, :]
            out[q0 : q0 + q_step, d0 : d0 + db_step] = _popcount_(x).sum(dim=2, dtype=torch.int32)
    return out


def small_distances(q_words: np.ndarray, db_words: np.ndarray) -> np.ndarray:
    """Hamming distances between word codes in the narrowest dtype, for the metrics.

    Args:
        q_words: uint64 (or int64) ``(nq, W)`` codes, as :func:`as_words` makes them.
        db_words: the same for ``(n, W)``.

    Returns:
        ``(nq, n)`` distances: uint8 when ``64 * W <= 255``, else uint16. numpy's ``bitwise_count``
        (numpy >= 2) when present, else the torch SWAR popcount.
    """
    q_words, db_words = q_words.view(np.uint64), db_words.view(np.uint64)
    dtype = np.uint8 if 64 * q_words.shape[1] <= 255 else np.uint16
    if not hasattr(np, "bitwise_count"):  # numpy < 2
        out = word_distances(torch.from_numpy(q_words.view(np.int64)), torch.from_numpy(db_words.view(np.int64)))
        return out.numpy().astype(dtype)
    xor = np.bitwise_xor(q_words[:, None, 0], db_words[None, :, 0])
    out = np.bitwise_count(xor).astype(dtype, copy=False)
    for w in range(1, q_words.shape[1]):  # a few words at most
        np.bitwise_xor(q_words[:, None, w], db_words[None, :, w], out=xor)
        out += np.bitwise_count(xor)
    return out


def _check_widths(q: torch.Tensor, db: torch.Tensor) -> None:
    if q.shape[1] != db.shape[1]:
        raise CodeLengthError(f"query codes have {q.shape[1]} bytes but database codes have {db.shape[1]} bytes")


def hamming_distances(q: torch.Tensor | np.ndarray, db: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Exact Hamming distances between packed codes.

    Args:
        q: packed uint8 ``(nq, B)`` query codes.
        db: packed uint8 ``(n, B)`` database codes.

    Returns:
        int32 ``(nq, n)``; a numpy array when ``q`` is one, else a tensor on ``q``'s device.
    """
    q_t, db_t = _as_tensor(q, "query codes"), _as_tensor(db, "database codes")
    _check_widths(q_t, db_t)
    out = word_distances(as_words(q_t), as_words(db_t.to(q_t.device)))
    return out if isinstance(q, torch.Tensor) else out.numpy()


def hamming_knn(q: torch.Tensor | np.ndarray, db: torch.Tensor | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest database codes of each query, ties broken by database position.

    Args:
        q: packed uint8 ``(nq, B)``.
        db: packed uint8 ``(n, B)``.
        k: number of neighbours (``>= 1``).

    Returns:
        ``(D, I)``: int32 ``(nq, k)`` distances and int64 ``(nq, k)`` database positions, sorted by
        distance then position; ``-1`` in both where fewer than ``k`` codes exist.
    """
    if k < 1:
        raise DeephashError(f"k must be >= 1, got {k}")
    q_t, db_t = _as_tensor(q, "query codes"), _as_tensor(db, "database codes")
    _check_widths(q_t, db_t)
    nq, n = q_t.shape[0], db_t.shape[0]
    distances = np.full((nq, k), -1, dtype=np.int32)
    positions = np.full((nq, k), -1, dtype=np.int64)
    kk = min(k, n)
    if kk == 0 or nq == 0:
        return distances, positions
    q_w, db_w = as_words(q_t), as_words(db_t)
    arange = torch.arange(n, dtype=torch.int64)
    step = max(1, CHUNK_ELEMENTS // n)
    for q0 in range(0, nq, step):
        keys = word_distances(q_w[q0 : q0 + step], db_w).to(torch.int64) * n + arange
        top = torch.topk(keys, kk, dim=1, largest=False, sorted=True).values
        distances[q0 : q0 + step, :kk] = (top // n).numpy()
        positions[q0 : q0 + step, :kk] = (top % n).numpy()
    return distances, positions


def hamming_range(
    q: torch.Tensor | np.ndarray, db: torch.Tensor | np.ndarray, radius: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All database codes within Hamming distance ``<= radius`` (inclusive) of each query.

    Returns:
        ``(lims, D, I)`` as FAISS: int64 ``(nq + 1,)`` offsets; the results of query ``i`` are
        ``D[lims[i]:lims[i+1]]`` (int32 distances) and ``I[...]`` (int64 database positions),
        sorted by distance then position.
    """
    q_t, db_t = _as_tensor(q, "query codes"), _as_tensor(db, "database codes")
    _check_widths(q_t, db_t)
    nq, n = q_t.shape[0], db_t.shape[0]
    q_w, db_w = as_words(q_t), as_words(db_t)
    counts, all_d, all_i = [], [], []
    step = max(1, CHUNK_ELEMENTS // max(n, 1))
    for q0 in range(0, nq, step):
        dist = word_distances(q_w[q0 : q0 + step], db_w)
        rows, cols = torch.nonzero(dist <= radius, as_tuple=True)  # row-major: cols ascend per row
        d = dist[rows, cols]
        order = torch.sort(rows * (int(radius) + 1) + d.to(torch.int64), stable=True).indices
        counts.append(torch.bincount(rows, minlength=dist.shape[0]))
        all_d.append(d[order])
        all_i.append(cols[order])
    lims = np.zeros(nq + 1, dtype=np.int64)
    if nq:
        lims[1:] = torch.cumsum(torch.cat(counts), 0).numpy()
        return lims, torch.cat(all_d).numpy().astype(np.int32), torch.cat(all_i).numpy().astype(np.int64)
    return lims, np.zeros(0, np.int32), np.zeros(0, np.int64)
