"""Recall@K (metric learning) and MAP@R: brute-force loops and permutations, and
pytorch-metric-learning's AccuracyCalculator on float embeddings."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from deephash.retrieval import pack_codes
from deephash.retrieval.metrics import evaluate_codes, evaluate_embeddings, map_at_r, metric_learning_recall_at_k


def _case(seed: int, nq: int, n: int, bits: int, classes: int):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 2, (nq, bits)), rng.integers(0, 2, (n, bits)),
            rng.integers(0, classes, nq), rng.integers(0, classes, n))


def _recall_and_map_r(order: list[int], rel: np.ndarray, k: int) -> tuple[float, float]:
    ranked = rel[order]
    r = int(rel.sum())
    hits = np.cumsum(ranked)
    map_r = sum(hits[i] / (i + 1) for i in range(r) if ranked[i]) / r if r else 0.0
    return float(ranked[:k].any()), map_r


def _by_permutations(q_bits, db_bits, ql, dl, k, tie_aware: bool) -> tuple[float, float]:
    """Recall@k and MAP@R averaged over queries with a relevant item: stable order, or the mean
    over every order within each group of equal Hamming distance."""
    recalls, maps = [], []
    for i in range(len(q_bits)):
        dist = (q_bits[i] != db_bits).sum(1)
        rel = dl == ql[i]
        if not rel.any():
            continue
        groups = [list(np.flatnonzero(dist == d)) for d in sorted(set(dist))]
        orders = ([[j for g in perms for j in g] for perms in itertools.product(*[itertools.permutations(g) for g in groups])]
                  if tie_aware else [sorted(range(len(dist)), key=lambda j: (dist[j], j))])
        values = np.array([_recall_and_map_r(order, rel, k) for order in orders])
        recalls.append(values[:, 0].mean())
        maps.append(values[:, 1].mean())
    return float(np.mean(recalls)), float(np.mean(maps))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("ties", ["tie-aware", "stable"])
def test_codes_match_brute_force_permutations(seed, k, ties):
    """3-bit codes over 8 items: every distance is tied with others, and k cuts through tie groups."""
    q_bits, db_bits, ql, dl = _case(seed, nq=4, n=8, bits=3, classes=3)
    want_recall, want_map = _by_permutations(q_bits, db_bits, ql, dl, k, ties == "tie-aware")
    q, db = pack_codes(q_bits), pack_codes(db_bits)
    assert metric_learning_recall_at_k(q, ql, db, dl, [k], bits=3, ties=ties)[0] == pytest.approx(want_recall, abs=1e-12)
    assert map_at_r(q, ql, db, dl, bits=3, ties=ties) == pytest.approx(want_map, abs=1e-12)
    table = evaluate_codes(q, ql, db, dl, bits=3, ks=[2], knn_k=None, recall_ks=[k])
    assert table[f"Recall@{k}/{ties}"] == pytest.approx(want_recall, abs=1e-12)
    assert table[f"MAP@R/{ties}"] == pytest.approx(want_map, abs=1e-12)


def test_a_relevant_item_tied_at_the_cut_counts_by_its_chance():
    """One relevant item tied with three others at distance 0, k = 1: Recall@1 = 1/4, while a
    stable order that puts it first says 1."""
    q = pack_codes(np.zeros((1, 8), dtype=np.int64))
    db = pack_codes(np.zeros((4, 8), dtype=np.int64))
    assert metric_learning_recall_at_k(q, [1], db, [1, 0, 0, 0], [1], bits=8)[0] == pytest.approx(0.25)
    assert metric_learning_recall_at_k(q, [1], db, [1, 0, 0, 0], [1], bits=8, ties="stable")[0] == 1.0
    assert metric_learning_recall_at_k(q, [1], db, [0, 0, 0, 1], [1], bits=8, ties="stable")[0] == 0.0
    assert metric_learning_recall_at_k(q, [1], db, [0, 0, 0, 1], [4], bits=8)[0] == 1.0


def test_queries_without_a_relevant_item_are_left_out():
    q = pack_codes(np.array([[0] * 8, [1] * 8]))
    db = pack_codes(np.array([[0] * 8, [1] * 8]))
    assert metric_learning_recall_at_k(q, [0, 5], db, [0, 1], [1], bits=8)[0] == 1.0  # query 2 has none
    assert map_at_r(q, [0, 5], db, [0, 1], bits=8) == 1.0


@pytest.mark.parametrize("seed", range(3))
def test_embeddings_match_pytorch_metric_learning(seed):
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(5, 8, generator=gen) * 1.5
    ql, dl = torch.randint(0, 5, (60,), generator=gen), torch.randint(0, 5, (300,), generator=gen)
    q = centers[ql] + torch.randn(60, 8, generator=gen)
    db = centers[dl] + torch.randn(300, 8, generator=gen)
    pml = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count",
                             device=torch.device("cpu")).get_accuracy(q, ql, db, dl, ref_includes_query=False)
    assert metric_learning_recall_at_k(q, ql, db, dl, [1])[0] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert map_at_r(q, ql, db, dl) == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)
    table = evaluate_embeddings(q.numpy(), ql.numpy(), db.numpy(), dl.numpy(), ks=[10], recall_ks=[1, 5])
    assert table["MAP@R"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)
    assert table["Recall@1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    dist = torch.cdist(q, db)
    nearest5 = dist.argsort(dim=1)[:, :5]
    assert table["Recall@5"] == pytest.approx(float((dl[nearest5] == ql[:, None]).any(1).double().mean()))
