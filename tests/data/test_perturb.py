"""Near-duplicate perturbations: seeded, exact shifts against a loop, photometric changes in range."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deephash.data.perturb import perturb_images

IMAGES = torch.randint(0, 256, (6, 1, 12, 10), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
NONE = dict(shift=0, crop=1.0, brightness=0.0, contrast=0.0, noise=0.0)


def test_the_identity_when_every_perturbation_is_off():
    assert torch.equal(perturb_images(IMAGES, torch.Generator().manual_seed(1), **NONE), IMAGES)


def test_same_seed_same_copies_other_seed_other_copies():
    a = perturb_images(IMAGES, torch.Generator().manual_seed(3))
    assert torch.equal(a, perturb_images(IMAGES, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, perturb_images(IMAGES, torch.Generator().manual_seed(4)))


def test_integer_shifts_move_pixels_with_edge_repeat():
    """Against a per-image loop that shifts by the drawn (dy, dx) and repeats the edge pixels."""
    gen = torch.Generator().manual_seed(5)
    out = perturb_images(IMAGES, gen, **{**NONE, "shift": 2})
    draws = torch.Generator().manual_seed(5)  # perturb_batch draws dy, then dx, first
    dy = torch.floor(torch.rand(6, generator=draws) * 5) - 2
    dx = torch.floor(torch.rand(6, generator=draws) * 5) - 2
    for i in range(6):
        rows = np.clip(np.arange(12) - int(dy[i]), 0, 11)
        cols = np.clip(np.arange(10) - int(dx[i]), 0, 9)
        want = IMAGES[i, 0].numpy()[rows][:, cols]
        np.testing.assert_array_equal(out[i, 0].numpy(), want)
    assert (dy != 0).any() and (dx != 0).any()


def test_brightness_contrast_and_noise_stay_in_their_ranges():
    flat = torch.full((200, 1, 4, 4), 128, dtype=torch.uint8)
    bright = perturb_images(flat, torch.Generator().manual_seed(0), **{**NONE, "brightness": 0.1}).float()
    assert ((bright - 128).abs() <= 0.1 * 255 + 0.5).all() and bright.std() > 5
    noisy = perturb_images(flat, torch.Generator().manual_seed(0), **{**NONE, "noise": 0.02}).float()
    assert abs(float((noisy - 128).std()) - 0.02 * 255) < 0.5
    contrast = perturb_images(IMAGES, torch.Generator().manual_seed(0), **{**NONE, "contrast": 0.2}).float()
    spread = contrast.std(dim=(1, 2, 3)) / IMAGES.float().std(dim=(1, 2, 3))
    assert ((spread > 0.75) & (spread < 1.25)).all()


@pytest.mark.parametrize("channels", [1, 3])
def test_crop_and_jpeg_keep_shape_and_dtype(channels):
    images = torch.randint(0, 256, (4, channels, 16, 16), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    out = perturb_images(images, torch.Generator().manual_seed(2), crop=0.8, jpeg_quality=[50, 90])
    assert out.shape == images.shape and out.dtype == torch.uint8 and not torch.equal(out, images)
