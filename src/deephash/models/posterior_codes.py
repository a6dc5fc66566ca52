"""Codes from a class posterior: a point on the Hamming path between the two likeliest centers.

For class probabilities p = softmax(logits / T) with the likeliest class a and the runner-up b,
and ±1 hash centers c_a, c_b differing in the bit set D (|D| = Hamming distance of the centers),
the code is c_a with the first m bits of D (in bit order) taken from c_b, where
m = round(p_b / (p_a + p_b) · |D|) ≤ |D| / 2. So:

* a confident image (p_b ≈ 0) gets its class's center exactly;
* an ambiguous one lies m bits from c_a and |D| − m from c_b: a Hamming ranking returns class a's
  images first and class b's next, instead of whichever class happens to have the nearest center.

The database is the training set, whose images are classified confidently, so the database codes
sit on their centers; it is the misclassified queries whose average precision this raises.
"""

from __future__ import annotations

import torch

__all__ = ["posterior_path_codes"]


def posterior_path_codes(logits: torch.Tensor, centers: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """±1 codes on the path from the likeliest class's center towards the runner-up's.

    Args:
        logits: float (B, K) class scores, K >= 2.
        centers: float (K, bits) ±1 hash centers, one per class.
        temperature: softmax temperature T > 0 applied to ``logits``.

    Returns:
        float (B, bits) codes in {−1, +1}.
    """
    if logits.dim() != 2 or centers.dim() != 2 or logits.shape[1] != centers.shape[0] or logits.shape[1] < 2:
        raise ValueError(
            f"posterior codes need logits (B, K) and centers (K, bits) with K >= 2, got "
            f"{tuple(logits.shape)} and {tuple(centers.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    top = torch.softmax(logits.float() / temperature, dim=1).topk(2, dim=1)
    first, second = centers[top.indices[:, 0]], centers[top.indices[:, 1]]
    share = top.values[:, 1] / top.values.sum(1)  # in [0, 1/2]
    differ = first != second  # (B, bits)
    n_taken = torch.round(share * differ.sum(1))
    taken = differ & (differ.long().cumsum(1) <= n_taken[:, None])  # a count in int64: ONNX's CumSum takes no bools
    return torch.where(taken, second, first)
