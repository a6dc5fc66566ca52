"""Pairwise distance and similarity matrices between two sets of vectors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deephash.errors import ConfigError

METRICS = ("squared_euclidean", "euclidean", "cosine", "inner_product")


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """Square root whose gradient is 0 (not inf) where ``x <= 0``.

    Args:
        x: non-negative tensor of any shape, e.g. squared distances.

    Returns:
        ``sqrt(x)`` with ``0`` where ``x <= 0``; the gradient there is finite (zero), so duplicate
        embeddings (distance 0) never produce NaN.
    """
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def squared_euclidean(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances ``|x_i - y_j|^2`` by the Gram trick, clamped at 0.

    Args:
        x: float ``(N, D)``.
        y: float ``(M, D)``; ``None`` means ``x`` (then the diagonal is exactly 0).

    Returns:
        float ``(N, M)``, same dtype and device as ``x``.
    """
    x_sq = x.pow(2).sum(1)
    if y is None:  # -2·x·xᵀ + |x_j|² in one addmm, then in place: + |x_i|², clamp, zero diagonal
        dist = torch.addmm(x_sq[None, :], x, x.T, alpha=-2).add_(x_sq[:, None]).clamp_(min=0)
        return dist.fill_diagonal_(0)
    y_sq = y.pow(2).sum(1)
    return (x_sq[:, None] + y_sq[None, :] - 2 * (x @ y.T)).clamp(min=0)


def pairwise_distances(
    x: torch.Tensor, y: torch.Tensor | None = None, metric: str = "squared_euclidean"
) -> torch.Tensor:
    """Distance (or similarity) between every row of ``x`` and every row of ``y``.

    Args:
        x: float ``(N, D)``.
        y: float ``(M, D)``; ``None`` compares ``x`` with itself.
        metric: ``"squared_euclidean"`` (clamped at 0), ``"euclidean"`` (zero-safe sqrt gradient),
            ``"cosine"`` (``1 - cos``) or ``"inner_product"`` (a similarity: larger is closer).

    Returns:
        float ``(N, M)`` on ``x``'s device.

    Raises:
        ConfigError: ``metric`` is not one of the four names.
    """
    if metric == "squared_euclidean":
        return squared_euclidean(x, y)
    if metric == "euclidean":
        return safe_sqrt(squared_euclidean(x, y))
    if metric == "cosine":
        xn = F.normalize(x, dim=1)
        yn = xn if y is None else F.normalize(y, dim=1)
        return 1 - xn @ yn.T
    if metric == "inner_product":
        return x @ (x if y is None else y).T
    raise ConfigError(f"unknown distance metric {metric!r}; choose one of {', '.join(METRICS)}")
