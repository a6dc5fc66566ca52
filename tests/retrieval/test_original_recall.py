"""Recall of the original item (near-duplicate retrieval) against a per-query loop over every order."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from deephash.retrieval import pack_codes
from deephash.retrieval.metrics import original_recall_at_k


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
