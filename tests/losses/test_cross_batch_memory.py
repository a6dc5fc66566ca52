"""Cross-batch memory: the rectangular miners and the wrapped losses against brute-force loops over
batch ∪ memory, against pytorch-metric-learning's CrossBatchMemory, and the queue itself."""

from __future__ import annotations

import io
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from deephash import CrossBatchMemory
from deephash.errors import ConfigError
from deephash.losses import (
    DTSHLoss,
    OnlineContrastiveLoss,
    OnlineTripletLoss,
    create_loss,
)
from deephash.mining import (
    AllPositivePairSelector,
    AllTripletSelector,
    BatchHardTripletSelector,
    HardestNegativeTripletSelector,
    HardNegativePairSelector,
    RandomNegativeTripletSelector,
    SemihardNegativeTripletSelector,
    create_selector,
)

MARGIN = 1.0
TRIPLET_SELECTORS = ["all", "hardest", "random", "semihard", "batch-hard"]
PAIR_SELECTORS = ["all-positive", "hard-negative"]


# ---------------------------------------------------------------- data


def _gaussian(n_batch=(4, 3), n_memory=(5, 2), dim=3, seed=0, scale=0.6, memory_classes=None):
    """A shuffled batch of n_classes × n_samples and a memory of its own labels, float64."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_batch[0]).repeat_interleave(n_batch[1])
    labels = labels[torch.randperm(len(labels), generator=g)]
    memory_labels = torch.arange(n_memory[0]).repeat_interleave(n_memory[1]) if memory_classes is None else memory_classes
    memory_labels = memory_labels[torch.randperm(len(memory_labels), generator=g)]
    e = torch.randn(len(labels), dim, generator=g, dtype=torch.float64) * scale
    m = torch.randn(len(memory_labels), dim, generator=g, dtype=torch.float64) * scale
    return e, labels, m, memory_labels


def _codes(seed=1, batch=10, memory=9, bits=4, classes=3):
    """±1 codes: squared distances are 4 × Hamming (integers), so ties with margin 4 are exact."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randint(0, 2, (batch, bits), generator=g).double() * 2 - 1
    m = torch.randint(0, 2, (memory, bits), generator=g).double() * 2 - 1
    return e, torch.randint(0, classes, (batch,), generator=g), m, torch.randint(0, classes, (memory,), generator=g)


CASES = {
    "gaussian": (_gaussian(), MARGIN),
    "memory-new-classes": (_gaussian((3, 4), (6, 2), seed=2), MARGIN),
    "memory-one-class": (_gaussian((3, 3), (0, 0), seed=3, memory_classes=torch.full((7,), 1)), MARGIN),
    "codes-margin-tie": (_codes(), 4.0),
    "codes-margin-tie-2": (_codes(seed=5, classes=2), 8.0),
}


# ---------------------------------------------------------------- brute force over batch ∪ memory


class Brute:
    """Explicit lists over batch ∪ memory: anchors are batch rows, columns the batch then memory."""

    def __init__(self, e, labels, m, memory_labels, margin):
        self.cols = torch.cat((e, m)).tolist()
        self.lab = labels.tolist()
        self.col_lab = self.lab + memory_labels.tolist()
        self.B, self.margin = len(self.lab), margin

    def d(self, a, j):
        return sum((x - y) ** 2 for x, y in zip(self.cols[a], self.cols[j]))

    def pairs(self):
        return [(a, p) for a in range(self.B) for p in range(len(self.col_lab)) if p != a and self.col_lab[p] == self.lab[a]]

    def negatives(self, a):
        return [n for n in range(len(self.col_lab)) if self.col_lab[n] != self.lab[a]]

    def hinge(self, a, p, n):
        return self.d(a, p) - self.d(a, n) + self.margin

    def all(self):
        return sorted((a, p, n) for a, p in self.pairs() for n in self.negatives(a))

    def hardest(self):
        out = []
        for a, p in self.pairs():
            negs = self.negatives(a)
            if negs:
                n = min(negs, key=lambda n: (self.d(a, n), n))
                if self.hinge(a, p, n) > 0:
                    out.append((a, p, n))
        return sorted(out)

    def valid(self, kind, a, p, n):
        h = self.hinge(a, p, n)
        return h > 0 if kind == "random" else 0 < h < self.margin

    def batch_hard(self):
        out = []
        for a in range(self.B):
            pos = [p for p in range(len(self.col_lab)) if p != a and self.col_lab[p] == self.lab[a]]
            negs = self.negatives(a)
            if pos and negs:
                p = max(pos, key=lambda p: (self.d(a, p), -p))
                n = min(negs, key=lambda n: (self.d(a, n), n))
                out.append((a, p, n))
        return out

    def negative_pairs(self):
        return [(a, n) for a in range(self.B) for n in self.negatives(a)]


def _rows(t):
    assert t.dtype == torch.int64
    return [tuple(r) for r in t.tolist()]


def _selector(name, margin, seed=0):
    params = {} if name in ("all", "batch-hard", "all-positive", "hard-negative") else {"margin": margin}
    if name in ("random", "semihard", "all-positive"):
        params["generator"] = torch.Generator().manual_seed(seed)
    return create_selector(name, **params)


# ---------------------------------------------------------------- miners against brute force


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", ["all", "hardest", "batch-hard"])
def test_deterministic_triplet_selectors_match_brute_force(case, name) -> None:
    (e, labels, m, ml), margin = CASES[case]
    brute = Brute(e, labels, m, ml, margin)
    got = _rows(_selector(name, margin).get_triplets(e, labels, m, ml))
    expected = {"all": brute.all, "hardest": brute.hardest, "batch-hard": brute.batch_hard}[name]()
    assert (sorted(got) if name != "batch-hard" else got) == expected
    if case != "memory-one-class":
        assert expected and any(max(t[1:]) >= len(labels) for t in expected)  # the memory is used


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["random", "semihard"])
def test_random_triplet_selectors_condition_and_one_per_pair(case, kind) -> None:
    (e, labels, m, ml), margin = CASES[case]
    brute = Brute(e, labels, m, ml, margin)
    got = _rows(_selector(kind, margin).get_triplets(e, labels, m, ml))
    expected_pairs = sorted(
        (a, p) for a, p in brute.pairs() if any(brute.valid(kind, a, p, n) for n in brute.negatives(a))
    )
    assert sorted((a, p) for a, p, _ in got) == expected_pairs
    assert all(brute.valid(kind, a, p, n) for a, p, n in got)


@pytest.mark.parametrize("case", ["codes-margin-tie", "codes-margin-tie-2"])
def test_ties_at_the_margin_boundary_are_excluded(case) -> None:
    """±1 codes: integer distances. A negative with hinge exactly 0 (d_an = d_ap + margin) is not
    taken by hardest or random; one with hinge exactly margin (d_an = d_ap) not by semihard."""
    (e, labels, m, ml), margin = CASES[case]
    brute = Brute(e, labels, m, ml, margin)
    triplets = [(a, p, n) for a, p in brute.pairs() for n in brute.negatives(a)]
    at_zero = {t for t in triplets if brute.hinge(*t) == 0}
    at_margin = {t for t in triplets if brute.hinge(*t) == margin}
    assert at_zero and at_margin and any(max(t[1:]) >= len(labels) for t in at_zero)
    hardest = set(_rows(HardestNegativeTripletSelector(margin).get_triplets(e, labels, m, ml)))
    assert not hardest & at_zero
    hardest_at_zero = [
        (a, p) for a, p in brute.pairs() if brute.hinge(a, p, min(brute.negatives(a), key=lambda n: brute.d(a, n))) == 0
    ]
    assert bool(hardest_at_zero) == (case == "codes-margin-tie")  # the first case pins hardest's tie
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        assert not set(_rows(RandomNegativeTripletSelector(margin, g).get_triplets(e, labels, m, ml))) & at_zero
        picked = set(_rows(SemihardNegativeTripletSelector(margin, g).get_triplets(e, labels, m, ml)))
        assert not picked & (at_zero | at_margin)


def test_random_negative_is_uniform_over_batch_and_memory() -> None:
    e, labels, m, ml = _gaussian((2, 3), (2, 6), seed=4, scale=0.1)  # tiny distances: every negative valid
    brute = Brute(e, labels, m, ml, MARGIN)
    selector = RandomNegativeTripletSelector(MARGIN, torch.Generator().manual_seed(0))
    a, p = brute.pairs()[0]
    counts = Counter()
    for _ in range(600):
        triplets = _rows(selector.get_triplets(e, labels, m, ml))
        counts.update(n for a2, p2, n in triplets if (a2, p2) == (a, p))
    negatives = brute.negatives(a)
    assert set(counts) == set(negatives) and any(n >= len(labels) for n in negatives)
    expected = 600 / len(negatives)
    assert all(abs(c - expected) < 5 * math.sqrt(expected) for c in counts.values())


@pytest.mark.parametrize("case", CASES)
def test_pair_selectors_match_brute_force(case) -> None:
    (e, labels, m, ml), _ = CASES[case]
    brute = Brute(e, labels, m, ml, MARGIN)
    positives = sorted(brute.pairs())
    all_negatives = sorted(brute.negative_pairs())

    pos, neg = AllPositivePairSelector(balance=False).get_pairs(e, labels, m, ml)
    assert sorted(_rows(pos)) == positives and sorted(_rows(neg)) == all_negatives
    pos, neg = AllPositivePairSelector(generator=torch.Generator().manual_seed(1)).get_pairs(e, labels, m, ml)
    sample = _rows(neg)
    assert sorted(_rows(pos)) == positives and len(sample) == min(len(positives), len(all_negatives))
    assert len(set(sample)) == len(sample) and set(sample) <= set(all_negatives)

    pos, neg = HardNegativePairSelector().get_pairs(e, labels, m, ml)
    assert sorted(_rows(pos)) == positives
    n = min(len(positives), len(all_negatives))
    expected = sorted(brute.d(a, j) for a, j in all_negatives)[:n]
    got = _rows(neg)
    assert len(got) == n and set(got) <= set(all_negatives)
    assert sorted(brute.d(a, j) for a, j in got) == pytest.approx(expected)


def test_random_negative_pairs_sparse_regime_is_uniform() -> None:
    """Few pairs wanted among many: the rejection sampler on the B×(B+M) grid."""
    from deephash.mining import random_negative_pairs

    labels, columns = torch.tensor([0, 1]), torch.tensor([0, 1, 0, 1, 2, 2, 2, 0])
    all_pairs = [(a, j) for a in range(2) for j in range(8) if labels[a] != columns[j]]
    counts = Counter()
    g = torch.Generator().manual_seed(0)
    for _ in range(800):
        drawn = _rows(random_negative_pairs(labels, 2, g, columns))
        assert len(set(drawn)) == 2 and set(drawn) <= set(all_pairs)
        counts.update(drawn)
    expected = 800 * 2 / len(all_pairs)
    assert set(counts) == set(all_pairs)
    assert all(abs(c - expected) < 5 * math.sqrt(expected) for c in counts.values())


def test_rectangular_shapes_are_checked() -> None:
    e, labels, m, ml = _gaussian()
    with pytest.raises(ValueError, match="memory must be"):
        BatchHardTripletSelector().get_triplets(e, labels, m[:, :2], ml)
    with pytest.raises(ValueError, match="needs its labels"):
        BatchHardTripletSelector().get_triplets(e, labels, m, None)


# ---------------------------------------------------------------- losses against brute force


def _brute_triplet_loss(e, m, triplets, margin):
    cols = torch.cat((e, m.detach()))
    if not triplets:
        return e.sum() * 0
    terms = [F.relu((e[a] - cols[p]).pow(2).sum() - (e[a] - cols[n]).pow(2).sum() + margin) for a, p, n in triplets]
    return torch.stack(terms).mean()


def _brute_contrastive_loss(e, m, positives, negatives, margin):
    cols = torch.cat((e, m.detach()))
    terms = [0.5 * (e[a] - cols[j]).pow(2).sum() for a, j in positives]
    for a, j in negatives:
        squared = (e[a] - cols[j]).pow(2).sum()
        if float(squared.detach()) == 0:  # duplicate codes: ours takes sqrt's gradient at 0 as 0
            terms.append(0.5 * margin**2 + 0 * squared)
        else:
            terms.append(0.5 * F.relu(margin - squared.sqrt()).pow(2))
    return torch.stack(terms).mean()


def _value_and_grad(fn, e, m):
    x = e.clone().requires_grad_(True)
    mem = m.clone().requires_grad_(True)  # the loss must not send it a gradient
    value = fn(x, mem)
    value.backward()
    assert mem.grad is None
    return value.detach(), x.grad


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", TRIPLET_SELECTORS)
def test_online_triplet_loss_with_memory_matches_brute_force(case, name) -> None:
    (e, labels, m, ml), margin = CASES[case]
    brute = Brute(e, labels, m, ml, margin)
    loss = OnlineTripletLoss(margin, _selector(name, margin, seed=3))
    value, grad = _value_and_grad(lambda x, mem: loss(x, labels, mem, ml), e, m)
    if name in ("random", "semihard"):  # the same draw: the selector's triplets, checked above
        triplets = _rows(_selector(name, margin, seed=3).get_triplets(e, labels, m, ml))
    else:
        triplets = {"all": brute.all, "hardest": brute.hardest, "batch-hard": brute.batch_hard}[name]()
    expected, expected_grad = _value_and_grad(lambda x, mem: _brute_triplet_loss(x, mem, triplets, margin), e, m)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert int(loss.num_selected) == len(triplets)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", PAIR_SELECTORS)
def test_online_contrastive_loss_with_memory_matches_brute_force(case, name) -> None:
    (e, labels, m, ml), margin = CASES[case]
    brute = Brute(e, labels, m, ml, margin)
    selector = AllPositivePairSelector(balance=False) if name == "all-positive" else HardNegativePairSelector()
    loss = OnlineContrastiveLoss(margin, selector)
    value, grad = _value_and_grad(lambda x, mem: loss(x, labels, mem, ml), e, m)
    positives = brute.pairs()
    if name == "all-positive":
        negatives = brute.negative_pairs()
    else:  # the selector's choice among equal distances; its distances are checked above
        negatives = _rows(selector.get_pairs(e, labels, m, ml)[1])
    expected, expected_grad = _value_and_grad(
        lambda x, mem: _brute_contrastive_loss(x, mem, positives, negatives, margin), e, m
    )
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", ["hardest", "random", "semihard", "batch-hard"])
def test_dtsh_with_memory_matches_brute_force(case, name) -> None:
    (e, labels, m, ml), margin = CASES[case]
    u, um = 0.75 * e, 0.75 * m  # relaxed codes; ±0.75 codes keep integer-multiple (tied) distances exact
    alpha, weight = 0.5, 0.3
    loss = DTSHLoss(_selector(name, margin, seed=2), alpha=alpha, quantization_weight=weight)
    value, grad = _value_and_grad(lambda x, mem: loss(x, labels, mem, ml), u, um)
    triplets = _rows(_selector(name, margin, seed=2).get_triplets(u, labels, um, ml))
    if name in ("hardest", "batch-hard"):
        brute = Brute(u, labels, um, ml, margin)
        assert triplets == (brute.batch_hard() if name == "batch-hard" else sorted(brute.hardest()))

    def brute_loss(x, mem):
        cols = torch.cat((x, mem.detach()))
        quant = sum((x[i] - torch.sign(x[i].detach())).pow(2).sum() for i in range(len(x))) / len(x)
        if not triplets:
            return x.sum() * 0 + weight * quant
        terms = [
            torch.log1p(torch.exp(-(0.5 * x[a] @ cols[p] - 0.5 * x[a] @ cols[n] - alpha))) for a, p, n in triplets
        ]
        return torch.stack(terms).mean() + weight * quant

    expected, expected_grad = _value_and_grad(brute_loss, u, um)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)


# ---------------------------------------------------------------- the wrapper


def _stream(steps, n_classes=3, n_samples=4, dim=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        labels = torch.randint(0, n_classes + 2, (n_classes * n_samples,), generator=g)
        yield torch.randn(len(labels), dim, generator=g, dtype=dtype) * 0.6, labels


def _wrapped(name, memory_size=10, dim=3, warmup=0, seed=0):
    if name in PAIR_SELECTORS:
        inner = OnlineContrastiveLoss(MARGIN, _selector(name, MARGIN, seed))
    else:
        inner = OnlineTripletLoss(MARGIN, _selector(name, MARGIN, seed))
    return CrossBatchMemory(inner, memory_size, dim, warmup_steps=warmup)


@pytest.mark.parametrize("name", TRIPLET_SELECTORS + PAIR_SELECTORS)
def test_wrapper_equals_loss_on_batch_and_the_queue_of_previous_batches(name) -> None:
    """Each step: the wrapped loss with the memory holding the last M rows of earlier batches
    (a brute-force list), gradients into the batch only; the first step (empty memory) is the
    loss on the batch alone."""
    memory_size = 10
    xbm = _wrapped(name, memory_size)
    reference = _wrapped(name, memory_size).loss  # same selector seed: same random draws
    slots: list[tuple[list[float], int] | None] = [None] * memory_size  # a plain-list ring
    pointer = 0
    for step, (e, labels) in enumerate(_stream(5)):
        x = e.clone().requires_grad_(True)
        value = xbm(x, labels)
        value.backward()
        y = e.clone().requires_grad_(True)
        kept = [slot for slot in slots if slot is not None]  # slot order; the ring fills from 0
        if kept:
            mem = torch.tensor([row for row, _ in kept], dtype=e.dtype)
            expected = reference(y, labels, mem, torch.tensor([label for _, label in kept]))
        else:
            expected = reference(y, labels)
        expected.backward()
        torch.testing.assert_close(value, expected.detach())
        torch.testing.assert_close(x.grad, y.grad)
        for row, label in list(zip(e.tolist(), labels.tolist()))[-memory_size:]:
            slots[pointer] = (row, label)
            pointer = (pointer + 1) % memory_size
        assert xbm.filled == len([s for s in slots if s is not None]) and xbm.step == step + 1
        assert xbm.pointer == pointer
        assert xbm.memory_labels[: xbm.filled].tolist() == [label for _, label in slots if _ is not None]


def test_queue_wraps_around_and_keeps_the_last_rows() -> None:
    xbm = _wrapped("batch-hard", memory_size=5, dim=2)
    rows = torch.arange(24, dtype=torch.float64).reshape(12, 2)
    labels = torch.arange(12)
    xbm(rows[:4], labels[:4])
    assert xbm.pointer == 4 and xbm.filled == 4
    xbm(rows[4:7], labels[4:7])  # slots 4, 0, 1
    assert xbm.pointer == 2 and xbm.filled == 5
    assert xbm.memory_labels.tolist() == [5, 6, 2, 3, 4]
    torch.testing.assert_close(xbm.memory, rows[[5, 6, 2, 3, 4]])
    xbm(rows[7:12], labels[7:12])  # a batch of exactly M: slots 2, 3, 4, 0, 1
    assert xbm.memory_labels.tolist() == [10, 11, 7, 8, 9] and xbm.pointer == 2
    big = torch.arange(14, dtype=torch.float64).reshape(7, 2) + 100
    xbm(big, torch.arange(7) + 20)  # larger than the memory: its last 5 rows, from slot 2
    assert xbm.memory_labels.tolist() == [25, 26, 22, 23, 24] and xbm.pointer == 2 and xbm.filled == 5
    assert not xbm.memory.requires_grad


def test_empty_memory_and_warm_up_give_the_plain_loss() -> None:
    xbm = _wrapped("all", memory_size=50, warmup=2)
    plain = OnlineTripletLoss(MARGIN, AllTripletSelector())
    batches = list(_stream(4))
    for step, (e, labels) in enumerate(batches):
        value = xbm(e, labels)
        if step < 3:  # steps 0, 1 warm up (nothing stored); step 2 finds the memory empty
            assert torch.equal(value, plain(e, labels))
            assert xbm.filled == (len(e) if step == 2 else 0)
        else:
            e2, l2 = batches[2]
            assert torch.equal(value, plain(e, labels, e2, l2))
            assert not torch.equal(value, plain(e, labels))
    xbm.eval()
    e, labels = batches[0]
    assert torch.equal(xbm(e, labels), plain(e, labels)) and xbm.step == 4 and xbm.filled == 2 * len(e)


def test_memory_of_one_class_same_as_batch_gives_exact_zero() -> None:
    e = torch.randn(6, 3, dtype=torch.float64)
    for name in TRIPLET_SELECTORS + PAIR_SELECTORS:
        xbm = _wrapped(name)
        xbm(e, torch.zeros(6, dtype=torch.int64))
        x = e.clone().requires_grad_(True)
        value = xbm(x, torch.zeros(6, dtype=torch.int64))
        value.backward()
        if name in PAIR_SELECTORS:  # positives only: the contrastive positive term
            assert value > 0
        else:
            assert value.item() == 0.0 and torch.all(x.grad == 0) and int(xbm.num_selected) == 0


@pytest.mark.parametrize("name", TRIPLET_SELECTORS)
def test_no_positive_anywhere_gives_exact_zero(name) -> None:
    """Singleton labels in the batch, other labels in the memory: no anchor has a positive."""
    e, m = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    loss = OnlineTripletLoss(MARGIN, _selector(name, MARGIN))
    x = e.clone().requires_grad_(True)
    value = loss(x, torch.arange(5), m, torch.arange(10, 14))
    value.backward()
    assert value.item() == 0.0 and torch.all(x.grad == 0) and int(loss.num_selected) == 0


@pytest.mark.parametrize("name", ["all", "semihard", "random", "all-positive"])
def test_state_dict_round_trip_resumes_exactly(name) -> None:
    """Save after 4 of 7 steps (through torch.save and a weights_only load, as checkpoints do), load
    into a fresh wrapper, run the last 3: the values and the memory equal the uninterrupted run's."""
    batches = list(_stream(7, seed=3))
    straight = _wrapped(name, memory_size=16, warmup=1, seed=4)
    values = [straight(e, labels) for e, labels in batches]

    first = _wrapped(name, memory_size=16, warmup=1, seed=4)
    for e, labels in batches[:4]:
        first(e, labels)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    resumed = _wrapped(name, memory_size=16, warmup=1, seed=99)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert (resumed.pointer, resumed.filled, resumed.step) == (first.pointer, first.filled, first.step) == (4, 16, 4)
    assert resumed.memory.dtype == torch.float64
    if name != "all":  # a checkpoint carries the selector's generator too (fit's ``generators``)
        _selector_of(resumed).generator.set_state(_selector_of(first).generator.get_state())
    for (e, labels), value in zip(batches[4:], values[4:]):
        assert torch.equal(resumed(e, labels), value)
    assert torch.equal(resumed.memory, straight.memory) and torch.equal(resumed.memory_labels, straight.memory_labels)


def _selector_of(xbm):
    return getattr(xbm.loss, "triplet_selector", None) or xbm.loss.pair_selector


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ConfigError, match="all' selector"):
        CrossBatchMemory(DTSHLoss("all"), 8, 4)
    with pytest.raises(ConfigError, match="wraps"):
        CrossBatchMemory(create_loss("csq", bits=8, n_classes=2), 8, 8)
    with pytest.raises(ConfigError, match="memory_size"):
        CrossBatchMemory(OnlineTripletLoss(1.0, BatchHardTripletSelector()), 0, 4)
    with pytest.raises(ConfigError, match="4-wide"):
        CrossBatchMemory(OnlineTripletLoss(1.0, BatchHardTripletSelector()), 8, 4)(torch.randn(3, 5), torch.arange(3))

    class OldSelector:
        def get_triplets(self, embeddings, labels):
            return torch.zeros(0, 3, dtype=torch.int64)

    with pytest.raises(ConfigError, match="cannot mine from a memory"):
        CrossBatchMemory(OnlineTripletLoss(1.0, OldSelector()), 8, 4)
    xbm = CrossBatchMemory(OnlineTripletLoss(1.0, BatchHardTripletSelector()), 8, 4)
    state = xbm.state_dict()
    state["_extra_state"] = {"pointer": 9, "filled": 0, "step": 0}
    with pytest.raises(ConfigError, match="does not fit"):
        xbm.load_state_dict(state)


def test_wrapped_loss_attributes_pass_through_for_schedules() -> None:
    from deephash.losses import LinearRamp

    dtsh = DTSHLoss("batch-hard", quantization_weight=1.0)
    xbm = CrossBatchMemory(dtsh, 8, 4)
    xbm.quantization_weight = 0.25
    assert dtsh.quantization_weight == 0.25 and xbm.quantization_weight == 0.25
    assert "quantization_weight" not in xbm.__dict__
    xbm.pointer = 3  # the wrapper's own attributes stay its own
    assert xbm.pointer == 3 and not hasattr(dtsh, "pointer")
    with pytest.raises(AttributeError):
        _ = xbm.no_such_attribute
    ramp = LinearRamp("quantization_weight", 0.0, 1.0, epochs=4)
    ramp.apply(xbm, 2, 4)
    assert dtsh.quantization_weight == pytest.approx(0.5)


def test_half_precision_embeddings_keep_a_float32_memory() -> None:
    xbm = _wrapped("batch-hard", dim=3)
    for e, labels in _stream(3, dtype=torch.float64):
        value = xbm(e.to(torch.bfloat16).requires_grad_(True), labels)
    assert xbm.memory.dtype == torch.float32 and value.dtype == torch.float32
    assert xbm.memory_bytes() == 10 * 3 * 4 + 10 * 8


# ---------------------------------------------------------------- pytorch-metric-learning


def _pml_pair(name, margin, memory_size, dim):
    from pytorch_metric_learning import distances, losses, miners, reducers

    squared = distances.LpDistance(power=2, normalize_embeddings=False)
    if name == "contrastive":
        loss = losses.ContrastiveLoss(pos_margin=0.0, neg_margin=0.0, distance=squared, reducer=reducers.MeanReducer())
        miner = None
    else:
        loss = losses.TripletMarginLoss(margin=margin, distance=squared, reducer=reducers.MeanReducer())
        miner = miners.BatchHardMiner(distance=squared) if name == "batch-hard" else None
    return losses.CrossBatchMemory(loss, dim, memory_size=memory_size, miner=miner)


@pytest.mark.parametrize("name", ["all", "batch-hard", "contrastive"])
def test_values_match_pytorch_metric_learning(name) -> None:
    """PML enqueues the batch first and mines batch → (its queue, which then holds the batch);
    ours mines batch → batch ∪ memory and enqueues after. With PML's queue M + B long the two see
    the same columns, so from the second step on the values agree for the selectors whose rules
    coincide: all triplets (PML: no miner, MeanReducer over every triplet) and batch-hard (PML's
    BatchHardMiner; it may pick the anchor itself as positive and then drop it, as ours skips an
    anchor without another positive). Contrastive: PML's negative hinge is relu(m − d²), ours
    ½·relu(m − d)², so only the positive term is compared (margin 0: no negative term in either),
    scaled by the pair counts. Gradients differ by design: PML's positives and negatives are its
    detached queue, so only anchors get gradients; ours also sends them to in-batch positives and
    negatives (the loss over batch ∪ memory, memory constant)."""
    batch, memory_size, dim = 12, 24, 3
    if name == "contrastive":
        ours = CrossBatchMemory(OnlineContrastiveLoss(0.0, AllPositivePairSelector(balance=False)), memory_size, dim)
    else:
        selector = AllTripletSelector() if name == "all" else BatchHardTripletSelector()
        ours = CrossBatchMemory(OnlineTripletLoss(MARGIN, selector), memory_size, dim)
    pml = _pml_pair(name, MARGIN, memory_size + batch, dim)
    compared = 0
    for step, (e, labels) in enumerate(_stream(6, n_classes=3, n_samples=4, dim=dim)):
        e = e.float()
        columns = torch.cat((labels, ours.memory_labels[: ours.filled]))
        n_positive = int((labels[:, None] == columns[None, :]).sum()) - batch  # ordered, a != p
        mine, theirs = ours(e, labels), pml(e, labels)
        if step == 0:
            continue  # ours: the batch alone (a < p); PML: the batch against itself, both orders
        if name == "contrastive":  # ours: Σ½d² / (P + Q); PML: Σd² / P
            mine = mine * ours.num_selected * 2 / n_positive
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
        compared += 1
    assert compared == 5 and ours.filled == memory_size


def test_fit_trains_through_the_wrapper_and_validation_leaves_the_memory_alone() -> None:
    """The training loop as it is: ``fit`` calls ``loss(embeddings, labels)`` and switches the loss
    to eval mode for validation, so validation batches are neither mined against nor enqueued."""
    from deephash import fit

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(12, 5, generator=g), torch.randint(0, 3, (12,), generator=g)) for _ in range(4)]
    xbm = CrossBatchMemory(OnlineTripletLoss(MARGIN, BatchHardTripletSelector()), 40, 3, warmup_steps=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fit(batches, batches[:2], model, xbm, optimizer, None, 2, "cpu", 100, progress=False)
    assert xbm.step == 8 and xbm.filled == 40 and xbm.pointer == (7 * 12) % 40
    assert not xbm.memory.requires_grad and torch.isfinite(xbm.memory).all()
