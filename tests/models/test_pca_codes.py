"""The "pca" code rule: PCA hashing of the L2-normalised features or last map, fitted after training.

Oracles: scikit-learn's PCA for the fit, a loop for the codes (with ties at exactly 0), Hamming
distances (which do not see a bit's polarity) against codes made from scikit-learn's components, and
a tiny ``deephash train`` run whose saved model reproduces the fit on its training images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA

from deephash.cli import main
from deephash.errors import ConfigError
from deephash.models import ModelSpec, build_model, fit_pca_codes, pca_codes, pca_projection, pca_rows
from deephash.runs import load_run, load_split


def _rows(n: int = 400, d: int = 10, seed: int = 0) -> torch.Tensor:
    """Rows with well separated variances per direction (so the principal directions are unique)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 0.2, d)
    rotation = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    return (torch.randn(n, d, generator=g) * scales) @ rotation.T + 0.5


def test_the_fit_is_scikit_learns_pca_of_the_normalised_rows():
    x = _rows()
    mean, projection = pca_projection([x], bits=4)
    z = F.normalize(x.double(), dim=1).numpy()
    oracle = PCA(n_components=4, svd_solver="full").fit(z)
    np.testing.assert_allclose(mean.numpy(), oracle.mean_, atol=1e-6)
    overlap = projection.double().numpy().T @ oracle.components_.T  # ±identity: the same directions, in order
    np.testing.assert_allclose(np.abs(overlap), np.eye(4), atol=1e-5)
    peaks = projection.gather(0, projection.abs().argmax(0, keepdim=True))
    assert bool((peaks > 0).all())  # the sign convention: each direction's largest entry is positive


def test_a_power_is_applied_per_value_with_its_sign_before_the_normalisation():
    x = _rows(n=300, d=8, seed=3) - 0.5  # values of both signs
    rooted = np.sign(x.double().numpy()) * np.sqrt(np.abs(x.double().numpy()))
    rooted /= np.linalg.norm(rooted, axis=1, keepdims=True)
    np.testing.assert_allclose(pca_rows(x, 0.5).numpy(), rooted, atol=1e-6)
    np.testing.assert_allclose(pca_rows(x).numpy(), F.normalize(x.double(), dim=1).numpy(), atol=1e-6)
    mean, projection = pca_projection(x.split(64), bits=3, power=0.5)
    oracle = PCA(n_components=3, svd_solver="full").fit(rooted)
    np.testing.assert_allclose(mean.numpy(), oracle.mean_, atol=1e-6)
    np.testing.assert_allclose(np.abs(projection.double().numpy().T @ oracle.components_.T), np.eye(3), atol=1e-5)
    codes = pca_codes(x, mean, projection, power=0.5)
    values = (rooted - mean.double().numpy()) @ projection.double().numpy()
    clear = np.abs(values) > 1e-6
    assert np.array_equal(codes.numpy()[clear], np.where(values >= 0, 1.0, -1.0)[clear])
    assert not torch.equal(codes, pca_codes(x, mean, projection))  # the power changes the codes


def test_the_fit_does_not_depend_on_how_the_rows_are_batched():
    x = _rows(n=301)
    whole = pca_projection([x], bits=3)
    pieces = pca_projection(x.split(37), bits=3)
    for a, b in zip(whole, pieces):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("batches, bits, message", [
    ([torch.ones(1, 4)], 2, "at least two rows"),
    ([], 2, "at least two rows"),
    ([torch.rand(3, 4), torch.rand(3, 5)], 2, "must all have 4 values"),
    ([torch.rand(5, 4)], 5, "1 <= bits <= 4"),
    ([torch.rand(5, 4)], 0, "1 <= bits <= 4"),
])
def test_bad_fits_are_refused(batches, bits, message):
    with pytest.raises(ValueError, match=message):
        pca_projection(batches, bits)


def test_codes_are_the_sign_of_the_centred_projection_with_zero_as_plus_one():
    x = _rows(n=50, d=6, seed=1)
    mean, projection = pca_projection([x], bits=5)
    codes = pca_codes(x, mean, projection)
    for i in range(len(x)):  # the loop oracle
        z = x[i].double() / x[i].double().norm()
        for b in range(5):
            value = float(((z - mean.double()) * projection[:, b].double()).sum())
            if abs(value) > 1e-6:
                assert codes[i, b] == (1.0 if value > 0 else -1.0)
    # ties: a row on the mean projects to exactly 0 in every bit -> all +1; a row just below it -> -1
    on_mean = torch.tensor([[1.0, 0.0]])
    tie = pca_codes(on_mean, torch.tensor([1.0, 0.0]), torch.tensor([[1.0], [0.0]]))
    below = pca_codes(torch.tensor([[1.0, 1.0]]), torch.tensor([0.75, 0.75]), torch.tensor([[1.0], [0.0]]))
    assert tie.tolist() == [[1.0]] and below.tolist() == [[-1.0]]  # 1/sqrt(2) - 0.75 < 0


def _map_model(**extra) -> torch.nn.Module:
    spec = ModelSpec(backbone="fmnist-cnn", backbone_params={"width": 4, "depth": [1, 1], "fc": 16}, bits=8,
                     code_rule="pca", code_source="map", **extra)
    torch.manual_seed(0)
    return build_model(spec)


def test_a_fitted_model_ranks_as_pca_codes_of_its_map_do():
    model = _map_model()
    images = torch.randint(0, 256, (120, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    fit_pca_codes(model, images, batch_size=50)
    x = images.float() / 255
    with torch.no_grad():
        codes = model.eval()(x)
        assert torch.equal(model.encode(x), codes) and torch.equal(model.encode_with_rerank(x)[0], codes)
        maps = F.normalize(model.backbone.forward_with_map(model.normalize(x))[1].double(), dim=1).numpy()
    assert model.code_projection.shape == (model.backbone.map_features, 8)
    oracle = PCA(n_components=8, svd_solver="full").fit(maps)
    oracle_codes = np.where(oracle.transform(maps) >= 0, 1.0, -1.0)
    hamming = lambda c: (c[:, None, :] != c[None, :, :]).sum(-1)  # noqa: E731 -- blind to each bit's polarity
    np.testing.assert_array_equal(hamming(codes.numpy()), hamming(oracle_codes))


def test_an_unfitted_or_misbuilt_pca_model_says_so():
    model = _map_model().eval()
    with pytest.raises(ConfigError, match="no projection: fit it"):
        model(torch.rand(2, 1, 28, 28))
    with pytest.raises(ConfigError, match="needs mean"):
        model.set_code_projection(torch.zeros(3), torch.zeros(3, 8))
    with pytest.raises(ConfigError, match="code_rule 'pca' or 'itq' only"):
        build_model(ModelSpec(backbone="fmnist-cnn", code_source="map"))
    with pytest.raises(ConfigError, match="needs a backbone with forward_with_map"):
        build_model(ModelSpec(backbone="seed-cnn", code_rule="pca", code_source="map"))
    with pytest.raises(ConfigError, match="needs a hash head"):
        build_model(ModelSpec(backbone="fmnist-cnn", head="embedding", embedding_dim=8, code_rule="pca"))
    with pytest.raises(ConfigError, match="code_source must be"):
        build_model(ModelSpec(backbone="fmnist-cnn", code_rule="pca", code_source="pixels"))
    for power in (0, -0.5, True, "0.5"):
        with pytest.raises(ConfigError, match="code_power must be a number > 0"):
            build_model(ModelSpec(backbone="fmnist-cnn", code_rule="pca", code_power=power))
    with pytest.raises(ConfigError, match="used by code_rule 'pca' or 'itq' only"):
        build_model(ModelSpec(backbone="fmnist-cnn")).set_code_projection(torch.zeros(3), torch.zeros(3, 8))


CONFIG = """
name = "pca"
seed = 3
device = "cpu"
[data]
dataset = "fashion-mnist"
root = "{root}"
seen_classes = [0, 1]
unseen_classes = [2]
[model]
backbone = "fmnist-cnn"
backbone_params = {{ width = 4, depth = [1, 1], fc = 16 }}
bits = 8
code_rule = "pca"
code_source = "{source}"
code_power = {power}
[loss]
name = "csq"
[sampler]
kind = "random"
batch_size = 12
[train]
epochs = 1
num_threads = 1
"""


@pytest.mark.parametrize("source, power", [("map", 0.5), ("features", 1.0)])
def test_a_training_run_fits_the_projection_on_its_training_images(tmp_path, tiny_fmnist, source, power):
    (tmp_path / "pca.toml").write_text(CONFIG.format(root=tiny_fmnist[0], source=source, power=power), encoding="utf-8")
    assert main(["train", str(tmp_path / "pca.toml"), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    model, config = load_run(tmp_path / "run")
    seen = load_split(config, config.data.train_split, tmp_path / "run", training=True).data
    unseen = load_split(config, config.data.train_split, tmp_path / "run").data
    mean, projection = model.code_mean.clone(), model.code_projection.clone()
    fit_pca_codes(model, unseen)  # not fitted on the classes it is evaluated on
    assert not torch.allclose(model.code_mean, mean, atol=1e-3)
    fit_pca_codes(model, seen)  # refitting the saved model on its training images gives the stored fit
    torch.testing.assert_close(model.code_mean, mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.code_projection, projection, atol=1e-5, rtol=0)
    width = model.backbone.map_features if source == "map" else model.backbone.out_features
    assert projection.shape == (width, 8) and bool(projection.any()) and model.code_power == power
    assert main(["evaluate", str(tmp_path / "run")]) == 0


@pytest.mark.parametrize("model, message", [
    ('code_source = "map"', "read by model.code_rule = 'pca' or 'itq' only"),
    ('code_rule = "pca"\nhead = "embedding"', "code_rule = 'pca' makes the codes of a hash head"),
    ('code_rule = "pca"\ncode_source = "pixels"', "code_source must be 'features' or 'map'"),
    ('code_rule = "pca"\ncode_power = 0.0', "code_power must be > 0"),
])
def test_config_checks(tmp_path, model, message):
    from deephash.config import load_config
    text = CONFIG.format(root=tmp_path, source="features", power=1.0).replace(
        'code_rule = "pca"\ncode_source = "features"\ncode_power = 1.0\n', model + "\n")
    assert model in text
    (tmp_path / "bad.toml").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "bad.toml")
