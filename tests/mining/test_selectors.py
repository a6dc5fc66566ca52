"""Selectors against brute-force loops over explicit pairs and triplets."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import labelled_batch, squared_distance

from deephash.errors import DeephashError
from deephash.mining import (
    AllPositivePairSelector,
    AllTripletSelector,
    BatchHardTripletSelector,
    HardestNegativeTripletSelector,
    HardNegativePairSelector,
    RandomNegativeTripletSelector,
    SemihardNegativeTripletSelector,
    create_selector,
    random_negative_pairs,
)
from deephash.mining.pairs import hardest_negative_pairs, positive_mask

MARGIN = 1.0


def _batch(n_classes: int = 4, n_samples: int = 5, dim: int = 3, seed: int = 0, scale: float = 0.7):
    return labelled_batch(n_classes, n_samples, dim, seed, scale)


_sq = squared_distance


def _brute_pairs(labels: torch.Tensor) -> tuple[list, list]:
    lab = labels.tolist()
    pairs = list(itertools.combinations(range(len(lab)), 2))
    return [p for p in pairs if lab[p[0]] == lab[p[1]]], [p for p in pairs if lab[p[0]] != lab[p[1]]]


def _hinges(e: torch.Tensor, labels: torch.Tensor) -> dict[tuple[int, int], dict[int, float]]:
    """{(a, p): {n: d_ap - d_an + margin}} for every pair a < p of one label."""
    lab = labels.tolist()
    positives, _ = _brute_pairs(labels)
    return {
        (a, p): {n: _sq(e, a, p) - _sq(e, a, n) + MARGIN for n in range(len(lab)) if lab[n] != lab[a]}
        for a, p in positives
    }


def _rows(t: torch.Tensor) -> list[tuple[int, ...]]:
    assert t.dtype == torch.int64
    return [tuple(r) for r in t.tolist()]


BATCHES = [_batch(), _batch(3, 6, 4, seed=1, scale=0.4), _batch(6, 2, 2, seed=2, scale=1.0)]


@pytest.mark.parametrize("e,labels", BATCHES)
def test_all_triplets(e, labels) -> None:
    expected = sorted((a, p, n) for (a, p), negs in _hinges(e, labels).items() for n in negs)
    assert sorted(_rows(AllTripletSelector().get_triplets(e, labels))) == expected


@pytest.mark.parametrize("e,labels", BATCHES)
def test_hardest_negative(e, labels) -> None:
    expected = []
    for (a, p), negs in _hinges(e, labels).items():
        n = max(negs, key=negs.get)
        if negs[n] > 0:
            expected.append((a, p, n))
    got = _rows(HardestNegativeTripletSelector(MARGIN).get_triplets(e, labels))
    assert expected and sorted(got) == sorted(expected)


@pytest.mark.parametrize("e,labels", BATCHES)
def test_batch_hard(e, labels) -> None:
    lab = labels.tolist()
    expected = []
    for a in range(len(lab)):
        pos = [p for p in range(len(lab)) if p != a and lab[p] == lab[a]]
        neg = [n for n in range(len(lab)) if lab[n] != lab[a]]
        if pos and neg:
            expected.append((a, max(pos, key=lambda p: _sq(e, a, p)), min(neg, key=lambda n: _sq(e, a, n))))
    assert _rows(BatchHardTripletSelector().get_triplets(e, labels)) == expected


@pytest.mark.parametrize("e,labels", BATCHES)
def test_hard_negative_pairs(e, labels) -> None:
    positives, negatives = _brute_pairs(labels)
    nearest = sorted(negatives, key=lambda q: _sq(e, *q))[: len(positives)]
    got_pos, got_neg = HardNegativePairSelector().get_pairs(e, labels)
    assert sorted(_rows(got_pos)) == positives
    assert sorted(_rows(got_neg)) == sorted(nearest)


@pytest.mark.parametrize("e,labels", BATCHES)
def test_all_positive_pairs(e, labels) -> None:
    positives, negatives = _brute_pairs(labels)
    got_pos, got_neg = AllPositivePairSelector(balance=True, generator=torch.Generator().manual_seed(3)).get_pairs(e, labels)
    assert sorted(_rows(got_pos)) == positives
    sample = _rows(got_neg)
    assert len(sample) == min(len(positives), len(negatives)) == len(set(sample))
    assert set(sample) <= set(negatives)
    got_pos, got_neg = AllPositivePairSelector(balance=False).get_pairs(e, labels)
    assert sorted(_rows(got_neg)) == negatives


def _in_range(kind: str, value: float) -> bool:
    return value > 0 if kind == "random" else 0 < value < MARGIN


@pytest.mark.parametrize("kind,cls", [("random", RandomNegativeTripletSelector), ("semihard", SemihardNegativeTripletSelector)])
@pytest.mark.parametrize("e,labels", BATCHES)
def test_random_selectors_condition_and_one_per_pair(kind, cls, e, labels) -> None:
    hinges = _hinges(e, labels)
    valid_pairs = {ap for ap, negs in hinges.items() if any(_in_range(kind, v) for v in negs.values())}
    assert valid_pairs, "the batch should have pairs with a valid negative"
    chosen_per_pair: dict[tuple[int, int], set[int]] = {ap: set() for ap in valid_pairs}
    for seed in range(40):
        triplets = _rows(cls(MARGIN, generator=torch.Generator().manual_seed(seed)).get_triplets(e, labels))
        assert sorted((a, p) for a, p, _ in triplets) == sorted(valid_pairs)
        for a, p, n in triplets:
            assert _in_range(kind, hinges[(a, p)][n]), (a, p, n)
            chosen_per_pair[(a, p)].add(n)
    # over many draws every valid negative of a pair with at most three of them turns up
    for ap, seen in chosen_per_pair.items():
        valid = {n for n, v in hinges[ap].items() if _in_range(kind, v)}
        if len(valid) <= 3:
            assert seen == valid


@pytest.mark.parametrize("cls", [RandomNegativeTripletSelector, SemihardNegativeTripletSelector])
def test_seeded_generator_reproducible(cls) -> None:
    e, labels = _batch(5, 6, 3, seed=4, scale=0.5)
    first = cls(MARGIN, generator=torch.Generator().manual_seed(7)).get_triplets(e, labels)
    again = cls(MARGIN, generator=torch.Generator().manual_seed(7)).get_triplets(e, labels)
    other = cls(MARGIN, generator=torch.Generator().manual_seed(8)).get_triplets(e, labels)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    pos_a, neg_a = AllPositivePairSelector(generator=torch.Generator().manual_seed(7)).get_pairs(e, labels)
    pos_b, neg_b = AllPositivePairSelector(generator=torch.Generator().manual_seed(7)).get_pairs(e, labels)
    assert torch.equal(neg_a, neg_b)


SELECTOR_NAMES = ["all", "hardest", "random", "semihard", "batch-hard"]


def _make(name: str):
    return create_selector(name, margin=MARGIN) if name in ("hardest", "random", "semihard") else create_selector(name)


@pytest.mark.parametrize("name", SELECTOR_NAMES)
@pytest.mark.parametrize("labels", [torch.zeros(6, dtype=torch.int64), torch.arange(6)])
def test_one_class_or_singletons_give_no_triplets(name, labels) -> None:
    e = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    triplets = _make(name).get_triplets(e, labels)
    assert triplets.shape == (0, 3) and triplets.dtype == torch.int64


@pytest.mark.parametrize("name", ["all-positive", "hard-negative"])
def test_pair_selectors_edge_cases(name) -> None:
    e = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    pos, neg = create_selector(name).get_pairs(e, torch.arange(5))
    assert pos.shape == (0, 2) and neg.shape == (0, 2)
    pos, neg = create_selector(name).get_pairs(e, torch.zeros(5, dtype=torch.int64))
    assert pos.shape == (10, 2) and neg.shape == (0, 2)


def test_duplicates_and_well_separated_batch() -> None:
    # two tight, far-apart clusters: every triplet satisfied, nothing hard or semihard to pick
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    e = torch.tensor([[0.0, 0.0]] * 3 + [[10.0, 0.0]] * 3)
    for name in ["hardest", "random", "semihard"]:
        assert len(_make(name).get_triplets(e, labels)) == 0
    assert len(_make("batch-hard").get_triplets(e, labels)) == 6


def test_registry_errors() -> None:
    with pytest.raises(DeephashError, match="unknown selector 'nope'"):
        create_selector("nope")
    with pytest.raises(DeephashError, match="hardest"):
        create_selector("hardest", margin=1.0, bogus=2)
    assert isinstance(create_selector("all-positive", balance=False), AllPositivePairSelector)


def test_random_negative_pairs_sparse_sample_is_uniform() -> None:
    """Few positives among many negatives (n = 8 of Q = 112): every negative pair equally often."""
    labels = torch.arange(8).repeat_interleave(2)  # 8 positive pairs, 112 negative pairs
    _, negatives = _brute_pairs(labels)
    counts = dict.fromkeys(negatives, 0)
    generator = torch.Generator().manual_seed(0)
    draws = 3000
    for _ in range(draws):
        sample = _rows(random_negative_pairs(labels, 8, generator))
        assert len(sample) == 8 == len(set(sample)) and set(sample) <= set(negatives)
        for pair in sample:
            counts[pair] += 1
    expected = draws * 8 / len(negatives)  # 214.3, standard deviation about 14
    assert all(abs(c - expected) < 6 * expected**0.5 for c in counts.values()), counts
    first = random_negative_pairs(labels, 8, torch.Generator().manual_seed(5))
    assert torch.equal(first, random_negative_pairs(labels, 8, torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("pattern", ["random", "sample-sees-small", "sample-sees-large"])
def test_hardest_negative_pairs_large_batch_matches_full_topk(pattern) -> None:
    """B = 400: the selected set equals a full top-n over the negatives (small values on a pattern)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(20).repeat_interleave(20)
    distances = torch.rand(400, 400, generator=g)
    if pattern != "random":  # the strided sample sees only even flat indices
        even = torch.arange(400 * 400).reshape(400, 400) % 2 == 0
        small_on_even = pattern == "sample-sees-small"
        distances = torch.where(even == small_on_even, distances * 0.01, 1 + distances)
    distances = (distances + distances.T) / 2
    n = int(positive_mask(labels).sum())
    candidates = torch.triu(labels[:, None] != labels[None, :], diagonal=1)
    expected = torch.topk(distances.masked_fill(~candidates, float("inf")).flatten(), n, largest=False).indices
    got = hardest_negative_pairs(distances, labels, n)
    assert sorted((got[:, 0] * 400 + got[:, 1]).tolist()) == sorted(expected.tolist())


@pytest.mark.parametrize("size", [0, 1, 3])
def test_pair_selectors_on_batches_without_pairs(size) -> None:
    e, labels = torch.randn(size, 4), torch.arange(size)  # every class a singleton (or no item)
    for selector in (HardNegativePairSelector(), AllPositivePairSelector(generator=torch.Generator().manual_seed(0))):
        positives, negatives = selector.get_pairs(e, labels)
        assert positives.shape == negatives.shape == (0, 2)


def test_selectors_accept_the_seeds_cpu_flag_and_pick_the_same() -> None:
    """The seed's constructors took ``cpu`` (keyword or the second positional argument); it is
    ignored, so the selections equal those of selectors built without it (same generator seed)."""
    from deephash import (
        HardestNegativeTripletSelector,
        HardNegativePairSelector,
        RandomNegativeTripletSelector,
        SemihardNegativeTripletSelector,
    )

    g = torch.Generator().manual_seed(0)
    e, labels = torch.randn(24, 2, generator=g), torch.arange(4).repeat_interleave(6)
    for seed_pairs in (HardNegativePairSelector(cpu=True), HardNegativePairSelector(False)):
        for a, b in zip(seed_pairs.get_pairs(e, labels), HardNegativePairSelector().get_pairs(e, labels)):
            assert torch.equal(a, b)
    for seed_style in (HardestNegativeTripletSelector(1.0, cpu=False), HardestNegativeTripletSelector(1.0, True)):
        assert torch.equal(seed_style.get_triplets(e, labels), HardestNegativeTripletSelector(1.0).get_triplets(e, labels))
    for cls in (RandomNegativeTripletSelector, SemihardNegativeTripletSelector):
        for seed_style in (cls(1.0, cpu=False), cls(1.0, False), cls(1.0, True)):
            assert seed_style.generator is None
            torch.manual_seed(5)
            picked = seed_style.get_triplets(e, labels)
            torch.manual_seed(5)
            assert torch.equal(picked, cls(1.0).get_triplets(e, labels)) and len(picked) > 0
        with pytest.raises(TypeError, match="torch.Generator or None, got int"):
            cls(1.0, 3)
