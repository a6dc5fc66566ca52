"""examples/seed_experiments.py, the seed's notebook written against deephash, on a subset of the
real Fashion-MNIST (Debian's dataset-fashion-mnist, which `make test` installs).

Oracles: the loss of each experiment before and after training (its ``fit`` history), a binomial
bound on the kNN accuracy of random guessing, and the plots on disk.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SUBSET, EPOCHS = 300, 3
# Hardest and random negatives average the loss over the triplets that still violate the margin,
# a population that changes as the model learns: that mean need not fall (with hardest negatives
# on 2-D embeddings it stays at the margin while the embeddings collapse, as in the seed).
LOSS_OVER_A_FIXED_POPULATION = ("baseline", "siamese", "triplet", "online_contrastive", "online_triplet_all",
                                "online_triplet_semihard")


def load_example():
    spec = importlib.util.spec_from_file_location("seed_experiments", ROOT / "examples" / "seed_experiments.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_seed_experiment_trains_and_its_2d_embeddings_beat_chance(tmp_path):
    example = load_example()
    results = example.main(["--subset", str(SUBSET), "--epochs", str(EPOCHS), "--batch-size", "32",
                            "--n-samples", "6", "--out", str(tmp_path)])
    assert list(results) == list(example.EXPERIMENTS)
    # chance: a guess right with probability 1/10 on SUBSET test images; 4 standard deviations above
    bound = 0.1 + 4 * math.sqrt(0.1 * 0.9 / SUBSET)
    for name, result in results.items():
        history = result["history"]
        losses = [h["train_loss"] for h in history]
        assert len(history) == EPOCHS and all(np.isfinite(losses)), name
        if name in LOSS_OVER_A_FIXED_POPULATION:
            assert losses[-1] < losses[0], (name, losses)
        assert result["knn_accuracy"] > bound, (name, result["knn_accuracy"])
        for split in ("train", "test"):
            assert (tmp_path / f"{name}_{split}.png").stat().st_size > 1000
    assert results["baseline"]["history"][-1]["val_Accuracy"] > 100 * bound
    assert (tmp_path / "results.json").is_file()


def test_knn_accuracy_matches_a_loop():
    example = load_example()
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(40, 2)), rng.normal(size=(15, 2))
    train_labels, test_labels = rng.integers(0, 10, 40), rng.integers(0, 10, 15)
    hits = 0
    for x, y in zip(test, test_labels):
        order = sorted(range(40), key=lambda j: (float(((train[j] - x) ** 2).sum()), j))[:5]
        votes = np.bincount(train_labels[order], minlength=10)
        hits += int(votes.argmax() == y)
    assert example.knn_accuracy(train, train_labels, test, test_labels) == hits / 15
