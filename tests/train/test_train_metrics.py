"""Training metrics against hand computation, fed the way ``fit`` feeds them."""

from __future__ import annotations

import pytest
import torch

from deephash.train import AccumulatedAccuracyMetric, AverageNonzeroTripletsMetric


def test_accuracy_accumulates_over_batches_in_percent():
    gen = torch.Generator().manual_seed(0)
    metric = AccumulatedAccuracyMetric()
    correct = total = 0
    for batch_size in (5, 7, 3):
        scores = torch.randn(batch_size, 4, generator=gen).log_softmax(1)
        labels = torch.randint(0, 4, (batch_size,), generator=gen)
        metric((scores,), (labels,), (torch.tensor(1.0),))
        for row, label in zip(scores.tolist(), labels.tolist()):
            correct += max(range(4), key=lambda c: row[c]) == label
            total += 1
    assert metric.value() == pytest.approx(100.0 * correct / total)
    assert metric.name() == "Accuracy"
    metric.reset()
    assert metric.value() == 0.0
    metric((torch.tensor([[0.0, 1.0], [2.0, 1.0]]),), (torch.tensor([1, 1]),), (0.0,))
    assert metric.value() == 50.0


def test_accuracy_without_target_is_an_error():
    with pytest.raises(ValueError, match="labelled"):
        AccumulatedAccuracyMetric()((torch.zeros(2, 3),), None, (0.0,))


def test_average_nonzero_triplets_accepts_ints_and_tensors():
    metric = AverageNonzeroTripletsMetric()
    counts = [4, torch.tensor(10), 0, torch.tensor(7, dtype=torch.int64)]
    for count in counts:
        metric((torch.zeros(3, 2),), (torch.zeros(3),), (torch.tensor(0.5), count))
    assert metric.value() == pytest.approx((4 + 10 + 0 + 7) / 4)
    assert isinstance(metric.value(), float)
    assert metric.name() == "Average nonzero triplets"
    metric.reset()
    assert metric.value() == 0.0


def test_average_nonzero_triplets_needs_a_count():
    with pytest.raises(ValueError, match="num_selected"):
        AverageNonzeroTripletsMetric()((torch.zeros(3, 2),), None, (torch.tensor(0.5),))
