"""Retrieval metrics on packed binary codes (Hamming ranking) and on real embeddings (Euclidean).

Definitions (every number says which rule it used):

* Relevance: a database item is relevant to a query when they share a label: equal labels for
  int ``(N,)`` labels, ``labels_q @ labels_db.T > 0`` for multi-hot ``(N, C)`` labels.
* Ranking: ascending Hamming distance. Integer distances tie, so two rules:
  ``ties="stable"`` breaks ties by database position (lower first); ``ties="tie-aware"`` gives
  the exact expected value over uniformly random orders within each tie group
  (McSherry & Najork 2008), computed in closed form from per-distance counts.
* AP@k (as DeepHash-pytorch's ``CalcTopMap``): ``AP = sum_{i<=k} P(i) rel(i) / R_k`` with ``R_k``
  the number of relevant items in the top ``k``; a query with ``R_k = 0`` contributes 0 and still
  counts in the mean over queries. ``k=None`` means the whole database (``R_k = R``).
  Tie-aware AP@k is the exact expectation ``E[sum_{i<=k} P(i) rel(i) / R_k]`` (the ratio, not a
  ratio of expectations), summing over the hypergeometric number of relevant items drawn from
  the tie group cut by ``k``.
* P@k = relevant in top k / k (k capped at the database size); R@k = relevant in top k / R,
  averaged over queries with ``R > 0``. Tie-aware: expected counts.
* Precision within radius r: relevant / items at distance ``<= r``; an empty ball counts as
  precision 0 (the fraction of empty balls is reported beside it).
* PR curve over radii 0..bits: macro averages; precision over queries with a non-empty ball
  (NaN when every ball is empty), recall over queries with ``R > 0``.
* kNN accuracy: majority label among the k nearest (stable order); a vote tie goes to the
  tied label whose nearest member ranks first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from deephash.errors import CodeLengthError, DeephashError
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


def _codes_problem(q_codes: Any, q_labels: Any, db_codes: Any, db_labels: Any, bits: int) -> _Problem:
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


def _real_problem(q_emb: Any, q_labels: Any, db_emb: Any, db_labels: Any) -> _Problem:
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


def _tie_aware_ap(total: torch.Tensor, relevant: torch.Tensor, k: int | None, harmonic: torch.Tensor) -> torch.Tensor:
    """Exact expected AP@k per query (float64 ``(c,)``) from distance histograms."""
    n = int(total[0].sum().item()) if total.shape[0] else 0
    n_before = torch.cumsum(total, 1) - total
    r_before = torch.cumsum(relevant, 1) - relevant
    group_sums = _expected_precision_sum(n_before, r_before, total, relevant, harmonic)
    if k is None or k >= n:
        r_all = relevant.sum(1)
        return torch.where(r_all > 0, group_sums.sum(1) / r_all.clamp(min=1), torch.zeros_like(r_all))
    cut = torch.searchsorted(torch.cumsum(total, 1), torch.full((total.shape[0], 1), float(k), dtype=torch.float64))
    before_cut = torch.arange(total.shape[1])[None, :] < cut
    full_sum = (group_sums * before_cut).sum(1)
    n_c, r_c = n_before.gather(1, cut)[:, 0], r_before.gather(1, cut)[:, 0]
    size, rel = total.gather(1, cut)[:, 0], relevant.gather(1, cut)[:, 0]
    m = k - n_c  # drawn from the cut group, 1..size
    lo = (m - (size - rel)).clamp(min=0)[:, None]
    hi = torch.minimum(rel, m)[:, None]
    x = torch.arange(int(hi.max()) + 1 if hi.numel() else 1, dtype=torch.float64)[None, :]
    valid = (x >= lo) & (x <= hi)

    def log_choose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.lgamma(a + 1) - torch.lgamma(b + 1) - torch.lgamma((a - b).clamp(min=0) + 1)

    log_pmf = log_choose(rel[:, None], x) + log_choose((size - rel)[:, None], m[:, None] - x) - log_choose(size, m)[:, None]
    pmf = torch.where(valid, torch.exp(torch.where(valid, log_pmf, torch.zeros_like(log_pmf))), torch.zeros_like(log_pmf))
    cut_sum = _expected_precision_sum(n_c[:, None], r_c[:, None], m[:, None].expand(-1, x.shape[1]), x.expand(m.shape[0], -1), harmonic)
    denom = r_c[:, None] + x
    ratio = torch.where(denom > 0, (full_sum[:, None] + cut_sum) / denom.clamp(min=1), torch.zeros_like(denom))
    return (pmf * ratio).sum(1)


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


def _knn_predict(neighbour_labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Majority label of each row of int64 ``(c, k)`` labels, ties to the label ranked first."""
    c, k = neighbour_labels.shape
    votes = torch.zeros(c, n_classes, dtype=torch.int64).scatter_add_(1, neighbour_labels, torch.ones_like(neighbour_labels))
    ranks = torch.arange(k).expand(c, k)
    first = torch.full((c, n_classes), k, dtype=torch.int64).scatter_reduce_(1, neighbour_labels, ranks, "amin")
    return torch.argmax(votes * (k + 1) + (k - first), dim=1)


# ---------------------------------------------------------------- one pass, many metrics
def _run(
    problem: _Problem,
    *,
    map_ks: Sequence[int | None] = (),
    count_ks: Sequence[int] = (),
    ties: Sequence[str] = ("tie-aware",),
    radii: Sequence[int] = (),
    knn_k: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-query statistics over all chunks (float64 tensors, queries along dim 0).

    One distance matrix, one histogram and one stable order per chunk feed every metric asked
    for. Keys: ``"R"``; ``"ap/<rule>"`` ``(nq, len(map_ks))`` and ``"hits/<rule>"``
    ``(nq, len(count_ks))`` for each rule in ``ties`` (real embeddings: always stable order, keyed
    by the rule asked); ``"ball"``/``"ball_rel"`` ``(nq, len(radii))``; ``"knn"`` ``(nq,)``.
    """
    for rule in ties:
        if rule not in ("tie-aware", "stable"):
            raise DeephashError(f"ties must be 'tie-aware' or 'stable', got {rule!r}")
    for k in [*[k for k in map_ks if k is not None], *count_ks, *([knn_k] if knn_k else [])]:
        if int(k) < 1:
            raise DeephashError(f"k must be >= 1, got {k}")
    if knn_k and problem.q_class is None:
        raise DeephashError("kNN accuracy needs single labels (N,), not multi-hot labels")
    hamming = problem.n_levels > 0
    aware = [rule for rule in ties if rule == "tie-aware" and hamming]
    ordered = [rule for rule in ties if rule not in aware]
    harmonic = _harmonic(problem.n) if aware and map_ks else None
    wanted = ([problem.n if k is None else k for k in map_ks] + list(count_ks) if ordered else []) + [knn_k or 0]
    length = min(max(wanted), problem.n)
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
        if length > 0:
            order = _stable_order(dist, length)
            rel_sorted = _sorted_relevance(problem, rows, order, rel)
            ap = _stable_ap(rel_sorted, map_ks) if ordered and map_ks else None
            hits = [np.count_nonzero(rel_sorted[:, : min(k, length)], axis=1) for k in count_ks] if ordered else []
            for rule in ordered:
                if ap is not None:
                    stats[f"ap/{rule}"] = ap
                if hits:
                    stats[f"hits/{rule}"] = torch.from_numpy(np.stack(hits, 1).astype(np.float64))
            if knn_k:
                neighbours = torch.from_numpy(problem.db_class[order[:, : min(knn_k, length)]]).long()
                pred = _knn_predict(neighbours, problem.n_classes)
                stats["knn"] = (pred == torch.from_numpy(problem.q_class[rows]).long()).double()
        for key, value in stats.items():
            out.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in out.items()}


def _mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    if mask is not None:
        x = x[mask]
    return float(x.mean()) if x.numel() else float("nan")


# ---------------------------------------------------------------- public: codes
def mean_average_precision(
    q_codes: Any, q_labels: Any, db_codes: Any, db_labels: Any, bits: int, k: int | None = None, ties: str = "tie-aware"
) -> float:
    """mAP@k of Hamming ranking (see the module docstring for the exact definition).

    Args:
        q_codes: packed uint8 ``(nq, ceil(bits/8))`` query codes (numpy or torch).
        q_labels: int ``(nq,)`` or multi-hot ``(nq, C)``.
        db_codes: packed uint8 ``(n, ceil(bits/8))`` database codes.
        db_labels: int ``(n,)`` or multi-hot ``(n, C)``.
        bits: code length in bits.
        k: cut-off; ``None`` ranks the whole database.
        ties: ``"tie-aware"`` (expected value over random orders within ties) or ``"stable"``.
    """
    stats = _run(_codes_problem(q_codes, q_labels, db_codes, db_labels, bits), map_ks=[k], ties=(ties,))
    return _mean(stats[f"ap/{ties}"][:, 0])


def precision_at_k(q_codes: Any, q_labels: Any, db_codes: Any, db_labels: Any, bits: int, ks: Sequence[int], ties: str = "tie-aware") -> np.ndarray:
    """Mean precision@k for each k in ``ks``: float64 ``(len(ks),)``."""
    problem = _codes_problem(q_codes, q_labels, db_codes, db_labels, bits)
    stats = _run(problem, count_ks=list(ks), ties=(ties,))
    k = torch.tensor([min(v, problem.n) for v in ks], dtype=torch.float64)
    return (stats[f"hits/{ties}"] / k).mean(0).numpy()


def recall_at_k(q_codes: Any, q_labels: Any, db_codes: Any, db_labels: Any, bits: int, ks: Sequence[int], ties: str = "tie-aware") -> np.ndarray:
    """Mean recall@k for each k in ``ks`` over queries with a relevant item: float64 ``(len(ks),)``."""
    stats = _run(_codes_problem(q_codes, q_labels, db_codes, db_labels, bits), count_ks=list(ks), ties=(ties,))
    has = stats["R"] > 0
    return (stats[f"hits/{ties}"][has] / stats["R"][has, None]).mean(0).numpy()


def precision_recall_curve_at_k(q: Any, q_labels: Any, db: Any, db_labels: Any, ks: Sequence[int],
                                bits: int | None = None, ties: str = "stable") -> tuple[np.ndarray, np.ndarray]:
    """Mean precision@k and recall@k at each rank cut-off, for codes (``bits`` given: packed codes,
    Hamming ranking) or real embeddings (Euclidean ranking, stable ties).

    The conventions of this module: P@k over every query (k capped at the database size), R@k over
    queries with a relevant item.

    Returns:
        ``(precision, recall)``: float64 ``(len(ks),)`` each.
    """
    problem = (_codes_problem(q, q_labels, db, db_labels, bits) if bits is not None
               else _real_problem(q, q_labels, db, db_labels))
    ties = ties if bits is not None else "stable"
    stats = _run(problem, count_ks=list(ks), ties=(ties,))
    hits, has = stats[f"hits/{ties}"], stats["R"] > 0
    k = torch.tensor([min(v, problem.n) for v in ks], dtype=torch.float64)
    recall = (hits[has] / stats["R"][has, None]).mean(0) if bool(has.any()) else torch.full((len(ks),), float("nan"))
    return (hits / k).mean(0).numpy(), recall.numpy()


def precision_within_radius(q_codes: Any, q_labels: Any, db_codes: Any, db_labels: Any, bits: int, radius: int = 2) -> tuple[float, float]:
    """Mean precision of the Hamming ball ``d <= radius``; an empty ball counts as 0.

    Returns:
        ``(precision, empty_fraction)``: the mean precision and the fraction of queries whose ball
        is empty.
    """
    stats = _run(_codes_problem(q_codes, q_labels, db_codes, db_labels, bits), radii=[radius])
    ball, hits = stats["ball"][:, 0], stats["ball_rel"][:, 0]
    precision = torch.where(ball > 0, hits / ball.clamp(min=1), torch.zeros_like(ball))
    return _mean(precision), _mean((ball == 0).double())


def pr_curve(q_codes: Any, q_labels: Any, db_codes: Any, db_labels: Any, bits: int) -> dict[str, np.ndarray]:
    """Precision and recall of the Hamming ball of each radius 0..bits (macro averages).

    Returns:
        ``{"radius": int64 (bits+1,), "precision": float64, "recall": float64, "empty_fraction": float64}``;
        precision averages queries with a non-empty ball, recall queries with a relevant item.
    """
    radii = list(range(int(bits) + 1))
    stats = _run(_codes_problem(q_codes, q_labels, db_codes, db_labels, bits), radii=radii)
    ball, hits, r_all = stats["ball"], stats["ball_rel"], stats["R"][:, None]
    nonempty, has = ball > 0, (r_all > 0).expand_as(ball)
    precision = (torch.where(nonempty, hits / ball.clamp(min=1), 0.0).sum(0) / nonempty.sum(0)).numpy()
    recall = (torch.where(has, hits / r_all.clamp(min=1), 0.0).sum(0) / has.sum(0)).numpy()
    return {"radius": np.array(radii), "precision": precision, "recall": recall, "empty_fraction": (~nonempty).double().mean(0).numpy()}


def knn_accuracy(q_codes: Any, q_labels: Any, db_codes: Any, db_labels: Any, bits: int, k: int = 10) -> float:
    """Accuracy of the majority label of the ``k`` Hamming-nearest codes (stable order)."""
    return _mean(_run(_codes_problem(q_codes, q_labels, db_codes, db_labels, bits), knn_k=k)["knn"])


def evaluate_codes(
    q_codes: Any,
    q_labels: Any,
    db_codes: Any,
    db_labels: Any,
    bits: int,
    ks: Sequence[int] = (100, 1000),
    radius: int = 2,
    knn_k: int | None = 10,
    splits: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The standard table for Hamming ranking in one pass over the distances (both tie rules).

    Keys: ``"mAP@all/tie-aware"``, ``"mAP@all/stable"``, ``"mAP@<k>/tie-aware"``,
    ``"mAP@<k>/stable"``, ``"P@<k>/tie-aware"``, ``"P@<k>/stable"``, ``"R@<k>/tie-aware"``,
    ``"P@r<=<radius>"``, ``"P@r<=<radius>/empty"``, ``"kNN-acc@<knn_k>"``, and ``"protocol"`` (a
    sentence naming the splits given as ``(query, database)``, relevance and tie rules).
    ``knn_k=None`` leaves kNN accuracy out (needed for multi-hot labels).
    """
    problem = _codes_problem(q_codes, q_labels, db_codes, db_labels, bits)
    ks = [int(k) for k in ks]
    map_ks: list[int | None] = [None, *ks]
    result: dict[str, Any] = {}
    capped = torch.tensor([min(k, problem.n) for k in ks], dtype=torch.float64)
    stats = _run(problem, map_ks=map_ks, count_ks=ks, ties=("tie-aware", "stable"), radii=[radius], knn_k=knn_k)
    for ties in ("tie-aware", "stable"):
        for j, k in enumerate(map_ks):
            result[f"mAP@{'all' if k is None else k}/{ties}"] = _mean(stats[f"ap/{ties}"][:, j])
        for j, k in enumerate(ks):
            result[f"P@{k}/{ties}"] = _mean(stats[f"hits/{ties}"][:, j] / capped[j])
            result[f"R@{k}/{ties}"] = _mean(stats[f"hits/{ties}"][:, j] / stats["R"].clamp(min=1), stats["R"] > 0)
        if ties == "tie-aware":
            ball, hits = stats["ball"][:, 0], stats["ball_rel"][:, 0]
            result[f"P@r<={radius}"] = _mean(torch.where(ball > 0, hits / ball.clamp(min=1), 0.0))
            result[f"P@r<={radius}/empty"] = _mean((ball == 0).double())
    if knn_k:
        result[f"kNN-acc@{knn_k}"] = _mean(stats["knn"])
    query, database = splits or ("queries", "database")
    result["protocol"] = (
        f"{int(bits)}-bit codes; queries: {query} ({problem.q.shape[0]}), database: {database} ({problem.n}); "
        "Hamming ranking; relevant = shares a label; AP@k divides by the relevant items in the top k; "
        "tie-aware = exact expectation over random order within equal distances, stable = database order; "
        f"P@r<={radius}: empty ball counts 0"
    )
    return result


# ---------------------------------------------------------------- public: real embeddings
def mean_average_precision_real(q_emb: Any, q_labels: Any, db_emb: Any, db_labels: Any, k: int | None = None) -> float:
    """mAP@k of Euclidean ranking of real embeddings (ties broken by database position)."""
    return _mean(_run(_real_problem(q_emb, q_labels, db_emb, db_labels), map_ks=[k], ties=("stable",))["ap/stable"][:, 0])


def evaluate_embeddings(
    q_emb: Any,
    q_labels: Any,
    db_emb: Any,
    db_labels: Any,
    ks: Sequence[int] = (100, 1000),
    knn_k: int = 10,
    splits: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The real-valued baseline table (Euclidean ranking, stable ties).

    Keys: ``"mAP@all"``, ``"mAP@<k>"``, ``"P@<k>"``, ``"R@<k>"``, ``"kNN-acc@<knn_k>"``, ``"protocol"``.
    """
    problem = _real_problem(q_emb, q_labels, db_emb, db_labels)
    ks = [int(k) for k in ks]
    map_ks: list[int | None] = [None, *ks]
    stats = _run(problem, map_ks=map_ks, count_ks=ks, ties=("stable",), knn_k=knn_k)
    result: dict[str, Any] = {}
    for j, k in enumerate(map_ks):
        result[f"mAP@{'all' if k is None else k}"] = _mean(stats["ap/stable"][:, j])
    for j, k in enumerate(ks):
        result[f"P@{k}"] = _mean(stats["hits/stable"][:, j] / min(k, problem.n))
        result[f"R@{k}"] = _mean(stats["hits/stable"][:, j] / stats["R"].clamp(min=1), stats["R"] > 0)
    result[f"kNN-acc@{knn_k}"] = _mean(stats["knn"])
    query, database = splits or ("queries", "database")
    result["protocol"] = (
        f"real embeddings ({problem.q.shape[1]}-d); queries: {query} ({problem.q.shape[0]}), database: {database} ({problem.n}); "
        "Euclidean ranking, ties by database position; relevant = shares a label; AP@k divides by the relevant items in the top k"
    )
    return result
