"""Shared pieces of the issue-16 research scripts: splits, perturbations, baselines, evaluation.

Protocols (48 bits, Fashion-MNIST, tie-aware for codes):
  * open set: train on the train images of the seen classes {0, 2, 4, 6, 8}; queries = test images
    of the unseen classes {1, 3, 5, 7, 9} (5,000), database = train images of the unseen classes
    (30,000); relevant = same label. mAP@all and kNN accuracy (k = 10) as deephash evaluates them.
  * closed set: queries = the 10,000 test images, database = the 60,000 train images.
  * near-duplicates: 500 train images (seeded), each perturbed; searched against all 60,000 train
    images; relevant = the original item only; tie-aware recall@1 / recall@10 of the original.

These are research scripts (issue 16); the library's own protocol plumbing is built elsewhere.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from deephash.data import load_dataset
from deephash.retrieval.codes import pack_codes
from deephash.retrieval.index import HashIndex
from deephash.retrieval.metrics import evaluate_codes, evaluate_embeddings, original_recall_at_k, original_recall_of_lists
from deephash.retrieval.search import DEFAULT_SHORTLIST, ranked_positions, search
from deephash.signs import sign

SEEN = (0, 2, 4, 6, 8)
UNSEEN = (1, 3, 5, 7, 9)


def load_fmnist() -> dict[str, torch.Tensor]:
    """Float32 (N, 1, 28, 28) images in [0, 1] and int64 labels of both splits."""
    tr, te = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    return {"xtr": tr.data.float().div_(255), "ytr": tr.targets, "xte": te.data.float().div_(255), "yte": te.targets}


def class_mask(y: torch.Tensor, classes: tuple[int, ...]) -> torch.Tensor:
    return torch.isin(y, torch.tensor(classes))


def open_split(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Training set = seen classes of train; queries = unseen test; database = unseen train."""
    s, u, uq = class_mask(d["ytr"], SEEN), class_mask(d["ytr"], UNSEEN), class_mask(d["yte"], UNSEEN)
    return {"xtrain": d["xtr"][s], "ytrain": d["ytr"][s], "xq": d["xte"][uq], "yq": d["yte"][uq], "xdb": d["xtr"][u], "ydb": d["ytr"][u]}


# ---------------------------------------------------------------- augmentation (training views)
def augment(x: torch.Tensor, g: torch.Generator, shift: int = 2, jitter: float = 0.2, noise: float = 0.05,
            erase: float = 0.0, scale: float = 0.0, flip: float = 0.0) -> torch.Tensor:
    """Batched random view of float (B, 1, H, W) images in [0, 1].

    A random translation by up to ``shift`` pixels (zero fill), an optional random rescale by a
    factor in [1 - scale, 1 + scale] (bilinear), a contrast factor in [1 - jitter, 1 + jitter] and
    brightness offset in [-jitter/2, jitter/2], Gaussian noise with a std drawn in [0, noise], and
    with probability ``erase`` one random rectangle (4..10 px a side) set to 0.
    """
    b, c, h, w = x.shape
    if flip > 0:
        x = torch.where((torch.rand(b, 1, 1, 1, generator=g) < flip), x.flip(-1), x)
    if scale > 0 or shift > 0:
        s = 1 + (torch.rand(b, generator=g) * 2 - 1) * scale if scale > 0 else torch.ones(b)
        t = (torch.randint(-shift, shift + 1, (b, 2), generator=g).float() * 2 / w) if shift > 0 else torch.zeros(b, 2)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = 1 / s
        theta[:, 1, 1] = 1 / s
        theta[:, :, 2] = t
        grid = F.affine_grid(theta, (b, c, h, w), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if jitter > 0:
        con = 1 + (torch.rand(b, 1, 1, 1, generator=g) * 2 - 1) * jitter
        bri = (torch.rand(b, 1, 1, 1, generator=g) - 0.5) * jitter
        x = x * con + bri
    if noise > 0:
        x = x + torch.randn(x.shape, generator=g) * (torch.rand(b, 1, 1, 1, generator=g) * noise)
    if erase > 0:
        hh = torch.randint(4, 11, (b, 1, 1), generator=g)
        ww = torch.randint(4, 11, (b, 1, 1), generator=g)
        y0 = (torch.rand(b, 1, 1, generator=g) * (h - hh + 1)).long()
        x0 = (torch.rand(b, 1, 1, generator=g) * (w - ww + 1)).long()
        rows = torch.arange(h).view(1, h, 1)
        cols = torch.arange(w).view(1, 1, w)
        box = (rows >= y0) & (rows < y0 + hh) & (cols >= x0) & (cols < x0 + ww)
        box &= (torch.rand(b, 1, 1, generator=g) < erase)
        x = x.masked_fill(box[:, None], 0.0)
    return x.clamp(0, 1)


# ---------------------------------------------------------------- near-duplicate perturbations
_JPEG_Q = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=torch.float32)


def _dct_matrix(n: int = 8) -> torch.Tensor:
    k = torch.arange(n).float()
    m = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m


def jpeg_like(x: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """Baseline-JPEG luminance loss on float (B, 1, H, W) in [0, 1]: 8x8 block DCT quantised with the
    standard table at ``quality`` (IJG scaling), then 8-bit rounding. (No entropy coding: lossless.)"""
    b, c, h, w = x.shape
    ph, pw = (-h) % 8, (-w) % 8
    y = F.pad(x * 255 - 128, (0, pw, 0, ph), mode="replicate")
    H, W = y.shape[-2:]
    blocks = y.reshape(b, c, H // 8, 8, W // 8, 8).permute(0, 1, 2, 4, 3, 5)
    d = _dct_matrix()
    coef = d @ blocks @ d.T
    s = 5000 / quality if quality < 50 else 200 - 2 * quality
    q = ((_JPEG_Q * s + 50) // 100).clamp(min=1)
    coef = torch.round(coef / q) * q
    out = (d.T @ coef @ d).permute(0, 1, 2, 4, 3, 5).reshape(b, c, H, W)[..., :h, :w]
    return (torch.round(out + 128).clamp(0, 255)) / 255


PERTURBATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {}


def _perturbation(name: str) -> Callable:
    def deco(fn: Callable) -> Callable:
        PERTURBATIONS[name] = fn
        return fn
    return deco


def _shift(x: torch.Tensor, g: torch.Generator, max_shift: int) -> torch.Tensor:
    b = x.shape[0]
    out = torch.zeros_like(x)
    d = torch.randint(-max_shift, max_shift + 1, (b, 2), generator=g)
    for i in range(b):  # 500 items, evaluation only
        dy, dx = int(d[i, 0]), int(d[i, 1])
        out[i] = torch.roll(x[i], (dy, dx), (-2, -1))
        if dy > 0: out[i, :, :dy] = 0
        if dy < 0: out[i, :, dy:] = 0
        if dx > 0: out[i, :, :, :dx] = 0
        if dx < 0: out[i, :, :, dx:] = 0
    return out


def _bc(x: torch.Tensor, g: torch.Generator, b_: float, c_: float) -> torch.Tensor:
    b = x.shape[0]
    con = 1 + (torch.rand(b, 1, 1, 1, generator=g) * 2 - 1) * c_
    bri = (torch.rand(b, 1, 1, 1, generator=g) * 2 - 1) * b_
    return x * con + bri


@_perturbation("shift1-bright-noise")  # the issue's own measurement: shift <= 1 px, small brightness change, noise
def _p1(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    x = _bc(_shift(x, g, 1), g, 0.05, 0.0)
    return (x + torch.randn(x.shape, generator=g) * 0.02).clamp(0, 1)


@_perturbation("shift2-bc-noise")  # shift <= 2 px, brightness +-0.1, contrast x[0.8, 1.2], noise 0.04
def _p2(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    x = _bc(_shift(x, g, 2), g, 0.1, 0.2)
    return (x + torch.randn(x.shape, generator=g) * 0.04).clamp(0, 1)


@_perturbation("crop-resize-jpeg")  # a random 26x26 crop resized back to 28x28, then JPEG-like q=60
def _p3(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    out = torch.empty_like(x)
    off = torch.randint(0, 3, (b, 2), generator=g)
    for i in range(b):
        y0, x0 = int(off[i, 0]), int(off[i, 1])
        out[i] = F.interpolate(x[i:i + 1, :, y0:y0 + 26, x0:x0 + 26], size=(28, 28), mode="bilinear", align_corners=False)[0]
    return jpeg_like(out.clamp(0, 1), 60)


@_perturbation("mixed")  # a random choice per item among the others, plus JPEG-like q=75 on half
def _p4(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    outs = torch.stack([_p1(x, g), _p2(x, g), _p3(x, g)])
    pick = torch.randint(0, 3, (x.shape[0],), generator=g)
    y = outs[pick, torch.arange(x.shape[0])]
    jp = torch.rand(x.shape[0], generator=g) < 0.5
    y[jp] = jpeg_like(y[jp], 75)
    return y


def near_dup_queries(xtr: torch.Tensor, n: int = 500, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``n`` seeded train indices and their perturbed copies under every perturbation."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(xtr), generator=g)[:n]
    return idx, {name: fn(xtr[idx], torch.Generator().manual_seed(seed + 1 + j)) for j, (name, fn) in enumerate(PERTURBATIONS.items())}


def near_dup_recall_codes(q_codes: np.ndarray, db_codes: np.ndarray, idx: torch.Tensor, bits: int) -> tuple[float, float]:
    """Tie-aware recall@1 / @10 of the original item (the library's ``original_recall_at_k``)."""
    r = original_recall_at_k(q_codes, db_codes, idx.numpy(), [1, 10], bits=bits)["tie-aware"]
    return float(r[0]), float(r[1])


def near_dup_recall_real(q: torch.Tensor, db: torch.Tensor, idx: torch.Tensor, ks=(1, 10)) -> tuple[float, ...]:
    """Recall@k of the original under Euclidean ranking of float vectors (``original_recall_at_k``)."""
    r = original_recall_at_k(q.float().numpy(), db.float().numpy(), idx.numpy(), list(ks))["stable"]
    return tuple(float(v) for v in r)


def near_dup_recall_rerank(q_codes: np.ndarray, db_codes: np.ndarray, q_vec: torch.Tensor, db_vec: torch.Tensor,
                           idx: torch.Tensor, bits: int, shortlist: int = DEFAULT_SHORTLIST) -> tuple[float, float]:
    """The library's two-stage search (``retrieval.search``: the ``shortlist`` nearest codes and
    every item tied with the last, ranked by the re-rank vectors); recall@1 / @10 of the original
    (``original_recall_of_lists``; the original counts only if shortlisted)."""
    index = HashIndex(bits)
    index.add(db_codes, rerank=db_vec.float().numpy())
    found = search(index, q_codes, 10, rerank=q_vec.float().numpy(), shortlist=shortlist)
    r = original_recall_of_lists(ranked_positions(found, 10), idx.numpy(), len(db_codes), [1, 10])
    return float(r[0]), float(r[1])


# ---------------------------------------------------------------- baselines and evaluation
def pca_hash(fit_x: torch.Tensor, bits: int = 48) -> Callable[[torch.Tensor], np.ndarray]:
    """Sign of the top-``bits`` PCA projections, fitted (mean and axes) on ``fit_x``; returns an encoder."""
    flat = fit_x.reshape(len(fit_x), -1).double()
    mean = flat.mean(0)
    _, _, v = torch.linalg.svd(flat - mean, full_matrices=False)
    axes = v[:bits].T

    def encode(x: torch.Tensor) -> np.ndarray:
        return pack_codes((x.reshape(len(x), -1).double() - mean) @ axes)

    return encode


def itq_rotation(v: torch.Tensor, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """ITQ (Gong & Lazebnik 2011): the orthogonal R (D, D) minimising ||sign(V R) - V R||_F for
    centred float (N, D) ``v``, by alternating sign and orthogonal Procrustes steps."""
    v = v.double()
    g = torch.Generator().manual_seed(seed)
    r, _ = torch.linalg.qr(torch.randn(v.shape[1], v.shape[1], generator=g, dtype=torch.float64))
    for _ in range(iters):
        b = sign(v @ r).double()
        u, _, wt = torch.linalg.svd(v.T @ b)
        r = u @ wt
    return r


def eval_open_codes(q_codes: np.ndarray, yq: torch.Tensor, db_codes: np.ndarray, ydb: torch.Tensor, bits: int = 48) -> dict[str, float]:
    r = evaluate_codes(q_codes, yq.numpy(), db_codes, ydb.numpy(), bits, ks=(100,), knn_k=10)
    return {"mAP@all": r["mAP@all/tie-aware"], "kNN": r["kNN-acc@10"], "mAP@100": r["mAP@100/tie-aware"], "P@r<=2": r["P@r<=2"]}


def eval_open_real(q: torch.Tensor, yq: torch.Tensor, db: torch.Tensor, ydb: torch.Tensor) -> dict[str, float]:
    r = evaluate_embeddings(q.numpy(), yq.numpy(), db.numpy(), ydb.numpy(), ks=(100,), knn_k=10)
    return {"mAP@all": r["mAP@all"], "kNN": r["kNN-acc@10"], "mAP@100": r["mAP@100"]}


class Timer:
    def __init__(self) -> None:
        self.t = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t


def to_jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x
