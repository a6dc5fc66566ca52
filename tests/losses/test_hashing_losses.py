"""Hashing losses against direct re-computations with explicit loops in float64."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from deephash.errors import CodeLengthError, DeephashError
from deephash.losses import create_loss
from deephash.losses.hashing import (
    BitBalanceLoss,
    CSQLoss,
    DSHLoss,
    DTSHLoss,
    QuantizationLoss,
    bit_balance_loss,
    default_min_distance,
    hadamard,
    hash_centers,
    quantization_loss,
)
from deephash.mining import create_selector


class LoopAllTriplets:
    """Independent stand-in: every (a, p, n) with a < p of one label and n of another."""

    def get_triplets(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        y = labels.tolist()
        rows = [
            (a, p, n)
            for a, p in itertools.combinations(range(len(y)), 2)
            if y[a] == y[p]
            for n in range(len(y))
            if y[n] != y[a]
        ]
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)


class Recording:
    """Wraps a selector and keeps the triplets it returned last."""

    def __init__(self, selector) -> None:
        self.selector = selector
        self.last: torch.Tensor | None = None

    def get_triplets(self, embeddings, labels):
        self.last = self.selector.get_triplets(embeddings, labels)
        return self.last


def codes(b: int, bits: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(b, bits, generator=g, dtype=torch.float64)).tanh().requires_grad_(True)


def labels_of(b: int, k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, k, (b,), generator=g)


def sgn(x: float) -> float:
    return 1.0 if x >= 0 else -1.0


def dtsh_reference(u: torch.Tensor, triplets: list[tuple[int, int, int]], alpha: float, lam: float):
    bits = u.shape[1]
    total = u.new_zeros(())
    for a, p, n in triplets:
        th_ap = 0.5 * sum(u[a, k] * u[p, k] for k in range(bits))
        th_an = 0.5 * sum(u[a, k] * u[n, k] for k in range(bits))
        x = th_ap - th_an - alpha
        total = total + (-x + torch.log1p(torch.exp(x)))
    trip = total / len(triplets) if triplets else u.new_zeros(())
    quant = u.new_zeros(())
    for i in range(u.shape[0]):
        quant = quant + sum((sgn(float(u.detach()[i, k])) - u[i, k]) ** 2 for k in range(bits))
    return trip + lam * quant / u.shape[0]


def grad_of(value: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(value, u)
    return g


@pytest.mark.parametrize("alpha", [None, 0.0, 3.0])
def test_dtsh_matches_loop_over_all_triplets(alpha):
    u, y = codes(9, 12), labels_of(9, 3)
    loss = DTSHLoss(LoopAllTriplets(), alpha=alpha, quantization_weight=0.7)
    value = loss(u, y)
    triplets = [tuple(t) for t in LoopAllTriplets().get_triplets(u, y).tolist()]
    ref = dtsh_reference(u, triplets, 12 / 4 if alpha is None else alpha, 0.7)
    assert loss.num_selected == len(triplets) > 0
    assert value.item() == pytest.approx(ref.item(), abs=1e-6)
    assert torch.allclose(grad_of(value, u), grad_of(ref, u), atol=1e-6)


@pytest.mark.parametrize("name", ["all", "hardest", "random", "semihard", "batch-hard"])
def test_dtsh_with_each_selector_uses_its_triplets(name):
    params = {} if name in ("all", "batch-hard") else {"margin": 1.0}
    selector = Recording(create_selector(name, **params))
    u, y = codes(12, 16, seed=3), labels_of(12, 3, seed=4)
    loss = DTSHLoss(selector, alpha=2.0, quantization_weight=0.5)
    value = loss(u, y)
    triplets = [tuple(t) for t in selector.last.tolist()]
    assert loss.num_selected == len(triplets)
    ref = dtsh_reference(u, triplets, 2.0, 0.5)
    assert value.item() == pytest.approx(ref.item(), abs=1e-6)
    assert torch.allclose(grad_of(value, u), grad_of(ref, u), atol=1e-6)


def test_dtsh_selector_by_name():
    loss = create_loss("dtsh", triplet_selector="semihard", selector_params={"margin": 0.5})
    assert type(loss.triplet_selector).__name__ == "SemihardNegativeTripletSelector"


def test_dtsh_without_triplets_is_the_quantization_term():
    u = codes(6, 10)
    y = torch.zeros(6, dtype=torch.int64)
    loss = DTSHLoss(LoopAllTriplets(), quantization_weight=2.0)
    value = loss(u, y)
    ref = dtsh_reference(u, [], 0.0, 2.0)
    assert loss.num_selected == 0
    assert value.item() == pytest.approx(ref.item(), abs=1e-9)
    g = grad_of(value, u)
    assert torch.isfinite(g).all() and torch.allclose(g, grad_of(ref, u), atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtsh_is_stable_at_huge_scales(dtype):
    g = torch.Generator().manual_seed(5)
    u = (1e4 * torch.randn(10, 32, generator=g, dtype=dtype)).requires_grad_(True)
    y = labels_of(10, 3, seed=6)
    loss = DTSHLoss(LoopAllTriplets(), alpha=8.0, quantization_weight=0.0)
    value = loss(u, y)
    g_u = grad_of(value, u)
    assert torch.isfinite(value) and torch.isfinite(g_u).all()
    # At this scale softplus(-x) equals its linear asymptote relu(-x).
    t = LoopAllTriplets().get_triplets(u, y)
    ud = u.detach().double()
    x = 0.5 * (ud[t[:, 0]] * ud[t[:, 1]]).sum(1) - 0.5 * (ud[t[:, 0]] * ud[t[:, 2]]).sum(1) - 8.0
    asymptote = torch.relu(-x).mean().item()
    assert value.item() == pytest.approx(asymptote, rel=1e-5)


def dsh_reference(u, y, margin, alpha):
    b, bits = u.shape
    pairs = list(itertools.combinations(range(b), 2))
    total = u.new_zeros(())
    for i, j in pairs:
        d = sum((u[i, k] - u[j, k]) ** 2 for k in range(bits))
        if y[i] == y[j]:
            total = total + 0.5 * d
        else:
            total = total + 0.5 * torch.clamp(margin - d, min=0)
    reg = sum(abs(abs(u[i, k]) - 1) for i in range(b) for k in range(bits)) / b
    return (total / len(pairs) if pairs else 0) + alpha * reg


@pytest.mark.parametrize("margin", [None, 3.0])
def test_dsh_matches_loop_over_pairs(margin):
    u, y = codes(8, 10, seed=7, scale=2.0), labels_of(8, 3, seed=8)
    loss = DSHLoss(10, margin=margin, alpha=0.05)
    value = loss(u, y)
    ref = dsh_reference(u, y.tolist(), 20.0 if margin is None else margin, 0.05)
    assert loss.num_selected == 28
    assert value.item() == pytest.approx(ref.item(), abs=1e-6)
    assert torch.allclose(grad_of(value, u), grad_of(ref, u), atol=1e-6)


def test_dsh_quantization_weight_is_alpha_and_length_checked():
    loss = DSHLoss(16)
    assert loss.margin == 32.0
    loss.quantization_weight = 0.3
    assert loss.alpha == 0.3
    with pytest.raises(CodeLengthError, match="16"):
        loss(codes(4, 12), labels_of(4, 2))
    single = codes(1, 16)
    value = loss(single, torch.zeros(1, dtype=torch.int64))
    assert value.item() == pytest.approx(0.3 * (single.abs() - 1).abs().sum().item(), abs=1e-9)


def csq_reference(u, targets, lam):
    b, bits = u.shape
    bce = u.new_zeros(())
    for i in range(b):
        for k in range(bits):
            p, t = (u[i, k] + 1) / 2, (targets[i][k] + 1) / 2
            bce = bce - (t * torch.log(p) + (1 - t) * torch.log(1 - p))
    quant = sum((abs(u[i, k]) - 1) ** 2 for i in range(b) for k in range(bits))
    return bce / (b * bits) + lam * quant / (b * bits)


@pytest.mark.parametrize("bits", [16, 12])
def test_csq_matches_loop(bits):
    u, y = codes(7, bits, seed=9), labels_of(7, 5, seed=10)
    loss = CSQLoss(bits, 5, quantization_weight=0.1)
    value = loss(u, y)
    centers = hash_centers(5, bits)
    assert torch.equal(loss.centers, centers)
    ref = csq_reference(u, [centers[c].tolist() for c in y.tolist()], 0.1)
    assert value.item() == pytest.approx(ref.item(), abs=1e-6)
    assert torch.allclose(grad_of(value, u), grad_of(ref, u), atol=1e-6)


def test_csq_multilabel_center_is_sign_of_summed_centers():
    loss = CSQLoss(16, 4)
    multi = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 0]])
    targets = loss.targets(multi)
    c = loss.centers
    for row, hot in zip(targets.tolist(), multi.tolist()):
        summed = [sum(c[j, k].item() for j in range(4) if hot[j]) for k in range(16)]
        assert row == [1.0 if s >= 0 else -1.0 for s in summed]


def test_csq_saturated_codes_stay_finite():
    loss = CSQLoss(16, 3)
    u = torch.tensor([[1.0] * 16, [-1.0] * 16], requires_grad=True)
    value = loss(u, torch.tensor([0, 2]))
    assert torch.isfinite(value)


def test_hashing_losses_are_registered():
    assert isinstance(create_loss("dsh", bits=16), DSHLoss)
    assert isinstance(create_loss("csq", bits=16, n_classes=10), CSQLoss)
    assert isinstance(create_loss("dtsh", alpha=1.0), DTSHLoss)


def hamming_min(centers: torch.Tensor) -> int:
    rows = centers.tolist()
    return min(sum(a != b for a, b in zip(r, s)) for r, s in itertools.combinations(rows, 2))


@pytest.mark.parametrize(
    ("n_classes", "bits"), [(10, 48), (10, 12), (10, 13), (20, 24), (40, 16), (100, 20), (10, 8), (3, 9)]
)
def test_random_centers_meet_their_stated_distance(n_classes, bits):
    centers = hash_centers(n_classes, bits, seed=3)
    assert centers.shape == (n_classes, bits) and set(centers.unique().tolist()) == {-1.0, 1.0}
    stated = bits // 2 if bits & (bits - 1) == 0 and n_classes <= 2 * bits else default_min_distance(bits)
    assert hamming_min(centers) >= stated
    assert torch.equal(centers, hash_centers(n_classes, bits, seed=3))


def test_default_min_distance_values():
    assert default_min_distance(48) == math.floor(24 - math.sqrt(48)) == 17
    assert default_min_distance(8) == 1


def test_explicit_min_distance_and_impossible_request():
    assert hamming_min(hash_centers(10, 48, min_distance=20)) >= 20
    with pytest.raises(DeephashError, match="min_distance"):
        hash_centers(30, 8, min_distance=4, max_tries=2000)


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_hadamard_centers_are_orthogonal(bits):
    h = hadamard(bits)
    assert torch.equal(h @ h.T, bits * torch.eye(bits))
    centers = hash_centers(10, bits)
    assert torch.equal(centers, h[:10])
    assert hamming_min(centers) == bits // 2
    both = hash_centers(2 * bits, bits)
    assert torch.equal(both[bits:], -h)
    assert hamming_min(both) == bits // 2


def test_regularisers_match_loops():
    u = codes(5, 9, seed=11)
    bb = sum((sum(u[i, k] for i in range(5)) / 5) ** 2 for k in range(9)) / 9
    q = sum((abs(u[i, k]) - 1) ** 2 for i in range(5) for k in range(9)) / 45
    assert bit_balance_loss(u).item() == pytest.approx(bb.item(), abs=1e-12)
    assert quantization_loss(u).item() == pytest.approx(q.item(), abs=1e-12)
    assert BitBalanceLoss(2.0)(u).item() == pytest.approx(2 * bb.item(), abs=1e-12)
    assert QuantizationLoss(3.0)(u, None).item() == pytest.approx(3 * q.item(), abs=1e-12)
    assert torch.allclose(grad_of(bit_balance_loss(u), u), grad_of(bb, u), atol=1e-12)
    balanced = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    assert bit_balance_loss(balanced).item() == 0.0 and quantization_loss(balanced).item() == 0.0


def test_csq_with_partial_labels_is_the_labelled_rows_bce_plus_everyones_quantization():
    torch.manual_seed(0)
    u = torch.tanh(torch.randn(12, 16, dtype=torch.float64))
    labels = torch.tensor([2, -1, 0, 1, -1, -1, 2, 0, -1, 1, 1, -1])
    loss = CSQLoss(16, 3, quantization_weight=0.3).double()
    kept = labels >= 0
    quantization = ((u.abs() - 1) ** 2).mean()
    expected = loss(u[kept], labels[kept]) - 0.3 * ((u[kept].abs() - 1) ** 2).mean() + 0.3 * quantization
    assert float(loss(u, labels)) == pytest.approx(float(expected), rel=1e-12)
    everyone = torch.tensor([2, 1, 0, 1, 0, 0, 2, 0, 1, 1, 1, 2])  # all labelled: the plain mean as before
    target = (loss.centers[everyone].double() + 1) / 2
    p = ((u + 1) / 2).clamp(1e-6, 1 - 1e-6)
    plain = -(target * p.log() + (1 - target) * (1 - p).log()).mean() + 0.3 * quantization
    assert float(loss(u, everyone)) == pytest.approx(float(plain), rel=1e-12)
    none = torch.full((12,), -1)
    free = u.clone().requires_grad_(True)
    value = loss(free, none)
    value.backward()
    assert float(value.detach()) == pytest.approx(float(0.3 * quantization), rel=1e-12) and torch.isfinite(free.grad).all()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_aux_cross_entropy_leaves_out_unlabelled_items(smoothing):
    from deephash.losses.aux import AuxClassificationLoss

    torch.manual_seed(1)
    u, logits = torch.tanh(torch.randn(10, 16)), torch.randn(10, 3)
    labels = torch.tensor([0, -1, 2, 2, -1, 1, 0, -1, 1, 2])
    inner = CSQLoss(16, 3)
    loss = AuxClassificationLoss(inner, 0.5, label_smoothing=smoothing)
    kept = labels >= 0
    rows = [torch.nn.functional.cross_entropy(logits[i:i + 1], labels[i:i + 1], label_smoothing=smoothing)
            for i in range(10) if labels[i] >= 0]  # one labelled row at a time, then their mean
    expected = inner(u, labels) + 0.5 * torch.stack(rows).mean()
    assert float(loss(u, logits, labels)) == pytest.approx(float(expected), rel=1e-6)
    assert int(kept.sum()) == len(rows) == 7
    none = torch.full((10,), -1)
    assert float(loss(u, logits, none)) == pytest.approx(float(inner(u, none)), abs=1e-7)
