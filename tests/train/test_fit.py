"""fit(): the seed's unified loop for 1, 2 and 3 inputs, scheduler order, metrics, NaN guard, callbacks."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import gaussian_blobs, learning_seeds
from torch import nn

from deephash.errors import DataFormatError, TrainingDiverged
from deephash.train import (
    AccumulatedAccuracyMetric,
    AverageNonzeroTripletsMetric,
    History,
    JsonlLogger,
    StopTraining,
    fit,
    read_jsonl,
)

N_CLASSES, DIM = 4, 8


def blobs(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable Gaussian blobs: float32 (N, DIM), int64 (N,), shuffled."""
    return gaussian_blobs(N_CLASSES, n_per_class, DIM, seed)


def batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def classifier() -> nn.Module:
    return nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Linear(16, N_CLASSES), nn.LogSoftmax(dim=1))


# The learning tests below (pinned threads; seeds from DEEPHASH_LEARNING_SEEDS when checking) assert
# what a rounding difference cannot flip: on separable blobs, a fixed training set that the model
# fits (training accuracy >= 0.9, where it ends at 1.0 and starts near 0.25), or a loss measured on
# a fixed population (every pair or triplet of the data, not the epoch's mean over what the miner
# picked) that falls to a small fraction of its start (measured: 0 to 0.16 of it; the bounds leave
# a factor of 3 or more; RELIABILITY.md, "Learning tests").


def training_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


@pytest.mark.parametrize("seed", learning_seeds())
def test_one_input_classification_learns_and_reports_val_metrics(seed, pinned_threads):
    torch.manual_seed(seed)
    x, y = blobs(24, 1)
    train, val = batches(x, y, 16), batches(*blobs(8, 2), 10)
    model = classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    history = fit(train, val, model, F.nll_loss, opt, None, 4, "cpu", 2,
                  metrics=[AccumulatedAccuracyMetric()], progress=False)
    assert [r["epoch"] for r in history] == [0, 1, 2, 3]
    assert set(history[0]) == {"epoch", "train_loss", "val_loss", "Accuracy", "val_Accuracy",
                               "seconds", "images_per_s", "lr"}
    assert training_accuracy(model, x, y) >= 0.9
    # validation numbers of the last epoch = the final model evaluated by hand
    model.eval()
    with torch.no_grad():
        losses = [F.nll_loss(model(xb), yb).item() for xb, yb in val]
        hits = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in val)
    assert history[-1]["val_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    assert history[-1]["val_Accuracy"] == pytest.approx(100.0 * hits / 32)
    assert history[-1]["lr"] == 0.2


def test_train_metric_and_step_losses_match_hand_computation_with_frozen_weights():
    torch.manual_seed(0)
    train = batches(*blobs(10, 3), 8)  # 40 items: 5 batches of 8
    model = classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    steps = []

    class Steps:
        def on_step_end(self, epoch, step, loss_value, n_images):
            steps.append((epoch, step, loss_value, n_images))

    history = fit(train, None, model, F.nll_loss, opt, None, 1, "cpu", 2,
                  metrics=[AccumulatedAccuracyMetric()], callbacks=[Steps()], progress=False)
    with torch.no_grad():
        per_batch = [F.nll_loss(model(xb), yb).item() for xb, yb in train]
        hits = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in train)
    assert history[0]["Accuracy"] == pytest.approx(100.0 * hits / 40)
    assert history[0]["train_loss"] == pytest.approx(sum(per_batch) / 5, rel=1e-6)
    assert [(e, s, n) for e, s, _, n in steps] == [(0, 2, 16), (0, 4, 16), (0, 5, 8)]
    expected = [sum(per_batch[0:2]) / 2, sum(per_batch[2:4]) / 2, per_batch[4]]
    assert [v for _, _, v, _ in steps] == pytest.approx(expected, rel=1e-6)
    assert "val_loss" not in history[0]


class CountingTripletLoss(nn.Module):
    """Stand-in online triplet loss: all (a, p, n) triplets, ``num_selected`` = active ones."""

    def __init__(self, margin: float) -> None:
        super().__init__()
        self.margin = margin
        self.num_selected: int | torch.Tensor = 0

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(embeddings, embeddings).pow(2)
        same = labels[:, None] == labels[None, :]
        valid = (same & ~torch.eye(len(labels), dtype=torch.bool))[:, :, None] & ~same[:, None, :]
        hinge = F.relu(d[:, :, None] - d[:, None, :] + self.margin) * valid
        self.num_selected = ((hinge > 0) & valid).sum()
        return hinge.sum() / valid.sum().clamp(min=1)


def test_nonzero_triplets_metric_matches_brute_force_count():
    torch.manual_seed(0)
    train = batches(*blobs(6, 4), 12)
    model = nn.Linear(DIM, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss_fn = CountingTripletLoss(margin=1.0)
    history = fit(train, train, model, loss_fn, opt, None, 1, "cpu", 10,
                  metrics=[AverageNonzeroTripletsMetric()], progress=False)
    counts = []
    with torch.no_grad():
        for xb, yb in train:
            e = model(xb)
            n = 0
            for a in range(len(yb)):
                for p in range(len(yb)):
                    for q in range(len(yb)):
                        if a != p and yb[a] == yb[p] and yb[q] != yb[a]:
                            d_ap = ((e[a] - e[p]) ** 2).sum()
                            d_an = ((e[a] - e[q]) ** 2).sum()
                            n += bool(d_ap - d_an + 1.0 > 0)
            counts.append(n)
    assert history[0]["Average nonzero triplets"] == pytest.approx(sum(counts) / len(counts))
    assert history[0]["val_Average nonzero triplets"] == pytest.approx(sum(counts) / len(counts))


class PairData(torch.utils.data.Dataset):
    """((x1, x2), target) like SiameseMNIST: target 1 for the same class."""

    def __init__(self, x, y, seed):
        gen = torch.Generator().manual_seed(seed)
        self.x, self.y = x, y
        self.partner = torch.randint(0, len(y), (len(y),), generator=gen)
        same = torch.randint(0, 2, (len(y),), generator=gen).bool()
        for i in range(len(y)):  # the test's own pairing: half same-class partners
            if same[i]:
                self.partner[i] = int((y == y[i]).nonzero()[i % int((y == y[i]).sum())])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        j = int(self.partner[i])
        return (self.x[i], self.x[j]), int(self.y[i] == self.y[j])


class TripletData(torch.utils.data.Dataset):
    """((a, p, n), []) like TripletMNIST."""

    def __init__(self, x, y, seed):
        gen = torch.Generator().manual_seed(seed)
        self.x, self.y = x, y
        self.pos = [int(torch.nonzero(y == y[i])[torch.randint(0, int((y == y[i]).sum()), (1,), generator=gen)])
                    for i in range(len(y))]
        self.neg = [int(torch.nonzero(y != y[i])[torch.randint(0, int((y != y[i]).sum()), (1,), generator=gen)])
                    for i in range(len(y))]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return (self.x[i], self.x[self.pos[i]], self.x[self.neg[i]]), []


@pytest.mark.parametrize("seed", learning_seeds())
def test_two_inputs_siamese_with_contrastive_loss(seed, pinned_threads):
    from deephash.losses import ContrastiveLoss
    from deephash.models import SiameseNet

    torch.manual_seed(seed)
    x, y = blobs(16, 5)
    pairs = PairData(x, y, 0)
    loader = torch.utils.data.DataLoader(pairs, batch_size=16, shuffle=True)
    (x1, x2), target = next(iter(torch.utils.data.DataLoader(pairs, batch_size=len(pairs))))  # every pair
    model = SiameseNet(nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Linear(16, 2)))

    def loss_on_every_pair() -> float:
        with torch.no_grad():
            return float(ContrastiveLoss(1.0)(*model(x1, x2), target.float()))

    before = loss_on_every_pair()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = fit(loader, loader, model, ContrastiveLoss(1.0), opt, None, 5, "cpu", 100, progress=False)
    assert len(history) == 5 and all(np.isfinite([h["train_loss"] for h in history] + [h["val_loss"] for h in history]))
    assert loss_on_every_pair() < 0.5 * before


@pytest.mark.parametrize("seed", learning_seeds())
def test_three_inputs_triplet_with_empty_collated_targets(seed, pinned_threads):
    from deephash.losses import TripletLoss
    from deephash.models import TripletNet

    torch.manual_seed(seed)
    x, y = blobs(16, 6)
    triplets = TripletData(x, y, 0)
    loader = torch.utils.data.DataLoader(triplets, batch_size=16, shuffle=True)
    (_, target) = next(iter(loader))
    assert target == []  # default collate of [] targets
    (a, p, n), _ = next(iter(torch.utils.data.DataLoader(triplets, batch_size=len(triplets))))  # every triplet
    model = TripletNet(nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Linear(16, 2)))

    def loss_on_every_triplet() -> float:
        with torch.no_grad():
            return float(TripletLoss(1.0)(*model(a, p, n)))

    before = loss_on_every_triplet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = fit(loader, None, model, TripletLoss(1.0), opt, None, 5, "cpu", 100, progress=False)
    assert len(history) == 5 and all(np.isfinite([h["train_loss"] for h in history]))
    assert loss_on_every_triplet() < 0.25 * before
    assert history[0]["images_per_s"] > 0 and history[0]["seconds"] > 0


@pytest.mark.parametrize("seed", learning_seeds())
def test_online_triplet_loss_with_balanced_batches(capsys, seed, pinned_threads):
    from deephash.data.samplers import BalancedBatchSampler
    from deephash.losses import OnlineTripletLoss
    from deephash.mining import SemihardNegativeTripletSelector

    torch.manual_seed(seed)
    x, y = blobs(12, 7)
    sampler = BalancedBatchSampler(y, 4, 3, generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_sampler=sampler)
    model = nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Linear(16, 2))
    loss_fn = OnlineTripletLoss(1.0, SemihardNegativeTripletSelector(1.0, generator=torch.Generator().manual_seed(0)))
    every_triplet = CountingTripletLoss(1.0)  # the mean hinge over all triplets of the data: a fixed population
    with torch.no_grad():
        before = float(every_triplet(model(x), y))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = fit(loader, None, model, loss_fn, opt, None, 6, "cpu", 2,
                  metrics=[AverageNonzeroTripletsMetric()], progress=True)
    assert all(np.isfinite([h["train_loss"] for h in history]))
    with torch.no_grad():
        assert float(every_triplet(model(x), y)) < 0.25 * before
    assert history[0]["Average nonzero triplets"] > 0
    captured = capsys.readouterr()
    assert "Epoch 6/6. train_loss: " in captured.out  # the per-epoch summary under the bar


def test_scheduler_steps_once_per_epoch_after_the_optimizer():
    events: list[str] = []

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):
            events.append("opt")
            return super().step(closure)

    class RecordingStepLR(torch.optim.lr_scheduler.StepLR):
        recording = False

        def step(self, epoch=None):
            if self.recording:
                events.append("sched")
            return super().step(epoch)

    torch.manual_seed(0)
    train = batches(*blobs(6, 8), 8)  # 3 batches
    model = classifier()
    opt = RecordingSGD(model.parameters(), lr=0.1)
    sched = RecordingStepLR(opt, step_size=1, gamma=0.5)
    sched.recording = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when the scheduler steps before the optimizer
        history = fit(train, None, model, F.nll_loss, opt, sched, 3, "cpu", 1, progress=False)
    assert events == (["opt"] * 3 + ["sched"]) * 3
    assert [r["lr"] for r in history] == pytest.approx([0.1, 0.05, 0.025])


def test_reduce_on_plateau_gets_the_validation_loss():
    seen = []

    class Plateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
        def step(self, metrics):
            seen.append(metrics)
            return super().step(metrics)

    torch.manual_seed(0)
    train, val = batches(*blobs(6, 9), 8), batches(*blobs(3, 10), 6)
    model = classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    history = fit(train, val, model, F.nll_loss, opt, Plateau(opt), 2, "cpu", 5, progress=False)
    assert seen == [r["val_loss"] for r in history]


def test_schedules_and_callback_hooks_run_in_order_and_stop_training():
    events = []

    class Schedule:
        def apply(self, loss_fn, epoch, n_epochs):
            events.append(("apply", epoch, n_epochs))

    class Recorder:
        def on_epoch_start(self, epoch):
            events.append(("start", epoch))

        def on_epoch_end(self, epoch, record):
            events.append(("end", epoch, record["epoch"]))
            if epoch == 2:
                raise StopTraining

        def on_train_end(self, history):
            events.append(("train_end", len(history)))

    torch.manual_seed(0)
    train = batches(*blobs(4, 11), 16)
    model = classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = History([{"epoch": 0, "train_loss": 9.0}])
    history = fit(train, None, model, F.nll_loss, opt, None, 10, "cpu", 100, start_epoch=1,
                  schedules=[Schedule()], callbacks=[Recorder(), recorder], progress=False)
    assert events == [("apply", 1, 10), ("start", 1), ("end", 1, 1),
                      ("apply", 2, 10), ("start", 2), ("end", 2, 2), ("train_end", 2)]
    assert [r["epoch"] for r in history] == [1, 2]
    # History starts from the given records; the stopping callback ran first, so epoch 2 is missing
    assert [r["epoch"] for r in recorder.records] == [0, 1]


class Poisoned:
    """Yields clean batches, except NaN inputs at (epoch, step) = (1, 3) (0-based epoch, 1-based step)."""

    def __init__(self, data):
        self.data, self.epoch = data, -1

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        self.epoch += 1
        for step, (xb, yb) in enumerate(self.data, start=1):
            if (self.epoch, step) == (1, 3):
                xb = xb.clone()
                xb[0, 0] = float("nan")
            yield xb, yb


def test_nan_loss_stops_training_before_the_weights_change():
    torch.manual_seed(0)
    train = Poisoned(batches(*blobs(8, 12), 8))  # 4 batches
    model = classifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    snapshots = []

    class Snapshot:
        def on_step_end(self, epoch, step, loss_value, n_images):
            snapshots.append([p.detach().clone() for p in model.parameters()])

    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 2/3, step 3/4") as info:
        fit(train, None, model, F.nll_loss, opt, None, 3, "cpu", 1, callbacks=[Snapshot()], progress=False)
    assert "\n" not in str(info.value)
    assert len(snapshots) == 4 + 2
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), snapshots[-1]))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_gradient_with_finite_loss_stops_training():
    torch.manual_seed(0)
    train = batches(*blobs(4, 13), 8)
    model = classifier()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def sqrt_loss(out, target):  # value 0, gradient of sqrt at 0 is infinite
        return (out - out.detach()).abs().sqrt().sum()

    with pytest.raises(TrainingDiverged, match=r"gradients became non-finite \(loss 0\) at epoch 1/2, step 1/2"):
        fit(train, None, model, sqrt_loss, opt, None, 2, "cpu", 1, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_jsonl_logger_writes_steps_and_epochs(tmp_path):
    torch.manual_seed(0)
    train = batches(*blobs(6, 14), 8)  # 3 batches
    model = classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "run" / "metrics.jsonl"
    history = fit(train, train, model, F.nll_loss, opt, None, 2, "cpu", 2,
                  callbacks=[JsonlLogger(path), JsonlLogger(tmp_path / "rank1.jsonl", is_main_process=False)],
                  progress=False)
    lines = read_jsonl(path)
    assert [(e["type"], e["epoch"]) + ((e["step"],) if e["type"] == "step" else ()) for e in lines] == [
        ("step", 0, 2), ("step", 0, 3), ("epoch", 0), ("step", 1, 2), ("step", 1, 3), ("epoch", 1)]
    assert [{k: v for k, v in e.items() if k != "type"} for e in lines if e["type"] == "epoch"] == history
    assert not (tmp_path / "rank1.jsonl").exists()


def test_read_jsonl_skips_a_torn_last_line_and_the_logger_repairs_it(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"type": "epoch", "epoch": 0}\n{"type": "step", "ep')
    assert read_jsonl(path) == [{"type": "epoch", "epoch": 0}]
    JsonlLogger(path).write({"type": "epoch", "epoch": 1, "loss": float("nan")})
    assert read_jsonl(path) == [{"type": "epoch", "epoch": 0}, {"type": "epoch", "epoch": 1, "loss": "nan"}]
    for line in path.read_text().splitlines():
        json.loads(line)
    path.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(DataFormatError, match=r"m.jsonl, line 2"):
        read_jsonl(path)


def test_set_epoch_reaches_the_batch_sampler_of_a_dataloader():
    seen = []

    class EpochSampler(torch.utils.data.Sampler):
        def __init__(self):
            self.epoch = None

        def set_epoch(self, epoch):
            seen.append(epoch)

        def __len__(self):
            return 2

        def __iter__(self):
            yield from ([0, 1, 2, 3], [4, 5, 6, 7])

    x, y = blobs(2, 15)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_sampler=EpochSampler())
    model = classifier()
    fit(loader, None, model, F.nll_loss, torch.optim.SGD(model.parameters(), lr=0.1), None, 4, "cpu", 1,
        start_epoch=2, progress=False)
    assert seen == [2, 3]


def _train_copy(device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    fit(batches(*blobs(8, 1), 16), None, model, F.nll_loss, opt, None, 2, device, 1, progress=False)
    return model


@pytest.mark.parametrize("device", [False, "cpu", torch.device("cpu")])
def test_fit_accepts_the_seeds_cuda_false_a_string_and_a_device(device):
    """The seed passes ``cuda = torch.cuda.is_available()``; False must train on the CPU as "cpu" does
    (a bool handed to Tensor.to would cast the images to torch.bool)."""
    reference, model = _train_copy("cpu"), _train_copy(device)
    for a, b in zip(reference.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_fit_cuda_true_without_cuda_is_a_one_line_error(monkeypatch):
    from deephash.errors import DeephashError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = classifier()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    with pytest.raises(DeephashError, match="no CUDA device") as info:
        fit(batches(*blobs(8, 1), 16), None, model, F.nll_loss, opt, None, 1, True, 1, progress=False)
    assert "\n" not in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_cuda_true_means_the_first_cuda_device(monkeypatch):
    from deephash.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(True) == torch.device("cuda", 0)
    assert resolve_device(False) == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("device", [1, 0, None, 0.5, ["cpu"]])
def test_fit_refuses_other_device_types(device):
    model = classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    with pytest.raises(TypeError, match=f"got {type(device).__name__}") as info:
        fit(batches(*blobs(8, 1), 16), None, model, F.nll_loss, opt, None, 1, device, 1, progress=False)
    assert "\n" not in str(info.value)
