"""pairwise_distances against explicit loops and torch.cdist."""

from __future__ import annotations

import math

import pytest
import torch

from deephash.distances import pairwise_distances, safe_sqrt
from deephash.errors import DeephashError


def _loop(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    out = torch.empty(len(x), len(y), dtype=torch.float64)
    for i, a in enumerate(x.tolist()):
        for j, b in enumerate(y.tolist()):
            sq = sum((u - v) ** 2 for u, v in zip(a, b))
            dot = sum(u * v for u, v in zip(a, b))
            if metric == "squared_euclidean":
                out[i, j] = sq
            elif metric == "euclidean":
                out[i, j] = math.sqrt(sq)
            elif metric == "cosine":
                out[i, j] = 1 - dot / math.sqrt(sum(u * u for u in a) * sum(v * v for v in b))
            else:
                out[i, j] = dot
    return out


@pytest.mark.parametrize("metric", ["squared_euclidean", "euclidean", "cosine", "inner_product"])
def test_matches_loops(metric: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.randn(4, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(pairwise_distances(x, y, metric), _loop(x, y, metric), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(pairwise_distances(x, metric=metric), _loop(x, x, metric), atol=1e-9, rtol=1e-9)


def test_self_distance_diagonal_is_exactly_zero_and_nonnegative() -> None:
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(1)) * 100
    d = pairwise_distances(x)
    assert torch.all(d.diagonal() == 0)
    assert torch.all(d >= 0)
    reference = torch.cdist(x.double(), x.double()).pow(2).fill_diagonal_(0).float()
    torch.testing.assert_close(d, reference, rtol=1e-5, atol=0.5)


def test_euclidean_gradient_finite_for_duplicates() -> None:
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    d = pairwise_distances(x, metric="euclidean")
    d.sum().backward()
    assert torch.isfinite(x.grad).all()
    # pairs (0,1) and (1,0) are duplicates and contribute 0; the others contribute unit vectors
    u = (x[0] - x[2]).detach() / (x[0] - x[2]).detach().norm()
    torch.testing.assert_close(x.grad[0], 2 * u)
    torch.testing.assert_close(x.grad[1], 2 * u)
    torch.testing.assert_close(x.grad[2], -4 * u)


def test_safe_sqrt_zero_gradient_at_zero() -> None:
    v = torch.tensor([0.0, 4.0], requires_grad=True)
    safe_sqrt(v).sum().backward()
    assert v.grad.tolist() == [0.0, 0.25]


def test_unknown_metric() -> None:
    with pytest.raises(DeephashError, match="manhattan"):
        pairwise_distances(torch.zeros(2, 2), metric="manhattan")
