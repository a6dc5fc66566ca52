"""Seeded small perturbations of images: shift, crop, brightness, contrast, noise, JPEG.

:func:`perturb_batch` is one batched tensor operation on the images' device (an affine
``grid_sample`` for shift and crop, elementwise for the photometric changes); training uses it as
the ``perturb`` augmentation, and :func:`perturb_images` makes near-duplicate copies of uint8
images with it, adding a JPEG round trip through Pillow.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["perturb_batch", "perturb_images"]


def _uniform(n: int, generator: torch.Generator | None, device: torch.device, low: float = 0.0,
             high: float = 1.0) -> torch.Tensor:
    """``(n,)`` uniform draws in ``[low, high)`` from ``generator`` (on its own device), moved to ``device``."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return (low + (high - low) * torch.rand(n, generator=generator, device=gen_device)).to(device)


def perturb_batch(x: torch.Tensor, generator: torch.Generator | None, shift: int = 1, crop: float = 1.0,
                  brightness: float = 0.1, contrast: float = 0.1, noise: float = 0.02) -> torch.Tensor:
    """Perturb float images ``(B, C, H, W)`` in [0, 1], an independent draw per image.

    Args:
        x: float ``(B, C, H, W)`` in [0, 1], on any device.
        generator: where the draws come from (None: torch's global one).
        shift: largest integer translation in pixels, on each axis (edge pixels repeat).
        crop: smallest share of each side kept by a random crop that is resized back (1 = none).
        brightness: largest added brightness (uniform in ``[-b, b]``).
        contrast: largest relative contrast change (factor uniform in ``[1 - c, 1 + c]`` around the
            image's mean).
        noise: standard deviation of added Gaussian noise.

    Returns:
        float ``(B, C, H, W)`` in [0, 1], on ``x``'s device.
    """
    n, _, h, w = x.shape
    device = x.device
    dy = torch.floor(_uniform(n, generator, device) * (2 * shift + 1)) - shift
    dx = torch.floor(_uniform(n, generator, device) * (2 * shift + 1)) - shift
    scale = _uniform(n, generator, device, crop, 1.0)
    room = 1 - scale  # a crop may sit anywhere inside the image (normalised coordinates)
    cy, cx = _uniform(n, generator, device, -1, 1) * room, _uniform(n, generator, device, -1, 1) * room
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 1, 1] = scale, scale
    theta[:, 0, 2], theta[:, 1, 2] = cx - 2 * dx / w, cy - 2 * dy / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * _uniform(n, generator, device, 1 - contrast, 1 + contrast)[:, None, None, None] + mean
    x = x + _uniform(n, generator, device, -brightness, brightness)[:, None, None, None]
    if noise > 0:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        x = x + noise * torch.randn(x.shape, generator=generator, device=gen_device).to(device)
    return x.clamp(0, 1)


def perturb_images(images: torch.Tensor, generator: torch.Generator, shift: int = 1, crop: float = 1.0,
                   brightness: float = 0.1, contrast: float = 0.1, noise: float = 0.02,
                   jpeg_quality: Sequence[int] = ()) -> torch.Tensor:
    """Perturbed copies of uint8 images ``(N, C, H, W)`` (:func:`perturb_batch`, then an optional
    JPEG re-encoding at a quality drawn uniformly from ``jpeg_quality = [low, high]``).

    Returns:
        uint8 ``(N, C, H, W)``; the same ``generator`` state gives the same copies.
    """
    x = perturb_batch(images.float().div(255), generator, shift, crop, brightness, contrast, noise)
    out = x.mul(255).round().to(torch.uint8)
    if jpeg_quality:
        low, high = int(min(jpeg_quality)), int(max(jpeg_quality))
        qualities = torch.randint(low, high + 1, (len(out),), generator=generator).tolist()
        out = torch.stack([_jpeg(image, q) for image, q in zip(out, qualities)])
    return out


def _jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    """One uint8 ``(C, H, W)`` image through a JPEG encode and decode at ``quality``."""
    from PIL import Image

    array = image.numpy()
    picture = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert(picture.mode))
    return torch.from_numpy((decoded[None] if decoded.ndim == 2 else decoded.transpose(2, 0, 1)).copy())
