"""Per-image policies for photos (on Pillow images, in DataLoader workers): the evaluation resize and
centre crop, and the training random resized crop, horizontal flip and colour jitter.

Both return uint8 ``(C, size, size)``; the batched augmentation of ``augment.py`` may still follow
on the model's device.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from deephash.data.images import image_array

__all__ = ["EVAL_CROP_FRACTION", "eval_resize_side", "eval_transform", "random_resized_box", "train_transform"]

#: The evaluation crop keeps this fraction of the resized shorter side (timm's and torchvision's 0.875).
EVAL_CROP_FRACTION = 0.875


def eval_resize_side(size: int, crop_fraction: float = EVAL_CROP_FRACTION) -> int:
    """The shorter side images are resized to before the centre crop of ``size``: ``floor(size / crop_fraction)``."""
    return max(int(size), int(math.floor(size / crop_fraction)))


def eval_transform(image: Any, size: int, crop_fraction: float = EVAL_CROP_FRACTION) -> np.ndarray:
    """Resize the shorter side to :func:`eval_resize_side` (bilinear), then crop the centre ``size x size``.

    Args:
        image: a Pillow ``L`` or ``RGB`` image.
        size: the model's input side in pixels.
        crop_fraction: the centre crop's share of the resized shorter side.

    Returns:
        uint8 ``(C, size, size)``; the crop's top-left corner is ``((W' - size) // 2, (H' - size) // 2)``
        of the resized ``W' x H'`` image.
    """
    from PIL import Image

    side = eval_resize_side(size, crop_fraction)
    width, height = image.size
    if width <= height:
        new = (side, max(side, round(height * side / width)))
    else:
        new = (max(side, round(width * side / height)), side)
    if new != (width, height):
        image = image.resize(new, Image.Resampling.BILINEAR)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return image_array(image.crop((left, top, left + size, top + size)))


def random_resized_box(width: int, height: int, rng: np.random.Generator, scale: tuple[float, float] = (0.08, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """A random crop box ``(left, top, right, bottom)`` of a share in ``scale`` of the image's area
    and an aspect ratio in ``ratio`` (log-uniform); ten tries, then the centre crop of the largest
    box within ``ratio`` (torchvision's RandomResizedCrop rule)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def train_transform(image: Any, size: int, rng: np.random.Generator, scale: tuple[float, float] = (0.08, 1.0),
                    jitter: float = 0.4, hflip: bool = True) -> np.ndarray:
    """Random resized crop to ``size x size``, a horizontal flip with probability 1/2, then
    brightness, contrast and saturation each scaled by a factor drawn from ``[1 - jitter, 1 + jitter]``.

    Args:
        image: a Pillow ``L`` or ``RGB`` image.
        size: output side in pixels.
        rng: the draws (seed it per item for results independent of the number of workers).
        scale: the crop's share of the image's area.
        jitter: colour jitter strength (0 = none); saturation only changes RGB images.
        hflip: whether to flip.

    Returns:
        uint8 ``(C, size, size)``.
    """
    from PIL import Image, ImageEnhance

    box = random_resized_box(*image.size, rng, tuple(scale))
    image = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if hflip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if jitter > 0:
        factors = rng.uniform(1 - jitter, 1 + jitter, size=3)
        image = ImageEnhance.Brightness(image).enhance(float(factors[0]))
        image = ImageEnhance.Contrast(image).enhance(float(factors[1]))
        if image.mode == "RGB":
            image = ImageEnhance.Color(image).enhance(float(factors[2]))
    return image_array(image)
