"""Retrieval metrics against per-query Python references, brute-force permutations and sklearn."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from deephash.retrieval import (
    evaluate_codes,
    evaluate_embeddings,
    knn_accuracy,
    mean_average_precision,
    mean_average_precision_real,
    pack_codes,
    pr_curve,
    precision_at_k,
    precision_within_radius,
    recall_at_k,
)


def _random_case(seed: int, nq: int, n: int, bits: int, classes: int, multi: bool = False):
    rng = np.random.default_rng(seed)
    q_bits = rng.integers(0, 2, (nq, bits)).astype(bool)
    db_bits = rng.integers(0, 2, (n, bits)).astype(bool)
    if multi:
        ql = (rng.random((nq, classes)) < 0.3).astype(np.int64)
        dl = (rng.random((n, classes)) < 0.3).astype(np.int64)
    else:
        ql, dl = rng.integers(0, classes, nq), rng.integers(0, classes, n)
    return q_bits, db_bits, ql, dl


def _relevance(ql, dl):
    return (ql[:, None] == dl[None, :]) if ql.ndim == 1 else (ql @ dl.T > 0)


def _distances(q_bits, db_bits):
    return (q_bits[:, None, :] != db_bits[None, :, :]).sum(2)


def _ap_of_order(rel_sorted, k):
    """DeepHash-pytorch CalcTopMap for one query: sum P(i) rel(i) over the top k / relevant in top k."""
    top = rel_sorted[:k]
    hits, total = 0, 0.0
    for i, r in enumerate(top, 1):
        if r:
            hits += 1
            total += hits / i
    return total / hits if hits else 0.0


def _reference_stable_map(q_bits, db_bits, ql, dl, k):
    dist, rel = _distances(q_bits, db_bits), _relevance(ql, dl)
    aps = []
    for i in range(len(q_bits)):
        order = sorted(range(len(db_bits)), key=lambda j: (dist[i, j], j))
        aps.append(_ap_of_order(rel[i, order], k or len(db_bits)))
    return float(np.mean(aps))


def _reference_tie_aware_map(q_bits, db_bits, ql, dl, k):
    """Average over every permutation within each tie group (brute force)."""
    dist, rel = _distances(q_bits, db_bits), _relevance(ql, dl)
    aps = []
    for i in range(len(q_bits)):
        groups = [list(np.flatnonzero(dist[i] == d)) for d in sorted(set(dist[i]))]
        values = []
        for perms in itertools.product(*[itertools.permutations(g) for g in groups]):
            order = [j for perm in perms for j in perm]
            values.append(_ap_of_order(rel[i, order], k or len(db_bits)))
        aps.append(np.mean(values))
    return float(np.mean(aps))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [None, 1, 3, 5, 8])
def test_tie_aware_map_matches_brute_force_permutations(seed, k):
    q_bits, db_bits, ql, dl = _random_case(seed, nq=3, n=8, bits=3, classes=2)
    got = mean_average_precision(pack_codes(q_bits), ql, pack_codes(db_bits), dl, bits=3, k=k)
    assert got == pytest.approx(_reference_tie_aware_map(q_bits, db_bits, ql, dl, k), abs=1e-12)


def test_tie_aware_map_multi_label_matches_brute_force():
    q_bits, db_bits, ql, dl = _random_case(7, nq=3, n=7, bits=2, classes=3, multi=True)
    for k in (None, 4):
        got = mean_average_precision(pack_codes(q_bits), ql, pack_codes(db_bits), dl, bits=2, k=k)
        assert got == pytest.approx(_reference_tie_aware_map(q_bits, db_bits, ql, dl, k), abs=1e-12)


def test_tie_aware_map_matches_monte_carlo_on_a_larger_case():
    q_bits, db_bits, ql, dl = _random_case(3, nq=2, n=60, bits=4, classes=3)
    dist, rel = _distances(q_bits, db_bits), _relevance(ql, dl)
    rng = np.random.default_rng(0)
    for k in (None, 20):
        estimates = []
        for i in range(2):
            samples = [
                _ap_of_order(rel[i, np.lexsort((rng.random(60), dist[i]))], k or 60) for _ in range(4000)
            ]
            estimates.append(np.mean(samples))
        got = mean_average_precision(pack_codes(q_bits), ql, pack_codes(db_bits), dl, bits=4, k=k)
        assert got == pytest.approx(np.mean(estimates), abs=0.01)


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("k", [None, 1, 10, 37, 500])
def test_stable_map_matches_python_reference(multi, k):
    q_bits, db_bits, ql, dl = _random_case(11, nq=40, n=120, bits=5, classes=4, multi=multi)
    got = mean_average_precision(pack_codes(q_bits), ql, pack_codes(db_bits), dl, bits=5, k=k, ties="stable")
    assert got == pytest.approx(_reference_stable_map(q_bits, db_bits, ql, dl, k), abs=1e-12)


def test_stable_map_at_all_matches_sklearn_with_position_tiebreak():
    q_bits, db_bits, ql, dl = _random_case(5, nq=25, n=200, bits=6, classes=5)
    dist, rel = _distances(q_bits, db_bits), _relevance(ql, dl)
    scores = -(dist * 1000 + np.arange(200)[None, :])  # distinct scores in stable order
    expected = np.mean([average_precision_score(rel[i], scores[i]) for i in range(25) if rel[i].any()])
    expected *= rel.any(1).sum() / 25  # queries without a relevant item count 0
    got = mean_average_precision(pack_codes(q_bits), ql, pack_codes(db_bits), dl, bits=6, ties="stable")
    assert got == pytest.approx(expected, abs=1e-12)


def test_no_ties_makes_both_rules_equal_and_ties_make_them_differ():
    bits = 16
    db_ints = np.array([0b0, 0b1, 0b11, 0b111, 0b1111], dtype=np.int64)  # distinct distances from 0
    db_bits = ((db_ints[:, None] >> np.arange(bits)[::-1]) & 1).astype(bool)
    q_bits = np.zeros((1, bits), bool)
    labels, q_labels = np.array([0, 1, 0, 1, 0]), np.array([0])
    a = mean_average_precision(pack_codes(q_bits), q_labels, pack_codes(db_bits), labels, bits)
    b = mean_average_precision(pack_codes(q_bits), q_labels, pack_codes(db_bits), labels, bits, ties="stable")
    assert a == pytest.approx(b) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    tied = np.zeros((2, bits), bool)  # two codes at distance 0: irrelevant first in database order
    s = mean_average_precision(pack_codes(q_bits), q_labels, pack_codes(tied), np.array([1, 0]), bits, ties="stable")
    t = mean_average_precision(pack_codes(q_bits), q_labels, pack_codes(tied), np.array([1, 0]), bits)
    assert s == pytest.approx(0.5) and t == pytest.approx(0.75)


@pytest.mark.parametrize("ties", ["stable", "tie-aware"])
def test_precision_and_recall_at_k(ties):
    q_bits, db_bits, ql, dl = _random_case(2, nq=4, n=7, bits=3, classes=2)
    dist, rel = _distances(q_bits, db_bits), _relevance(ql, dl)
    ks = [1, 3, 7, 10]
    prec = precision_at_k(pack_codes(q_bits), ql, pack_codes(db_bits), dl, 3, ks, ties=ties)
    rec = recall_at_k(pack_codes(q_bits), ql, pack_codes(db_bits), dl, 3, ks, ties=ties)
    exp_p, exp_r = [], []
    for i in range(4):
        groups = [list(np.flatnonzero(dist[i] == d)) for d in sorted(set(dist[i]))]
        orders = (
            [[j for g in groups for j in g]]
            if ties == "stable"
            else [[j for p in perms for j in p] for perms in itertools.product(*[itertools.permutations(g) for g in groups])]
        )
        hits = np.array([[rel[i, o[: min(k, 7)]].sum() for k in ks] for o in orders]).mean(0)
        exp_p.append(hits / np.minimum(ks, 7))
        if rel[i].any():
            exp_r.append(hits / rel[i].sum())
    np.testing.assert_allclose(prec, np.mean(exp_p, 0), atol=1e-12)
    np.testing.assert_allclose(rec, np.mean(exp_r, 0), atol=1e-12)


def test_radius_precision_pr_curve_and_knn():
    q_bits, db_bits, ql, dl = _random_case(9, nq=30, n=50, bits=10, classes=3)
    dist, rel = _distances(q_bits, db_bits), _relevance(ql, dl)
    args = (pack_codes(q_bits), ql, pack_codes(db_bits), dl, 10)
    ball = dist <= 2
    per_query = [rel[i, ball[i]].mean() if ball[i].any() else 0.0 for i in range(30)]
    precision, empty = precision_within_radius(*args, radius=2)
    assert precision == pytest.approx(np.mean(per_query)) and empty == pytest.approx((~ball.any(1)).mean())
    assert 0 < empty < 1  # the case exercises both kinds of ball
    curve = pr_curve(*args)
    for r in range(11):
        inside = dist <= r
        nonempty = inside.any(1)
        p = [rel[i, inside[i]].mean() for i in range(30) if nonempty[i]]
        rc = [rel[i, inside[i]].sum() / rel[i].sum() for i in range(30) if rel[i].any()]
        assert curve["precision"][r] == pytest.approx(np.mean(p) if p else np.nan, nan_ok=True)
        assert curve["recall"][r] == pytest.approx(np.mean(rc))
    assert curve["recall"][-1] == pytest.approx(1.0)
    for k in (1, 4, 7):
        correct = 0
        for i in range(30):
            order = sorted(range(50), key=lambda j: (dist[i, j], j))[:k]
            votes = {}
            for rank, j in enumerate(order):
                votes.setdefault(dl[j], [0, rank])[0] += 1
            winner = max(votes, key=lambda c: (votes[c][0], -votes[c][1]))
            correct += winner == ql[i]
        assert knn_accuracy(*args, k=k) == pytest.approx(correct / 30)


def test_evaluate_codes_agrees_with_single_metrics_and_chunking():
    q_bits, db_bits, ql, dl = _random_case(4, nq=300, n=400, bits=12, classes=10)  # > one chunk of queries
    args = (pack_codes(q_bits), ql, pack_codes(db_bits), dl, 12)
    table = evaluate_codes(*args, ks=(10, 100), splits=("test", "train"))
    assert table["mAP@all/tie-aware"] == pytest.approx(mean_average_precision(*args))
    assert table["mAP@100/stable"] == pytest.approx(_reference_stable_map(q_bits, db_bits, ql, dl, 100))
    assert table["P@10/tie-aware"] == pytest.approx(precision_at_k(*args, [10])[0])
    assert table["kNN-acc@10"] == pytest.approx(knn_accuracy(*args, k=10))
    assert "test" in table["protocol"] and "train" in table["protocol"]
    torch_args = (torch.from_numpy(args[0]), torch.from_numpy(ql), torch.from_numpy(args[2]), torch.from_numpy(dl), 12)
    assert mean_average_precision(*torch_args) == pytest.approx(table["mAP@all/tie-aware"])


def test_real_embeddings_match_reference():
    rng = np.random.default_rng(0)
    q, db = rng.normal(size=(20, 5)), rng.normal(size=(60, 5))
    ql, dl = rng.integers(0, 3, 20), rng.integers(0, 3, 60)
    dist, rel = ((q[:, None] - db[None]) ** 2).sum(2), _relevance(ql, dl)
    for k in (None, 10):
        expected = np.mean([_ap_of_order(rel[i, np.argsort(dist[i], kind="stable")], k or 60) for i in range(20)])
        assert mean_average_precision_real(q, ql, db, dl, k=k) == pytest.approx(expected)
    table = evaluate_embeddings(q, ql, db, dl, ks=(10,), knn_k=5)
    assert table["mAP@all"] == pytest.approx(mean_average_precision_real(q, ql, db, dl))
    assert table["P@10"] == pytest.approx(np.mean([rel[i, np.argsort(dist[i])[:10]].mean() for i in range(20)]))


def test_bad_inputs_raise_clear_errors():
    q_bits, db_bits, ql, dl = _random_case(0, nq=3, n=5, bits=8, classes=2)
    with pytest.raises(ValueError, match="bytes"):
        mean_average_precision(pack_codes(q_bits), ql, pack_codes(db_bits), dl, bits=16)
    with pytest.raises(ValueError, match="ties"):
        mean_average_precision(pack_codes(q_bits), ql, pack_codes(db_bits), dl, bits=8, ties="random")
    with pytest.raises(ValueError, match="labels"):
        mean_average_precision(pack_codes(q_bits), ql[:2], pack_codes(db_bits), dl, bits=8)
    assert math.isfinite(mean_average_precision(pack_codes(q_bits), ql, pack_codes(db_bits), dl, bits=8, k=100))


# ---------------------------------------------------------------- fast paths against the references
@pytest.mark.parametrize("bits", [5, 48, 64, 130, 300])
def test_small_distances_match_brute_force_and_the_torch_fallback(bits, monkeypatch):
    from deephash.retrieval.hamming import as_words, small_distances

    rng = np.random.default_rng(bits)
    q_bits, db_bits = rng.integers(0, 2, (6, bits)).astype(bool), rng.integers(0, 2, (9, bits)).astype(bool)
    q_w, db_w = as_words(torch.from_numpy(pack_codes(q_bits))).numpy(), as_words(torch.from_numpy(pack_codes(db_bits))).numpy()
    got = small_distances(q_w, db_w)
    assert got.dtype == (np.uint8 if bits <= 192 else np.uint16)
    np.testing.assert_array_equal(got, _distances(q_bits, db_bits))
    monkeypatch.delattr(np, "bitwise_count", raising=False)  # numpy < 2
    np.testing.assert_array_equal(small_distances(q_w, db_w), _distances(q_bits, db_bits))


def test_many_small_chunks_give_the_references(monkeypatch):
    from deephash.retrieval import metric_engine

    q_bits, db_bits, ql, dl = _random_case(21, nq=23, n=40, bits=6, classes=3)
    args = (pack_codes(q_bits), ql, pack_codes(db_bits), dl, 6)
    whole = evaluate_codes(*args, ks=(5, 17))
    monkeypatch.setattr(metric_engine, "CHUNK_ELEMENTS", 40 * 4)  # 4 queries per chunk, 6 chunks
    chunked = evaluate_codes(*args, ks=(5, 17))
    for key, value in whole.items():
        assert chunked[key] == (value if key == "protocol" else pytest.approx(value, abs=1e-12))
    for k in (None, 17):
        name = f"mAP@{'all' if k is None else k}/stable"
        assert chunked[name] == pytest.approx(_reference_stable_map(q_bits, db_bits, ql, dl, k), abs=1e-12)


def test_arbitrary_label_values_and_the_relevance_bit_histograms(monkeypatch):
    """Negative, large and query-only labels; the class histograms and the relevance-bit fallback agree."""
    from deephash.retrieval import metric_engine

    q_bits, db_bits, ql, dl = _random_case(8, nq=4, n=8, bits=3, classes=3)
    values = np.array([-7, 10**12, 3])
    ql, dl = values[ql], values[dl]
    ql[0] = 99  # no relevant item in the database
    args = (pack_codes(q_bits), ql, pack_codes(db_bits), dl, 3)
    for k in (None, 3):
        expected = _reference_tie_aware_map(q_bits, db_bits, ql, dl, k)
        assert mean_average_precision(*args, k=k) == pytest.approx(expected, abs=1e-12)
        assert mean_average_precision(*args, k=k, ties="stable") == pytest.approx(
            _reference_stable_map(q_bits, db_bits, ql, dl, k), abs=1e-12)
    table = evaluate_codes(*args, ks=(3,), knn_k=3)
    monkeypatch.setattr(metric_engine, "MAX_CLASS_CELLS", 0)  # force the (distance, relevant) bincount
    fallback = evaluate_codes(*args, ks=(3,), knn_k=3)
    for key, value in table.items():
        assert fallback[key] == (value if key == "protocol" else pytest.approx(value, abs=1e-12))
    assert mean_average_precision(*args) == pytest.approx(_reference_tie_aware_map(q_bits, db_bits, ql, dl, None), abs=1e-12)


def test_evaluate_codes_multi_label_matches_the_references():
    q_bits, db_bits, ql, dl = _random_case(12, nq=3, n=7, bits=3, classes=3, multi=True)
    table = evaluate_codes(pack_codes(q_bits), ql, pack_codes(db_bits), dl, 3, ks=(4,), knn_k=None)
    for k in (None, 4):
        name = "all" if k is None else k
        assert table[f"mAP@{name}/tie-aware"] == pytest.approx(_reference_tie_aware_map(q_bits, db_bits, ql, dl, k), abs=1e-12)
        assert table[f"mAP@{name}/stable"] == pytest.approx(_reference_stable_map(q_bits, db_bits, ql, dl, k), abs=1e-12)
