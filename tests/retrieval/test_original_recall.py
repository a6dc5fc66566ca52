"""Recall of the original item (near-duplicate retrieval), through the metrics engine, against a
per-query loop over every order and a loop over ranked lists."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from deephash.errors import DeephashError
from deephash.retrieval import pack_codes
from deephash.retrieval.metrics import original_recall_at_k, original_recall_of_lists


@pytest.mark.parametrize("seed", range(4))
def test_tie_aware_and_stable_match_a_loop(seed):
    rng = np.random.default_rng(seed)
    q_bits, db_bits = rng.integers(0, 2, (5, 3)), rng.integers(0, 2, (7, 3))  # 3 bits: many ties
    targets = rng.integers(0, 7, 5)
    ks = [1, 2, 4]
    got = original_recall_at_k(pack_codes(q_bits), pack_codes(db_bits), targets, ks, bits=3)
    aware, stable = [], []
    for i in range(5):
        dist = (q_bits[i] != db_bits).sum(1)
        groups = [list(np.flatnonzero(dist == d)) for d in sorted(set(dist))]
        orders = [[j for g in perms for j in g] for perms in itertools.product(*[itertools.permutations(g) for g in groups])]
        aware.append([np.mean([order.index(targets[i]) < k for order in orders]) for k in ks])
        first = sorted(range(7), key=lambda j: (dist[j], j))
        stable.append([first.index(targets[i]) < k for k in ks])
    np.testing.assert_allclose(got["tie-aware"], np.mean(aware, 0), atol=1e-12)
    np.testing.assert_allclose(got["stable"], np.mean(stable, 0), atol=1e-12)


def test_embeddings_rank_by_euclidean_distance():
    db = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    q = np.array([[0.9, 0.0], [2.9, 0.0]])
    got = original_recall_at_k(q, db, [0, 2], [1, 2])
    np.testing.assert_allclose(got["stable"], [0.5, 1.0])  # query 1's original is second, query 2's first


def test_embeddings_break_exact_ties_by_database_position():
    db = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 5.0]])  # rows 0 and 1 tie for the query at the origin
    got = original_recall_at_k(np.zeros((2, 2)), db, [0, 1], [1, 2])
    np.testing.assert_allclose(got["stable"], [0.5, 1.0])
    np.testing.assert_allclose(got["tie-aware"], got["stable"])


@pytest.mark.parametrize("seed", range(3))
def test_ranked_lists_match_a_loop(seed):
    rng = np.random.default_rng(seed)
    n, nq, depth, ks = 9, 12, 5, [1, 3, 5]
    ranked = np.stack([rng.permutation(n)[:depth] for _ in range(nq)])
    ranked[rng.random((nq, depth)) < 0.2] = -1  # short lists, padded
    targets = rng.integers(0, n, nq)
    want = [np.mean([targets[i] in list(ranked[i, :k]) for i in range(nq)]) for k in ks]
    np.testing.assert_allclose(original_recall_of_lists(ranked, targets, n, ks), want, atol=1e-12)


def test_a_target_outside_the_database_is_an_error():
    with pytest.raises(DeephashError, match="original rows"):
        original_recall_at_k(np.zeros((1, 2)), np.zeros((3, 2)), [3], [1])
    with pytest.raises(DeephashError, match="original rows"):
        original_recall_of_lists(np.zeros((1, 2), np.int64), [-1], 3, [1])
