"""Mining in a training step reads nothing back to the host: every selector (and the online and
DTSH losses around them) runs with ``.item()``, ``int(tensor)``, ``float(tensor)``,
``bool(tensor)``, ``.tolist()``, ``.cpu()`` and ``.numpy()`` made to raise.

(The size of a variable-length output, ``nonzero`` or a boolean mask, is the one value that must
reach the host; torch does that in C++, which these patches do not see.)
"""

from __future__ import annotations

import pytest
import torch

from deephash.losses import DTSHLoss
from deephash.losses.online import online_contrastive, online_triplet
from deephash.mining import SELECTORS, create_selector
from deephash.mining.selectors import PairSelector

SYNCS = ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")


class HostSync(AssertionError):
    pass


@pytest.fixture
def no_host_sync(monkeypatch):
    """Within the test, every listed Tensor method raises HostSync."""
    def install():
        for name in SYNCS:
            def refuse(self, *args, _name=name, **kwargs):
                raise HostSync(f"Tensor.{_name} called in a training step")
            monkeypatch.setattr(torch.Tensor, name, refuse)
    return install


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(24, 6, generator=g)
    labels = torch.arange(4).repeat_interleave(6)
    memory, memory_labels = torch.randn(10, 6, generator=g), torch.randint(0, 4, (10,), generator=g)
    return embeddings, labels, memory, memory_labels


def test_the_patch_catches_a_sync(no_host_sync):
    no_host_sync()
    with pytest.raises(HostSync):
        torch.ones(2).sum().item()
    with pytest.raises(HostSync):
        int(torch.tensor(3))


@pytest.mark.parametrize("name", SELECTORS.names())
@pytest.mark.parametrize("with_memory", [False, True])
def test_every_selector_mines_without_a_host_sync(no_host_sync, name, with_memory):
    embeddings, labels, memory, memory_labels = _batch()
    selector = create_selector(name, default_margin=1.0, generator=torch.Generator().manual_seed(0))
    extra = (memory, memory_labels) if with_memory else ()
    mine = selector.get_pairs if isinstance(selector, PairSelector) else selector.get_triplets
    expected = mine(embeddings, labels, *extra)  # unpatched: the same draws from a fresh generator
    selector = create_selector(name, default_margin=1.0, generator=torch.Generator().manual_seed(0))
    mine = selector.get_pairs if isinstance(selector, PairSelector) else selector.get_triplets
    no_host_sync()
    got = mine(embeddings, labels, *extra)
    same = [torch.equal(a, b) for a, b in zip(got, expected)] if isinstance(got, tuple) else [torch.equal(got, expected)]
    assert all(same)  # and the selection is the one made without the patches


@pytest.mark.parametrize("make", [
    lambda: online_triplet(1.0, "semihard", {"generator": torch.Generator().manual_seed(0)}),
    lambda: online_triplet(1.0, "hardest"),
    lambda: online_triplet(1.0, "batch-hard"),
    lambda: online_contrastive(1.0, "hard-negative"),
    lambda: online_contrastive(1.0, "all-positive", {"generator": torch.Generator().manual_seed(0)}),
    lambda: DTSHLoss("semihard", bits=6, selector_params={"generator": torch.Generator().manual_seed(0)}),
    lambda: DTSHLoss("random", bits=6, selector_params={"generator": torch.Generator().manual_seed(0)}),
], ids=["triplet-semihard", "triplet-hardest", "triplet-batch-hard", "contrastive-hard", "contrastive-all",
        "dtsh-semihard", "dtsh-random"])
def test_a_loss_step_with_mining_makes_no_host_sync(no_host_sync, make):
    embeddings, labels, _, _ = _batch(1)
    embeddings = torch.tanh(embeddings).requires_grad_()
    loss = make()
    no_host_sync()
    value = loss(embeddings, labels)
    value.backward()
    assert embeddings.grad is not None
