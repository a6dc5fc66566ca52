"""Training without labels (``data.labels = "none"``): no label is read in training, so any labels,
or labels that raise when read, give bit-identical weights; evaluate still scores with labels."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

import deephash.runs.data as run_data
from deephash.cli import main
from deephash.data.datasets import ArrayDataset
from deephash.data.unlabelled import labelled_mask
from deephash.runs import load_run
from helpers import write_idx

CONFIG = """
name = "unlabelled"
seed = 3
device = "cpu"
[data]
dataset = "fashion-mnist"
root = "{root}"
labels = "{labels}"
labelled_fraction = {fraction}
unlabelled = "{unlabelled}"
views = 2
augment = {{ hflip = true, perturb = {{ shift = 2, crop = 0.8, noise = 0.03 }} }}
[model]
backbone = "fmnist-cnn"
backbone_params = {{ width = 4, depth = [1, 1], fc = 16 }}
bits = 16
code_rule = "{rule}"
[loss]
name = "{loss}"
[sampler]
kind = "{sampler}"
batch_size = 12
[train]
epochs = 2
log_interval = 1
num_threads = 1
tanh_scale = [1.0, 3.0]
"""


class _LabelsRaise(ArrayDataset):
    """An ArrayDataset whose labels raise when anything reads them."""

    @property
    def targets(self) -> torch.Tensor:
        raise AssertionError("training read a label")

    @targets.setter
    def targets(self, value: torch.Tensor) -> None:
        pass


@pytest.fixture(scope="module")
def roots(tmp_path_factory, tiny_fmnist):
    """The tiny data set, and a copy of it whose training labels are garbage (other values, other order)."""
    root, data = tiny_fmnist
    garbage = tmp_path_factory.mktemp("garbage-labels")
    for f in root.iterdir():
        shutil.copy(f, garbage / f.name)
    labels = data["train"][1]
    write_idx(garbage / "train-labels-idx1-ubyte.gz", (labels[::-1] * 7 + 1) % 10)
    return root, garbage


def _train(tmp_path, name, root, labels="none", loss="view-hash", rule="sign", fraction=1.0, unlabelled="keep",
           sampler="random", extra=""):
    path = tmp_path / f"{name}.toml"
    path.write_text(CONFIG.format(root=root, labels=labels, loss=loss, rule=rule, fraction=fraction, unlabelled=unlabelled,
                                  sampler=sampler) + extra, encoding="utf-8")
    assert main(["train", str(path), "--out", str(tmp_path / name), "--quiet"]) == 0
    return torch.load(tmp_path / name / "model.pt", weights_only=True)["state_dict"]


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_labels_are_never_read_in_training(tmp_path, roots, monkeypatch):
    root, garbage = roots
    real = _train(tmp_path, "real", root)
    assert _same(real, _train(tmp_path, "garbage", garbage))
    load = run_data.load_dataset

    def raising(name, split, root=None):
        d = load(name, split, root=root)
        return _LabelsRaise(d.data, d.targets, d.classes, name=d.name, train=d.train)

    monkeypatch.setattr(run_data, "load_dataset", raising)
    assert _same(real, _train(tmp_path, "raising", root))


def test_the_comparison_sees_a_loss_that_reads_labels(tmp_path, roots):
    # the same check on a labelled loss: garbage labels change the weights, so the test above can fail
    root, garbage = roots
    assert not _same(_train(tmp_path, "a", root, "class", "contrastive-hash"),
                     _train(tmp_path, "b", garbage, "class", "contrastive-hash"))


def _stable_map(q: np.ndarray, yq: np.ndarray, d: np.ndarray, yd: np.ndarray) -> float:
    """mAP@all of ±1 codes, ties broken by database order, by a loop over queries (the oracle)."""
    aps = []
    for code, label in zip(q, yq):
        distance = (code != d).sum(1)
        relevant = yd[np.lexsort((np.arange(len(d)), distance))] == label
        hits = np.cumsum(relevant)
        aps.append((hits[relevant] / (np.flatnonzero(relevant) + 1)).mean())
    return float(np.mean(aps))


def test_an_unlabelled_itq_run_is_scored_with_the_labels_of_its_splits(tmp_path, roots, tiny_fmnist):
    _train(tmp_path, "itq", roots[0], rule="itq")
    assert main(["evaluate", str(tmp_path / "itq")]) == 0
    reported = json.loads((tmp_path / "itq" / "metrics.json").read_text())["metrics"]["mAP@all/stable"]
    model, _ = load_run(tmp_path / "itq", device="cpu")
    (xd, yd), (xq, yq) = tiny_fmnist[1]["train"], tiny_fmnist[1]["test"]
    with torch.no_grad():
        d, q = (model.encode(torch.from_numpy(x[:, None]).float() / 255).numpy() for x in (xd, xq))
    assert reported == pytest.approx(_stable_map(q, yq, d, yd), abs=1e-9)


@pytest.mark.parametrize("sampler", ["random", "labelled-share"])
def test_with_a_labelled_fraction_only_the_kept_labels_are_read(tmp_path, tiny_fmnist, sampler):
    root, data = tiny_fmnist
    labels = data["train"][1]
    keep = labelled_mask(len(labels), 0.5, seed=3).numpy()  # the config's seed
    assert keep.sum() == len(labels) // 2
    for name, change in (("unkept", ~keep), ("kept", keep)):
        other = tmp_path / name
        shutil.copytree(root, other)
        garbage = np.where(change, labels[::-1], labels)  # not a renaming of the classes: other groups
        write_idx(other / "train-labels-idx1-ubyte.gz", garbage)
    args = dict(labels="class", loss="contrastive-hash", fraction=0.5, sampler=sampler)
    real = _train(tmp_path, "real", root, **args)
    assert _same(real, _train(tmp_path, "garbage-unkept", tmp_path / "unkept", **args))
    assert not _same(real, _train(tmp_path, "garbage-kept", tmp_path / "kept", **args))
    if sampler == "labelled-share":  # other batches than the random sampler's
        assert not _same(real, _train(tmp_path, "random", root, **{**args, "sampler": "random"}))


PSEUDO = "[pseudo_labels]\nfrom_epoch = 1\nk = 3\nagreement = 0.6\n"


def test_pseudo_labels_come_from_their_epoch_on_read_only_the_kept_labels_and_resume_exactly(tmp_path, tiny_fmnist,
                                                                                               monkeypatch):
    from deephash import runs
    from deephash.config import load_config
    from deephash.train import pseudo_labels
    from deephash.train.callbacks import read_jsonl

    root, data = tiny_fmnist
    labels = data["train"][1]
    keep = labelled_mask(len(labels), 0.5, seed=3).numpy()  # the config's seed
    other = tmp_path / "unkept"
    shutil.copytree(root, other)
    write_idx(other / "train-labels-idx1-ubyte.gz", np.where(~keep, labels[::-1], labels))
    args = dict(labels="class", loss="contrastive-hash", fraction=0.5, sampler="labelled-share", extra=PSEUDO)
    real = _train(tmp_path, "real", root, **args)
    epochs = [e for e in read_jsonl(tmp_path / "real" / "metrics.jsonl") if e["type"] == "epoch"]
    assert "pseudo_labelled" not in epochs[0] and 0 < epochs[1]["pseudo_labelled"] <= len(labels) // 2
    assert _same(real, _train(tmp_path, "garbage-unkept", other, **args))  # the vote reads only the kept labels
    assert not _same(real, _train(tmp_path, "without", root, **{**args, "extra": ""}))

    class Interrupt:
        def on_epoch_end(self, epoch, record):
            if epoch == 1:
                raise KeyboardInterrupt

    votes: list[int] = []
    vote = pseudo_labels.knn_pseudo_labels
    monkeypatch.setattr(pseudo_labels, "knn_pseudo_labels", lambda *args: votes.append(1) or vote(*args))
    # votes in epochs 1 and 3 (0-based): the run stops after epoch 1 and resumes between the votes,
    # on the checkpoint's labels (not a vote of its own)
    config = load_config(tmp_path / "real.toml", overrides=["train.epochs=4", "pseudo_labels.every=2"])
    whole = runs.train_run(config, tmp_path / "whole", progress=False)
    assert len(votes) == 2
    with pytest.raises(KeyboardInterrupt):  # stopped after an epoch with pseudo labels
        runs.train_run(config, tmp_path / "parted", progress=False, callbacks=[Interrupt()])
    assert len(votes) == 3
    runs.train_run(config, tmp_path / "parted", resume=True, progress=False)
    assert len(votes) == 4
    assert _same(*(torch.load(d / "model.pt", weights_only=True)["state_dict"] for d in (whole, tmp_path / "parted")))
    stored = [torch.load(d / "checkpoints" / "last.pt", weights_only=True)["extra"]["pseudo_labels"]["labels"]
              for d in (whole, tmp_path / "parted")]
    assert stored[0].dtype == torch.int64 and torch.equal(*stored)  # the last vote's labels (not the starting ones)
    assert int((stored[0] >= 0).sum()) > int(keep.sum())
    whole_epochs = [e for e in read_jsonl(whole / "metrics.jsonl") if e["type"] == "epoch"]
    assert whole_epochs[1]["pseudo_labelled"] == whole_epochs[2]["pseudo_labelled"]  # epoch 2 keeps epoch 1's vote
    logged = [e for e in read_jsonl(tmp_path / "parted" / "metrics.jsonl") if e["type"] == "epoch"]
    assert [e.get("pseudo_labelled") for e in logged] == [
        e.get("pseudo_labelled") for e in read_jsonl(whole / "metrics.jsonl") if e["type"] == "epoch"]


def test_dropping_the_unlabelled_keeps_exactly_the_labelled_share(tiny_fmnist):
    from deephash.config import config_from_dict
    from deephash.runs import load_split
    root, data = tiny_fmnist
    images, labels = data["train"]
    table = {"data": {"root": str(root), "labelled_fraction": 0.25, "unlabelled": "drop"}, "loss": {"name": "csq"}, "seed": 7,
             "sampler": {"kind": "random"}}
    dropped = load_split(config_from_dict(table), "train", training=True)
    # the oracle: the documented draw (torch.randperm on a generator seeded with the config's seed), in data-set order
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(7)).numpy()
    chosen = np.sort(order[:round(0.25 * len(labels))])
    assert np.array_equal(dropped.data[:, 0].numpy(), images[chosen]) and np.array_equal(dropped.targets.numpy(), labels[chosen])
    table["data"]["unlabelled"], table["loss"]["name"] = "keep", "contrastive-hash"
    kept = load_split(config_from_dict(table), "train", training=True)  # the same items are the labelled ones there
    assert np.array_equal(np.flatnonzero(kept.targets.numpy() >= 0), chosen) and len(kept) == len(labels)
    assert len(load_split(config_from_dict(table), "train")) == len(labels)  # the database is untouched


def test_a_labels_only_run_never_sees_the_dropped_images(tmp_path, tiny_fmnist):
    root, data = tiny_fmnist
    images, labels = data["train"]
    keep = labelled_mask(len(labels), 0.5, seed=3).numpy()  # the config's seed
    for name, change in (("unkept", ~keep), ("kept", keep)):
        other = tmp_path / name
        shutil.copytree(root, other)
        write_idx(other / "train-images-idx3-ubyte.gz", np.where(change[:, None, None], 255 - images, images))
        write_idx(other / "train-labels-idx1-ubyte.gz", np.where(change, labels[::-1], labels))
    args = ("class", "contrastive-hash", "sign", 0.5, "drop")
    real = _train(tmp_path, "real", root, *args)
    assert _same(real, _train(tmp_path, "garbage-unkept", tmp_path / "unkept", *args))
    assert not _same(real, _train(tmp_path, "garbage-kept", tmp_path / "kept", *args))
    assert not _same(real, _train(tmp_path, "keep", root, *args[:-1], "keep"))  # keep trains on the others too


def test_training_on_the_unlabelled_database_adds_the_unseen_classes_images_without_labels(tmp_path, tiny_fmnist):
    from deephash.config import config_from_dict
    from deephash.runs import load_split
    root, data = tiny_fmnist
    images, labels = data["train"]
    table = {"data": {"root": str(root), "seen_classes": [0, 1], "unseen_classes": [2], "views": 2, "augment": {"hflip": True}},
             "loss": {"name": "contrastive-hash"}, "sampler": {"kind": "random"}}
    plain = load_split(config_from_dict(table), "train", training=True)
    table["data"]["train_on_database_unlabelled"] = True
    both = load_split(config_from_dict(table), "train", training=True)
    seen, unseen = np.isin(labels, [0, 1]), labels == 2
    assert np.array_equal(plain.data[:, 0].numpy(), images[seen]) and np.array_equal(plain.targets.numpy(), labels[seen])
    assert np.array_equal(both.data[:, 0].numpy(), np.concatenate([images[seen], images[unseen]]))
    assert np.array_equal(both.targets.numpy(), np.concatenate([labels[seen], np.full(unseen.sum(), -1)]))
    database = load_split(config_from_dict(table), "train")  # what is evaluated is unchanged: the unseen classes
    assert np.array_equal(database.targets.numpy(), labels[unseen])


def _flat_photo_folder(root) -> None:
    """train/ and test/ holding images directly (no class sub-folders), of mixed sizes and kinds."""
    from PIL import Image

    rng = np.random.default_rng(5)
    for split, n in (("train", 24), ("test", 6)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            w, h = int(rng.integers(30, 60)), int(rng.integers(30, 60))
            picture = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            picture.save(root / split / f"img-{i:02d}.{'png' if i % 2 else 'jpg'}")


FLAT_FOLDER_SETS = ['data.dataset="folder"', "data.image_size=16", "data.channels=3", "sampler.batch_size=8",
                    "train.epochs=1", "model.backbone_params={width=8, depth=[1,1,1], fc=0}", "model.bits=16",
                    'device="cpu"', "train.num_threads=1"]


def test_a_flat_folder_of_unlabelled_photos_trains_without_labels_and_is_encoded(tmp_path):
    _flat_photo_folder(tmp_path / "photos")
    sets = [x for s in [*FLAT_FOLDER_SETS, f'data.images="{tmp_path / "photos"}"'] for x in ("--set", s)]
    assert main(["train", "fashion-mnist-unlabelled-48", "--out", str(tmp_path / "run"), "--quiet", *sets]) == 0
    model, config = load_run(tmp_path / "run")
    assert config.data.labels == "none" and model.code_projection.shape == (32, 16)  # the itq fit on the folder
    assert main(["encode", str(tmp_path / "run"), "--images", str(tmp_path / "photos" / "test"),
                 "--out", str(tmp_path / "test.npz")]) == 0
    from deephash.retrieval.codes import load_codes

    codes = load_codes(tmp_path / "test.npz")
    assert len(codes) == 6 and (codes.labels == -1).all()
    assert sorted(codes.paths.tolist()) == sorted(p.name for p in (tmp_path / "photos" / "test").iterdir())


@pytest.mark.parametrize("loss", ["csq", "contrastive-hash"])  # partial labels, but no label at all here
def test_a_flat_folder_with_a_loss_that_needs_labels_is_refused_naming_the_loss(tmp_path, capsys, loss):
    _flat_photo_folder(tmp_path / "photos")
    sets = [x for s in [*FLAT_FOLDER_SETS, f'data.images="{tmp_path / "photos"}"', 'data.labels="class"',
                        f'loss.name="{loss}"', "loss.params={}", 'model.code_rule="sign"', "data.views=1"]
            for x in ("--set", s)]
    assert main(["train", "fashion-mnist-unlabelled-48", "--out", str(tmp_path / "run"), "--quiet", *sets]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "24 of 24 training images have no label" in err and f"loss.name = '{loss}'" in err, err


def test_a_flat_folder_with_a_label_free_loss_but_a_class_head_is_refused_naming_the_head(tmp_path, capsys):
    _flat_photo_folder(tmp_path / "photos")
    sets = [x for s in [*FLAT_FOLDER_SETS, f'data.images="{tmp_path / "photos"}"', 'data.labels="class"',
                        'loss.name="view-hash"', "loss.params={}", 'model.code_rule="sign"', "model.aux_classes=3",
                        "train.aux_weight=0.5"]
            for x in ("--set", s)]
    assert main(["train", "fashion-mnist-unlabelled-48", "--out", str(tmp_path / "run"), "--quiet", *sets]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "have no label" in err and "train.aux_weight > 0" in err, err


def test_training_on_the_unlabelled_database_of_a_photo_folder_is_refused_at_load(tmp_path):
    from deephash.config import load_config
    from deephash.errors import ConfigError

    with pytest.raises(ConfigError, match="not a photo folder"):
        load_config("fashion-mnist-open-48", ['data.dataset="folder"', 'data.images="photos"',
                                              "data.train_on_database_unlabelled=true", 'loss.name="contrastive-hash"'])


def test_the_vote_reads_the_tanh_codes_at_scale_one_whatever_the_continuation_has_reached(tmp_path, tiny_fmnist):
    # a resumed run starts with the head's scale at 1, an uninterrupted one at the continuation's β:
    # voting at a fixed scale keeps the two runs' labels equal
    from deephash.config import load_config
    from deephash.models import build_model
    from deephash.runs.training import _pseudo_labels
    from deephash.train.distributed import SingleProcess

    path = tmp_path / "c.toml"
    path.write_text(CONFIG.format(root=tiny_fmnist[0], labels="class", loss="contrastive-hash", rule="sign", fraction=0.5,
                                  unlabelled="keep", sampler="random") + PSEUDO, encoding="utf-8")
    config = load_config(path)
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(config.model, in_channels=1))
    dataset = ArrayDataset(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), [0, 1, -1, -1])
    callback = _pseudo_labels(config, dataset, model, SingleProcess())
    x = torch.rand(5, 1, 28, 28)
    model.eval()
    model.head.scale = 7.0
    with torch.no_grad():
        assert torch.equal(callback.embed(x), model.relaxed(x, scale=1.0))
        assert not torch.allclose(callback.embed(x), model.relaxed(x))


def _catalogue(root, extra: int) -> None:
    """train/ and test/ with 3 class sub-folders of 6 and 2 images; train/new-stock/ with ``extra``
    images in no class."""
    from PIL import Image

    rng = np.random.default_rng(7)
    for split, n in (("train", 6), ("test", 2)):
        for c in ("a", "b", "c"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    (root / "train" / "new-stock" / "deep").mkdir(parents=True)
    for i in range(extra):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "train" / "new-stock" / "deep" / f"{i}.jpg")


CATALOGUE_SETS = [*FLAT_FOLDER_SETS, 'data.labels="class"', 'loss.name="contrastive-hash"', "loss.params={}", 'model.code_rule="sign"',
                  'sampler.kind="labelled-share"', "sampler.labelled_share=0.5",
                  "model.mean=[0.5, 0.5, 0.5]", "model.std=[0.25, 0.25, 0.25]"]  # not from the images: only training sees them


def test_an_unlabelled_sub_folder_trains_without_labels_beside_the_classes_and_stays_out_of_evaluation(tmp_path):
    from deephash.config import load_config
    from deephash.runs import load_split

    _catalogue(tmp_path / "photos", extra=12)
    sets = [*CATALOGUE_SETS, f'data.images="{tmp_path / "photos"}"', 'data.unlabelled_folder="new-stock"']
    config = load_config("fashion-mnist-unlabelled-48", sets)
    training = load_split(config, "train", training=True)
    assert training.classes == ["a", "b", "c"] and training.targets.tolist() == [0] * 6 + [1] * 6 + [2] * 6 + [-1] * 12
    assert len(load_split(config, "train")) == 18 and len(load_split(config, "test")) == 6  # database, queries
    from deephash.runs.data import source_dataset

    encoded = source_dataset(config, tmp_path, None, tmp_path / "photos" / "train")  # `encode --images`: no class either
    assert encoded.classes == ["a", "b", "c"] and len(encoded) == 18
    argv = [x for s in sets for x in ("--set", s)]
    assert main(["train", "fashion-mnist-unlabelled-48", "--out", str(tmp_path / "run"), "--quiet", *argv]) == 0
    assert main(["evaluate", str(tmp_path / "run")]) == 0
    with np.load(tmp_path / "run" / "codes" / "train.npz") as database:  # what evaluate encoded: the classes' images
        assert database["codes"].shape[0] == 18 and (database["labels"] >= 0).all()
    trained = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["state_dict"]
    # the unlabelled images are trained on: other pixels there give other weights
    shutil.copytree(tmp_path / "photos", tmp_path / "other")
    for path in (tmp_path / "other" / "train" / "new-stock" / "deep").iterdir():
        from PIL import Image

        Image.fromarray(255 - np.asarray(Image.open(path))).save(path)
    other = [x for s in [*CATALOGUE_SETS, f'data.images="{tmp_path / "other"}"', 'data.unlabelled_folder="new-stock"']
             for x in ("--set", s)]
    assert main(["train", "fashion-mnist-unlabelled-48", "--out", str(tmp_path / "run2"), "--quiet", *other]) == 0
    assert not _same(trained, torch.load(tmp_path / "run2" / "model.pt", weights_only=True)["state_dict"])


@pytest.mark.parametrize("sets, message", [
    (['loss.name="dsh"', "loss.params={}", "data.views=1"], "data.unlabelled_folder: adds items without labels, but loss.name = 'dsh'"),
    (['data.unlabelled_folder="a/b"'], "names a sub-folder .a plain name."),
    (['data.dataset="fashion-mnist"'], "names a sub-folder .a plain name. of a photo folder"),
    (["data.seen_classes=[0]", "data.unseen_classes=[1]"], "cannot go with a class split"),
    (["data.labelled_fraction=0.5", 'data.unlabelled="drop"'], "nor unlabelled_folder"),
    (["pseudo_labels.from_epoch=1", "train.epochs=2"], "pseudo_labels works on the in-memory data sets, not a photo folder"),
])
def test_an_unlabelled_folder_is_refused_where_it_cannot_train(sets, message):
    from deephash.config import load_config
    from deephash.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config("fashion-mnist-unlabelled-48", [*CATALOGUE_SETS, 'data.images="photos"', 'data.unlabelled_folder="new"',
                                                    *sets])
