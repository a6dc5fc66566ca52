"""Metric losses against brute-force loops, and against pytorch-metric-learning where they coincide."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import labelled_batch, squared_distance

from deephash.errors import DeephashError
from deephash.losses import (
    ContrastiveLoss,
    OnlineContrastiveLoss,
    OnlineTripletLoss,
    TripletLoss,
    create_loss,
    register_loss,
)
from deephash.mining import (
    AllPositivePairSelector,
    AllTripletSelector,
    BatchHardTripletSelector,
    HardestNegativeTripletSelector,
    HardNegativePairSelector,
    RandomNegativeTripletSelector,
    SemihardNegativeTripletSelector,
)

MARGIN = 1.0


def _batch(n_classes: int = 4, n_samples: int = 4, dim: int = 3, seed: int = 0, scale: float = 0.6):
    return labelled_batch(n_classes, n_samples, dim, seed, scale)


_sq = squared_distance


def _brute_triplet(e, triplets) -> torch.Tensor:
    terms = [torch.relu(_sq(e, a, p) - _sq(e, a, n) + MARGIN) for a, p, n in triplets]
    return sum(terms) / len(terms)


def _brute_contrastive(e, pairs, targets) -> torch.Tensor:
    terms = []
    for (i, j), t in zip(pairs, targets):
        d2 = _sq(e, i, j)
        d = torch.sqrt(d2) if d2 > 0 else d2 * 0  # duplicates: distance 0, zero gradient
        terms.append(0.5 * (d2 if t else torch.relu(MARGIN - d) ** 2))
    return sum(terms) / len(terms)


def _value_and_grad(fn, e):
    x = e.detach().clone().requires_grad_(True)
    value = fn(x)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


def _assert_same(ours, brute, e):
    v1, g1 = _value_and_grad(ours, e)
    v2, g2 = _value_and_grad(brute, e)
    torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)


def _all_triplets_brute(labels):
    lab = labels.tolist()
    return [
        (a, p, n)
        for a, p in itertools.combinations(range(len(lab)), 2)
        if lab[a] == lab[p]
        for n in range(len(lab))
        if lab[n] != lab[a]
    ]


BATCHES = [_batch(), _batch(3, 5, 4, seed=1, scale=0.4), _batch(5, 2, 2, seed=2, scale=1.0)]


def test_contrastive_and_triplet_loss_offline() -> None:
    e, _ = _batch(dim=4)
    pairs = [(0, 1), (2, 3), (4, 5), (6, 6), (7, 8)]
    targets = [1, 0, 0, 0, 1]
    t = torch.tensor(targets)
    i, j = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    _assert_same(lambda x: ContrastiveLoss(MARGIN)(x[i], x[j], t), lambda x: _brute_contrastive(x, pairs, targets), e)
    triplets = [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 9, 10)]
    a, p, n = (torch.tensor(c) for c in zip(*triplets))
    _assert_same(lambda x: TripletLoss(MARGIN)(x[a], x[p], x[n]), lambda x: _brute_triplet(x, triplets), e)


@pytest.mark.parametrize("e,labels", BATCHES)
def test_online_triplet_all_matches_brute_force(e, labels) -> None:
    loss = OnlineTripletLoss(MARGIN, AllTripletSelector())
    triplets = _all_triplets_brute(labels)
    _assert_same(lambda x: loss(x, labels), lambda x: _brute_triplet(x, triplets), e)
    assert int(loss.num_selected) == len(triplets)


@pytest.mark.parametrize("make", [
    lambda: HardestNegativeTripletSelector(MARGIN),
    lambda: BatchHardTripletSelector(),
    lambda: RandomNegativeTripletSelector(MARGIN, torch.Generator().manual_seed(5)),
    lambda: SemihardNegativeTripletSelector(MARGIN, torch.Generator().manual_seed(5)),
])
@pytest.mark.parametrize("e,labels", BATCHES)
def test_online_triplet_selected_matches_brute_force(make, e, labels) -> None:
    triplets = [tuple(t) for t in make().get_triplets(e, labels).tolist()]  # same seed → same triplets
    loss = OnlineTripletLoss(MARGIN, make())
    if not triplets:
        pytest.fail("test batch should select some triplets")
    _assert_same(lambda x: loss(x, labels), lambda x: _brute_triplet(x, triplets), e)
    assert loss.num_selected == len(triplets)


@pytest.mark.parametrize("selector", [AllPositivePairSelector(balance=False), HardNegativePairSelector()])
@pytest.mark.parametrize("e,labels", BATCHES)
def test_online_contrastive_matches_brute_force(selector, e, labels) -> None:
    lab = labels.tolist()
    all_pairs = list(itertools.combinations(range(len(lab)), 2))
    positives = [q for q in all_pairs if lab[q[0]] == lab[q[1]]]
    negatives = [q for q in all_pairs if lab[q[0]] != lab[q[1]]]
    if isinstance(selector, HardNegativePairSelector):
        negatives = sorted(negatives, key=lambda q: float(_sq(e, *q)))[: len(positives)]
    pairs = positives + negatives
    targets = [1] * len(positives) + [0] * len(negatives)
    loss = OnlineContrastiveLoss(MARGIN, selector)
    _assert_same(lambda x: loss(x, labels), lambda x: _brute_contrastive(x, pairs, targets), e)
    assert loss.num_selected == len(pairs)


def test_online_contrastive_balanced_uses_sampled_pairs() -> None:
    e, labels = _batch()
    pos, neg = AllPositivePairSelector(generator=torch.Generator().manual_seed(1)).get_pairs(e, labels)
    pairs = [tuple(q) for q in torch.cat((pos, neg)).tolist()]
    targets = [1] * len(pos) + [0] * len(neg)
    loss = OnlineContrastiveLoss(MARGIN, AllPositivePairSelector(generator=torch.Generator().manual_seed(1)))
    _assert_same(lambda x: loss(x, labels), lambda x: _brute_contrastive(x, pairs, targets), e)


LOSSES = [
    lambda: OnlineTripletLoss(MARGIN, AllTripletSelector()),
    lambda: OnlineTripletLoss(MARGIN, HardestNegativeTripletSelector(MARGIN)),
    lambda: OnlineTripletLoss(MARGIN, RandomNegativeTripletSelector(MARGIN)),
    lambda: OnlineTripletLoss(MARGIN, SemihardNegativeTripletSelector(MARGIN)),
    lambda: OnlineTripletLoss(MARGIN, BatchHardTripletSelector()),
    lambda: OnlineContrastiveLoss(MARGIN, AllPositivePairSelector()),
    lambda: OnlineContrastiveLoss(MARGIN, HardNegativePairSelector()),
]


def _check_exact_zero(loss_fn, labels) -> None:
    x = torch.randn(len(labels), 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    value = loss_fn(x, labels)
    value.backward()
    assert value.item() == 0.0 and int(loss_fn.num_selected) == 0
    assert torch.all(x.grad == 0)


@pytest.mark.parametrize("make", LOSSES[:5])
@pytest.mark.parametrize("labels", [torch.zeros(6, dtype=torch.int64), torch.arange(6)])
def test_no_triplet_gives_exact_zero_and_zero_grads(make, labels) -> None:
    _check_exact_zero(make(), labels)


@pytest.mark.parametrize("make", LOSSES[5:])
def test_no_pair_gives_exact_zero_and_zero_grads(make) -> None:
    _check_exact_zero(make(), torch.arange(6))  # singletons: no positive pair, so no balanced negative


@pytest.mark.parametrize("make", LOSSES)
def test_duplicate_embeddings_give_finite_gradients(make) -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    x = torch.tensor([[0.1, 0.2]] * 4 + [[0.5, 0.1]] * 2, requires_grad=True)
    value = make()(x, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()
    assert value.item() > 0


def test_every_triplet_satisfied_gives_zero() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    x = torch.tensor([[0.0, 0.0]] * 3 + [[10.0, 0.0]] * 3, requires_grad=True)
    loss = OnlineTripletLoss(MARGIN, AllTripletSelector())
    value = loss(x, labels)
    value.backward()
    assert value.item() == 0.0 and int(loss.num_selected) == 18 and torch.all(x.grad == 0)


def test_cross_check_batch_hard_with_pytorch_metric_learning() -> None:
    from pytorch_metric_learning import distances, losses, miners, reducers

    e, labels = _batch(5, 4, 6, seed=3, scale=0.5)
    distance = distances.LpDistance(power=2, normalize_embeddings=False)
    miner = miners.BatchHardMiner(distance=distance)
    pml = losses.TripletMarginLoss(margin=MARGIN, distance=distance, reducer=reducers.MeanReducer())
    ours = OnlineTripletLoss(MARGIN, BatchHardTripletSelector())
    _assert_same(lambda x: ours(x, labels), lambda x: pml(x, labels, miner(x, labels)), e)


def test_cross_check_all_triplets_with_pytorch_metric_learning() -> None:
    """PML mines ordered pairs (a != p); ours uses a < p. The ordered sum is ours on the batch plus
    ours on the reversed batch (which turns every a > p into a < p)."""
    from pytorch_metric_learning import distances, losses, miners, reducers

    e, labels = _batch(4, 4, 5, seed=6, scale=0.5)
    distance = distances.LpDistance(power=2, normalize_embeddings=False)
    miner = miners.TripletMarginMiner(margin=MARGIN, type_of_triplets="all", distance=distance)
    pml = losses.TripletMarginLoss(margin=MARGIN, distance=distance, reducer=reducers.MeanReducer())

    def pml_sum(x):
        mined = miner(x, labels)
        return pml(x, labels, mined) * len(mined[0])

    def ordered_brute(x):
        lab = labels.tolist()
        return sum(
            torch.relu(_sq(x, a, p) - _sq(x, a, n) + MARGIN)
            for a, p, n in itertools.product(range(len(lab)), repeat=3)
            if a != p and lab[a] == lab[p] and lab[n] != lab[a]
        )

    def ours_sum(x):
        forward, backward = OnlineTripletLoss(MARGIN, AllTripletSelector()), OnlineTripletLoss(MARGIN, AllTripletSelector())
        total = forward(x, labels) * forward.num_selected
        return total + backward(x.flip(0), labels.flip(0)) * backward.num_selected

    _assert_same(pml_sum, ordered_brute, e)
    _assert_same(ours_sum, ordered_brute, e)
    assert not math.isclose(float(ordered_brute(e)), 0.0)


def test_registry() -> None:
    loss = create_loss("online-triplet", margin=0.5, selector="semihard")
    assert isinstance(loss.triplet_selector, SemihardNegativeTripletSelector)
    assert loss.margin == loss.triplet_selector.margin == 0.5
    assert isinstance(create_loss("online-triplet", selector="batch-hard").triplet_selector, BatchHardTripletSelector)
    assert isinstance(create_loss("online-contrastive", selector="hard-negative").pair_selector, HardNegativePairSelector)
    assert create_loss("contrastive", margin=2.0).margin == 2.0
    assert isinstance(create_loss("triplet"), TripletLoss)
    with pytest.raises(DeephashError, match="unknown loss 'nope'"):
        create_loss("nope")
    with pytest.raises(DeephashError, match="triplet"):
        create_loss("triplet", bogus=1)
    with pytest.raises(ValueError, match="already registered"):
        register_loss("triplet")(TripletLoss)


@pytest.mark.parametrize("n_pairs", [3, 400])  # 3·64 < 20²: explicit differences; 400·64 ≥ 20²: the distance matrix
def test_pair_squared_distances_both_paths_match_loops(n_pairs) -> None:
    from deephash.losses.online import pair_squared_distances

    g = torch.Generator().manual_seed(0)
    e = torch.randn(20, 5, generator=g, dtype=torch.float64)
    e[7] = e[3]  # a duplicate row: distance 0, finite gradient
    first = torch.randint(0, 20, (n_pairs,), generator=g)
    second = torch.randint(0, 20, (n_pairs,), generator=g)
    first[0], second[0] = 3, 7
    weights = torch.rand(n_pairs, generator=g, dtype=torch.float64)
    x = e.clone().requires_grad_()
    (pair_squared_distances(x, first, second) * weights).sum().backward()
    y = e.clone().requires_grad_()
    expected = torch.stack([(y[i] - y[j]).pow(2).sum() for i, j in zip(first.tolist(), second.tolist())])
    (expected * weights).sum().backward()
    assert torch.allclose(pair_squared_distances(e, first, second), expected.detach(), atol=1e-12)
    assert torch.allclose(x.grad, y.grad, atol=1e-10)
