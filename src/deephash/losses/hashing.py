"""Deep hashing losses on relaxed codes u in (-1, 1): DTSH, DSH, CSQ, and regularisers.

Every loss is called as ``loss(u, labels)`` with ``u`` float (B, bits) relaxed codes (e.g. tanh
outputs) and ``labels`` int64 (B,), and returns a scalar tensor (float32 for float16/bfloat16
``u``, which is upcast so that margins and saturated codes stay finite). Loss weights are plain
attributes (``quantization_weight``) so that schedules (`deephash.losses.schedules`) can change them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deephash.errors import CodeLengthError, DeephashError
from deephash.losses.metric import upcast_half
from deephash.losses.margins import dtsh_alpha, selector_margin
from deephash.losses.registry import register_loss
from deephash.signs import sign

__all__ = [
    "DTSHLoss",
    "DSHLoss",
    "CSQLoss",
    "hash_centers",
    "hadamard",
    "default_min_distance",
    "bit_balance_loss",
    "quantization_loss",
    "BitBalanceLoss",
    "QuantizationLoss",
]


def quantization_loss(u: torch.Tensor) -> torch.Tensor:
    """mean over all B·bits entries of (|u| − 1)²; equals mean((sign(u) − u)²) for |u| ≤ 1."""
    return (u.abs() - 1).pow(2).mean()


def bit_balance_loss(u: torch.Tensor) -> torch.Tensor:
    """mean over bits of (mean over the batch of u)²: 0 when every bit is +1 on half the batch."""
    return u.mean(dim=0).pow(2).mean()


class QuantizationLoss(nn.Module):
    """``weight · quantization_loss(u)``; ``labels`` are ignored."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, u: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.weight * quantization_loss(u)


class BitBalanceLoss(nn.Module):
    """``weight · bit_balance_loss(u)``; ``labels`` are ignored."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, u: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.weight * bit_balance_loss(u)


def _check_bits(u: torch.Tensor, bits: int | None) -> None:
    if u.ndim != 2:
        raise CodeLengthError(f"relaxed codes must be (B, bits), got shape {tuple(u.shape)}")
    if bits is not None and u.shape[1] != bits:
        raise CodeLengthError(f"the loss expects {bits}-bit codes, got {u.shape[1]} bits")


@register_loss("dtsh")
class DTSHLoss(nn.Module):
    """Deep supervised hashing with triplet labels (Wang, Shi & Kitani, ACCV 2016).

    With θ_ij = ½·u_iᵀu_j and triplets (a, p, n) chosen by ``triplet_selector`` on the
    relaxed codes, the loss is

        mean over triplets of softplus(−(θ_ap − θ_an − α))
        + quantization_weight · mean over samples of ‖b_i − u_i‖²,   b = sign(u) (no gradient),

    where softplus(−x) = −x + log(1 + e^x) is the triplet negative log-likelihood, computed
    without overflow at any scale. A batch without triplets gives the quantization term alone.

    Args:
        triplet_selector: object with ``get_triplets(embeddings (B,D), labels (B,)) -> int64 (N,3)``,
            or a selector name for `deephash.mining.create_selector` (e.g. "all", "batch-hard");
            a named selector that takes a margin (``hardest``, ``random``, ``semihard``) gets α
            converted to squared-distance units, 4α (`deephash.losses.margins`), unless
            ``selector_params`` gives one.
        alpha: Margin α in inner-product units. None (default) means bits/4, resolved at each call
            from u's width (from ``bits`` when given). DeepHash-pytorch's DTSH uses a fixed α = 5; we could not confirm the
            paper's own setting, so bits/4 is our choice (α ≤ bits/2 keeps it reachable:
            θ_ap − θ_an ranges over [−bits, bits]).
        quantization_weight: λ.
        selector_params: keyword parameters for the selector when ``triplet_selector`` is a name.
        bits: the code length, when known when the loss is built (a config fills it in): α's
            default and the named selector's margin come from it, and inputs must be that wide.

    Attributes:
        num_selected: number of triplets used in the last call (int).
    """

    def __init__(
        self,
        triplet_selector: Any = "all",
        alpha: float | None = None,
        quantization_weight: float = 1.0,
        selector_params: Mapping[str, Any] | None = None,
        bits: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(triplet_selector, str):
            from deephash.mining import create_selector

            margin = selector_margin("dtsh", {"alpha": alpha, "bits": bits})
            triplet_selector = create_selector(triplet_selector, default_margin=margin, **dict(selector_params or {}))
        self.triplet_selector = triplet_selector
        self.bits = bits
        self.alpha = alpha
        self.quantization_weight = quantization_weight
        self.num_selected: int = 0

    def margin(self, bits: int) -> float:
        """α for codes of ``bits`` bits."""
        return dtsh_alpha(self.alpha, bits)

    def forward(
        self,
        u: torch.Tensor,
        labels: torch.Tensor,
        memory: torch.Tensor | None = None,
        memory_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``u`` float (B, bits), ``labels`` int64 (B,) -> scalar.

        With ``memory`` float (M, bits) relaxed codes and ``memory_labels`` int64 (M,) (e.g. from
        `deephash.losses.CrossBatchMemory`): triplets are mined from the batch's anchors to
        batch ∪ memory (see `deephash.mining.triplets`), θ is read against the columns
        ``cat(u, memory.detach())``, and the quantization term stays the batch's own."""
        _check_bits(u, self.bits)
        u = upcast_half(u)
        columns = u
        if memory is None:
            triplets = self.triplet_selector.get_triplets(u.detach(), labels)
        else:
            if memory_labels is None or memory.shape[1:] != u.shape[1:] or memory_labels.shape != memory.shape[:1]:
                raise CodeLengthError(
                    f"the memory must be (M, {u.shape[1]}) codes with labels (M,), got "
                    f"{tuple(memory.shape)} and {None if memory_labels is None else tuple(memory_labels.shape)}"
                )
            memory = memory.detach().to(u.device, u.dtype)
            triplets = self.triplet_selector.get_triplets(u.detach(), labels, memory, memory_labels)
            columns = torch.cat((u, memory))
        self.num_selected = int(triplets.shape[0])
        quant = (u - sign(u)).pow(2).sum(dim=1).mean()
        if self.num_selected == 0:
            return u.sum() * 0 + self.quantization_weight * quant
        a, p, n = triplets.unbind(dim=1)
        theta_ap = 0.5 * (u[a] * columns[p]).sum(dim=1)
        theta_an = 0.5 * (u[a] * columns[n]).sum(dim=1)
        x = theta_ap - theta_an - self.margin(u.shape[1])
        return F.softplus(-x).mean() + self.quantization_weight * quant


@register_loss("dsh")
class DSHLoss(nn.Module):
    """Deep supervised hashing, pairwise (Liu, Wang, Shan & Chen, CVPR 2016).

    Over all pairs i < j of the batch, with D_ij = ‖u_i − u_j‖² and s_ij = 1 for the same label:

        mean over pairs of ½·s_ij·D_ij + ½·(1 − s_ij)·relu(m − D_ij)
        + α · mean over samples of ‖|u_i| − 1‖₁.

    The pair term is divided by the number of pairs B(B−1)/2 (the paper sums); a batch of one
    sample gives the regulariser alone.

    Args:
        bits: Code length.
        margin: m in squared-distance units; None means 2·bits (the paper's choice).
        alpha: Weight α of the regulariser; also readable/settable as ``quantization_weight``.

    Attributes:
        num_selected: number of pairs used in the last call (int).
    """

    def __init__(self, bits: int, margin: float | None = None, alpha: float = 0.01) -> None:
        super().__init__()
        self.bits = bits
        self.margin = 2.0 * bits if margin is None else float(margin)
        self.alpha = alpha
        self.num_selected: int = 0

    @property
    def quantization_weight(self) -> float:
        """Alias of ``alpha`` (the schedules' name for it)."""
        return self.alpha

    @quantization_weight.setter
    def quantization_weight(self, value: float) -> None:
        self.alpha = value

    def forward(self, u: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``u`` float (B, bits), ``labels`` int64 (B,) -> scalar."""
        _check_bits(u, self.bits)
        u = upcast_half(u)
        b = u.shape[0]
        reg = (u.abs() - 1).abs().sum(dim=1).mean()
        self.num_selected = b * (b - 1) // 2
        if self.num_selected == 0:
            return u.sum() * 0 + self.alpha * reg
        sq = u.pow(2).sum(dim=1)
        dist = (sq[:, None] + sq[None, :] - 2 * u @ u.T).clamp_min(0)
        same = (labels[:, None] == labels[None, :]).to(u.dtype)
        terms = 0.5 * same * dist + 0.5 * (1 - same) * F.relu(self.margin - dist)
        upper = torch.ones(b, b, dtype=torch.bool, device=u.device).triu(diagonal=1)
        return terms[upper].mean() + self.alpha * reg


def hadamard(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix: float (n, n) with entries ±1, rows orthogonal; n a power of two."""
    if n < 1 or n & (n - 1):
        raise DeephashError(f"a Sylvester Hadamard matrix needs a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), dim=1), torch.cat((h, -h), dim=1)), dim=0)
    return h


def default_min_distance(bits: int) -> int:
    """The pairwise Hamming distance `hash_centers` guarantees by default for random centers:
    max(1, floor(bits/2 − sqrt(bits))), i.e. two standard deviations below the mean bits/2 of two
    random codes (e.g. 17 at 48 bits, 2 at 12 bits)."""
    return max(1, math.floor(bits / 2 - math.sqrt(bits)))


def hash_centers(
    n_classes: int,
    bits: int,
    seed: int | torch.Generator = 0,
    min_distance: int | None = None,
    max_tries: int = 10_000,
) -> torch.Tensor:
    """One ±1 hash center per class, pairwise far apart in Hamming distance.

    * bits a power of two and n_classes ≤ 2·bits (and min_distance, if given, ≤ bits/2): the
      first n_classes rows of [H; −H], H the Sylvester Hadamard matrix (as in CSQ). Any two
      differ in exactly bits/2 bits, except a row and its negation, which differ in all bits.
    * otherwise: centers drawn uniformly at random, one class after another, each candidate kept
      only if it differs from every kept center in at least ``min_distance`` bits (default
      `default_min_distance(bits)`).

    Guarantee: every pair of returned centers differs in at least ``min_distance`` bits
    (bits/2 for Hadamard centers); this is verified before returning.

    Args:
        n_classes: Number of centers K.
        bits: Code length.
        seed: Seed or torch.Generator for the random method.
        min_distance: Required minimum pairwise Hamming distance.
        max_tries: Random candidates drawn at most, over all classes.

    Returns:
        float32 (K, bits) with entries ±1.

    Raises:
        DeephashError: the random method cannot reach ``min_distance`` within ``max_tries``.
    """
    if n_classes < 1 or bits < 1:
        raise DeephashError(f"hash_centers needs n_classes >= 1 and bits >= 1, got {n_classes}, {bits}")
    power_of_two = bits & (bits - 1) == 0
    if power_of_two and n_classes <= 2 * bits and (min_distance is None or min_distance <= bits // 2):
        h = hadamard(bits)
        centers = torch.cat((h, -h))[:n_classes]
        required = bits // 2 if n_classes > 1 else 0
    else:
        required = default_min_distance(bits) if min_distance is None else int(min_distance)
        centers = _random_centers(n_classes, bits, seed, required, max_tries)
    if n_classes > 1:
        dist = (bits - centers @ centers.T) / 2  # Hamming distance of ±1 codes
        dist.fill_diagonal_(bits)
        if float(dist.min()) < required:
            raise DeephashError(f"hash centers fail their minimum distance {required}")  # never expected
    return centers


def _random_centers(
    n_classes: int, bits: int, seed: int | torch.Generator, min_distance: int, max_tries: int
) -> torch.Tensor:
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    chunk = 256
    candidates = torch.randint(0, 2, (max_tries, bits), generator=generator).float() * 2 - 1
    kept = torch.empty(0, bits)
    used = 0
    while len(kept) < n_classes and used < max_tries:
        block = candidates[used : used + chunk]
        ok = torch.ones(len(block), dtype=torch.bool)
        if len(kept):
            ok = ((bits - block @ kept.T) / 2 >= min_distance).all(dim=1)
        hits = ok.nonzero().flatten()
        if len(hits) == 0:
            used += len(block)
            continue
        first = int(hits[0])
        kept = torch.cat((kept, block[first : first + 1]))
        used += first + 1
    if len(kept) < n_classes:
        raise DeephashError(
            f"cannot draw {n_classes} hash centers of {bits} bits at pairwise distance >= {min_distance} "
            f"in {max_tries} tries; lower min_distance or use more bits"
        )
    return kept


_CSQ_EPS = 1e-6


@register_loss("csq")
class CSQLoss(nn.Module):
    """Central similarity quantization (Yuan et al., CVPR 2020).

    Each class has a ±1 hash center c (`hash_centers`); with p = (u + 1)/2 and t = (c_y + 1)/2,

        loss = BCE(p, t) averaged over bits and batch + quantization_weight · mean((|u| − 1)²),

    as in DeepHash-pytorch's CSQ. BCE is written out on p clamped to [1e-6, 1 − 1e-6], so saturated
    codes u = ±1 keep a finite loss and gradient, and a NaN u gives a NaN loss (fit stops on it). Multi-label targets (B, K) multi-hot use the center
    sign(Σ of the label centers) with 0 ↦ +1. Items labelled -1 (no label, ``data.labelled_fraction``)
    take no part in the BCE term, which then averages over the labelled rows (0 in a batch without
    one); the quantization term takes every row.

    Args:
        bits: Code length.
        n_classes: Number of classes K.
        quantization_weight: λ (DeepHash-pytorch uses 1e-4).
        seed: Seed of the centers (used by the random method only).
        min_distance: Passed to `hash_centers`.

    Attributes:
        centers: float (K, bits) ±1 buffer (saved in the state dict).
    """

    centers: torch.Tensor
    partial_labels: ClassVar[bool] = True

    def __init__(
        self,
        bits: int,
        n_classes: int,
        quantization_weight: float = 1e-4,
        seed: int = 0,
        min_distance: int | None = None,
    ) -> None:
        super().__init__()
        self.bits = bits
        self.n_classes = n_classes
        self.quantization_weight = quantization_weight
        self.register_buffer("centers", hash_centers(n_classes, bits, seed=seed, min_distance=min_distance))

    def targets(self, labels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Center of each sample: float (B, bits) ±1, from int64 (B,) or multi-hot (B, K) labels."""
        centers = self.centers.to(dtype)
        if labels.ndim == 2:
            return sign(labels.to(dtype) @ centers)
        return centers[labels]

    def forward(self, u: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``u`` float (B, bits), ``labels`` int64 (B,) or multi-hot (B, K) -> scalar."""
        _check_bits(u, self.bits)
        u = upcast_half(u)
        labelled = labels >= 0 if labels.ndim == 1 else None
        target = (self.targets(labels if labelled is None else labels.clamp(min=0), u.dtype) + 1) / 2
        # p is kept 1e-6 away from 0 and 1: BCE's gradient 1/(p(1-p)) at a saturated wrong bit would
        # be ~1e12 (inf once cast back to a float16 u); tanh's own gradient is 0 there anyway.
        # BCE written out: F.binary_cross_entropy raises on NaN input, hiding divergence from fit.
        p = ((u + 1) / 2).clamp(_CSQ_EPS, 1 - _CSQ_EPS)
        bce = -(target * p.log() + (1 - target) * (1 - p).log())
        if labelled is None:
            center = bce.mean()
        else:  # a mean over the labelled rows, without a host sync
            center = (bce.mean(dim=1) * labelled).sum() / labelled.sum().clamp(min=1)
        return center + self.quantization_weight * quantization_loss(u)
