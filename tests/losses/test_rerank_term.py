"""The re-rank head's instance term: the inner loss plus NT-Xent over the views, against
pytorch-metric-learning's NTXentLoss and a hand-made inner loss."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import losses as pml

from deephash.errors import DeephashError
from deephash.losses import RerankInstanceLoss
from deephash.losses.aux import AuxClassificationLoss
from deephash.losses.contrastive import view_ids


class _Recorder(torch.nn.Module):
    """An inner loss that records its arguments and returns their sum."""

    num_selected = 7

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.seen = inputs
        return sum(t.float().sum() for t in inputs[:-1])


def _views(b: int = 6, d: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, d, generator=g)
    return torch.cat([a + 0.3 * torch.randn(b, d, generator=g), a + 0.3 * torch.randn(b, d, generator=g)])


@pytest.mark.parametrize("weight,temperature", [(1.0, 0.2), (0.3, 0.5)])
def test_adds_the_weighted_ntxent_of_z_and_passes_the_rest_to_the_inner_loss(weight, temperature):
    u, logits, z = torch.randn(12, 16), torch.randn(12, 3), _views()
    labels = torch.arange(6).repeat(2) % 3
    inner = _Recorder()
    loss = RerankInstanceLoss(inner, weight, temperature, n_views=2)(u, logits, z, labels)
    ntxent = pml.NTXentLoss(temperature=temperature)(z, view_ids(6, 2)).item()
    assert loss.item() == pytest.approx(u.sum().item() + logits.sum().item() + weight * ntxent, rel=1e-5)
    assert [t is s for t, s in zip(inner.seen, (u, logits, labels))] == [True, True, True]
    assert RerankInstanceLoss(inner, weight).num_selected == 7


def test_gradient_reaches_the_vectors_and_the_codes_through_the_aux_loss():
    u = torch.randn(12, 16, requires_grad=True)
    logits = torch.randn(12, 3, requires_grad=True)
    z = _views().requires_grad_()
    labels = torch.arange(6).repeat(2) % 3
    inner = AuxClassificationLoss(lambda codes, y: codes.pow(2).mean(), weight=0.5)
    RerankInstanceLoss(inner, 1.0)(u, logits, z, labels).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (u, logits, z))


def test_refuses_bad_settings_and_rows_that_are_not_views():
    with pytest.raises(DeephashError, match="n_views >= 2"):
        RerankInstanceLoss(_Recorder(), 1.0, n_views=1)
    with pytest.raises(DeephashError, match="weight > 0 and temperature > 0"):
        RerankInstanceLoss(_Recorder(), 0.0)
    with pytest.raises(DeephashError, match="weight > 0 and temperature > 0"):
        RerankInstanceLoss(_Recorder(), 1.0, temperature=0.0)
    with pytest.raises(DeephashError, match="11 rows are not 2 views"):
        RerankInstanceLoss(_Recorder(), 1.0)(torch.randn(11, 4), torch.randn(11, 4), torch.zeros(11, dtype=torch.long))
