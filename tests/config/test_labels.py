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


def test_only_losses_that_declare_it_train_without_labels():
    free = {name for name in loss_names() if not loss_needs_labels(name)}
    assert free == {"view-hash", "instance-contrastive"}
    config_from_dict(_with(loss={"name": "instance-contrastive"}))
