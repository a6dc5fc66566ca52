"""Images: folders of class sub-folders, and the one decoder (Pillow) for files and uploads.

Every decode goes through :func:`_pixels` (mode conversion and bilinear resizing) behind a size
guard against decompression bombs; failures are one-line :class:`~deephash.errors.DataFormatError`
subclasses that name the file or say what was wrong with the upload.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from deephash.errors import DataFormatError, NotFoundError, first_line

__all__ = ["IMAGE_EXTENSIONS", "UPLOAD_FORMATS", "CorruptImageError", "ImageTooLargeError", "UnsupportedImageError",
           "decode_image", "list_image_folder", "read_image"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")




def list_image_folder(root: str | os.PathLike) -> tuple[list[Path], np.ndarray, list[str]]:
    """List a folder with one sub-folder per class.

    Returns:
        ``(paths, labels int64 (N,), classes)``: classes are the sorted sub-folder names, a label
        is the index of its class; hidden files and files without an image extension are skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotFoundError(f"{root}: no such folder (expected one sub-folder of images per class)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        files = sorted(
            p for p in (root / name).rglob("*")
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        paths += files
        labels += [index] * len(files)
    if not paths:
        raise NotFoundError(f"{root}: no images found (expected one sub-folder of {', '.join(IMAGE_EXTENSIONS)} files per class)")
    return paths, np.asarray(labels, dtype=np.int64), classes


#: Formats a query upload may have; anything else is refused before decoding.
UPLOAD_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM")


class UnsupportedImageError(DataFormatError):
    """The upload is not an image in one of :data:`UPLOAD_FORMATS` (HTTP 415)."""


class CorruptImageError(DataFormatError):
    """The upload looks like an image but does not decode (HTTP 400)."""


class ImageTooLargeError(DataFormatError):
    """The image has more pixels than allowed, e.g. a decompression bomb (HTTP 413)."""


def _pixels(image: Any, mode: str | None, size: tuple[int, int] | None) -> np.ndarray:
    """A loaded Pillow image converted (``L``/``RGB``; None: L for grey, else RGB) and resized
    (bilinear, ``(height, width)``; None keeps it): uint8 ``(C, H, W)``. The one pixel path of
    every decoder here."""
    from PIL import Image

    target = mode or ("L" if image.mode in ("1", "L", "I", "I;16", "F") else "RGB")
    image = image.convert(target)
    if size is not None and (image.height, image.width) != tuple(size):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[None].copy() if array.ndim == 2 else array.transpose(2, 0, 1).copy()


def decode_image(data: bytes, shape: tuple[int, int, int], max_pixels: int) -> np.ndarray:
    """Decode an uploaded image and fit it to a model's input.

    The pixel count is checked from the header, before any pixel data is decompressed.

    Args:
        data: the file's bytes.
        shape: the model's ``(C, H, W)``; C = 1 converts to grey, C = 3 to RGB.
        max_pixels: the largest ``width * height`` accepted.

    Returns:
        uint8 ``(C, H, W)``.

    Raises:
        UnsupportedImageError, CorruptImageError, ImageTooLargeError.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except UnidentifiedImageError:
        raise UnsupportedImageError(f"not an image of a supported type ({', '.join(UPLOAD_FORMATS)})") from None
    except Image.DecompressionBombError:
        raise ImageTooLargeError(f"image refused: more than {max_pixels} pixels (possible decompression bomb)") from None
    except Exception as error:  # Pillow raises many types on a corrupt header
        raise CorruptImageError(f"image header does not decode: {first_line(error)}") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLargeError(f"image of {width}x{height} pixels refused: the limit is {max_pixels} pixels")
        try:
            image.load()
            channels, rows, cols = shape
            return _pixels(image, "L" if channels == 1 else "RGB", (rows, cols))
        except Exception as error:
            raise CorruptImageError(f"image does not decode: {first_line(error)}") from None


def read_image(path: str | os.PathLike, mode: str | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode one image file with Pillow, refusing decompression bombs.

    Args:
        path: the image file.
        mode: ``"L"`` or ``"RGB"`` to convert to; None keeps L for grey images, RGB otherwise.
        size: ``(height, width)`` to resize to (bilinear); None keeps the image's size.

    Returns:
        uint8 ``(C, H, W)`` with C = 1 for ``L`` and 3 for ``RGB``.
    """
    from PIL import Image

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return _pixels(image, mode, size)
    except FileNotFoundError as err:
        raise NotFoundError(f"{path}: no such file") from err
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise DataFormatError(f"{path}: refused: image too large (possible decompression bomb)") from err
    except Exception as err:  # Pillow raises many types on corrupt input
        raise DataFormatError(f"{path}: cannot decode image: {first_line(err)}") from err
