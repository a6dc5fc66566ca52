"""The loop baselines of bench/mining.py pick what deephash picks, so its ratios compare like with like."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from seed_reference import seed_loss  # noqa: E402

from deephash.losses import create_loss  # noqa: E402


def _batch(n_classes: int, n_samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(n_samples)
    labels = labels[torch.randperm(len(labels), generator=g)]
    return torch.randn(len(labels), 8, generator=g, dtype=torch.float64), labels


@pytest.mark.parametrize("reference", ["batch-hard", "batch-hard-anchor-loop"])
def test_batch_hard_loops_match_deephash(reference) -> None:
    embeddings, labels = _batch(5, 4)
    ours = create_loss("online-triplet", margin=1.0, selector="batch-hard")
    seed = seed_loss(reference, 1.0)
    assert torch.equal(seed.triplet_selector.get_triplets(embeddings, labels), ours.triplet_selector.get_triplets(embeddings, labels))
    assert torch.allclose(seed(embeddings, labels), ours(embeddings, labels), atol=1e-12)


@pytest.mark.parametrize("name", ["hardest", "all"])
def test_seed_triplet_loops_give_deephash_loss(name) -> None:
    embeddings, labels = _batch(4, 5, seed=1)
    ours = create_loss("online-triplet", margin=1.0, selector=name)
    assert torch.allclose(seed_loss(name, 1.0)(embeddings, labels), ours(embeddings, labels), atol=1e-10)


@pytest.mark.parametrize("bits", [16, 48])
def test_every_bench_method_is_a_valid_config(bits) -> None:
    """bench/methods.py's cells are shipped configs plus --set overrides: each must load."""
    from methods import METHODS, ROOT, overrides

    from deephash.config import load_config

    for method in METHODS:
        config = load_config(ROOT / "configs" / f"fashion-mnist-{bits}.toml", overrides(method, bits, 2))
        assert config.model.bits == bits
        if method != "recipe":
            assert config.train.epochs == 2 and config.model.aux_classes == 0
    ramp = load_config(ROOT / "configs" / f"fashion-mnist-{bits}.toml", overrides("dtsh-ramp", bits, 2))
    assert ramp.loss.name == "dtsh" and ramp.schedules[0].attribute == "quantization_weight"
    assert ramp.schedules[0].start * bits == pytest.approx(1.0) and ramp.schedules[0].end * bits == pytest.approx(16.0)
