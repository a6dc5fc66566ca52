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


@pytest.mark.parametrize("name", CODE_RULES.names())
def test_code_rule(name):
    spec = ModelSpec(backbone="seed-cnn", head="hash", bits=16, aux_classes=3, code_rule=name)
    model = build_model(spec)
    if name == "posterior":
        model.set_code_centers(torch.where(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)) >= 0, 1.0, -1.0))
    if name in ("pca", "itq"):
        fit_pca_codes(model, torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    codes = model.eval()(torch.rand(4, 1, 28, 28))
    assert codes.shape == (4, 16) and set(codes.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(model.encode(x := torch.rand(2, 1, 28, 28)), model(x))  # encode = eval-mode forward


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
