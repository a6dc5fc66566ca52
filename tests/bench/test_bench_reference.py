"""The loop baselines of bench/mining.py pick what deephash picks, so its ratios compare like with like."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[2] / "bench"), str(Path(__file__).resolve().parents[2] / "experiments")]

from helpers import labelled_batch
from seed_reference import seed_loss  # noqa: E402

from deephash.losses import create_loss  # noqa: E402


def _batch(n_classes: int, n_samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return labelled_batch(n_classes, n_samples, dim=8, seed=seed)


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
    """experiments/methods.py's cells are shipped configs plus --set overrides: each must load."""
    from methods import METHODS, overrides

    from deephash.config import load_config

    for method in METHODS:
        config = load_config(f"fashion-mnist-{bits}", overrides(method, bits, 2))
        assert config.model.bits == bits
        if method != "recipe":
            assert config.train.epochs == 2 and config.model.aux_classes == 0
    ramp = load_config(f"fashion-mnist-{bits}", overrides("dtsh-ramp", bits, 2))
    assert ramp.loss.name == "dtsh" and ramp.schedules[0].attribute == "quantization_weight"
    assert ramp.schedules[0].start * bits == pytest.approx(1.0) and ramp.schedules[0].end * bits == pytest.approx(16.0)


def test_code_fit_shares_and_map_split(tmp_path) -> None:
    """experiments/code_fit.py: shares against a per-item loop, its mAP against the metric on all queries."""
    import numpy as np
    from code_fit import code_fit

    from deephash.retrieval import mean_average_precision
    from deephash.retrieval.codes import pack_codes

    bits, rng = 12, np.random.default_rng(0)
    centers = rng.integers(0, 2, (3, bits))
    def noisy(labels: np.ndarray, flips: int) -> np.ndarray:
        codes = centers[labels].copy()
        for row in codes:
            row[rng.choice(bits, rng.integers(0, flips + 1), replace=False)] ^= 1
        return codes
    d_labels, q_labels = rng.integers(0, 3, 300), rng.integers(0, 3, 60)
    d_codes, q_codes = noisy(d_labels, 3), noisy(q_labels, 6)
    (tmp_path / "codes").mkdir()
    np.savez(tmp_path / "codes" / "train.npz", codes=pack_codes(d_codes), labels=d_labels)
    np.savez(tmp_path / "codes" / "test.npz", codes=pack_codes(q_codes), labels=q_labels)
    (tmp_path / "config.toml").write_text(f"[model]\nbits = {bits}\n")

    row = code_fit(tmp_path)

    majority = [(d_codes[d_labels == c].mean(0) > 0.5).astype(int) for c in range(3)]
    def nearest(code) -> tuple[int, int]:
        distances = [sum(int(a != b) for a, b in zip(code, m)) for m in majority]
        return distances.index(min(distances)), min(distances)
    d_near = [nearest(c) for c in d_codes]
    q_right = [nearest(c)[0] == y for c, y in zip(q_codes, q_labels)]
    assert row["db_nearest_own"] == pytest.approx(np.mean([p == y for (p, _), y in zip(d_near, d_labels)]))
    assert row["db_on_center"] == pytest.approx(np.mean([p == y and d == 0 for (p, d), y in zip(d_near, d_labels)]))
    assert row["query_nearest_own"] == pytest.approx(np.mean(q_right))
    assert 0 < row["query_nearest_own"] < 1  # both groups are present
    whole = mean_average_precision(pack_codes(q_codes), q_labels, pack_codes(d_codes), d_labels, bits)
    assert row["map"] == pytest.approx(whole, abs=1e-12)


def test_code_rules_rebuilds_the_same_weights_under_each_rule() -> None:
    """experiments/code_rules.py: the sign copy encodes as the hash head, the posterior copy as the rule."""
    from code_rules import with_rule

    from deephash.config import load_config
    from deephash.models import build_model, posterior_path_codes
    from deephash.runs.components import build_loss

    config = load_config("fashion-mnist-16")
    torch.manual_seed(0)
    trained = build_model(config.model)  # a posterior model, as the config says
    centers = build_loss(config, 10).loss.centers
    trained.set_code_centers(centers)
    trained.eval()
    x = torch.rand(32, 1, 28, 28)
    with torch.no_grad():
        for p in trained.aux.parameters():  # spread the untrained logits, so the temperature matters
            p.mul_(100)
        features = trained.features(x)
        expected_sign = trained.head.binary(features)
        expected_posterior = posterior_path_codes(trained.aux(features), centers, 2.0)
        assert torch.equal(with_rule(trained, config, "sign")(x), expected_sign)
        assert torch.equal(with_rule(trained, config, "posterior", 2.0)(x), expected_posterior)
    assert not torch.equal(expected_sign, expected_posterior)


def test_code_rules_encodes_a_pca_run_by_sign_and_by_its_fit() -> None:
    """experiments/code_rules.py on a pca run: the sign copy drops the fit, the pca copy keeps it."""
    from code_rules import with_rule

    from deephash.config import load_config
    from deephash.models import build_model, fit_pca_codes, pca_codes

    config = load_config("fashion-mnist-open-48")
    assert config.model.code_rule == "pca" and config.model.code_source == "map" and config.model.code_power == 0.5
    torch.manual_seed(0)
    trained = build_model(config.model)
    fit_pca_codes(trained, torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)))
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        feats, mapped = trained.eval().features_and_map(x)
        expected_sign = trained.head.binary(feats)
        expected_pca = pca_codes(mapped, trained.code_mean, trained.code_projection, trained.code_power)
        assert torch.equal(with_rule(trained, config, "sign")(x), expected_sign)
        assert torch.equal(with_rule(trained, config, "pca")(x), expected_pca)
    assert not torch.equal(expected_sign, expected_pca)
