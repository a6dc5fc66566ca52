"""Label-free code rules and baselines: ITQ (the ``"itq"`` code rule) and the linear hashes
SimHash, PCA hashing and ITQ of raw rows.

Oracles: a hand-written numpy ITQ (Gong & Lazebnik's alternation) from the same initial rotation,
numpy's eigendecomposition and random hyperplanes for the linear hashes, and a loop for the codes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deephash.errors import ConfigError
from deephash.models import (ModelSpec, build_model, fit_linear_hash, fit_pca_codes, itq_rotation, linear_hash_codes,
                             pca_projection, random_rotation)


def _rows(n: int = 300, d: int = 12, seed: int = 0) -> torch.Tensor:
    """Rows with well separated variances per direction (unique principal directions), off-centre."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 0.2, d)
    rotation = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    return (torch.randn(n, d, generator=g) * scales) @ rotation.T + 0.5


def _numpy_itq(v: np.ndarray, r: np.ndarray, n_iter: int) -> np.ndarray:
    """ITQ as Gong & Lazebnik's MATLAB: B = sign(VR); [UB, S, UA] = svd(B'V); R = UA UB'."""
    for _ in range(n_iter):
        b = np.where(v @ r >= 0, 1.0, -1.0)
        ub, _, ua_t = np.linalg.svd(b.T @ v)
        r = ua_t.T @ ub.T
    return r


def _quantization_error(v: np.ndarray, r: np.ndarray) -> float:
    z = v @ r
    return float(((np.where(z >= 0, 1.0, -1.0) - z) ** 2).sum())


def test_the_rotation_is_a_numpy_itq_from_the_same_start():
    v = (_rows() - 0.5)[:, :6].double()
    start = random_rotation(6, seed=4)
    np.testing.assert_allclose(start.double().numpy() @ start.double().numpy().T, np.eye(6), atol=1e-6)
    for n_iter in (0, 1, 20):
        rotation = itq_rotation(v, start, n_iter)
        np.testing.assert_allclose(rotation.numpy(), _numpy_itq(v.numpy(), start.double().numpy(), n_iter), atol=1e-5)
    rotation = itq_rotation(v, start, 50).double().numpy()
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(6), atol=1e-5)
    # each alternation cannot raise ||B - VR||²: 50 steps end below the start
    assert _quantization_error(v.numpy(), rotation) < _quantization_error(v.numpy(), start.double().numpy())


def test_random_rotations_depend_on_the_seed_only():
    assert torch.equal(random_rotation(5, 1), random_rotation(5, 1))
    assert not torch.equal(random_rotation(5, 1), random_rotation(5, 2))


def test_the_linear_hashes_against_numpy():
    x = _rows()
    xn = x.double().numpy()
    centred = xn - xn.mean(0)
    values, vectors = np.linalg.eigh(np.cov(centred, rowvar=False))
    top = vectors[:, ::-1][:, :4]
    for method in ("simhash", "pca", "itq"):
        mean, projection = fit_linear_hash(x, 4, method, seed=7)
        np.testing.assert_allclose(mean.numpy(), xn.mean(0), atol=1e-6)
        if method == "simhash":
            gaussian = torch.randn(12, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64).numpy()
            np.testing.assert_allclose(projection.numpy(), gaussian, atol=1e-6)
            expected = gaussian
        elif method == "pca":
            np.testing.assert_allclose(np.abs(projection.double().numpy().T @ top), np.eye(4), atol=1e-5)
            expected = projection.double().numpy()  # the directions' signs are the library's convention
        else:
            pca = fit_linear_hash(x, 4, "pca")[1].double().numpy()
            expected = pca @ _numpy_itq(centred @ pca, random_rotation(4, 7).double().numpy(), 50)
            np.testing.assert_allclose(projection.double().numpy(), expected, atol=1e-4)
        codes = linear_hash_codes(x, mean, projection).numpy()
        assert np.array_equal(codes, np.where(centred @ expected >= 0, 1.0, -1.0))


def test_a_zero_projection_is_plus_one():
    x = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    codes = linear_hash_codes(x, torch.tensor([2.0, 2.0]), torch.tensor([[1.0], [0.0]]))
    assert codes.flatten().tolist() == [-1.0, 1.0]
    codes = linear_hash_codes(x, torch.tensor([2.0, 2.0]), torch.tensor([[0.0], [1.0]]))
    assert codes.flatten().tolist() == [1.0, 1.0]  # exactly 0: +1


@pytest.mark.parametrize("rows, bits, method, message", [
    (torch.zeros(1, 3), 2, "pca", "N >= 2"), (torch.zeros(5, 3), 4, "itq", "bits <= D"),
    (torch.zeros(5, 3), 2, "lsh", "must be one of"),
])
def test_bad_linear_hashes_are_refused(rows, bits, method, message):
    with pytest.raises(ValueError, match=message):
        fit_linear_hash(rows, bits, method)


def test_the_itq_rule_rotates_the_pca_rules_fit_of_the_model():
    spec = dict(backbone="fmnist-cnn", backbone_params={"width": 4, "depth": [1, 1], "fc": 16}, bits=8, code_source="map",
                code_power=0.5)
    itq = build_model(ModelSpec(code_rule="itq", **spec))
    pca = build_model(ModelSpec(code_rule="pca", **spec))
    pca.load_state_dict(itq.state_dict())
    images = torch.randint(0, 256, (90, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    fit_pca_codes(itq, images, batch_size=40, seed=5)
    fit_pca_codes(pca, images, batch_size=40)
    x = images.float() / 255
    with torch.no_grad():
        source = itq.code_source_vectors(x)
        z = F.normalize(source.sign() * source.abs().sqrt(), dim=1).double()
        v = ((z - pca.code_mean.double()) @ pca.code_projection.double()).numpy()
        rotation = _numpy_itq(v, random_rotation(8, 5).double().numpy(), 50)
        np.testing.assert_allclose(itq.code_projection.double().numpy(), pca.code_projection.double().numpy() @ rotation,
                                   atol=1e-4)
        assert torch.equal(itq.code_mean, pca.code_mean)
        expected = np.where(v @ rotation >= 0, 1.0, -1.0)
        assert (itq.eval()(x).numpy() != expected).mean() < 0.01  # float32 against float64 at the sign's edge
        assert torch.equal(itq.encode(x), itq(x))
    reloaded = build_model(ModelSpec(code_rule="itq", **spec))
    reloaded.load_state_dict(itq.state_dict())
    assert torch.equal(reloaded.eval().encode(x), itq.encode(x))


def test_an_unfitted_itq_model_says_so():
    model = build_model(ModelSpec(backbone="fmnist-cnn", bits=8, code_rule="itq")).eval()
    with pytest.raises(ConfigError, match="'itq' has no projection"):
        model(torch.rand(2, 1, 28, 28))
    with pytest.raises(ConfigError, match="'itq' needs a hash head"):
        build_model(ModelSpec(backbone="fmnist-cnn", head="embedding", embedding_dim=8, code_rule="itq"))
