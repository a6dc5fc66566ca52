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
from deephash.retrieval.hamming import as_words, word_distances

CHUNK = 256  # queries per chunk


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
    """Queries and database prepared once: distance function inputs and labels."""

    q: torch.Tensor
    db: torch.Tensor
    q_labels: torch.Tensor
    db_labels: torch.Tensor
    n_levels: int  # number of distinct distance values for Hamming (bits + 1); 0 for real

    @property
    def n(self) -> int:
        return self.db.shape[0]

    def chunks(self) -> Any:
        """Yield ``(slice, distances (c, n), relevance bool (c, n))`` over query chunks."""
        for start in range(0, self.q.shape[0], CHUNK):
            rows = slice(start, start + CHUNK)
            if self.n_levels:
                dist = word_distances(self.q[rows], self.db).to(torch.int64)
            else:
                dist = torch.cdist(self.q[rows], self.db).double()
            yield rows, dist, _relevance(self.q_labels[rows], self.db_labels)


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
    return _Problem(as_words(q), as_words(db), ql, dl, int(bits) + 1)


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
def _histograms(dist: torch.Tensor, rel: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query counts of all and of relevant items at each distance: float64 ``(c, levels)`` each."""
    c = dist.shape[0]
    keys = ((torch.arange(c)[:, None] * levels + dist) * 2 + rel).reshape(-1)
    counts = torch.bincount(keys, minlength=c * levels * 2).reshape(c, levels, 2).double()
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
def _stable_order(dist: torch.Tensor, length: int) -> torch.Tensor:
    """int64 ``(c, length)`` database positions of the first ``length`` items in stable order."""
    n = dist.shape[1]
    if not dist.is_floating_point():  # numpy's stable sort of uint8 is a radix sort: O(n)
        small = dist.numpy().astype(np.uint8 if int(dist.max()) < 256 else np.int32)
        return torch.from_numpy(np.argsort(small, axis=1, kind="stable")[:, :length])
    return torch.sort(dist, dim=1, stable=True).indices[:, :length]


def _stable_ap(rel_sorted: torch.Tensor, ks: Sequence[int | None]) -> torch.Tensor:
    """AP@k per query for each k (``None`` = all), float64 ``(c, len(ks))``, from sorted relevance."""
    rel = rel_sorted.double()
    cum = torch.cumsum(rel, 1)
    sums = torch.cumsum(cum / torch.arange(1, rel.shape[1] + 1, dtype=torch.float64) * rel, 1)
    idx = torch.tensor([(rel.shape[1] if k is None else min(k, rel.shape[1])) - 1 for k in ks])
    r_k, s_k = cum[:, idx], sums[:, idx]
    return torch.where(r_k > 0, s_k / r_k.clamp(min=1), torch.zeros_like(r_k))


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
    ties: str = "tie-aware",
    radii: Sequence[int] = (),
    knn_k: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-query statistics over all chunks (float64 tensors, queries along dim 0)."""
    if ties not in ("tie-aware", "stable"):
        raise DeephashError(f"ties must be 'tie-aware' or 'stable', got {ties!r}")
    for k in [*[k for k in map_ks if k is not None], *count_ks, *([knn_k] if knn_k else [])]:
        if int(k) < 1:
            raise DeephashError(f"k must be >= 1, got {k}")
    tie_aware = ties == "tie-aware" and problem.n_levels > 0
    harmonic = _harmonic(problem.n) if tie_aware and map_ks else None
    n_classes = int(max(problem.q_labels.max(), problem.db_labels.max())) + 1 if knn_k else 0
    if knn_k and problem.q_labels.dim() != 1:
        raise DeephashError("kNN accuracy needs single labels (N,), not multi-hot labels")
    out: dict[str, list[torch.Tensor]] = {}
    for rows, dist, rel in problem.chunks():
        stats: dict[str, torch.Tensor] = {"R": rel.sum(1).double()}
        if problem.n_levels and (tie_aware or radii):
            total, relevant = _histograms(dist, rel, problem.n_levels)
            if radii:
                cum_t, cum_r = torch.cumsum(total, 1), torch.cumsum(relevant, 1)
                idx = torch.tensor([min(max(r, 0), problem.n_levels - 1) for r in radii])
                neg = torch.tensor([r < 0 for r in radii])
                stats["ball"] = torch.where(neg, 0.0, cum_t[:, idx])
                stats["ball_rel"] = torch.where(neg, 0.0, cum_r[:, idx])
        if tie_aware:
            if map_ks:
                stats["ap"] = torch.stack([_tie_aware_ap(total, relevant, k, harmonic) for k in map_ks], 1)
            if count_ks:
                stats["hits"] = _tie_aware_counts(total, relevant, count_ks)
        need_order = (not tie_aware and (map_ks or count_ks)) or knn_k
        if need_order:
            wanted = [problem.n if k is None else k for k in map_ks if not tie_aware] + [*([] if tie_aware else count_ks), knn_k or 0]
            length = min(max(wanted), problem.n)
            order = _stable_order(dist, length)
            rel_sorted = rel.gather(1, order)
            if not tie_aware and map_ks:
                stats["ap"] = _stable_ap(rel_sorted, map_ks)
            if not tie_aware and count_ks:
                cum = torch.cumsum(rel_sorted.double(), 1)
                stats["hits"] = cum[:, [min(k, length) - 1 for k in count_ks]]
            if knn_k:
                pred = _knn_predict(problem.db_labels[order[:, : min(knn_k, length)]], n_classes)
                stats["knn"] = (pred == problem.q_labels[rows]).double()
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
    stats = _run(_codes_problem(q_codes, q_labels, db_codes, db_labels, bits), map_ks=[k], ties=ties)
    return _mean(stats["ap"][:, 0])


def precision_at_k(q_codes: Any, q_labels: Any, db_codes: Any, db_labels: Any, bits: int, ks: Sequence[int], ties: str = "tie-aware") -> np.ndarray:
    """Mean precision@k for each k in ``ks``: float64 ``(len(ks),)``."""
    stats = _run(_codes_problem(q_codes, q_labels, db_codes, db_labels, bits), count_ks=list(ks), ties=ties)
    k = torch.tensor([min(v, _tensor(db_codes).shape[0]) for v in ks], dtype=torch.float64)
    return (stats["hits"] / k).mean(0).numpy()


def recall_at_k(q_codes: Any, q_labels: Any, db_codes: Any, db_labels: Any, bits: int, ks: Sequence[int], ties: str = "tie-aware") -> np.ndarray:
    """Mean recall@k for each k in ``ks`` over queries with a relevant item: float64 ``(len(ks),)``."""
    stats = _run(_codes_problem(q_codes, q_labels, db_codes, db_labels, bits), count_ks=list(ks), ties=ties)
    has = stats["R"] > 0
    return (stats["hits"][has] / stats["R"][has, None]).mean(0).numpy()


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
    knn_k: int = 10,
    splits: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The standard table for Hamming ranking in two passes (tie-aware and stable).

    Keys: ``"mAP@all/tie-aware"``, ``"mAP@all/stable"``, ``"mAP@<k>/tie-aware"``,
    ``"mAP@<k>/stable"``, ``"P@<k>/tie-aware"``, ``"P@<k>/stable"``, ``"R@<k>/tie-aware"``,
    ``"P@r<=<radius>"``, ``"P@r<=<radius>/empty"``, ``"kNN-acc@<knn_k>"``, and ``"protocol"`` (a
    sentence naming the splits given as ``(query, database)``, relevance and tie rules).
    """
    problem = _codes_problem(q_codes, q_labels, db_codes, db_labels, bits)
    ks = [int(k) for k in ks]
    map_ks: list[int | None] = [None, *ks]
    result: dict[str, Any] = {}
    capped = torch.tensor([min(k, problem.n) for k in ks], dtype=torch.float64)
    for ties in ("tie-aware", "stable"):
        stats = _run(
            problem, map_ks=map_ks, count_ks=ks, ties=ties,
            radii=[radius] if ties == "tie-aware" else (), knn_k=knn_k if ties == "stable" else None,
        )
        for j, k in enumerate(map_ks):
            result[f"mAP@{'all' if k is None else k}/{ties}"] = _mean(stats["ap"][:, j])
        for j, k in enumerate(ks):
            result[f"P@{k}/{ties}"] = _mean(stats["hits"][:, j] / capped[j])
            result[f"R@{k}/{ties}"] = _mean(stats["hits"][:, j] / stats["R"].clamp(min=1), stats["R"] > 0)
        if ties == "tie-aware":
            ball, hits = stats["ball"][:, 0], stats["ball_rel"][:, 0]
            result[f"P@r<={radius}"] = _mean(torch.where(ball > 0, hits / ball.clamp(min=1), 0.0))
            result[f"P@r<={radius}/empty"] = _mean((ball == 0).double())
        else:
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
    return _mean(_run(_real_problem(q_emb, q_labels, db_emb, db_labels), map_ks=[k], ties="stable")["ap"][:, 0])


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
    stats = _run(problem, map_ks=map_ks, count_ks=ks, ties="stable", knn_k=knn_k)
    result: dict[str, Any] = {}
    for j, k in enumerate(map_ks):
        result[f"mAP@{'all' if k is None else k}"] = _mean(stats["ap"][:, j])
    for j, k in enumerate(ks):
        result[f"P@{k}"] = _mean(stats["hits"][:, j] / min(k, problem.n))
        result[f"R@{k}"] = _mean(stats["hits"][:, j] / stats["R"].clamp(min=1), stats["R"] > 0)
    result[f"kNN-acc@{knn_k}"] = _mean(stats["knn"])
    query, database = splits or ("queries", "database")
    result["protocol"] = (
        f"real embeddings ({problem.q.shape[1]}-d); queries: {query} ({problem.q.shape[0]}), database: {database} ({problem.n}); "
        "Euclidean ranking, ties by database position; relevant = shares a label; AP@k divides by the relevant items in the top k"
    )
    return result
