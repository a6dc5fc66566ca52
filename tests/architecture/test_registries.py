"""Every registered name of every registry builds and works (as timm tests every model).

One test per registry, parametrised over its names as the registry lists them, so a newly
registered entry is tested the day it is added; and a check that no registry of the package is
left out of this file.
"""

from __future__ import annotations

import importlib
import pickle
import pkgutil

import numpy as np
import pytest
import torch
from helpers import labelled_batch, tiny_fashion_mnist
from PIL import Image

import deephash
from deephash.data.augment import AUGMENTATIONS
from deephash.data.datasets import DATASETS, load_dataset
from deephash.data.samplers import BATCH_SAMPLERS
from deephash.data.splits import PROTOCOL_SPLITS, SPLIT_PROTOCOLS
from deephash.losses.registry import LOSSES
from deephash.losses.schedules import SCHEDULES
from deephash.mining.selectors import SELECTORS
from deephash.models import (
    BACKBONES,
    CODE_RULES,
    HEADS,
    RERANK_VECTORS,
    ModelSpec,
    build_model,
    create_backbone,
    fit_pca_codes,
)
from deephash.registry import Registry
from deephash.train.optim import (
    OPTIMIZERS,
    SCHEDULERS,
    create_optimizer,
    create_scheduler,
    split_schedule,
)

TESTED = {id(r) for r in (AUGMENTATIONS, RERANK_VECTORS, BACKBONES, HEADS, CODE_RULES, LOSSES, SELECTORS, SCHEDULES, DATASETS, SPLIT_PROTOCOLS,
                          BATCH_SAMPLERS, OPTIMIZERS, SCHEDULERS)}
#: The input each backbone is made for.
INPUTS = {"resnet18-cifar": (3, 32), "seed-cnn": (1, 28), "seed-embeddingnet": (1, 28), "fmnist-cnn": (1, 28)}


def test_every_registry_of_the_package_is_tested_here():
    found = {}
    for info in pkgutil.walk_packages(deephash.__path__, "deephash."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        found.update({id(v): f"{info.name}.{k}" for k, v in vars(module).items() if isinstance(v, Registry)})
    assert set(found) <= TESTED, sorted(found[i] for i in set(found) - TESTED)


def _every_parameter_gets_a_gradient(module: torch.nn.Module, output: torch.Tensor) -> None:
    output.float().square().mean().backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("name", BACKBONES.names())
def test_backbone(name):
    channels, size = INPUTS.get(name, (1, 28))
    torch.manual_seed(0)
    backbone = create_backbone(name, in_channels=channels).train()
    out = backbone(torch.rand(4, channels, size, size))
    assert out.shape == (4, backbone.out_features) and torch.isfinite(out).all()
    _every_parameter_gets_a_gradient(backbone, out)


@pytest.mark.parametrize("name", HEADS.names())
def test_head(name):
    spec = ModelSpec(backbone="seed-cnn", head=name, bits=16, embedding_dim=5)
    model = build_model(spec).train()
    out = model(torch.rand(3, 1, 28, 28))
    width = {"hash": 16, "embedding": 5}.get(name, model.backbone.out_features)
    assert out.shape == (3, width) and torch.isfinite(out).all()
    _every_parameter_gets_a_gradient(model.backbone, out)


def _posterior_codes_by_a_loop(logits: np.ndarray, centers: np.ndarray, temperature: float) -> np.ndarray:
    """The posterior rule as its module docstring states it, one row at a time in float64."""
    out = []
    for row in logits.astype(np.float64) / temperature:
        p = np.exp(row - row.max())
        p /= p.sum()
        a, b = np.argsort(-p, kind="stable")[:2]
        assert p[a] - p[b] > 1e-4  # no tie for the likeliest class for rounding to decide
        differ = np.flatnonzero(centers[a] != centers[b])
        share = p[b] / (p[a] + p[b]) * len(differ)
        assert abs(share - np.floor(share) - 0.5) > 1e-4  # nor a half for rounding to decide
        m = round(share)
        code = centers[a].copy()
        code[differ[:m]] = centers[b][differ[:m]]
        out.append(code)
    return np.array(out)


def _codes_up_to_polarity_agree(ours: np.ndarray, projected: np.ndarray, margin: float = 1e-4) -> None:
    """``ours`` (±1) against the signs of scikit-learn's projections, each bit's polarity fixed by
    the rows where that projection is clearly away from 0 (a PCA direction's sign is arbitrary)."""
    clear = np.abs(projected) > margin
    assert clear.mean() > 0.9
    reference = np.where(projected >= 0, 1.0, -1.0)
    for bit in range(ours.shape[1]):
        rows = clear[:, bit]
        agree = ours[rows, bit] == reference[rows, bit]
        assert agree.all() or (~agree).all(), bit


@pytest.mark.parametrize("name", CODE_RULES.names())
def test_code_rule(name):
    """Each rule's codes (eval-mode forward and ``encode``) against the rule computed by hand from
    the backbone's features: the sign of the head's affine map, the posterior path by a loop, PCA
    by scikit-learn."""
    from sklearn.decomposition import PCA

    spec = ModelSpec(backbone="seed-cnn", head="hash", bits=16, aux_classes=3, code_rule=name)
    torch.manual_seed(0)
    model = build_model(spec)
    x = torch.rand(24, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    if name == "posterior":
        model.set_code_centers(torch.where(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)) >= 0, 1.0, -1.0))
        with torch.no_grad():  # logits of spread 3 around 0 on these images: confident rows and ambiguous ones
            feats = model.backbone(x)
            direction = torch.randn(3, feats.shape[1], generator=torch.Generator().manual_seed(3))
            direction *= 3 / ((feats - feats.mean(0)) @ direction.T).std()
            model.aux.linear.weight.copy_(direction)
            model.aux.linear.bias.copy_(-feats.mean(0) @ direction.T)
    fit_images = torch.randint(0, 256, (60, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    if name in ("pca", "itq"):
        fit_pca_codes(model, fit_images)
    model.eval()
    with torch.no_grad():
        forward, encoded = model(x).numpy(), model.encode(x).numpy()
        feats = model.backbone(x).double().numpy()  # mean 0, std 1: the images enter unchanged
        fit_feats = model.backbone(fit_images.float() / 255).double().numpy()
    assert forward.shape == (24, 16) and set(np.unique(forward).tolist()) <= {-1.0, 1.0}
    weight = {k: v.double().numpy() for k, v in model.state_dict().items()}
    if name == "sign":
        pre = feats @ weight["head.linear.weight"].T + weight["head.linear.bias"]
        assert np.abs(pre).min() > 1e-6  # no value close enough to 0 for rounding to decide it
        expected = np.where(pre >= 0, 1.0, -1.0)
        assert np.array_equal(forward, expected) and np.array_equal(encoded, expected)
    elif name == "posterior":
        logits = feats @ weight["aux.linear.weight"].T + weight["aux.linear.bias"]
        expected = _posterior_codes_by_a_loop(logits, weight["code_centers"], spec.code_temperature)
        centers = {tuple(c) for c in weight["code_centers"].tolist()}
        assert 0 < sum(tuple(c) in centers for c in expected.tolist()) < len(expected)  # on a center, and between
        assert np.array_equal(forward, expected) and np.array_equal(encoded, expected)
    elif name == "pca":
        unit = lambda f: f / np.linalg.norm(f, axis=1, keepdims=True)  # noqa: E731 (code_power 1: rows L2-normalised)
        projected = PCA(n_components=16, svd_solver="full").fit(unit(fit_feats)).transform(unit(feats))
        _codes_up_to_polarity_agree(forward, projected)
        _codes_up_to_polarity_agree(encoded, projected)
    elif name == "itq":  # the fitted projection applied by hand; it spans scikit-learn's PCA subspace, rotated
        unit = lambda f: f / np.linalg.norm(f, axis=1, keepdims=True)  # noqa: E731
        pre = (unit(feats) - weight["code_mean"]) @ weight["code_projection"]
        assert np.abs(pre).min() > 1e-6
        expected = np.where(pre >= 0, 1.0, -1.0)
        assert np.array_equal(forward, expected) and np.array_equal(encoded, expected)
        components = PCA(n_components=16, svd_solver="full").fit(unit(fit_feats)).components_.T
        rotation = components.T @ weight["code_projection"]  # (16, 16): orthogonal iff projection = P R
        np.testing.assert_allclose(rotation.T @ rotation, np.eye(16), atol=1e-3)
    else:
        pytest.fail(f"code rule {name!r} has no oracle in this test: add one")


@pytest.mark.parametrize("name", RERANK_VECTORS.names())
def test_rerank_vectors(name):
    model = build_model(ModelSpec(backbone="seed-cnn", head="hash", bits=16, rerank=name)).eval()
    x = torch.rand(3, 1, 28, 28)
    codes, vectors = model.encode_with_rerank(x)
    width = {"head": 16, "features": model.backbone.out_features, "instance": 64}[name]
    assert torch.equal(codes, model(x)) and vectors.shape == (3, width) and torch.isfinite(vectors).all()
    if name == "head":  # the codes are the sign of these vectors
        assert torch.equal(codes, torch.where(vectors >= 0, 1.0, -1.0))
    if name == "instance":  # its own head's L2-normalised output, the one training_outputs returns
        torch.testing.assert_close(vectors.norm(dim=1), torch.ones(3))
        torch.testing.assert_close(model.training_outputs(x, logits=False, rerank=True)[1], vectors)
    assert build_model(ModelSpec(backbone="seed-cnn")).eval().encode_with_rerank(x)[1] is None


@pytest.mark.parametrize("name", LOSSES.names())
def test_loss(name):
    embeddings, labels = labelled_batch(3, 4, dim=16, seed=1)
    params = {k: v for k, v in (("bits", 16), ("n_classes", 3)) if LOSSES.accepts(name, k)}
    loss_fn = LOSSES.create(name, **params)
    u = torch.tanh(embeddings).float().requires_grad_()
    if name in ("contrastive", "triplet"):  # the seed's pair / triplet losses take explicit tuples
        inputs = (u[:6], u[6:12]) if name == "contrastive" else (u[:4], u[4:8], u[8:12])
        loss = loss_fn(*inputs, *(() if name == "triplet" else ((labels[:6] == labels[6:12]).float(),)))
    else:
        loss = loss_fn(u, labels)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert u.grad is not None and torch.isfinite(u.grad).all()


@pytest.mark.parametrize("name", SELECTORS.names())
def test_selector(name):
    embeddings, labels = labelled_batch(3, 4, dim=4, seed=2)
    selector = SELECTORS.create(name, **({"margin": 1.0} if SELECTORS.accepts(name, "margin") else {}))
    if hasattr(selector, "get_triplets"):
        triplets = selector.get_triplets(embeddings, labels)
        a, p, n = triplets.T
        assert triplets.dtype == torch.int64 and triplets.shape[1] == 3
        assert (labels[a] == labels[p]).all() and (labels[a] != labels[n]).all() and (a != p).all()
    else:
        positives, negatives = selector.get_pairs(embeddings, labels)
        assert (labels[positives[:, 0]] == labels[positives[:, 1]]).all()
        assert (labels[negatives[:, 0]] != labels[negatives[:, 1]]).all() and len(positives) and len(negatives)


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_schedule(name):
    params = {"linear": {"start": 0.0, "end": 2.0}, "constant": {"value": 0.5}}[name]
    schedule = SCHEDULES.create(name, attribute="weight", **params)

    class Loss:
        weight = 9.0

    loss = Loss()
    values = [schedule.apply(loss, epoch, 3) for epoch in range(3)]
    assert loss.weight == values[-1] and values == ([0.0, 1.0, 2.0] if name == "linear" else [0.5] * 3)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Tiny copies of every named data set's files, in their real formats."""
    root = tmp_path_factory.mktemp("datasets")
    tiny_fashion_mnist(root / "fashion-mnist", n_classes=10, per_class_train=2, per_class_test=1)
    tiny_fashion_mnist(root / "mnist", n_classes=10, per_class_train=2, per_class_test=1)
    batches = root / "cifar10" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for member in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [0, 1, 2]}
        (batches / member).write_bytes(pickle.dumps(batch, protocol=2))
    for split in ("train", "test"):
        for c in ("cats", "dogs"):
            (root / "folder" / split / c).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(root / "folder" / split / c / "a.png")
    return root


@pytest.mark.parametrize("name", DATASETS.names())
def test_data_set(name, data_root):
    root = None if name == "digits" else data_root / name
    for split in ("train", "test"):
        dataset = load_dataset(name, split, root=root)
        assert dataset.data.dtype == torch.uint8 and dataset.data.dim() == 4 and len(dataset) == len(dataset.targets)
        assert dataset.targets.dtype == torch.int64 and int(dataset.targets.max()) < len(dataset.classes)
        assert dataset.train == (split == "train")


@pytest.mark.parametrize("name", AUGMENTATIONS.names())
def test_augmentation(name):
    x = torch.rand(5, 1, 12, 12)
    params = {"padding": 2} if "crop" in name else {}
    transform = AUGMENTATIONS.create(name, **params, generator=torch.Generator().manual_seed(0))
    out = transform(x)
    assert out.shape == x.shape and 0 <= float(out.min()) and float(out.max()) <= 1 and not torch.equal(out, x)
    again = AUGMENTATIONS.create(name, **params, generator=torch.Generator().manual_seed(0))(x)
    assert torch.equal(out, again)  # seeded


@pytest.mark.parametrize("name", SPLIT_PROTOCOLS.names())
def test_split_protocol(name):
    labels = np.repeat(np.arange(10), 700)
    split = SPLIT_PROTOCOLS.get(name)(labels, 0)
    assert sorted(split) == sorted(PROTOCOL_SPLITS)
    everything = np.concatenate(list(split.values()))
    assert np.array_equal(np.sort(everything), np.arange(len(labels)))  # disjoint and covering
    assert all(np.array_equal(v, np.sort(v)) for v in split.values())


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("name", BATCH_SAMPLERS.names())
def test_batch_sampler(name, world):
    labels = torch.arange(40) % 4
    if name == "labelled-share":
        labels = torch.where(torch.arange(40) % 3 == 0, labels, -1)  # 14 labelled, 26 unlabelled
    seen = []
    for rank in range(world):
        sampler = BATCH_SAMPLERS.create(name, labels=labels, n_classes=2, n_samples=3, batch_size=6,
                                        generator=torch.Generator().manual_seed(0), seed=0, rank=rank, world=world)
        batches = list(sampler)
        assert len(batches) == len(sampler) and all(len(b) == 6 for b in batches[:-1]) and 2 <= len(batches[-1]) <= 6
        if name == "balanced":
            assert all(sorted(torch.bincount(labels[b]).tolist())[-2:] == [3, 3] for b in batches)
        seen += [i for b in batches for i in b]
    if name == "random":
        assert len(seen) == len(set(seen))  # no item twice in an epoch, across ranks
    if name == "labelled-share":  # 3 of 6 labelled in every batch; unlabelled items once an epoch, across ranks
        assert all((labels[b[:3]] >= 0).all() and (labels[b[3:]] < 0).all() for b in batches)
        unlabelled = [i for i in seen if labels[i] < 0]
        assert len(unlabelled) == len(set(unlabelled)) == 3 * len(seen) // 6


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_optimizer(name):
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = create_optimizer(name, [weight], lr=0.1)
    weight.sum().backward()
    optimizer.step()
    assert (weight < 1).all()


@pytest.mark.parametrize("name", SCHEDULERS.names())
def test_scheduler(name):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    epoch_wise, per_batch = split_schedule(create_scheduler(name, optimizer, lr=0.1, epochs=4))
    for epoch in range(4):
        if per_batch is not None:
            per_batch.on_batch_start(epoch, 1, 5)
        optimizer.step()
        if epoch_wise is not None:
            epoch_wise.step()
    rate = optimizer.param_groups[0]["lr"]
    assert 0 <= rate <= 0.1 and (name != "none" or rate == 0.1)
