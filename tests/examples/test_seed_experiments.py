"""examples/seed_experiments.py, the seed's notebook written against deephash, on real
Fashion-MNIST (Debian's dataset-fashion-mnist, which `make test` installs).

Two kinds of test, one experiment each:

* smoke: the script runs the experiment (a few batches), its losses are finite, its plots and
  ``results.json`` are written. No assertion on how well it learned: a seeded run of a few steps
  learns or collapses depending on floating-point rounding (CPU kernels, thread count), so an
  outcome there is not a property of the code.
* learning: the experiment's network and loss (as the script builds them) trained on one fixed
  balanced batch of real images, on a pinned number of threads, must fit it: training accuracy
  >= 0.9 (the classifier's, or the leave-one-out nearest neighbour's of the 2-D embeddings), where
  chance is 0.25. It held for seeds 0-4 on 1 and 2 threads under the AVX-512, AVX2 and default
  kernels (RELIABILITY.md, "Learning tests").

And the script's kNN accuracy against a loop.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from helpers import learning_seeds

from deephash import (
    AllTripletSelector,
    BalancedBatchSampler,
    ClassificationNet,
    ContrastiveLoss,
    EmbeddingNet,
    HardestNegativeTripletSelector,
    HardNegativePairSelector,
    OnlineContrastiveLoss,
    OnlineTripletLoss,
    RandomNegativeTripletSelector,
    SemihardNegativeTripletSelector,
    SiameseMNIST,
    SiameseNet,
    TripletLoss,
    TripletMNIST,
    TripletNet,
    fit,
    load_dataset,
)

ROOT = Path(__file__).resolve().parents[2]


def load_example():
    spec = importlib.util.spec_from_file_location("seed_experiments", ROOT / "examples" / "seed_experiments.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLE = load_example()


@functools.lru_cache(maxsize=None)
def fashion_mnist(name: str, split: str):
    """``load_dataset``, each split read once per test session (the script's ``subset`` copies from it)."""
    return load_dataset(name, split)


# ------------------------------------------------------------------------------------------ smoke

@pytest.mark.parametrize("name", EXAMPLE.EXPERIMENTS)
def test_seed_experiment_runs_and_writes_its_plots(name, tmp_path, monkeypatch, pinned_threads):
    monkeypatch.setattr(EXAMPLE, "load_dataset", fashion_mnist)
    results = EXAMPLE.main(["--only", name, "--subset", "120", "--epochs", "1", "--batch-size", "40",
                            "--n-samples", "2", "--out", str(tmp_path)])
    assert list(results) == [name]
    history = results[name]["history"]
    assert len(history) == 1 and history[0]["epoch"] == 0
    assert all(math.isfinite(history[0][key]) for key in ("train_loss", "val_loss")), history
    assert 0.0 <= results[name]["knn_accuracy"] <= 1.0
    for split in ("train", "test"):
        assert (tmp_path / f"{name}_{split}.png").stat().st_size > 1000
    written = json.loads((tmp_path / "results.json").read_text())
    assert list(written) == [name] and written[name]["knn_accuracy"] == results[name]["knn_accuracy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{name}_train.png", f"{name}_test.png", "results.json"])


# --------------------------------------------------------------------------------------- learning

#: The fixed batch: the first PER_CLASS training images of each of these classes (T-shirt/top,
#: Trouser, Sneaker, Bag), labels renumbered 0..3.
CLASSES, PER_CLASS = (0, 1, 7, 8), 8
#: Full-batch Adam steps and their rate. The seed's metric experiments use 1e-3; its baseline
#: uses 1e-2, at which the 2-unit PReLU bottleneck sometimes collapses classes onto each other
#: (on 24 images of these classes, 3 seeds of 6 ended at 0.5-0.7 accuracy), so every experiment
#: here takes 1e-3. With 4 images a class, semihard negatives left 1 seed of 6 at 0.875 (hard
#: negatives are never selected, so a misplaced image can stay so); with 8 none.
STEPS, LR, MARGIN = 60, 1e-3, 1.0

_SELECTORS: dict[str, Callable[[], Any]] = {
    "all": AllTripletSelector,
    "hardest": lambda: HardestNegativeTripletSelector(MARGIN),
    "random": lambda: RandomNegativeTripletSelector(MARGIN),
    "semihard": lambda: SemihardNegativeTripletSelector(MARGIN),
}


def build_experiment(name: str) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    """The network and loss the script builds for ``name``, and the form of its training items."""
    if name == "baseline":
        return ClassificationNet(EmbeddingNet(), n_classes=len(CLASSES)), torch.nn.NLLLoss(), "images"
    if name == "siamese":
        return SiameseNet(EmbeddingNet()), ContrastiveLoss(MARGIN), "pairs"
    if name == "triplet":
        return TripletNet(EmbeddingNet()), TripletLoss(MARGIN), "triplets"
    if name == "online_contrastive":
        return EmbeddingNet(), OnlineContrastiveLoss(MARGIN, HardNegativePairSelector()), "balanced"
    return EmbeddingNet(), OnlineTripletLoss(MARGIN, _SELECTORS[name.removeprefix("online_triplet_")]()), "balanced"


def fixed_batch():
    train = fashion_mnist("fashion-mnist", "train")
    indices = torch.cat([torch.nonzero(train.targets == c).flatten()[:PER_CLASS] for c in CLASSES])
    batch = train.subset(indices)
    batch.targets = torch.searchsorted(torch.tensor(CLASSES), batch.targets)
    return batch


def training_accuracy(name: str, model: torch.nn.Module, batch) -> float:
    """The classifier's accuracy on the batch (baseline), else the leave-one-out nearest
    neighbour's of its 2-D embeddings."""
    x, y = batch.batch(range(len(batch)))
    model.eval()
    with torch.no_grad():
        if name == "baseline":
            return float((model(x).argmax(1) == y).double().mean())
        e = model.get_embedding(x)
        d = torch.cdist(e, e)
        d.fill_diagonal_(float("inf"))
        return float((y[d.argmin(1)] == y).double().mean())


def test_the_fixed_batch_is_balanced():
    batch = fixed_batch()
    assert torch.bincount(batch.targets).tolist() == [PER_CLASS] * len(CLASSES)


@pytest.mark.parametrize("seed", learning_seeds())
@pytest.mark.parametrize("name", EXAMPLE.EXPERIMENTS)
def test_seed_experiment_fits_a_fixed_balanced_batch(name, seed, pinned_threads):
    batch = fixed_batch()
    torch.manual_seed(seed)
    model, loss_fn, form = build_experiment(name)
    before = training_accuracy(name, model, batch)
    if form == "balanced":
        sampler = BalancedBatchSampler(batch.targets, len(CLASSES), PER_CLASS)
        loader = torch.utils.data.DataLoader(batch, batch_sampler=sampler)
    else:
        items = {"images": batch, "pairs": SiameseMNIST(batch, seed=seed),
                 "triplets": TripletMNIST(batch, seed=seed)}[form]
        loader = torch.utils.data.DataLoader(items, batch_size=len(items), shuffle=True)
    assert len(loader) == 1  # one step per epoch, on the whole batch
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    history = fit(loader, None, model, loss_fn, optimizer, None, STEPS, "cpu", 1000, progress=False)
    assert all(math.isfinite(h["train_loss"]) for h in history)
    after = training_accuracy(name, model, batch)
    assert after >= 0.9, (name, seed, pinned_threads, before, after)


def test_knn_accuracy_matches_a_loop():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(40, 2)), rng.normal(size=(15, 2))
    train_labels, test_labels = rng.integers(0, 10, 40), rng.integers(0, 10, 15)
    hits = 0
    for x, y in zip(test, test_labels):
        order = sorted(range(40), key=lambda j: (float(((train[j] - x) ** 2).sum()), j))[:5]
        votes = np.bincount(train_labels[order], minlength=10)
        hits += int(votes.argmax() == y)
    assert EXAMPLE.knn_accuracy(train, train_labels, test, test_labels) == hits / 15
