"""``data.labels``: "class", or "none" with nothing in training that reads a label."""

from __future__ import annotations

import pytest

from deephash.config import config_from_dict
from deephash.errors import ConfigError
from deephash.losses import loss_names, loss_needs_labels

UNLABELLED = {"data": {"labels": "none", "views": 2, "augment": {"hflip": True}},
              "loss": {"name": "view-hash"}, "sampler": {"kind": "random"}}


def _with(**changes: dict) -> dict:
    table = {key: dict(value) for key, value in UNLABELLED.items()}
    for key, value in changes.items():
        table.setdefault(key, {}).update(value)
    return table


def test_an_unlabelled_config_validates_and_labels_default_to_class():
    assert config_from_dict(UNLABELLED).data.labels == "none"
    assert config_from_dict({}).data.labels == "class"


@pytest.mark.parametrize("changes, message", [
    ({"data": {"labels": "some"}}, "data.labels must be 'class' or 'none', got 'some'"),
    ({"loss": {"name": "csq"}}, "loss.name = 'csq'"),
    ({"loss": {"name": "contrastive-hash"}}, "loss.name = 'contrastive-hash'"),
    ({"sampler": {"kind": "balanced"}}, "sampler.kind = 'balanced'"),
    ({"model": {"aux_classes": 10}, "train": {"aux_weight": 0.5}}, "train.aux_weight > 0"),
    ({"selector": {"name": "all"}}, r"a \[selector\]"),
    ({"loss": {"name": "view-hash", "memory": {"size": 64}}}, "loss.memory"),
])
def test_what_reads_labels_is_refused_without_them(changes, message):
    with pytest.raises(ConfigError, match=f"{message}.* in <dict>"):
        config_from_dict(_with(**changes))


@pytest.mark.parametrize("data, loss, message", [
    ({"labelled_fraction": 0.0}, "contrastive-hash", r"labelled_fraction must be in \(0, 1\]"),
    ({"labelled_fraction": 1.5}, "contrastive-hash", r"labelled_fraction must be in \(0, 1\]"),
    ({"labelled_fraction": 0.5, "labels": "none"}, "view-hash", "1 with data.labels = 'none'"),
    ({"labelled_fraction": 0.5, "labels": "class"}, "dsh", "loss.name = 'dsh' .choose one that takes partial labels"),
])
def test_a_labelled_fraction_needs_a_loss_that_takes_partial_labels(data, loss, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(_with(data=data, loss={"name": loss}))


def test_a_labelled_fraction_validates_with_contrastive_hash():
    config = config_from_dict(_with(data={"labels": "class", "labelled_fraction": 0.25}, loss={"name": "contrastive-hash"}))
    assert config.data.labelled_fraction == 0.25


def test_dropping_the_unlabelled_needs_a_labelled_fraction_and_then_any_loss_trains():
    drop = {"labels": "class", "labelled_fraction": 0.1, "unlabelled": "drop"}
    config = config_from_dict(_with(data=drop, loss={"name": "csq"}, sampler={"kind": "balanced"}))
    assert config.data.unlabelled == "drop" and config_from_dict({}).data.unlabelled == "keep"
    for data, message in (({"labelled_fraction": 1.0}, "needs a labelled_fraction < 1"),
                          ({"unlabelled": "ignore"}, "data.unlabelled must be 'keep' or 'drop', got 'ignore'"),
                          ({"seen_classes": [0], "unseen_classes": [1], "train_on_database_unlabelled": True},
                           "neither train_on_database_unlabelled")):
        with pytest.raises(ConfigError, match=message):
            config_from_dict(_with(data={**drop, **data}, loss={"name": "csq"}))


OPEN = {"seen_classes": [0, 2], "unseen_classes": [1, 3], "labels": "class", "train_on_database_unlabelled": True}


def test_training_on_the_unlabelled_database_needs_a_class_split_and_partial_labels():
    assert config_from_dict(_with(data=OPEN, loss={"name": "contrastive-hash"})).data.train_on_database_unlabelled
    with pytest.raises(ConfigError, match="train_on_database_unlabelled: adds items without labels, but loss.name = 'dsh'"):
        config_from_dict(_with(data=OPEN, loss={"name": "dsh"}))
    for data in ({"seen_classes": [], "unseen_classes": []}, {"database_split": "test"}):
        with pytest.raises(ConfigError, match="needs a class split .* data.database_split = data.train_split"):
            config_from_dict(_with(data={**OPEN, **data}, loss={"name": "contrastive-hash"}))


def test_only_losses_that_declare_it_train_without_labels():
    free = {name for name in loss_names() if not loss_needs_labels(name)}
    assert free == {"view-hash", "instance-contrastive"}
    config_from_dict(_with(loss={"name": "instance-contrastive"}))


def test_the_labelled_share_sampler_needs_labelled_and_unlabelled_items():
    share = {"kind": "labelled-share", "labelled_share": 0.5}
    for data in ({"labels": "class", "labelled_fraction": 0.1}, OPEN):
        config = config_from_dict(_with(data=data, loss={"name": "contrastive-hash"}, sampler=share))
        assert (config.sampler.kind, config.sampler.labelled_share) == ("labelled-share", 0.5)
    for data, sampler, message in (
            ({"labels": "none"}, share, "sampler.kind = 'labelled-share' mixes labelled and unlabelled items"),
            ({"labels": "class"}, share, "needs data.labelled_fraction < 1"),
            ({"labels": "class", "labelled_fraction": 0.1, "unlabelled": "drop"}, share, "needs data.labelled_fraction < 1"),
            ({"labels": "class", "labelled_fraction": 0.1}, {**share, "labelled_share": 1.0},
             r"sampler.labelled_share must be in \(0, 1\), got 1.0"),
            ({"labels": "class", "labelled_fraction": 0.1}, {**share, "labelled_share": 0.0},
             r"sampler.labelled_share must be in \(0, 1\), got 0.0")):
        with pytest.raises(ConfigError, match=f"{message}.* in <dict>"):
            config_from_dict(_with(data=data, loss={"name": "contrastive-hash"}, sampler=sampler))


def test_pseudo_labels_need_unlabelled_images_of_the_labelled_classes_in_memory():
    semi = {"labels": "class", "labelled_fraction": 0.1}
    on = {"from_epoch": 2, "k": 5, "agreement": 0.8, "every": 3}
    config = config_from_dict(_with(data=semi, loss={"name": "contrastive-hash"}, train={"epochs": 3}, pseudo_labels=on))
    assert (config.pseudo_labels.from_epoch, config.pseudo_labels.k, config.pseudo_labels.agreement) == (2, 5, 0.8)
    assert config.pseudo_labels.every == 3
    assert (config_from_dict({}).pseudo_labels.from_epoch, config_from_dict({}).pseudo_labels.every) == (0, 1)  # off; each epoch
    for data, pseudo, epochs, message in (
            (semi, {**on, "k": 0}, 3, "pseudo_labels needs from_epoch >= 0, every >= 1, k >= 1 and agreement in"),
            (semi, {**on, "every": 0}, 3, "every >= 1"),
            (semi, {**on, "agreement": 0.0}, 3, "agreement in .0, 1.,"),
            (semi, {**on, "agreement": 1.01}, 3, "agreement in .0, 1.,"),
            (semi, {**on, "from_epoch": -1}, 3, "from_epoch >= 0"),
            (semi, on, 2, "pseudo_labels.from_epoch = 2 is not before train.epochs = 2"),
            ({"labels": "none"}, on, 3, "labels the training images that data.labelled_fraction < 1 leaves"),
            ({"labels": "class"}, on, 3, "there are none here"),
            ({**semi, "unlabelled": "drop"}, on, 3, "there are none here"),
            (OPEN, on, 3, "cannot go with data.train_on_database_unlabelled"),
            ({**semi, "dataset": "folder", "images": "/photos"}, on, 3, "not a photo folder"),
            ({**semi, "loss": "view-hash"}, on, 3, "loss.name = 'view-hash' reads no labels"),
            ({**semi, "loss_params": {"pseudo_label_threshold": 0.9}}, on, 3, "both label the unlabelled images")):
        with pytest.raises(ConfigError, match=f"{message}.* in <dict>"):
            data = dict(data)
            loss = {"name": data.pop("loss", "view-hash" if data["labels"] == "none" else "contrastive-hash"),
                    "params": data.pop("loss_params", {})}
            config_from_dict(_with(data=data, loss=loss, train={"epochs": epochs}, pseudo_labels=pseudo))
