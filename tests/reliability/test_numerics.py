"""Numerical edge cases: every loss stays finite, and a non-finite step stops training by name.

Cases: one-class batches, batches whose triplets are all satisfied, duplicate embeddings, zero
vectors, huge margins (1e6), and float16/bfloat16 embeddings. Oracles: the exact values these
degenerate batches must give (0 where nothing violates the margin), computed by hand here.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deephash.errors import TrainingDiverged
from deephash.losses.hashing import CSQLoss, DSHLoss, DTSHLoss
from deephash.losses.online import OnlineContrastiveLoss, OnlineTripletLoss
from deephash.mining import create_selector
from deephash.train.checkpoint import CheckpointCallback, load_checkpoint
from deephash.train.fit import fit

BITS, N_CLASSES = 16, 3
TRIPLET_SELECTORS = ["all", "hardest", "random", "semihard", "batch-hard"]
PAIR_SELECTORS = ["all-positive", "hard-negative"]


def _selector(name: str, margin: float):
    params = {"margin": margin} if name in ("hardest", "random", "semihard") else {}
    if name in ("random", "semihard", "all-positive"):
        params["generator"] = torch.Generator().manual_seed(0)
    return create_selector(name, **params)


def _losses(margin: float = 1.0) -> dict[str, nn.Module]:
    """Every loss with every selector it takes; ``margin`` for the metric/DTSH/DSH margins."""
    losses: dict[str, nn.Module] = {}
    for name in PAIR_SELECTORS:
        losses[f"online-contrastive/{name}"] = OnlineContrastiveLoss(margin, _selector(name, margin))
    for name in TRIPLET_SELECTORS:
        losses[f"online-triplet/{name}"] = OnlineTripletLoss(margin, _selector(name, margin))
        losses[f"dtsh/{name}"] = DTSHLoss(_selector(name, margin), alpha=margin)
    losses["dsh"] = DSHLoss(BITS, margin=2.0 * BITS if margin == 1.0 else margin)
    losses["csq"] = CSQLoss(BITS, N_CLASSES)
    return losses


LOSS_NAMES = list(_losses())


def _batch(case: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Relaxed codes in [-1, 1] (B=9, BITS) and labels for each edge case."""
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(9) % N_CLASSES
    centers = torch.tensor([[1.0] * BITS, [-1.0] * BITS, [1.0, -1.0] * (BITS // 2)])
    if case == "one-class":
        return torch.rand(9, BITS, generator=g) * 2 - 1, torch.zeros(9, dtype=torch.int64)
    if case == "satisfied":  # codes on their class centers: classes 16 or 8 bits apart
        return centers[labels].clone(), labels
    if case == "duplicates":
        return (torch.rand(1, BITS, generator=g) * 2 - 1).repeat(9, 1), labels
    if case == "zeros":
        return torch.zeros(9, BITS), labels
    if case == "saturated":  # tanh outputs at exactly +-1
        return torch.sign(torch.rand(9, BITS, generator=g) - 0.5), labels
    raise AssertionError(case)


CASES = ["one-class", "satisfied", "duplicates", "zeros", "saturated"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_every_loss_is_finite_with_finite_gradients(case, dtype):
    x, labels = _batch(case)
    for name, loss_fn in _losses().items():
        u = x.to(dtype).requires_grad_(True)
        loss = loss_fn(u, labels)
        loss.backward()
        assert loss.dim() == 0 and torch.isfinite(loss.float()), (name, case, dtype, loss)
        assert u.grad is not None and u.grad.dtype == dtype, (name, case, dtype)
        assert torch.isfinite(u.grad.float()).all(), (name, case, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_huge_margins_stay_finite(case, dtype):
    """Margin 1e6: losses are computed in float32, so the value is finite for every dtype. The
    gradient of a margin-1e6 hinge is itself ~1e6, beyond float16's range (65504): it is checked
    for float32 and bfloat16; in float16 fit's guard stops such a step (see RELIABILITY.md)."""
    x, labels = _batch(case)
    for name, loss_fn in _losses(margin=1e6).items():
        u = x.to(dtype).requires_grad_(True)
        loss = loss_fn(u, labels)
        loss.backward()
        assert torch.isfinite(loss) and loss.dtype == torch.float32, (name, case, dtype, loss)
        if dtype != torch.float16:
            assert torch.isfinite(u.grad.float()).all(), (name, case, dtype, loss)


@pytest.mark.parametrize("name", [n for n in LOSS_NAMES if n.startswith("online-triplet")])
def test_one_class_and_satisfied_triplet_batches_cost_exactly_zero(name):
    """Oracle: no anchor has a negative (one class), or every negative is >= 8 bits = squared
    distance 32 farther than the positive (satisfied, margin 1): the triplet loss is exactly 0."""
    for case in ("one-class", "satisfied"):
        x, labels = _batch(case)
        u = x.clone().requires_grad_(True)
        loss = _losses()[name](u, labels)
        loss.backward()
        assert loss.item() == 0.0 and torch.count_nonzero(u.grad) == 0, (name, case)


def test_contrastive_one_class_batch_matches_a_pair_loop():
    """Oracle: with one class there are only positive pairs; the loss is half their mean squared distance."""
    x, labels = _batch("one-class")
    loss = OnlineContrastiveLoss(1.0, _selector("all-positive", 1.0))(x, labels)
    pairs = [(i, j) for i in range(9) for j in range(i + 1, 9)]
    expected = 0.5 * sum(float(((x[i] - x[j]) ** 2).sum()) for i, j in pairs) / len(pairs)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)


# ----------------------------------------------------------------------------- divergence guard

class _Batches:
    """Fixed batches of a 2-class toy problem; ``poison`` = (epoch, step) whose input gets a NaN/inf."""

    def __init__(self, poison: tuple[int, int] | None = None, value: float = float("nan")) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(4, 8, 5, generator=g)
        self.y = torch.arange(8).remainder(2).repeat(4, 1)
        self.poison, self.value, self.epoch = poison, value, 0

    def __len__(self) -> int:
        return 4

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        for step in range(4):
            x = self.x[step].clone()
            if self.poison == (self.epoch, step):
                x[3, 1] = self.value
            yield x, self.y[step]


class _EpochTracker:
    def __init__(self, batches: _Batches) -> None:
        self.batches = batches

    def on_epoch_start(self, epoch: int) -> None:
        self.batches.on_epoch_start(epoch)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_batch_stops_by_epoch_and_step_and_keeps_the_last_checkpoint(tmp_path, value):
    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = OnlineTripletLoss(1.0, _selector("all", 1.0))
    batches = _Batches(poison=(1, 2), value=value)
    seen: list[dict] = []

    class Snapshot:  # weights after the last good step (epoch 2, step 2 in 1-based counting)
        def on_step_end(self, epoch, step, loss, n_images):
            seen.append({k: v.clone() for k, v in model.state_dict().items()})

    checkpoints = CheckpointCallback(tmp_path / "ck", model, optimizer, None, monitor=None)
    with pytest.raises(TrainingDiverged) as info:
        fit(batches, None, model, loss_fn, optimizer, None, 3, "cpu", 1,
            callbacks=[_EpochTracker(batches), checkpoints, Snapshot()], progress=False)
    message = str(info.value)
    assert "\n" not in message and "epoch 2/3" in message and "step 3" in message, message
    # the weights were not touched by the bad step
    assert all(torch.equal(v, seen[-1][k]) for k, v in model.state_dict().items())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # last.pt is the intact end of epoch 1, loadable with weights_only
    fresh = nn.Linear(5, 4)
    state = load_checkpoint(tmp_path / "ck" / "last.pt", fresh, rng=False)
    assert state["epoch"] == 1
    assert all(torch.equal(v, seen[3][k]) for k, v in fresh.state_dict().items())


def test_absurd_learning_rate_exits_2_naming_epoch_and_step(tmp_path, capsys, tiny_fmnist):
    """``deephash train`` with lr = 1e30: exit status 2, one line naming the epoch and step, no model."""
    from test_kill_resume import CONFIG

    from deephash.cli import main

    config = tmp_path / "diverge.toml"
    config.write_text(CONFIG.format(root=tiny_fmnist[0], epochs=3), encoding="utf-8")
    capsys.readouterr()
    status = main(["train", str(config), "--out", str(tmp_path / "run"), "--quiet",
                   "--set", "optimizer.lr=1e30", "--set", "optimizer.name=sgd"])
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("deephash: error:"), err
    assert "epoch 1/3, step" in err and "became" in err, err
    assert not (tmp_path / "run" / "model.pt").exists()
