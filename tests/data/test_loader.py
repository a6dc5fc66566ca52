"""BatchLoader: batches from the in-memory tensor, augmented on the device, and stacked views."""

from __future__ import annotations

import pytest
import torch

from deephash.config import config_from_dict
from deephash.data import ArrayDataset, BatchLoader
from deephash.data.augment import build_augment
from deephash.errors import ConfigError

DATA = ArrayDataset(torch.randint(0, 256, (12, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8),
                    torch.arange(12) % 3)


def test_views_are_independent_augmentations_stacked_view_major():
    augment = build_augment({"perturb": {"shift": 1, "noise": 0.05}}, generator=torch.Generator().manual_seed(1))
    loader = BatchLoader(DATA, [[0, 4, 5], [1, 2]], augment=augment, views=3)
    (x, y), (x2, y2) = list(loader)
    assert x.shape == (9, 1, 8, 8) and torch.equal(y, (DATA.targets[[0, 4, 5]]).repeat(3)) and len(y2) == 6
    views = x.view(3, 3, 1, 8, 8)
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])
    same = build_augment({"perturb": {"shift": 1, "noise": 0.05}}, generator=torch.Generator().manual_seed(1))
    plain = DATA.data[[0, 4, 5]].float() / 255
    assert torch.equal(views[0], same(plain)) and torch.equal(views[1], same(plain))  # one draw after another


def test_one_view_without_augmentation_is_the_images():
    (x, y), = list(BatchLoader(DATA, [[3, 7]]))
    assert torch.equal(x, DATA.data[[3, 7]].float() / 255) and torch.equal(y, DATA.targets[[3, 7]])


def test_views_need_an_augmentation():
    with pytest.raises(ConfigError, match="views > 1 needs data.augment"):
        config_from_dict({"data": {"dataset": "digits", "views": 2}})
    config_from_dict({"data": {"dataset": "digits", "views": 2, "augment": {"hflip": True}}})
