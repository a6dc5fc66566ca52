"""The one search engine: a query's neighbours in a :class:`HashIndex`, by ``k`` and/or ``radius``.

The command line, the service, ``evaluate``'s re-ranking and the report all call :func:`search`,
so ``k`` and ``radius`` mean one thing everywhere:

- ``k`` alone: the ``k`` nearest items (fewer when the index is smaller);
- ``radius`` alone: every item within Hamming distance ``<= radius`` (inclusive, as FAISS's
  ``range_search`` with ``radius + 1``);
- both: the items within ``radius``, at most the ``k`` nearest of them.

Results are nearest first; within ``radius`` ties are in id order. Each hit carries its index
row (``position``), through which its label and path are read.

Two-stage search (FAISS's ``IndexRefine`` pattern), when the index keeps re-rank vectors and the
query's vectors are given: the ``shortlist`` nearest codes, with every item tied with the last one
(so a class of equal codes is never cut arbitrarily), are ranked by the Euclidean distance between
the vectors (``scores``), then by Hamming distance and id; ``k`` and ``radius`` then apply as above.
The shortlist's size defaults to :data:`DEFAULT_SHORTLIST` everywhere (the CLI, the service,
``evaluate`` and the report), so the search that is measured is the search that is served.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from deephash.errors import DeephashError

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_SHORTLIST", "IdLookup", "Neighbours", "ranked_positions", "search"]

#: The first stage's size of a two-stage search, unless a caller asks for another: the CLI's
#: ``--shortlist``, the service, ``evaluate`` (``eval.rerank_shortlist``) and the report.
DEFAULT_SHORTLIST = 1000


@dataclass(frozen=True)
class Neighbours:
    """One query's results, nearest first.

    Attributes:
        distances: int32 ``(n,)`` Hamming distances.
        ids: int64 ``(n,)`` the items' ids.
        positions: int64 ``(n,)`` the items' rows in the index (for labels and paths).
        scores: float32 ``(n,)`` the second stage's distances (a two-stage search), else None.
    """

    distances: np.ndarray
    ids: np.ndarray
    positions: np.ndarray
    scores: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])


class IdLookup:
    """Ids to index rows, vectorised (a sorted copy and ``searchsorted``).

    Args:
        ids: int64 ``(N,)`` unique ids in row order.
    """

    def __init__(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        self._order = np.argsort(ids, kind="stable")
        self._sorted = ids[self._order]

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Rows of ``ids``: int64 of the same shape, ``-1`` where an id is not in the index."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(self._sorted) == 0:
            return np.full(ids.shape, -1, dtype=np.int64)
        where = np.searchsorted(self._sorted, ids).clip(max=len(self._sorted) - 1)
        return np.where(self._sorted[where] == ids, self._order[where], -1)

    def position(self, ident: int) -> int:
        """Row of one id, ``-1`` when absent (or outside int64)."""
        if not -(2**63) <= ident < 2**63:
            return -1
        return int(self.positions(np.array([ident], dtype=np.int64))[0])


def search(index: object, codes: torch.Tensor | np.ndarray, k: int | None = 10, radius: int | None = None,
           lookup: IdLookup | None = None, rerank: torch.Tensor | np.ndarray | None = None,
           shortlist: int = DEFAULT_SHORTLIST) -> list[Neighbours]:
    """Each query's neighbours in ``index`` (see the module docstring for ``k`` and ``radius``).

    Args:
        index: a ``HashIndex``.
        codes: queries, packed uint8 ``(nq, ceil(bits/8))`` or unpacked ``(nq, bits)``.
        k: at most this many results per query (``>= 1``), or None for no limit (needs ``radius``).
        radius: inclusive Hamming radius, or None.
        lookup: the index's :class:`IdLookup` (built here when not given; pass one to reuse it).
        rerank: the queries' re-rank vectors float ``(nq, D)``: a two-stage search when the index
            keeps vectors too (ignored otherwise).
        shortlist: the first stage's size (every item tied with its last one is kept as well).

    Returns:
        One :class:`Neighbours` per query.

    Raises:
        DeephashError: neither ``k`` nor ``radius``, ``k < 1`` or ``radius < 0``.
    """
    if k is None and radius is None:
        raise DeephashError("a search needs k, a radius, or both")
    if k is not None and int(k) < 1:
        raise DeephashError(f"k must be >= 1, got {k}")
    if radius is not None and int(radius) < 0:
        raise DeephashError(f"radius must be >= 0, got {radius}")
    lookup = lookup or IdLookup(index.ids)
    vectors = getattr(index, "rerank_vectors", None)
    if rerank is not None and vectors is not None and index.ntotal:
        return [_two_stage(index, codes[i:i + 1], np.asarray(rerank[i], dtype=np.float32), vectors, k, radius, lookup,
                           shortlist) for i in range(len(codes))]
    rows: list[tuple[np.ndarray, np.ndarray]]
    if radius is None:
        distances, ids = index.search(codes, int(k))
        rows = [(d[i >= 0], i[i >= 0]) for d, i in zip(distances, ids)]
    else:
        lims, distances, ids = index.range_search(codes, min(int(radius), int(index.bits)))
        rows = [(distances[a:b][:k], ids[a:b][:k]) for a, b in zip(lims[:-1], lims[1:])]
    return [Neighbours(d.astype(np.int32), i.astype(np.int64), lookup.positions(i)) for d, i in rows]


def ranked_positions(found: list[Neighbours], depth: int) -> np.ndarray:
    """The index rows of each query's first ``depth`` results, nearest first: int64 ``(nq, depth)``,
    ``-1`` where a query has fewer (the ranked lists that ``retrieval.metrics`` reads)."""
    ranked = np.full((len(found), int(depth)), -1, dtype=np.int64)
    for row, neighbours in zip(ranked, found):
        kept = neighbours.positions[: int(depth)]
        row[: len(kept)] = kept
    return ranked


def _two_stage(index: object, code: torch.Tensor | np.ndarray, vector: np.ndarray, vectors: np.ndarray, k: int | None,
               radius: int | None, lookup: IdLookup, shortlist: int) -> Neighbours:
    """One query's two-stage search (see the module docstring)."""
    first, _ = index.search(code, max(int(shortlist), int(k or 0), 1))
    cut = int(first[0][first[0] >= 0].max())
    if radius is not None:
        cut = min(cut, int(radius))
    lims, distances, ids = index.range_search(code, cut)
    positions = lookup.positions(ids)
    scores = np.linalg.norm(vectors[positions].astype(np.float32) - vector[None, :], axis=1)
    order = np.lexsort((ids, distances, scores))[:k]
    return Neighbours(distances[order].astype(np.int32), ids[order].astype(np.int64), positions[order],
                      scores[order].astype(np.float32))
