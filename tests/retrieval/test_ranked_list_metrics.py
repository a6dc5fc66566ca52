"""Metrics of given ranked lists (what the two-stage search is scored with): a loop, and the metric
engine's own P@k / Recall@K / kNN on the same Euclidean order."""

from __future__ import annotations

import numpy as np
import pytest

from deephash.errors import DeephashError
from deephash.retrieval import evaluate_embeddings, ranked_list_metrics


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    db = rng.normal(size=(60, 4)).astype(np.float32)
    q = rng.normal(size=(15, 4)).astype(np.float32)
    return q, rng.integers(0, 4, 15), db, rng.integers(0, 3, 60)  # label 3 of the queries is not in the database


def test_equals_the_metric_engine_on_the_full_euclidean_order():
    q, qy, db, dby = _data()
    order = np.argsort(((q[:, None] - db[None]) ** 2).sum(-1), axis=1, kind="stable")
    ours = ranked_list_metrics(order, qy, dby, ks=[5, 20], recall_ks=[1, 4], knn_k=7, rule="x")
    engine = evaluate_embeddings(q, qy, db, dby, ks=[5, 20], knn_k=7, recall_ks=[1, 4])
    for key in ("P@5", "P@20", "Recall@1", "Recall@4", "kNN-acc@7"):
        assert ours[f"{key}/x"] == pytest.approx(engine[key], abs=1e-12), key


def test_equals_a_loop_on_short_padded_lists():
    _, qy, _, dby = _data(1)
    rng = np.random.default_rng(2)
    ranked = np.stack([rng.permutation(60)[:10] for _ in qy])
    ranked[0, 6:] = -1  # a list of 6 items: the rest is padding, never relevant, never a vote
    ours = ranked_list_metrics(ranked, qy, dby, ks=[3, 10], recall_ks=[2], knn_k=10)
    rows = [[int(j) for j in r if j >= 0] for r in ranked]
    has = [q in set(dby.tolist()) for q in qy]
    for k in (3, 10):
        assert ours[f"P@{k}/rerank"] == pytest.approx(np.mean([sum(dby[j] == q for j in r[:k]) / k for r, q in zip(rows, qy)]))
    hits = [any(dby[j] == q for j in r[:2]) for r, q, h in zip(rows, qy, has) if h]
    assert ours["Recall@2/rerank"] == pytest.approx(np.mean(hits))

    def vote(r):  # majority, a tie to the label ranked first
        labels = [int(dby[j]) for j in r]
        return max(set(labels), key=lambda c: (labels.count(c), -labels.index(c)))

    assert ours["kNN-acc@10/rerank"] == pytest.approx(np.mean([vote(r) == q for r, q in zip(rows, qy)]))


def test_refuses_multi_hot_labels_and_short_lists():
    with pytest.raises(DeephashError, match="single labels"):
        ranked_list_metrics(np.zeros((2, 3), dtype=int), np.zeros((2, 2)), np.zeros((5, 2)), ks=[1])
    with pytest.raises(DeephashError, match="shorter than the cut-off 4"):
        ranked_list_metrics(np.zeros((2, 3), dtype=int), np.zeros(2, dtype=int), np.zeros(5, dtype=int), ks=[4])
