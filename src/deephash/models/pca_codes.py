"""PCA hashing of a trained backbone's features: the ``"pca"`` code rule.

The code of an image is the sign of the top principal components of its source vector (the
backbone's features, or its last feature map: ``model.code_source``), each value first raised to
``power`` (signed, ``sign(x)·|x|^power``; 0.5 is the square-root "power normalisation" of ReLU
features) and the row L2-normalised into z, centred on the training images' mean:
``sign((z - mean) @ P)``, 0 ↦ +1, with ``P`` (D, bits) the leading eigenvectors of the training
images' covariance of z. It is PCA hashing (Gong & Lazebnik's PCAH) on learned features:
an unsupervised projection, so it keeps the local structure of the features for classes that
training never saw, where a hash head fitted to the seen classes loses it (BENCHMARKS.md, issue 16).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from deephash.signs import sign

__all__ = ["fit_pca_codes", "pca_codes", "pca_projection", "pca_rows", "pca_values"]


def pca_rows(source: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """float32 (B, D) rows z of float (B, ...) ``source``: ``sign(x)·|x|^power`` per value, then L2-normalised."""
    x = source.detach().flatten(1).float()
    if power != 1.0:
        x = x.sign() * x.abs().pow(power)
    return F.normalize(x, dim=1)


def pca_projection(batches: Iterable[torch.Tensor], bits: int, power: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and the leading principal directions of the rows z = `pca_rows` of ``batches``.

    Args:
        batches: float (N_i, D) tensors, the rows of one data set in any number of pieces (each
            batch's sums in float32, their total in float64, on the rows' device).
        bits: how many directions, 1 <= bits <= D.
        power: the exponent `pca_rows` applies to each value before the L2 normalisation.

    Returns:
        ``(mean, projection)``: float32 (D,) and float32 (D, bits), orthonormal columns by
        decreasing variance, each signed so that its largest-magnitude entry is positive.

    Raises:
        ValueError: fewer than two rows, rows of different widths, or bits out of range.
    """
    n, total, outer = 0, None, None
    for batch in batches:
        z = pca_rows(batch, power)
        if total is None:
            total = z.new_zeros(z.shape[1], dtype=torch.float64)
            outer = z.new_zeros(z.shape[1], z.shape[1], dtype=torch.float64)
        elif z.shape[1] != total.shape[0]:
            raise ValueError(f"PCA rows must all have {total.shape[0]} values, got a batch of {z.shape[1]}")
        n += z.shape[0]
        total += z.sum(0).double()
        outer += (z.T @ z).double()  # a batch's products in float32 (2x faster), their sum in float64
    if total is None or n < 2:
        raise ValueError(f"PCA codes need at least two rows to fit, got {n}")
    if not 1 <= bits <= total.shape[0]:
        raise ValueError(f"PCA codes need 1 <= bits <= {total.shape[0]} (the source's width), got {bits}")
    mean = total / n
    covariance = (outer - n * torch.outer(mean, mean)) / (n - 1)
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    projection = vectors[:, -bits:].flip(1)
    peak = projection.gather(0, projection.abs().argmax(0, keepdim=True))
    projection = projection * torch.where(peak < 0, -1.0, 1.0).to(projection)
    return mean.float(), projection.float()


def pca_values(source: torch.Tensor, mean: torch.Tensor, projection: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """float32 (B, bits) values whose signs are the codes: ``(pca_rows(source, power) - mean) @ projection``."""
    return (pca_rows(source, power) - mean) @ projection


def pca_codes(source: torch.Tensor, mean: torch.Tensor, projection: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """±1 codes float (B, bits) of float (B, D) ``source`` rows: the sign of `pca_values`, 0 ↦ +1."""
    return sign(pca_values(source, mean, projection, power).to(source.dtype))


@torch.no_grad()
def fit_pca_codes(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 1024) -> None:
    """Fit a ``"pca"`` model's projection on uint8 images (N, C, H, W), in place.

    The model runs in eval mode on its own device; its code source (``model.code_source_vectors``)
    of every image enters :func:`pca_projection` with ``bits = model.bits`` and ``power = model.code_power``.
    """
    model.eval()
    device = next(model.parameters()).device
    rows = (model.code_source_vectors(images[i:i + batch_size].to(device).float().div_(255))
            for i in range(0, len(images), batch_size))
    model.set_code_projection(*pca_projection(rows, model.bits, model.code_power))
