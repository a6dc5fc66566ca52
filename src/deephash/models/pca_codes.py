"""PCA hashing of a trained backbone's features: the ``"pca"`` code rule.

The code of an image is the sign of the top principal components of its source vector (the
backbone's features, or its last feature map: ``model.code_source``), each value first raised to
``power`` (signed, ``sign(x)·|x|^power``; 0.5 is the square-root "power normalisation" of ReLU
features) and the row L2-normalised into z, centred on the training images' mean:
``sign((z - mean) @ P)``, 0 ↦ +1, with ``P`` (D, bits) the leading eigenvectors of the training
images' covariance of z. It is PCA hashing (Gong & Lazebnik's PCAH) on learned features:
an unsupervised projection, so it keeps the local structure of the features for classes that
training never saw, where a hash head fitted to the seen classes loses it (BENCHMARKS.md, issue 16).

The ``"itq"`` rule (Gong & Lazebnik's iterative quantization) rotates those components before the
sign: ``sign((z - mean) @ P @ R)`` with the orthogonal ``R`` (bits, bits) that minimises the
quantization error ``||B - V R||²`` of the projected training rows ``V``, alternating
``B = sign(V R)`` and the orthogonal Procrustes solution for ``R``. It is stored as the pca rule's
buffers with ``P @ R`` as the projection, so both rules encode alike; only the fit differs.
Neither fit reads a label.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from deephash.errors import DeephashError
from deephash.signs import sign

__all__ = ["LINEAR_HASHES", "PROJECTION_RULES", "fit_linear_hash", "fit_pca_codes", "itq_rotation", "linear_hash_codes",
           "pca_codes", "pca_projection", "pca_rows", "pca_values", "random_rotation"]

#: The code rules that encode with a fitted mean and projection of the code source.
PROJECTION_RULES = ("pca", "itq")


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
    return mean.float(), _leading_directions(covariance, bits)


def _leading_directions(covariance: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 (D, bits): the leading eigenvectors of a symmetric (D, D) matrix by decreasing
    eigenvalue, each signed so that its largest-magnitude entry is positive."""
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    projection = vectors[:, -bits:].flip(1)
    peak = projection.gather(0, projection.abs().argmax(0, keepdim=True))
    return (projection * torch.where(peak < 0, -1.0, 1.0).to(projection)).float()


def pca_values(source: torch.Tensor, mean: torch.Tensor, projection: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """float32 (B, bits) values whose signs are the codes: ``(pca_rows(source, power) - mean) @ projection``."""
    return (pca_rows(source, power) - mean) @ projection


def pca_codes(source: torch.Tensor, mean: torch.Tensor, projection: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """±1 codes float (B, bits) of float (B, D) ``source`` rows: the sign of `pca_values`, 0 ↦ +1."""
    return sign(pca_values(source, mean, projection, power).to(source.dtype))


def random_rotation(bits: int, seed: int = 0) -> torch.Tensor:
    """A random orthogonal float32 (bits, bits) matrix: Q of the QR decomposition of a standard
    normal matrix drawn on the CPU from ``torch.Generator().manual_seed(seed)``, columns signed so
    that R's diagonal is positive (Haar-distributed)."""
    gaussian = torch.randn(bits, bits, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)).float()


def itq_rotation(v: torch.Tensor, rotation: torch.Tensor, n_iter: int = 50) -> torch.Tensor:
    """ITQ's rotation of projected rows: ``n_iter`` alternations from ``rotation``.

    Each step sets ``B = sign(V R)`` (0 ↦ +1), then ``R = Ŝ Sᵀ`` from the SVD ``Bᵀ V = S Σ Ŝᵀ``
    (the orthogonal R that minimises ``||B − V R||_F`` for that B), in float64.

    Args:
        v: float (N, bits): the centred, projected rows.
        rotation: float (bits, bits), orthogonal: the start (e.g. `random_rotation`).
        n_iter: alternations, >= 0 (Gong & Lazebnik use 50).

    Returns:
        float32 (bits, bits), orthogonal.
    """
    if v.ndim != 2 or tuple(rotation.shape) != (v.shape[1], v.shape[1]):
        raise ValueError(f"ITQ needs rows (N, bits) and a rotation (bits, bits), got {tuple(v.shape)} and {tuple(rotation.shape)}")
    v = v.double()
    r = rotation.to(v)
    for _ in range(n_iter):
        b = sign(v @ r)
        u, _, vh = torch.linalg.svd(b.T @ v)
        r = vh.T @ u.T
    return r.float()


#: The linear hashes `fit_linear_hash` fits: codes ``sign((x - mean) @ projection)``.
LINEAR_HASHES = ("simhash", "pca", "itq")


def fit_linear_hash(rows: torch.Tensor, bits: int, method: str, seed: int = 0,
                    n_iter: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """A label-free linear hash of raw rows (no normalisation): the baselines of unsupervised hashing.

    ``"simhash"`` (Charikar): random Gaussian hyperplanes through the rows' mean, drawn on the CPU
    from ``torch.Generator().manual_seed(seed)``; ``"pca"`` (PCAH): the leading principal
    directions; ``"itq"`` (Gong & Lazebnik): those directions rotated by `itq_rotation` (``n_iter``
    steps from ``random_rotation(bits, seed)``). Encode with `linear_hash_codes`.

    Args:
        rows: float (N, D), N >= 2.
        bits: code length, 1 <= bits <= D.
        method: one of `LINEAR_HASHES`.

    Returns:
        ``(mean, projection)``: float32 (D,) and float32 (D, bits).
    """
    if method not in LINEAR_HASHES:
        raise ValueError(f"linear hash must be one of {LINEAR_HASHES}, got {method!r}")
    if rows.ndim != 2 or len(rows) < 2 or not 1 <= bits <= rows.shape[1]:
        raise ValueError(f"a linear hash needs rows (N >= 2, D) and 1 <= bits <= D, got {tuple(rows.shape)} and {bits}")
    x = rows.detach()
    chunks = x.split(4096)  # float32 products per chunk, their sums in float64: no float64 copy of the rows
    mean = sum(c.double().sum(0) for c in chunks) / len(x)
    if method == "simhash":
        gaussian = torch.randn(rows.shape[1], bits, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return mean.float(), gaussian.float()
    outer = sum((c.float().T @ c.float()).double() for c in chunks)
    projection = _leading_directions((outer - len(x) * torch.outer(mean, mean)) / (len(x) - 1), bits)
    if method == "itq":
        v = torch.cat([(c.float() - mean.float()) @ projection for c in chunks])
        projection = projection @ itq_rotation(v, random_rotation(bits, seed), n_iter)
    return mean.float(), projection


def linear_hash_codes(rows: torch.Tensor, mean: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """±1 codes float32 (N, bits) of float (N, D) rows: ``sign((rows - mean) @ projection)``, 0 ↦ +1."""
    return sign((rows.float() - mean) @ projection)


@torch.no_grad()
def fit_pca_codes(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 1024, seed: int = 0,
                  n_iter: int = 50) -> None:
    """Fit a ``"pca"`` or ``"itq"`` model's projection on uint8 images (N, C, H, W), in place.

    The model runs in eval mode on its own device; its code source (``model.code_source_vectors``)
    of every image enters :func:`pca_projection` with ``bits = model.bits`` and ``power = model.code_power``.
    Under ``"itq"`` a second pass projects the rows and :func:`itq_rotation` (``n_iter`` steps from
    ``random_rotation(bits, seed)``) rotates the projection.

    Raises:
        DeephashError: fewer than two images, or more bits than the code source has values.
    """
    model.eval()
    device = next(model.parameters()).device

    def rows():
        return (model.code_source_vectors(images[i:i + batch_size].to(device).float().div_(255))
                for i in range(0, len(images), batch_size))

    try:
        mean, projection = pca_projection(rows(), model.bits, model.code_power)
    except ValueError as error:  # a config the data cannot fit: the user's to change, in one line
        raise DeephashError(f"cannot fit the {model.code_rule!r} code rule of model.code_source "
                            f"{getattr(model, 'code_source', 'features')!r}: {error}") from None
    if model.code_rule == "itq":
        v = torch.cat([(pca_rows(r, model.code_power) - mean) @ projection for r in rows()])
        projection = projection @ itq_rotation(v, random_rotation(model.bits, seed), n_iter).to(projection)
    model.set_code_projection(mean, projection)
