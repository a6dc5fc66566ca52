"""``data.limit``: an in-memory data set keeps its first items; a photo folder, listed class by
class, keeps items spread evenly over its listing, so every class stays in proportion."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from deephash.config import config_from_dict
from deephash.runs import load_split
from deephash.runs.data import limited_items


def test_limited_items_spread_over_a_listing_and_keep_the_first_of_an_array():
    assert limited_items(10, 4, listed_by_class=False).tolist() == [0, 1, 2, 3]
    assert limited_items(10, 4, listed_by_class=True).tolist() == [0, 2, 5, 7]  # floor(i * 10 / 4)
    spread = limited_items(1000, 37, listed_by_class=True)
    assert len(spread) == len(set(spread.tolist())) == 37 and spread.max() < 1000
    assert torch.equal(limited_items(5, 5, True), torch.arange(5))


def test_a_limited_photo_folder_keeps_every_class_in_proportion(tmp_path, tiny_fmnist):
    rng = np.random.default_rng(0)
    for c, name in enumerate(("a", "b", "c")):  # 3 classes x 12 files, listed class by class
        (tmp_path / "photos" / "train" / name).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                tmp_path / "photos" / "train" / name / f"{i:02d}.png")
    table = {"data": {"dataset": "folder", "images": str(tmp_path / "photos"), "image_size": 16, "channels": 3,
                      "limit": 9}}
    folder = load_split(config_from_dict(table), "train")
    assert torch.bincount(folder.targets).tolist() == [3, 3, 3]  # not the first 9 files: a and b only
    root, data = tiny_fmnist
    arrays = load_split(config_from_dict({"data": {"root": str(root), "limit": 9}}), "train")
    assert np.array_equal(arrays.data[:, 0].numpy(), data["train"][0][:9])  # the first nine, as before
