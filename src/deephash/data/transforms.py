"""Per-image policies for photos (on Pillow images, in DataLoader workers): the evaluation resize and
centre crop (the model view, defined once in :mod:`deephash.data.images` and re-exported here), and
the training random resized crop, horizontal flip and colour jitter.

Both return uint8 ``(C, size, size)``; the batched augmentation of ``augment.py`` may still follow
on the model's device.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from deephash.data.images import EVAL_CROP_FRACTION, eval_resize_side, eval_transform, image_array

__all__ = ["EVAL_CROP_FRACTION", "eval_resize_side", "eval_transform", "random_resized_box", "train_transform"]

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
