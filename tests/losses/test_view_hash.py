"""The view-hash loss (codes learned without labels) against a loop over anchors written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from deephash.errors import DeephashError
from deephash.losses import ViewHashLoss, create_loss


def _nt_xent_loop(u: torch.Tensor, n_views: int, t: float) -> float:
    """NT-Xent by hand: rows i, j are positives when i ≡ j (mod B); cosine similarity; mean over anchors and positives."""
    n = len(u)
    b = n // n_views
    z = [row / row.norm() for row in u.double()]
    total = 0.0
    for i in range(n):
        denominator = sum(math.exp(float(z[i] @ z[a]) / t) for a in range(n) if a != i)
        positives = [p for p in range(n) if p != i and p % b == i % b]
        total += sum(-math.log(math.exp(float(z[i] @ z[p]) / t) / denominator) for p in positives) / len(positives)
    return total / n


@pytest.mark.parametrize("n_views", [2, 3])
def test_the_loss_is_nt_xent_plus_quantization_plus_balance(n_views):
    u = torch.tanh(torch.randn(5 * n_views, 8, generator=torch.Generator().manual_seed(n_views)))
    loss = ViewHashLoss(n_views=n_views, temperature=0.4, quantization_weight=0.3, balance_weight=0.7)
    quantization = float(((u.abs() - 1) ** 2).mean())
    balance = float((u.mean(0) ** 2).mean())
    expected = _nt_xent_loop(u, n_views, 0.4) + 0.3 * quantization + 0.7 * balance
    assert float(loss(u)) == pytest.approx(expected, rel=1e-5)


def test_labels_are_ignored_and_every_row_gets_a_gradient():
    u = torch.randn(12, 6, generator=torch.Generator().manual_seed(1)).requires_grad_()
    loss = create_loss("view-hash", n_views=2, temperature=0.2)
    value = loss(u)
    assert torch.equal(value, loss(u, torch.arange(12))) and torch.equal(value, loss(u, torch.zeros(12, dtype=torch.long)))
    value.backward()
    assert bool(torch.isfinite(u.grad).all()) and bool((u.grad.abs().sum(1) > 0).all())


def test_equal_views_far_from_the_rest_score_lower_than_swapped_ones():
    base = torch.eye(4) * 2 - 1  # four ±1 codes, pairwise far apart
    matched = ViewHashLoss(quantization_weight=0.0)(torch.cat([base, base]))
    swapped = ViewHashLoss(quantization_weight=0.0)(torch.cat([base, base.roll(1, 0)]))
    assert float(matched) < float(swapped)


@pytest.mark.parametrize("params, rows, message", [
    ({"n_views": 1}, 4, "n_views >= 2"), ({"temperature": 0.0}, 4, "temperature > 0"),
    ({"balance_weight": -1.0}, 4, "weights >= 0"), ({"n_views": 3}, 4, "not 3 views"),
])
def test_bad_settings_and_batches_are_refused(params, rows, message):
    with pytest.raises(DeephashError, match=message):
        ViewHashLoss(**params)(torch.randn(rows, 6))


def _supcon_loop(u: torch.Tensor, labels: list[int], t: float) -> float:
    """SupCon by hand, a label -1 being nobody's positive; mean over anchors with a positive."""
    z = [row / row.norm() for row in u.double()]
    n, per_anchor = len(u), []
    for i in range(n):
        positives = [p for p in range(n) if p != i and labels[i] >= 0 and labels[p] == labels[i]]
        if positives:
            denominator = sum(math.exp(float(z[i] @ z[a]) / t) for a in range(n) if a != i)
            per_anchor.append(sum(-math.log(math.exp(float(z[i] @ z[p]) / t) / denominator) for p in positives) / len(positives))
    return sum(per_anchor) / len(per_anchor)


def test_partial_labels_the_unlabelled_are_negatives_only():
    from deephash.losses import supcon_loss
    u = torch.randn(9, 5, generator=torch.Generator().manual_seed(3))
    labels = [0, 1, -1, 0, -1, 1, 2, -1, 2]
    assert float(supcon_loss(u, torch.tensor(labels), 0.3)) == pytest.approx(_supcon_loop(u, labels, 0.3), rel=1e-5)
    # the unlabelled rows are not one class: giving them other negative ids changes nothing
    relabelled = [-5 if y < 0 else y for y in labels]
    assert torch.equal(supcon_loss(u, torch.tensor(labels), 0.3), supcon_loss(u, torch.tensor(relabelled), 0.3))
