"""Batched augmentations against a brute-force per-image oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deephash.data import Compose, RandomCrop, RandomHorizontalFlip, build_augment
from deephash.errors import ConfigError


def images(b: int = 16, c: int = 3, h: int = 6, w: int = 5) -> torch.Tensor:
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(0))


def crop_offsets(x: torch.Tensor, out: torch.Tensor, padding: int) -> list[tuple[int, int]]:
    """For each image, the (top, left) offsets of the padded image that reproduce its crop."""
    padded = F.pad(x, (padding,) * 4)
    h, w = out.shape[-2:]
    found = []
    for b in range(len(x)):
        matches = [(t, l) for t in range(padded.shape[2] - h + 1) for l in range(padded.shape[3] - w + 1)
                   if torch.equal(padded[b, :, t : t + h, l : l + w], out[b])]
        assert matches, f"image {b} is not a crop of its padded input"
        found.append(matches[0])
    return found


@pytest.mark.parametrize("size, padding", [(None, 2), (4, 0), ((5, 3), 1)])
def test_random_crop_is_a_crop_with_per_image_offsets(size, padding):
    x = images()
    out = RandomCrop(size, padding, torch.Generator().manual_seed(1))(x)
    h, w = (6, 5) if size is None else ((size, size) if isinstance(size, int) else size)
    assert out.shape == (16, 3, h, w)
    offsets = crop_offsets(x, out, padding)
    assert len(set(offsets)) > 3  # independent draws per image


def test_random_crop_seeded_and_bounds():
    x = images(64)
    a = RandomCrop(None, 3, torch.Generator().manual_seed(2))(x)
    b = RandomCrop(None, 3, torch.Generator().manual_seed(2))(x)
    assert torch.equal(a, b)
    offsets = crop_offsets(x, a, 3)
    assert {t for t, _ in offsets} <= set(range(7))
    with pytest.raises(ConfigError, match="exceeds"):
        RandomCrop(20, 1)(x)


def test_horizontal_flip():
    x = images(200)
    out = RandomHorizontalFlip(0.3, torch.Generator().manual_seed(0))(x)
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]
    kept = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 40 < sum(flipped) < 80
    assert torch.equal(RandomHorizontalFlip(0.0)(x), x) and torch.equal(RandomHorizontalFlip(1.0)(x), x.flip(-1))


def test_build_augment():
    x = images()
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    from_dict = build_augment({"crop_padding": 2, "hflip": True}, g1)(x)
    manual = Compose([RandomCrop(None, 2, g2), RandomHorizontalFlip(0.5, g2)])(x)
    assert torch.equal(from_dict, manual)
    listed = build_augment(["hflip", {"name": "random_crop", "size": 4, "padding": 1}])
    assert listed(x).shape == (16, 3, 4, 4)
    assert torch.equal(build_augment(None)(x), x) and torch.equal(build_augment({})(x), x)
    with pytest.raises(ConfigError, match="'rotate'"):
        build_augment({"rotate": 10})
    with pytest.raises(ConfigError, match="'blur'"):
        build_augment(["blur"])
    with pytest.raises(ConfigError, match="bad parameters"):
        build_augment([{"name": "hflip", "q": 1}])
