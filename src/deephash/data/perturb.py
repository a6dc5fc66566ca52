"""Seeded small perturbations of images, for near-duplicate retrieval: shift, crop, brightness,
contrast, noise and JPEG re-encoding.

Everything but the JPEG step is one batched tensor operation (an affine ``grid_sample`` for shift
and crop, elementwise for the photometric changes); the JPEG step round-trips each image through
Pillow.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["perturb_images"]


def perturb_images(images: torch.Tensor, generator: torch.Generator, shift: int = 1, crop: float = 1.0,
                   brightness: float = 0.1, contrast: float = 0.1, noise: float = 0.02,
                   jpeg_quality: Sequence[int] = ()) -> torch.Tensor:
    """Perturbed copies of uint8 images ``(N, C, H, W)``, each drawn independently from ``generator``.

    Args:
        images: uint8 ``(N, C, H, W)``.
        generator: CPU generator; the same seed gives the same copies.
        shift: largest integer translation in pixels, on each axis (edge pixels repeat).
        crop: smallest share of each side kept by a random crop that is resized back (1 = none).
        brightness: largest added brightness, in [0, 1] units (uniform in ``[-b, b]``).
        contrast: largest relative contrast change (factor uniform in ``[1 - c, 1 + c]`` around the
            image's mean).
        noise: standard deviation of added Gaussian noise, in [0, 1] units.
        jpeg_quality: ``[low, high]`` JPEG quality drawn uniformly per image, or empty for none.

    Returns:
        uint8 ``(N, C, H, W)``.
    """
    n, _, h, w = images.shape
    x = images.float().div(255)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    scale = uniform(crop, 1.0) if crop < 1 else torch.ones(n)
    dy = torch.randint(-shift, shift + 1, (n,), generator=generator).float()
    dx = torch.randint(-shift, shift + 1, (n,), generator=generator).float()
    room = 1 - scale  # a crop may sit anywhere inside the image (normalised coordinates)
    cy, cx = uniform(-1, 1) * room, uniform(-1, 1) * room
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = scale, scale
    theta[:, 0, 2], theta[:, 1, 2] = cx - 2 * dx / w, cy - 2 * dy / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * uniform(1 - contrast, 1 + contrast)[:, None, None, None] + mean
    x = x + uniform(-brightness, brightness)[:, None, None, None]
    x = x + noise * torch.randn(x.shape, generator=generator)
    out = x.clamp(0, 1).mul(255).round().to(torch.uint8)
    if jpeg_quality:
        low, high = int(min(jpeg_quality)), int(max(jpeg_quality))
        qualities = torch.randint(low, high + 1, (n,), generator=generator).tolist()
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
