"""SupCon / NT-Xent against a brute-force loop over Khosla et al.'s eq. 2 and pytorch-metric-learning."""

from __future__ import annotations

import math

import pytest
import torch

from pytorch_metric_learning import losses as pml

from deephash.errors import DeephashError
from deephash.losses import create_loss
from deephash.losses.contrastive import InstanceContrastiveLoss, SupConLoss, supcon_loss, view_ids


def _brute(features: torch.Tensor, labels: torch.Tensor, t: float) -> float:
    z = [f / math.sqrt(sum(v * v for v in f.tolist())) for f in features.double()]
    sim = [[float((a * b).sum()) / t for b in z] for a in z]
    losses = []
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and int(labels[p]) == int(labels[i])]
        if not positives:
            continue
        denom = sum(math.exp(sim[i][a]) for a in range(len(z)) if a != i)
        losses.append(-sum(math.log(math.exp(sim[i][p]) / denom) for p in positives) / len(positives))
    return sum(losses) / len(losses) if losses else 0.0


def _batch(n: int = 12, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("t", [0.07, 0.5, 1.0])
def test_supcon_matches_brute_force_loop(t: float) -> None:
    x, y = _batch()
    y[0] = 99  # an anchor without positives: left out of the mean
    assert supcon_loss(x, y, t).item() == pytest.approx(_brute(x, y, t), rel=1e-5)


def test_supcon_matches_pytorch_metric_learning() -> None:
    x, y = _batch(n=16, seed=1)
    ours = SupConLoss(temperature=0.2)(x.float(), y)
    assert ours.item() == pytest.approx(pml.SupConLoss(temperature=0.2)(x.float(), y).item(), rel=1e-4)


def test_instance_loss_is_ntxent_of_two_views() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(6, 8, generator=g)
    views = torch.cat([a + 0.3 * torch.randn(6, 8, generator=g), a + 0.3 * torch.randn(6, 8, generator=g)])
    ids = view_ids(6, 2)
    assert ids.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]
    ours = InstanceContrastiveLoss(temperature=0.3)(views)
    assert ours.item() == pytest.approx(pml.NTXentLoss(temperature=0.3)(views, ids).item(), rel=1e-4)
    assert ours.item() == pytest.approx(_brute(views, ids, 0.3), rel=1e-4)


def test_no_positive_pairs_gives_zero_and_a_gradient() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    loss = supcon_loss(x, torch.arange(4), 0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_gradient_reaches_every_row_and_is_finite() -> None:
    x, y = _batch()
    x.requires_grad_(True)
    supcon_loss(x, y, 0.1).backward()
    assert torch.isfinite(x.grad).all() and (x.grad.abs().sum(1) > 0).all()


def test_identical_positives_far_negatives_approach_the_floor() -> None:
    # two classes at opposite poles: each anchor's positive share tends to 1 / |P(i)| of the mass -> loss log|P(i)|
    x = torch.tensor([[1.0, 0.0]] * 3 + [[-1.0, 0.0]] * 3)
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    assert supcon_loss(x, y, 0.01).item() == pytest.approx(math.log(2), abs=1e-5)


def test_registry_and_errors() -> None:
    assert isinstance(create_loss("supcon", temperature=0.2), SupConLoss)
    assert isinstance(create_loss("instance-contrastive", temperature=0.2), InstanceContrastiveLoss)
    with pytest.raises(DeephashError, match="temperature"):
        supcon_loss(torch.randn(4, 2), torch.zeros(4, dtype=torch.long), 0.0)
    with pytest.raises(DeephashError, match="features"):
        supcon_loss(torch.randn(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(DeephashError, match="views"):
        InstanceContrastiveLoss(n_views=2)(torch.randn(5, 2))
    with pytest.raises(DeephashError, match="n_views"):
        InstanceContrastiveLoss(n_views=1)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 0.0), (0.5, 2.0, 0.3), (0.0, 1.0, 0.0), (1.0, 0.0, 0.1)])
def test_contrastive_hash_is_the_weighted_sum_of_its_terms(weights) -> None:
    from deephash.losses import ContrastiveHashLoss

    supervised, instance, quantization = weights
    u, labels = _batch(n=12)
    u = torch.tanh(u)
    loss = ContrastiveHashLoss(n_views=3, supervised_weight=supervised, instance_weight=instance,
                               supervised_temperature=0.3, instance_temperature=0.2, quantization_weight=quantization)
    views = torch.arange(4).repeat(3)  # rows i, i+4, i+8 are views of one image
    want = (supervised * _brute(u, labels, 0.3) + instance * _brute(u, views, 0.2)
            + quantization * float(((u.abs() - 1) ** 2).mean()))
    assert float(loss(u, labels)) == pytest.approx(want, rel=1e-5)


def test_contrastive_hash_refuses_rows_that_are_not_views() -> None:
    from deephash.losses import ContrastiveHashLoss

    with pytest.raises(DeephashError, match="not 2 views"):
        ContrastiveHashLoss()(torch.randn(5, 4), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(DeephashError, match="n_views >= 2"):
        ContrastiveHashLoss(n_views=1)
    assert float(ContrastiveHashLoss(n_views=1, instance_weight=0)(torch.randn(5, 4), torch.arange(5) % 2)) > 0


def _pseudo_labels_loop(features, labels, n_views, threshold, temperature):
    """The oracle: image by image, class by class, in plain Python (a tie goes to the class whose
    first labelled row comes first)."""
    z = torch.nn.functional.normalize(features.double(), dim=1)
    n = len(labels) // n_views
    out = labels.clone()
    classes = list(dict.fromkeys(int(v) for v in labels if v >= 0))  # in order of first appearance
    for image in range(n):
        if labels[image] >= 0:
            continue
        p = dict.fromkeys(classes, 0.0)
        for view in range(n_views):
            row = view * n + image
            scores = {c: sum(float(z[row] @ z[j]) for j in range(len(labels)) if labels[j] == c) /
                      sum(1 for j in range(len(labels)) if labels[j] == c) for c in classes}
            top = max(scores.values())
            weights = {c: math.exp((s - top) / temperature) for c, s in scores.items()}
            for c in classes:
                p[c] += weights[c] / sum(weights.values()) / n_views
        best = max(classes, key=lambda c: (p[c], -classes.index(c)))
        if p[best] >= threshold:
            out[[view * n + image for view in range(n_views)]] = best
    return out


@pytest.mark.parametrize("n_views", [2, 3])
def test_pseudo_labels_match_a_loop(n_views) -> None:
    from deephash.losses.contrastive import in_batch_pseudo_labels
    torch.manual_seed(n_views)
    centers = torch.randn(6, 8) * 3
    labelled = torch.tensor([5, 2, 2, 5, 0, 0, 2])  # classes 1, 3, 4 absent; 5 first
    # unlabelled images near classes 2, 5, 0, between 0 and 5, and views that lean different ways
    near = [centers[2], centers[5], centers[0], (centers[0] + centers[5]) / 2, centers[2], centers[0]]
    b = len(labelled) + len(near)
    labels = torch.cat([labelled, torch.full((len(near),), -1)]).repeat(n_views)
    views = []
    for v in range(n_views):
        rows = [centers[c] for c in labelled.tolist()] + near
        rows[-2] = centers[2] if v == 0 else centers[5]  # first view says 2, the others 5
        rows[-1] = centers[0] if v < n_views - 1 else centers[2]
        views.append(torch.stack(rows) + 0.7 * torch.randn(b, 8))
    features = torch.cat(views)
    taken = set()
    for threshold in (0.3, 0.5, 0.7, 0.9, 0.999):
        got = in_batch_pseudo_labels(features, labels, n_views, threshold, temperature=0.2)
        assert torch.equal(got, _pseudo_labels_loop(features, labels, n_views, threshold, 0.2))
        assert torch.equal(got[labels >= 0], labels[labels >= 0])
        taken |= set(got[labels < 0].tolist()) - {-1}
    assert taken == {0, 2, 5}  # every class present is chosen for some image at some threshold
    got = in_batch_pseudo_labels(features, labels.int(), n_views, 1e-9, 0.2)  # every unlabelled image takes a class
    assert got.dtype == torch.int64 and (got >= 0).all()
    with pytest.raises(DeephashError, match="labels .V\\*B,. for V = 3 views"):
        in_batch_pseudo_labels(features[:-1], labels[:-1], 3, 0.5)


def test_pseudo_labels_threshold_is_inclusive_and_nothing_changes_without_labelled_rows() -> None:
    from deephash.losses.contrastive import in_batch_pseudo_labels
    # two classes, one unlabelled image exactly as close to both: p = (1/2, 1/2) in exact arithmetic
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).repeat(2, 1)
    labels = torch.tensor([0, 1, -1]).repeat(2)
    assert torch.equal(in_batch_pseudo_labels(features, labels, 2, 0.5, 1.0), torch.tensor([0, 1, 0]).repeat(2))
    assert torch.equal(in_batch_pseudo_labels(features, labels, 2, 0.5000001, 1.0), labels)
    unlabelled = torch.full((6,), -1)
    assert torch.equal(in_batch_pseudo_labels(features, unlabelled, 2, 0.5, 1.0), unlabelled)
    with pytest.raises(DeephashError, match="threshold in"):
        in_batch_pseudo_labels(features, labels, 2, 0.0, 1.0)


def test_contrastive_hash_with_pseudo_labels_is_supcon_on_them() -> None:
    from deephash.losses.contrastive import ContrastiveHashLoss, in_batch_pseudo_labels
    torch.manual_seed(3)
    u = torch.randn(16, 6, requires_grad=True)
    labels = torch.tensor([0, 1, -1, -1, 1, -1, 0, -1]).repeat(2)
    loss = ContrastiveHashLoss(n_views=2, instance_weight=0.0, pseudo_label_threshold=0.4, pseudo_label_temperature=0.5)
    pseudo = in_batch_pseudo_labels(u, labels, 2, 0.4, 0.5)
    assert (pseudo >= 0).sum() > (labels >= 0).sum()  # some were taken
    assert torch.allclose(loss(u, labels), supcon_loss(u, pseudo, 0.2))
    with pytest.raises(DeephashError, match="pseudo_label_threshold must be 0"):
        ContrastiveHashLoss(pseudo_label_threshold=1.5)
