"""The metrics engine: one chunked pass over query-database distances that every metric reads.

Queries are prepared once (:func:`codes_problem` for packed codes, :func:`real_problem` for
embeddings); :func:`run` walks them in chunks and returns per-query statistics (tie-aware and
stable AP@k, hits at rank cut-offs, ball counts per radius, kNN votes) as float64 tensors.
:mod:`deephash.retrieval.metrics` turns them into the published numbers and defines them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from deephash.errors import CodeLengthError, DeephashError

__all__ = ["codes_problem", "mean", "real_problem", "run"]
from deephash.retrieval.codes import n_bytes
from deephash.retrieval.hamming import as_words, small_distances

#: Distance-matrix elements per chunk of queries (peak memory about 30 bytes each).
CHUNK_ELEMENTS = 1 << 24
#: Upper bound on queries per chunk.
MAX_CHUNK = 2048
#: Above this many (distance, class) cells per query, histograms use a relevance bit instead.
MAX_CLASS_CELLS = 1 << 14


def _tensor(x: Any) -> torch.Tensor:
    return x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def _check_labels(q_labels: torch.Tensor, db_labels: torch.Tensor, nq: int, n: int) -> None:
    if q_labels.dim() not in (1, 2) or q_labels.dim() != db_labels.dim():
        raise DeephashError(f"labels must both be (N,) or both (N, C), got {tuple(q_labels.shape)} and {tuple(db_labels.shape)}")
    if q_labels.shape[0] != nq or db_labels.shape[0] != n:
        raise DeephashError(f"{q_labels.shape[0]} query labels for {nq} queries or {db_labels.shape[0]} database labels for {n} codes")
    if q_labels.dim() == 2 and q_labels.shape[1] != db_labels.shape[1]:
        raise DeephashError(f"multi-hot labels have {q_labels.shape[1]} and {db_labels.shape[1]} classes")


def _relevance(q_labels: torch.Tensor, db_labels: torch.Tensor) -> torch.Tensor:
    """bool ``(nq, n)``: shared label."""
    if q_labels.dim() == 1:
        return q_labels[:, None] == db_labels[None, :]
    return (q_labels.double() @ db_labels.double().T) > 0


@dataclass
class _Problem:
    """Queries and database prepared once: distance inputs and labels.

    Single labels are also renumbered to classes ``0..C-1`` (``q_class``/``db_class``: uint8, int32 beyond 256), so
    relevance is ``db_class == q_class`` and one bincount gives every per-class histogram.
    """

    q: Any  # uint64 words (N, W) as numpy for Hamming; float32 tensor (N, D) for real
    db: Any
    q_labels: torch.Tensor
    db_labels: torch.Tensor
    n_levels: int  # number of distinct distance values for Hamming (bits + 1); 0 for real
    q_class: np.ndarray | None = None
    db_class: np.ndarray | None = None
    n_classes: int = 0

    def __post_init__(self) -> None:
        if self.q_labels.dim() == 1:
            classes = torch.unique(torch.cat([self.q_labels, self.db_labels]), return_inverse=True)[1].to(torch.int32)
            self.n_classes = int(classes.max()) + 1 if classes.numel() else 0
            small = classes.numpy().astype(np.uint8 if self.n_classes <= 256 else np.int32)  # cheaper gathers
            self.q_class, self.db_class = small[: len(self.q_labels)], small[len(self.q_labels):]

    @property
    def n(self) -> int:
        return self.db.shape[0]

    def chunks(self) -> Any:
        """Yield ``(slice, distances (c, n))``: numpy uint8/uint16 for Hamming, float64 tensor for real."""
        step = max(1, min(MAX_CHUNK, CHUNK_ELEMENTS // max(self.n, 1)))
        for start in range(0, self.q.shape[0], step):
            rows = slice(start, start + step)
            if self.n_levels:
                yield rows, small_distances(self.q[rows], self.db)
            else:
                yield rows, torch.cdist(self.q[rows], self.db).double()

    def relevant_counts(self, rows: slice) -> torch.Tensor | None:
        """float64 ``(c,)`` relevant items in the database per query (single labels), else None."""
        if self.q_class is None:
            return None
        per_class = np.bincount(self.db_class, minlength=self.n_classes)
        return torch.from_numpy(per_class[self.q_class[rows]].astype(np.float64))


def codes_problem(q_codes: Any, q_labels: Any, db_codes: Any, db_labels: Any, bits: int) -> _Problem:
    q, db = _tensor(q_codes), _tensor(db_codes)
    for name, codes in (("query", q), ("database", db)):
        if codes.dtype != torch.uint8 or codes.dim() != 2:
            raise DeephashError(f"{name} codes must be packed uint8 (N, bytes), got {codes.dtype} {tuple(codes.shape)}")
        if codes.shape[1] != n_bytes(bits):
            raise CodeLengthError(f"{name} codes have {codes.shape[1]} bytes but {bits}-bit codes need {n_bytes(bits)}")
    if db.shape[0] == 0:
        raise DeephashError("the database is empty")
    ql, dl = _tensor(q_labels).long(), _tensor(db_labels).long()
    _check_labels(ql, dl, q.shape[0], db.shape[0])
    return _Problem(as_words(q).numpy(), as_words(db).numpy(), ql, dl, int(bits) + 1)


def real_problem(q_emb: Any, q_labels: Any, db_emb: Any, db_labels: Any) -> _Problem:
    q, db = _tensor(q_emb).float(), _tensor(db_emb).float()
    if q.dim() != 2 or db.dim() != 2 or q.shape[1] != db.shape[1]:
        raise DeephashError(f"embeddings must be (N, D) with equal D, got {tuple(q.shape)} and {tuple(db.shape)}")
    if db.shape[0] == 0:
        raise DeephashError("the database is empty")
    ql, dl = _tensor(q_labels).long(), _tensor(db_labels).long()
    _check_labels(ql, dl, q.shape[0], db.shape[0])
    return _Problem(q, db, ql, dl, 0)


def _harmonic(n: int) -> torch.Tensor:
    """float64 ``(n + 1,)``: ``H[i] = sum_{j<=i} 1/j``, ``H[0] = 0``."""
    return torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(1.0 / torch.arange(1, n + 1, dtype=torch.float64), 0)])


# ---------------------------------------------------------------- tie-aware (histograms)
def _histograms(problem: _Problem, rows: slice, dist: np.ndarray, rel: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query counts of all and of relevant items at each distance: float64 ``(c, levels)`` each.

    Single labels with few classes: one bincount over ``(query, distance, database class)`` cells,
    then the query's own class gives the relevant counts (no relevance matrix). Otherwise one
    bincount over ``(query, distance, relevant)`` with ``rel()`` the bool ``(c, n)`` relevance.
    """
    c, levels = dist.shape[0], problem.n_levels
    if problem.q_class is not None and levels * problem.n_classes <= MAX_CLASS_CELLS:
        cells = problem.n_classes
        keys = dist.astype(np.int32)
        keys *= cells
        keys += problem.db_class[None, :]
        keys += (np.arange(c, dtype=np.int32) * (levels * cells))[:, None]
        counts = torch.bincount(torch.from_numpy(keys).view(-1), minlength=c * levels * cells).view(c, levels, cells)
        own = torch.from_numpy(problem.q_class[rows]).long()[:, None, None].expand(c, levels, 1)
        return counts.sum(2).double(), counts.gather(2, own)[:, :, 0].double()
    keys = torch.from_numpy(dist.astype(np.int64))
    keys = ((torch.arange(c)[:, None] * levels + keys) * 2 + rel()).view(-1)
    counts = torch.bincount(keys, minlength=c * levels * 2).view(c, levels, 2).double()
    return counts.sum(2), counts[:, :, 1]


def _expected_precision_sum(n_before: torch.Tensor, r_before: torch.Tensor, m: torch.Tensor, x: torch.Tensor, harmonic: torch.Tensor) -> torch.Tensor:
    """``E[sum of P(i) over relevant i]`` for ``x`` relevant items placed uniformly at random among
    ``m`` positions that follow ``n_before`` items holding ``r_before`` relevant ones.

    A relevant item at position p has, in expectation, ``(p-1)(x-1)/(m-1)`` relevant items before
    it inside the group, so the sum is ``(x/m) * sum_p (r_before + 1 + (p-1)(x-1)/(m-1)) / (n_before + p)``,
    which the harmonic numbers close.
    """
    safe_m = m.clamp(min=1)
    dh = harmonic[(n_before + m).long()] - harmonic[n_before.long()]
    inner = (x - 1) / (safe_m - 1).clamp(min=1) * (m - (n_before + 1) * dh)
    value = x / safe_m * ((r_before + 1) * dh + torch.where(m > 1, inner, torch.zeros_like(inner)))
    return torch.where((m > 0) & (x > 0), value, torch.zeros_like(value))


def _log_choose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.lgamma(a + 1) - torch.lgamma(b + 1) - torch.lgamma((a - b).clamp(min=0) + 1)


def _cut_groups(total: torch.Tensor, relevant: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Where a rank cut-off ``k`` (float64 ``(c,)``, ``1 <= k <= n``) falls in each query's distance
    histogram: the level of the cut, the items and relevant items strictly before it, the size and
    relevant count of the cut group, and ``m = k - n_before`` items drawn from it."""
    n_before = torch.cumsum(total, 1) - total
    r_before = torch.cumsum(relevant, 1) - relevant
    cut = torch.searchsorted(torch.cumsum(total, 1), k[:, None].contiguous())
    n_c, r_c = n_before.gather(1, cut)[:, 0], r_before.gather(1, cut)[:, 0]
    size, rel = total.gather(1, cut)[:, 0], relevant.gather(1, cut)[:, 0]
    return cut, n_c, r_c, size, rel, k - n_c


def _truncated_precision_sums(total: torch.Tensor, relevant: torch.Tensor, k: torch.Tensor, harmonic: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pieces of a tie-aware ``sum_{i<=k} P(i) rel(i)`` with a per-query cut ``k`` (float64 ``(c,)``):
    ``full_sum`` (the groups wholly before the cut), and over ``x`` = relevant items drawn from the
    cut group: its hypergeometric ``pmf``, the expected ``cut_sum`` given x, and ``r_c`` (relevant
    items before the cut); each ``(c,)`` or ``(c, X)``."""
    n_before = torch.cumsum(total, 1) - total
    r_before = torch.cumsum(relevant, 1) - relevant
    group_sums = _expected_precision_sum(n_before, r_before, total, relevant, harmonic)
    cut, n_c, r_c, size, rel, m = _cut_groups(total, relevant, k)
    before_cut = torch.arange(total.shape[1])[None, :] < cut
    full_sum = (group_sums * before_cut).sum(1)
    lo = (m - (size - rel)).clamp(min=0)[:, None]
    hi = torch.minimum(rel, m)[:, None]
    x = torch.arange(int(hi.max()) + 1 if hi.numel() else 1, dtype=torch.float64)[None, :]
    valid = (x >= lo) & (x <= hi)
    log_pmf = _log_choose(rel[:, None], x) + _log_choose((size - rel)[:, None], m[:, None] - x) - _log_choose(size, m)[:, None]
    pmf = torch.where(valid, torch.exp(torch.where(valid, log_pmf, torch.zeros_like(log_pmf))), torch.zeros_like(log_pmf))
    cut_sum = _expected_precision_sum(n_c[:, None], r_c[:, None], m[:, None].expand(-1, x.shape[1]), x.expand(m.shape[0], -1), harmonic)
    return full_sum, pmf, cut_sum, r_c[:, None] + x


def _tie_aware_ap(total: torch.Tensor, relevant: torch.Tensor, k: int | None, harmonic: torch.Tensor) -> torch.Tensor:
    """Exact expected AP@k per query (float64 ``(c,)``) from distance histograms."""
    n = int(total[0].sum().item()) if total.shape[0] else 0
    if k is None or k >= n:
        n_before = torch.cumsum(total, 1) - total
        r_before = torch.cumsum(relevant, 1) - relevant
        group_sums = _expected_precision_sum(n_before, r_before, total, relevant, harmonic)
        r_all = relevant.sum(1)
        return torch.where(r_all > 0, group_sums.sum(1) / r_all.clamp(min=1), torch.zeros_like(r_all))
    full_sum, pmf, cut_sum, denom = _truncated_precision_sums(total, relevant, torch.full((total.shape[0],), float(k),
                                                                                         dtype=torch.float64), harmonic)
    ratio = torch.where(denom > 0, (full_sum[:, None] + cut_sum) / denom.clamp(min=1), torch.zeros_like(denom))
    return (pmf * ratio).sum(1)


def _tie_aware_map_at_r(total: torch.Tensor, relevant: torch.Tensor, harmonic: torch.Tensor) -> torch.Tensor:
    """Exact expected MAP@R per query: ``(1/R) sum_{i<=R} P(i) rel(i)`` with R = the query's relevant
    items (0 for a query without any), float64 ``(c,)``."""
    r_all = relevant.sum(1)
    full_sum, pmf, cut_sum, _ = _truncated_precision_sums(total, relevant, r_all.clamp(min=1), harmonic)
    expected = full_sum + (pmf * cut_sum).sum(1)
    return torch.where(r_all > 0, expected / r_all.clamp(min=1), torch.zeros_like(r_all))


def _tie_aware_any_relevant(total: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Probability that the top k hold a relevant item (Recall@K of metric learning), over random
    orders within ties: float64 ``(c, len(ks))`` (k capped at n)."""
    n = total.sum(1)
    columns = []
    for k in ks:
        _, _, r_c, size, rel, m = _cut_groups(total, relevant, torch.minimum(torch.full_like(n, float(k)), n))
        none_drawn = torch.exp(_log_choose(size - rel, m) - _log_choose(size, m))  # C(size-rel, m) / C(size, m)
        none_drawn = torch.where(m <= size - rel, none_drawn, torch.zeros_like(none_drawn))
        columns.append(torch.where(r_c > 0, torch.ones_like(n), 1 - none_drawn))
    return torch.stack(columns, 1)


def _tie_aware_counts(total: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Expected number of relevant items in the top k, float64 ``(c, len(ks))`` (k capped at n)."""
    n = total.sum(1, keepdim=True)
    cum_total, cum_rel = torch.cumsum(total, 1), torch.cumsum(relevant, 1)
    k = torch.minimum(torch.tensor([float(v) for v in ks], dtype=torch.float64)[None, :], n)
    cut = torch.searchsorted(cum_total, k.contiguous())
    n_in = cum_total.gather(1, cut) - total.gather(1, cut)
    r_in = cum_rel.gather(1, cut) - relevant.gather(1, cut)
    size, rel = total.gather(1, cut), relevant.gather(1, cut)
    return r_in + (k - n_in) * rel / size.clamp(min=1)


# ---------------------------------------------------------------- stable order
def _stable_order(dist: Any, length: int) -> np.ndarray:
    """int64 ``(c, length)`` database positions of the first ``length`` items in stable order."""
    if isinstance(dist, np.ndarray):  # numpy's stable sort of 8/16-bit integers is a radix sort: O(n)
        return np.argsort(dist, axis=1, kind="stable")[:, :length]
    return torch.sort(dist, dim=1, stable=True).indices[:, :length].numpy()


def _sorted_relevance(problem: _Problem, rows: slice, order: np.ndarray, rel: Any) -> np.ndarray:
    """bool ``(c, length)``: relevance of the items in ranked order."""
    if problem.q_class is not None:
        return problem.db_class[order] == problem.q_class[rows, None]
    return rel().gather(1, torch.from_numpy(order)).numpy()


def _stable_ap(rel_sorted: np.ndarray, ks: Sequence[int | None]) -> torch.Tensor:
    """AP@k per query for each k (``None`` = all), float64 ``(c, len(ks))``, from sorted relevance.

    Works on the relevant positions only: the i-th relevant item of a row at rank p adds i / p.
    """
    c, length = rel_sorted.shape
    rows, cols = np.nonzero(rel_sorted)  # row-major: ranks ascend within each row
    per_row = np.bincount(rows, minlength=c)
    nth = np.arange(1, len(rows) + 1) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    precision = nth / (cols + 1.0)
    ap = []
    for k in ks:
        top = length if k is None else min(k, length)
        keep = slice(None) if top == length else cols < top
        r_k = per_row if top == length else np.bincount(rows[keep], minlength=c)
        s_k = np.bincount(rows[keep], weights=precision[keep], minlength=c)
        ap.append(np.where(r_k > 0, s_k / np.maximum(r_k, 1), 0.0))
    return torch.from_numpy(np.stack(ap, 1)) if ap else torch.zeros(c, 0, dtype=torch.float64)


def _stable_map_at_r(rel_sorted: np.ndarray, r_all: np.ndarray) -> torch.Tensor:
    """MAP@R per query from sorted relevance (``length >= max R``): ``(1/R) sum_{i<=R} P(i) rel(i)``."""
    c = rel_sorted.shape[0]
    rows, cols = np.nonzero(rel_sorted)
    per_row = np.bincount(rows, minlength=c)
    nth = np.arange(1, len(rows) + 1) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    keep = cols < r_all[rows]
    sums = np.bincount(rows[keep], weights=nth[keep] / (cols[keep] + 1.0), minlength=c)
    return torch.from_numpy(np.where(r_all > 0, sums / np.maximum(r_all, 1), 0.0))


def knn_predict(neighbour_labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Majority label of each row of int64 ``(c, k)`` labels, ties to the label ranked first."""
    c, k = neighbour_labels.shape
    votes = torch.zeros(c, n_classes, dtype=torch.int64).scatter_add_(1, neighbour_labels, torch.ones_like(neighbour_labels))
    ranks = torch.arange(k).expand(c, k)
    first = torch.full((c, n_classes), k, dtype=torch.int64).scatter_reduce_(1, neighbour_labels, ranks, "amin")
    return torch.argmax(votes * (k + 1) + (k - first), dim=1)


# ---------------------------------------------------------------- one pass, many metrics
def run(
    problem: _Problem,
    *,
    map_ks: Sequence[int | None] = (),
    count_ks: Sequence[int] = (),
    ties: Sequence[str] = ("tie-aware",),
    radii: Sequence[int] = (),
    knn_k: int | None = None,
    recall_ks: Sequence[int] = (),
    map_at_r: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-query statistics over all chunks (float64 tensors, queries along dim 0).

    One distance matrix, one histogram and one stable order per chunk feed every metric asked
    for. Keys: ``"R"``; ``"ap/<rule>"`` ``(nq, len(map_ks))``, ``"hits/<rule>"``
    ``(nq, len(count_ks))``, ``"recall/<rule>"`` ``(nq, len(recall_ks))`` (a relevant item in the
    top k) and ``"map_r/<rule>"`` ``(nq,)`` for each rule in ``ties`` (real embeddings: always
    stable order, keyed by the rule asked); ``"ball"``/``"ball_rel"`` ``(nq, len(radii))``;
    ``"knn"`` ``(nq,)``.
    """
    for rule in ties:
        if rule not in ("tie-aware", "stable"):
            raise DeephashError(f"ties must be 'tie-aware' or 'stable', got {rule!r}")
    for k in [*[k for k in map_ks if k is not None], *count_ks, *recall_ks, *([knn_k] if knn_k else [])]:
        if int(k) < 1:
            raise DeephashError(f"k must be >= 1, got {k}")
    if knn_k and problem.q_class is None:
        raise DeephashError("kNN accuracy needs single labels (N,), not multi-hot labels")
    hamming = problem.n_levels > 0
    aware = [rule for rule in ties if rule == "tie-aware" and hamming]
    ordered = [rule for rule in ties if rule not in aware]
    harmonic = _harmonic(problem.n) if aware and (map_ks or map_at_r) else None
    wanted = ([problem.n if k is None else k for k in map_ks] + list(count_ks) + list(recall_ks) if ordered else [])
    wanted.append(knn_k or 0)
    out: dict[str, list[torch.Tensor]] = {}
    for rows, dist in problem.chunks():
        cache: dict[str, torch.Tensor] = {}

        def rel() -> torch.Tensor:  # the relevance matrix, built at most once per chunk
            if "rel" not in cache:
                cache["rel"] = _relevance(problem.q_labels[rows], problem.db_labels)
            return cache["rel"]

        counts = problem.relevant_counts(rows)
        stats: dict[str, torch.Tensor] = {"R": rel().sum(1).double() if counts is None else counts}
        if hamming and (aware or radii):
            total, relevant = _histograms(problem, rows, dist, rel)
            if radii:
                cum_t, cum_r = torch.cumsum(total, 1), torch.cumsum(relevant, 1)
                idx = torch.tensor([min(max(r, 0), problem.n_levels - 1) for r in radii])
                neg = torch.tensor([r < 0 for r in radii])
                stats["ball"] = torch.where(neg, 0.0, cum_t[:, idx])
                stats["ball_rel"] = torch.where(neg, 0.0, cum_r[:, idx])
            for rule in aware:
                if map_ks:
                    stats[f"ap/{rule}"] = torch.stack([_tie_aware_ap(total, relevant, k, harmonic) for k in map_ks], 1)
                if count_ks:
                    stats[f"hits/{rule}"] = _tie_aware_counts(total, relevant, count_ks)
                if recall_ks:
                    stats[f"recall/{rule}"] = _tie_aware_any_relevant(total, relevant, recall_ks)
                if map_at_r:
                    stats[f"map_r/{rule}"] = _tie_aware_map_at_r(total, relevant, harmonic)
        r_all = stats["R"].numpy().astype(np.int64)
        length = min(max(wanted + ([int(r_all.max())] if map_at_r and ordered and len(r_all) else [])), problem.n)
        if length > 0:
            order = _stable_order(dist, length)
            rel_sorted = _sorted_relevance(problem, rows, order, rel)
            ap = _stable_ap(rel_sorted, map_ks) if ordered and map_ks else None
            hits = [np.count_nonzero(rel_sorted[:, : min(k, length)], axis=1) for k in count_ks] if ordered else []
            found = [rel_sorted[:, : min(k, length)].any(axis=1) for k in recall_ks] if ordered else []
            for rule in ordered:
                if ap is not None:
                    stats[f"ap/{rule}"] = ap
                if hits:
                    stats[f"hits/{rule}"] = torch.from_numpy(np.stack(hits, 1).astype(np.float64))
                if found:
                    stats[f"recall/{rule}"] = torch.from_numpy(np.stack(found, 1).astype(np.float64))
                if map_at_r:
                    stats[f"map_r/{rule}"] = _stable_map_at_r(rel_sorted, r_all)
            if knn_k:
                neighbours = torch.from_numpy(problem.db_class[order[:, : min(knn_k, length)]]).long()
                pred = knn_predict(neighbours, problem.n_classes)
                stats["knn"] = (pred == torch.from_numpy(problem.q_class[rows]).long()).double()
        for key, value in stats.items():
            out.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in out.items()}


def mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    if mask is not None:
        x = x[mask]
    return float(x.mean()) if x.numel() else float("nan")
