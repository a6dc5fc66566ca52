"""``png_bytes``: the one PNG writer of stored (full size, lossless) and shown (shrunk) images.

Oracle: PIL decoding the bytes back.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from deephash.retrieval.item_images import png_bytes


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.mark.parametrize("channels", [1, 3])
def test_stored_images_are_full_size_and_lossless(channels):
    image = np.random.default_rng(channels).integers(0, 256, (channels, 700, 300), dtype=np.uint8)
    back = decoded(png_bytes(image))
    np.testing.assert_array_equal(back, image[0] if channels == 1 else image.transpose(1, 2, 0))


@pytest.mark.parametrize(("height", "width"), [(700, 300), (300, 700), (512, 512), (513, 40), (8, 8)])
def test_shown_images_fit_max_side_keeping_aspect_and_are_never_enlarged(height, width):
    image = np.random.default_rng(0).integers(0, 256, (3, height, width), dtype=np.uint8)
    back = decoded(png_bytes(image, max_side=512))
    scale = min(1.0, 512 / max(height, width))
    assert back.shape[2] == 3 and max(back.shape[:2]) == min(512, max(height, width))
    assert abs(back.shape[0] - height * scale) <= 1 and abs(back.shape[1] - width * scale) <= 1
