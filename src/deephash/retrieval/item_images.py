"""The images of items added to an index after it was built: ``INDEX/items/<id>.png``.

Written by ``deephash index add`` and the service's adds, read by the service; torch-free, so a
server on an exported model (``deephash serve --model``) shows them too.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from deephash._io import atomic_write_bytes

__all__ = ["ITEM_IMAGES", "drop_item_images", "item_image_path", "png_bytes", "save_item_image"]

#: Sub-folder of an index folder with the images of items added after it was built.
ITEM_IMAGES = "items"


def item_image_path(index_dir: str | os.PathLike, ident: int) -> Path:
    """Where the stored image of an added item lives: ``INDEX/items/<id>.png``."""
    return Path(index_dir) / ITEM_IMAGES / f"{int(ident)}.png"


def png_bytes(image: np.ndarray, max_side: int | None = None) -> bytes:
    """PNG of a uint8 ``(C, H, W)`` image (C = 1 or 3): full size (stored images), or shrunk to
    fit ``max_side`` pixels keeping its aspect (shown images; never enlarged)."""
    from PIL import Image

    array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    picture = Image.fromarray(np.ascontiguousarray(array))
    if max_side is not None:
        picture.thumbnail((int(max_side), int(max_side)))
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def save_item_image(index_dir: str | os.PathLike, ident: int, image: np.ndarray, durable: bool = True) -> Path:
    """Store an item's image (uint8 ``(C, H, W)``) as ``INDEX/items/<id>.png``, atomically.

    ``durable=False`` skips the per-file fsync (a bulk add syncs once at the end).
    """
    path = item_image_path(index_dir, ident)
    atomic_write_bytes(path, png_bytes(image), sync=durable)
    return path


def drop_item_images(index_dir: str | os.PathLike, ids: np.ndarray) -> None:
    """Delete the stored images of these ids (absent ones are fine)."""
    for ident in np.asarray(ids).tolist():
        item_image_path(index_dir, ident).unlink(missing_ok=True)
