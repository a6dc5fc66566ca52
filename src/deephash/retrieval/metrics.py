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
* Recall@K in the metric-learning sense (CUB-200, Cars-196, SOP papers): the share of queries
  whose K nearest hold at least one relevant item, averaged over queries with ``R > 0``;
  tie-aware: the exact probability over random orders within ties (hypergeometric at the cut).
  Not the same as R@k above (the share of a query's relevant items retrieved).
* MAP@R (Musgrave et al. 2020, pytorch-metric-learning's ``mean_average_precision_at_r``):
  ``(1/R) sum_{i<=R} P(i) rel(i)`` with R the query's relevant items in the database; averaged
  over queries with ``R > 0``; tie-aware: its exact expectation.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from deephash.errors import DeephashError
from deephash.retrieval.metric_engine import codes_problem as _codes_problem
from deephash.retrieval.metric_engine import knn_predict as _knn_predict
from deephash.retrieval.metric_engine import mean as _mean
from deephash.retrieval.metric_engine import real_problem as _real_problem
from deephash.retrieval.metric_engine import run as _run


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


def metric_learning_recall_at_k(q: Any, q_labels: Any, db: Any, db_labels: Any, ks: Sequence[int],
                                bits: int | None = None, ties: str = "tie-aware") -> np.ndarray:
    """Recall@K of metric learning (a relevant item among the K nearest) for each K: float64
    ``(len(ks),)``. Packed codes when ``bits`` is given (Hamming ranking), else embeddings
    (Euclidean ranking, stable ties)."""
    problem = _codes_problem(q, q_labels, db, db_labels, bits) if bits is not None else _real_problem(q, q_labels, db, db_labels)
    rule = ties if bits is not None else "stable"
    stats = _run(problem, recall_ks=list(ks), ties=(rule,))
    has = stats["R"] > 0
    return stats[f"recall/{rule}"][has].mean(0).numpy() if bool(has.any()) else np.full(len(ks), np.nan)


def map_at_r(q: Any, q_labels: Any, db: Any, db_labels: Any, bits: int | None = None, ties: str = "tie-aware") -> float:
    """MAP@R (see the module docstring) of packed codes (``bits`` given) or embeddings."""
    problem = _codes_problem(q, q_labels, db, db_labels, bits) if bits is not None else _real_problem(q, q_labels, db, db_labels)
    rule = ties if bits is not None else "stable"
    stats = _run(problem, map_at_r=True, ties=(rule,))
    return _mean(stats[f"map_r/{rule}"], stats["R"] > 0)


def original_recall_at_k(q: Any, db: Any, targets: Any, ks: Sequence[int], bits: int | None = None
                         ) -> dict[str, np.ndarray]:
    """Near-duplicate retrieval: for each query, is its one relevant item (its original, database
    row ``targets[i]``) among the k nearest?

    The metrics engine's Recall@K with every database item its own label and each query labelled
    with its original's row, so the original is the only relevant item: with ``n_less`` items
    strictly nearer than it and ``n_tie`` at its distance (itself included), tie-aware is
    ``clip((k - n_less) / n_tie, 0, 1)``, the probability over random orders within the tie;
    stable breaks ties by database position. Embeddings have no tie rule: both keys hold the
    stable value.

    Args:
        q: packed uint8 codes ``(nq, bytes)`` (``bits`` given: Hamming distances) or float
            embeddings ``(nq, D)`` (Euclidean).
        db: the database, same kind ``(n, ...)``.
        targets: int ``(nq,)`` database rows of the originals.
        ks: cut-offs.

    Returns:
        ``{"tie-aware": float64 (len(ks),), "stable": float64 (len(ks),)}``, means over queries.

    Raises:
        DeephashError: a target outside the database.
    """
    targets, items = _original_labels(targets, len(db))
    problem = _codes_problem(q, targets, db, items, bits) if bits is not None else _real_problem(q, targets, db, items)
    stats = _run(problem, recall_ks=ks, ties=("tie-aware", "stable"))
    return {rule: stats[f"recall/{rule}"].mean(0).numpy() for rule in ("tie-aware", "stable")}


def original_recall_of_lists(ranked: Any, targets: Any, n_database: int, ks: Sequence[int]) -> np.ndarray:
    """Near-duplicate recall@k of given ranked lists (e.g. a two-stage search's): the share of
    queries whose original (database row ``targets[i]``) is among the first k of its list.

    :func:`ranked_list_metrics`'s Recall@K with the labels of :func:`original_recall_at_k`.

    Args:
        ranked: int ``(nq, depth)`` database rows, nearest first; -1 pads a short list.
        targets: int ``(nq,)`` database rows of the originals.
        n_database: the database's size.
        ks: cut-offs.

    Returns:
        float64 ``(len(ks),)``.
    """
    targets, items = _original_labels(targets, n_database)
    found = ranked_list_metrics(ranked, targets, items, recall_ks=ks, rule="original")
    return np.array([found[f"Recall@{k}/original"] for k in ks], dtype=np.float64)


def _original_labels(targets: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels that make each query's original its only relevant item: ``(targets, arange(n))``."""
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    if targets.size and (targets.min() < 0 or targets.max() >= n):
        raise DeephashError(f"original rows must lie in 0..{n - 1}, got {int(targets.min())}..{int(targets.max())}")
    return targets, np.arange(n, dtype=np.int64)


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
    recall_ks: Sequence[int] = (1, 10),
) -> dict[str, Any]:
    """The standard table for Hamming ranking in one pass over the distances (both tie rules).

    Keys: ``"mAP@all/tie-aware"``, ``"mAP@all/stable"``, ``"mAP@<k>/tie-aware"``,
    ``"mAP@<k>/stable"``, ``"P@<k>/tie-aware"``, ``"P@<k>/stable"``, ``"R@<k>/tie-aware"``,
    ``"P@r<=<radius>"``, ``"P@r<=<radius>/empty"``, ``"kNN-acc@<knn_k>"``, the metric-learning
    ``"Recall@<K>/<rule>"`` for each of ``recall_ks`` and ``"MAP@R/<rule>"``, and ``"protocol"`` (a
    sentence naming the splits given as ``(query, database)``, relevance and tie rules).
    ``knn_k=None`` leaves kNN accuracy out (needed for multi-hot labels).
    """
    problem = _codes_problem(q_codes, q_labels, db_codes, db_labels, bits)
    ks = [int(k) for k in ks]
    map_ks: list[int | None] = [None, *ks]
    result: dict[str, Any] = {}
    capped = torch.tensor([min(k, problem.n) for k in ks], dtype=torch.float64)
    stats = _run(problem, map_ks=map_ks, count_ks=ks, ties=("tie-aware", "stable"), radii=[radius], knn_k=knn_k,
                 recall_ks=list(recall_ks), map_at_r=True)
    has = stats["R"] > 0
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
        for j, k in enumerate(recall_ks):
            result[f"Recall@{k}/{ties}"] = _mean(stats[f"recall/{ties}"][:, j], has)
        result[f"MAP@R/{ties}"] = _mean(stats[f"map_r/{ties}"], has)
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
def ranked_list_metrics(ranked: Any, q_labels: Any, db_labels: Any, ks: Sequence[int] = (), recall_ks: Sequence[int] = (),
                        knn_k: int | None = None, rule: str = "rerank") -> dict[str, float]:
    """P@k, Recall@K and kNN accuracy of given ranked lists (e.g. a two-stage search's), with the
    definitions of the module docstring; keys ``"P@<k>/<rule>"``, ``"Recall@<K>/<rule>"``,
    ``"kNN-acc@<knn_k>/<rule>"``.

    Args:
        ranked: int ``(nq, depth)`` database positions, nearest first; -1 pads a short list.
            ``depth`` must cover every k asked for (or the whole database).
        q_labels: int ``(nq,)``; db_labels: int ``(n,)`` (single labels only).

    Raises:
        DeephashError: multi-hot labels, or a list shorter than a k it is asked for.
    """
    ranked = np.asarray(ranked, dtype=np.int64)
    q_labels, db_labels = np.asarray(q_labels), np.asarray(db_labels)
    if q_labels.ndim != 1 or db_labels.ndim != 1:
        raise DeephashError("ranked-list metrics need single labels (N,), not multi-hot labels")
    n = len(db_labels)
    depth = max([*ks, *recall_ks, knn_k or 0, 1])
    if ranked.ndim != 2 or ranked.shape[1] < min(depth, n):
        raise DeephashError(f"ranked lists of shape {ranked.shape} are shorter than the cut-off {min(depth, n)}")
    labels = np.where(ranked >= 0, db_labels[np.maximum(ranked, 0)], -1)
    relevant = (labels == q_labels[:, None]) & (ranked >= 0)
    classes = max(int(db_labels.max()), int(q_labels.max())) + 1
    has = np.bincount(db_labels, minlength=classes)[q_labels] > 0
    out: dict[str, float] = {}
    for k in ks:
        out[f"P@{k}/{rule}"] = float(relevant[:, :k].sum(1).mean() / min(k, n))
    for k in recall_ks:
        out[f"Recall@{k}/{rule}"] = float(relevant[:, :k].any(1)[has].mean()) if has.any() else float("nan")
    if knn_k:
        top = torch.from_numpy(np.where(labels[:, :knn_k] >= 0, labels[:, :knn_k], classes))
        pred = _knn_predict(top, classes + 1).numpy()  # padding votes for an extra class
        out[f"kNN-acc@{knn_k}/{rule}"] = float((pred == q_labels).mean())
    return out


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
    recall_ks: Sequence[int] = (1, 10),
) -> dict[str, Any]:
    """The real-valued baseline table (Euclidean ranking, stable ties).

    Keys: ``"mAP@all"``, ``"mAP@<k>"``, ``"P@<k>"``, ``"R@<k>"``, ``"kNN-acc@<knn_k>"``,
    ``"Recall@<K>"``, ``"MAP@R"``, ``"protocol"``.
    """
    problem = _real_problem(q_emb, q_labels, db_emb, db_labels)
    ks = [int(k) for k in ks]
    map_ks: list[int | None] = [None, *ks]
    stats = _run(problem, map_ks=map_ks, count_ks=ks, ties=("stable",), knn_k=knn_k, recall_ks=list(recall_ks),
                 map_at_r=True)
    has = stats["R"] > 0
    result: dict[str, Any] = {}
    for j, k in enumerate(map_ks):
        result[f"mAP@{'all' if k is None else k}"] = _mean(stats["ap/stable"][:, j])
    for j, k in enumerate(ks):
        result[f"P@{k}"] = _mean(stats["hits/stable"][:, j] / min(k, problem.n))
        result[f"R@{k}"] = _mean(stats["hits/stable"][:, j] / stats["R"].clamp(min=1), stats["R"] > 0)
    result[f"kNN-acc@{knn_k}"] = _mean(stats["knn"])
    for j, k in enumerate(recall_ks):
        result[f"Recall@{k}"] = _mean(stats["recall/stable"][:, j], has)
    result["MAP@R"] = _mean(stats["map_r/stable"], has)
    query, database = splits or ("queries", "database")
    result["protocol"] = (
        f"real embeddings ({problem.q.shape[1]}-d); queries: {query} ({problem.q.shape[0]}), database: {database} ({problem.n}); "
        "Euclidean ranking, ties by database position; relevant = shares a label; AP@k divides by the relevant items in the top k"
    )
    return result
