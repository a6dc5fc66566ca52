"""posterior_path_codes against a per-image loop, its distance invariants, and the model's rule."""

import numpy as np
import pytest
import torch

from deephash.errors import ConfigError
from deephash.losses.hashing import hash_centers
from deephash.models import build_model
from deephash.models.posterior_codes import posterior_path_codes


def _loop(logits: np.ndarray, centers: np.ndarray, temperature: float) -> np.ndarray:
    """The rule written out image by image."""
    out = []
    for row in logits:
        p = np.exp((row - row.max()) / temperature)
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        a, b = order[0], order[1]
        code = centers[a].copy()
        differing = [i for i in range(centers.shape[1]) if centers[a, i] != centers[b, i]]
        n_taken = int(np.round(p[b] / (p[a] + p[b]) * len(differing)))
        for i in differing[:n_taken]:
            code[i] = centers[b, i]
        out.append(code)
    return np.stack(out)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_codes_match_the_per_image_rule(temperature):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 7, generator=gen) * 3
    centers = torch.where(torch.rand(7, 21, generator=gen) < 0.5, -1.0, 1.0)
    codes = posterior_path_codes(logits, centers, temperature)
    expected = _loop(logits.double().numpy(), centers.numpy(), temperature)
    assert codes.shape == (300, 21) and set(codes.unique().tolist()) <= {-1.0, 1.0}
    # rounding at an exact .5 share may differ between float32 and float64: allow a rare row
    assert (codes.numpy() != expected).any(1).mean() < 0.01


def test_codes_lie_on_the_path_between_the_two_likeliest_centers():
    centers = hash_centers(10, 48, seed=1)
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(500, 10, generator=gen) * 4
    codes = posterior_path_codes(logits, centers, 1.0)
    top = logits.topk(2, dim=1).indices
    d = lambda x, y: ((x != y).sum(1)).float()  # noqa: E731
    to_a, to_b = d(codes, centers[top[:, 0]]), d(codes, centers[top[:, 1]])
    between = d(centers[top[:, 0]], centers[top[:, 1]])
    assert torch.equal(to_a + to_b, between)  # on a shortest path
    assert (to_a <= to_b).all()  # never nearer the runner-up than the likeliest class

    confident = torch.full((4, 10), -20.0)
    confident[torch.arange(4), torch.tensor([0, 3, 5, 9])] = 20.0
    assert torch.equal(posterior_path_codes(confident, centers), centers[[0, 3, 5, 9]])

    tied = torch.zeros(1, 10)
    tied[0, 2] = tied[0, 7] = 5.0
    code, a, b = posterior_path_codes(tied, centers), centers[[2]], centers[[7]]
    assert d(a, b).item() % 2 == 0  # an even distance: an even split is possible
    assert d(code, a).item() == d(code, b).item() == d(a, b).item() / 2


def test_bad_shapes_and_temperature_are_refused():
    centers = hash_centers(3, 12, seed=0)
    with pytest.raises(ValueError, match="centers"):
        posterior_path_codes(torch.zeros(2, 4), centers)
    with pytest.raises(ValueError, match="temperature"):
        posterior_path_codes(torch.zeros(2, 3), centers, 0.0)


SPEC = {"backbone": "fmnist-cnn", "backbone_params": {"width": 4, "depth": [1, 1]}, "bits": 12,
        "aux_classes": 3, "code_rule": "posterior", "code_temperature": 2.0}


def test_model_codes_follow_the_rule_in_eval_and_the_hash_head_in_training():
    torch.manual_seed(0)
    model = build_model(SPEC)
    centers = hash_centers(3, 12, seed=0)
    model.set_code_centers(centers)
    x = torch.rand(6, 1, 28, 28)
    model.eval()
    with torch.no_grad():
        logits = model.aux(model.features(x))
        expected = posterior_path_codes(logits, centers, 2.0)
        assert torch.equal(model(x), expected) and torch.equal(model.encode(x), expected)
    model.train()
    relaxed = model(x)
    assert (relaxed.abs() < 1).all()  # tanh codes of the hash head, for the loss

    rebuilt = build_model(SPEC)
    rebuilt.load_state_dict(model.state_dict())  # the centers travel in the state dict
    assert torch.equal(rebuilt.code_centers, centers)


def test_model_rule_errors_name_the_problem():
    with pytest.raises(ConfigError, match="aux_classes"):
        build_model({**SPEC, "aux_classes": None})
    with pytest.raises(ConfigError, match="code_rule"):
        build_model({**SPEC, "code_rule": "nearest"})
    model = build_model(SPEC)
    with pytest.raises(ConfigError, match="set_code_centers"):
        model.eval()(torch.rand(2, 1, 28, 28))
    with pytest.raises(ConfigError, match=r"\(3, 12\)"):
        model.set_code_centers(hash_centers(4, 12, seed=0))
    with pytest.raises(ConfigError, match="posterior"):
        build_model({**SPEC, "code_rule": "sign"}).set_code_centers(hash_centers(3, 12, seed=0))
