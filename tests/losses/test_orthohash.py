"""OrthoHashLoss against a direct per-sample re-computation, and its ranking property."""

import math

import pytest
import torch

from deephash.losses import create_loss
from deephash.losses.orthohash import OrthoHashLoss


def reference(u, labels, centers, scale, margin, qweight):
    bits = u.shape[1]
    total = 0.0
    for i in range(len(u)):
        norm = math.sqrt(sum(float(x) ** 2 for x in u[i]))
        logits = []
        for k in range(len(centers)):
            cos = sum(float(u[i, j]) * float(centers[k, j]) for j in range(bits)) / (norm * math.sqrt(bits))
            logits.append(scale * (cos - (margin if k == int(labels[i]) else 0.0)))
        top = max(logits)
        lse = top + math.log(sum(math.exp(v - top) for v in logits))
        total += lse - logits[int(labels[i])]
    loss = total / len(u)
    if qweight:
        loss += qweight * sum((abs(float(x)) - 1) ** 2 for x in u.flatten()) / u.numel()
    return loss


@pytest.mark.parametrize("bits,qweight", [(16, 0.0), (12, 0.5)])
def test_matches_direct_computation_and_gradcheck(bits, qweight):
    g = torch.Generator().manual_seed(3)
    u = (torch.rand(7, bits, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    labels = torch.randint(0, 4, (7,), generator=g)
    loss_fn = OrthoHashLoss(bits, 4, scale=6.0, margin=0.3, quantization_weight=qweight).double()
    value = loss_fn(u, labels)
    assert value.item() == pytest.approx(reference(u.detach(), labels, loss_fn.centers, 6.0, 0.3, qweight), abs=1e-9)
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, labels), (u,))


def test_cosine_to_binary_codes_ranks_centers_by_hamming_distance():
    loss_fn = OrthoHashLoss(48, 10)
    b = torch.where(torch.randn(5, 48, generator=torch.Generator().manual_seed(0)) >= 0, 1.0, -1.0)
    cos = loss_fn.logits(b)
    hamming = (b[:, None, :] != loss_fn.centers[None]).sum(-1).float()
    assert torch.allclose(cos, 1 - 2 * hamming / 48, atol=1e-6)


def test_registered_and_finite_on_saturated_half_codes():
    loss_fn = create_loss("orthohash", bits=32, n_classes=10)
    u = torch.ones(6, 32, dtype=torch.float16, requires_grad=True)
    loss = loss_fn(u, torch.arange(6))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(u.grad).all()


def test_wrong_code_length_is_a_clear_error():
    with pytest.raises(ValueError, match="48-bit"):
        OrthoHashLoss(48, 10)(torch.zeros(2, 32), torch.zeros(2, dtype=torch.int64))
