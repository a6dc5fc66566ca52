"""Images: folders (class sub-folders or unlabelled trees), the one decoder (Pillow) for files and
uploads, and the one model view: the geometric step from a decoded image to a model's square input
(:func:`eval_transform`: the shorter side resized bilinearly, then the centre crop).

Every decode goes through :func:`to_model_mode` (EXIF orientation, transparency composited over
white, every Pillow mode to ``L`` or ``RGB``) behind a size guard against decompression bombs;
failures are one-line :class:`~deephash.errors.DataFormatError` subclasses that name the file or
say what was wrong with the upload. :func:`open_image` also lets a JPEG decode at a reduced scale
(Pillow's draft mode) when the model needs far fewer pixels than the file has.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deephash.errors import DataFormatError, DeephashError, NotFoundError, first_line

__all__ = ["EVAL_CROP_FRACTION", "IMAGE_EXTENSIONS", "RESIZE_FILTER", "UPLOAD_FORMATS", "CorruptImageError",
           "ImageTooLargeError", "UnsupportedImageError", "check_image_header", "decode_image", "decode_images", "eval_resize_side",
           "eval_transform", "image_array", "list_image_folder", "open_image", "read_image", "to_model_mode"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

#: The evaluation crop of a photo-folder run keeps this fraction of the resized shorter side
#: (timm's and torchvision's 0.875); other runs use 1.0 (the whole shorter side).
EVAL_CROP_FRACTION = 0.875
#: The model view's resize filter (Pillow's name), as ``encoder.json`` records it.
RESIZE_FILTER = "bilinear"


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` at any depth, sorted; hidden files and folders skipped."""
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def list_image_folder(root: str | os.PathLike, labelled: bool | None = None, unlabelled_dir: str = "",
                      with_unlabelled: bool = True) -> tuple[list[Path], np.ndarray, list[str]]:
    """List a folder of images: one sub-folder per class (at any depth below it), or unlabelled.

    Args:
        root: the folder.
        labelled: True: the sorted sub-folder names are the classes; False: every image file
            under ``root`` at any depth, unlabelled; None: labelled unless image files lie
            directly in ``root`` (a flat folder).
        unlabelled_dir: in a labelled folder, the name of a sub-folder that is not a class: its
            images (at any depth) are listed unlabelled after the classes' ones when
            ``with_unlabelled`` (then the sub-folder must exist), and left out otherwise.

    Returns:
        ``(paths, labels int64 (N,), classes)``: a label is the index of its class, ``-1`` for
        unlabelled images (``classes`` then empty); hidden files and files without an image
        extension are skipped.

    Raises:
        NotFoundError: no such folder (or unlabelled sub-folder), or no images in it.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotFoundError(f"{root}: no such folder (expected images, or one sub-folder of images per class)")
    if labelled is None:
        labelled = not any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
                           for p in root.iterdir())
    paths: list[Path] = []
    labels: list[int] = []
    classes: list[str] = []
    if labelled:
        classes = sorted(p.name for p in root.iterdir()
                         if p.is_dir() and not p.name.startswith(".") and p.name != unlabelled_dir)
        for index, name in enumerate(classes):
            files = _image_files(root / name)
            paths += files
            labels += [index] * len(files)
        if unlabelled_dir and with_unlabelled:
            if not (root / unlabelled_dir).is_dir():
                raise NotFoundError(f"{root / unlabelled_dir}: no such folder (the unlabelled images' sub-folder, "
                                    "beside the class sub-folders)")
            files = _image_files(root / unlabelled_dir)
            paths += files
            labels += [-1] * len(files)
    else:
        paths = _image_files(root)
        labels = [-1] * len(paths)
    if not paths:
        raise NotFoundError(f"{root}: no images found (expected {', '.join(IMAGE_EXTENSIONS)} files, "
                            f"{'in one sub-folder per class' if labelled else 'at any depth'})")
    return paths, np.asarray(labels, dtype=np.int64), classes


#: Formats a query upload may have; anything else is refused before decoding.
UPLOAD_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM")


class UnsupportedImageError(DataFormatError):
    """The upload is not an image in one of :data:`UPLOAD_FORMATS` (HTTP 415)."""


class CorruptImageError(DataFormatError):
    """The upload looks like an image but does not decode (HTTP 400)."""


class ImageTooLargeError(DataFormatError):
    """The image has more pixels than allowed, e.g. a decompression bomb (HTTP 413)."""


_GREY_MODES = ("1", "L", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_model_mode(image: Any, mode: str | None = None) -> Any:
    """A Pillow image upright (its EXIF orientation applied) in ``L`` or ``RGB``.

    Args:
        image: a loaded Pillow image of any mode.
        mode: ``"L"`` or ``"RGB"``; None: ``L`` for grey images (``1``, ``L``, ``I``, ``I;16``,
            ``F``), ``RGB`` otherwise.

    Returns:
        A Pillow image in ``mode``. Transparent pixels (``RGBA``, ``LA``, ``P`` with a
        transparency) are composited over white; 16-bit and 32-bit integer grey keeps its top 8
        of 16 bits (value >> 8, 32-bit values clipped to 0..65535 first); ``F`` is clipped to
        0..255; ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` convert with Pillow's own formulas.
    """
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    target = mode or ("L" if image.mode in _GREY_MODES else "RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    elif image.mode.startswith("I"):
        values = np.asarray(image).astype(np.int64)
        image = Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    return image if image.mode == target else image.convert(target)


def image_array(image: Any) -> np.ndarray:
    """A Pillow ``L``/``RGB`` image as uint8 ``(C, H, W)`` (a new array)."""
    array = np.asarray(image, dtype=np.uint8)
    return array[None].copy() if array.ndim == 2 else array.transpose(2, 0, 1).copy()


def eval_resize_side(size: int, crop_fraction: float = EVAL_CROP_FRACTION) -> int:
    """The shorter side images are resized to before the centre crop of ``size``: ``floor(size / crop_fraction)``."""
    return max(int(size), int(math.floor(size / crop_fraction)))


def eval_transform(image: Any, size: int, crop_fraction: float = EVAL_CROP_FRACTION) -> np.ndarray:
    """The model view: resize the shorter side to :func:`eval_resize_side` (bilinear), then crop the
    centre ``size x size``. Every path that encodes an image for retrieval takes it (folders, query
    files, uploads, the exported encoder).

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


def _square_side(shape: tuple[int, ...]) -> int:
    """The side of a square model input ``(C, S, S)``; the model view crops squares only."""
    if int(shape[-1]) != int(shape[-2]):
        raise DataFormatError(f"the model view crops a square input, got {shape[-2]}x{shape[-1]}")
    return int(shape[-1])


def _draft_and_load(image: Any, mode: str | None, min_side: int | None) -> Any:
    """Load an opened Pillow image (a JPEG at a reduced scale when both its sides are at least
    ``2 * min_side``: Pillow's draft mode keeps both ``>= min_side``), then :func:`to_model_mode`."""
    if min_side is not None and image.format == "JPEG" and min(image.size) >= 2 * min_side:
        image.draft(image.mode, (min_side, min_side))
    image.load()
    return to_model_mode(image, mode)


def decode_image(data: bytes, shape: tuple[int, int, int], max_pixels: int, *, crop_fraction: float) -> np.ndarray:
    """Decode an uploaded image and fit it to a model's input by the model view (:func:`eval_transform`),
    pixel for pixel as the same file read from a folder (:func:`open_image` with the same draft size).

    The pixel count is checked from the header, before any pixel data is decompressed.

    Args:
        data: the file's bytes.
        shape: the model's ``(C, S, S)``; C = 1 converts to grey, C = 3 to RGB.
        max_pixels: the largest ``width * height`` accepted.
        crop_fraction: the run's evaluation crop (``runs.eval_crop_fraction``: 0.875 for a
            photo-folder run, 1.0 otherwise).

    Returns:
        uint8 ``(C, S, S)``.

    Raises:
        UnsupportedImageError, CorruptImageError, ImageTooLargeError. DataFormatError: ``shape``
        is not square.
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
        side = _square_side(shape)
        try:
            image = _draft_and_load(image, "L" if shape[0] == 1 else "RGB", eval_resize_side(side, crop_fraction))
            return eval_transform(image, side, crop_fraction)
        except Exception as error:
            raise CorruptImageError(f"image does not decode: {first_line(error)}") from None



def decode_images(uploads: Sequence[bytes], shape: tuple[int, int, int], max_pixels: int, *,
                  crop_fraction: float) -> tuple[list[np.ndarray], list[int], dict[int, DeephashError]]:
    """:func:`decode_image` of each upload of a batch, a refused one kept apart from the others.

    Returns:
        ``(pixels, decoded, refused)``: uint8 ``(C, S, S)`` images of the uploads that decoded,
        their positions in ``uploads``, and the error of each refused upload by position.
    """
    pixels, decoded, refused = [], [], {}
    for i, data in enumerate(uploads):
        try:
            pixels.append(decode_image(data, shape, max_pixels, crop_fraction=crop_fraction))
            decoded.append(i)
        except DeephashError as error:
            refused[i] = error
    return pixels, decoded, refused

def read_image(path: str | os.PathLike, mode: str | None = None, size: int | None = None,
               crop_fraction: float = 1.0) -> np.ndarray:
    """Decode one image file with Pillow (:func:`open_image`), refusing decompression bombs.

    Args:
        path: the image file.
        mode: ``"L"`` or ``"RGB"`` to convert to; None keeps L for grey images, RGB otherwise.
        size: the side of the model view (:func:`eval_transform` with ``crop_fraction``); None
            keeps the image as it is.
        crop_fraction: the model view's centre crop.

    Returns:
        uint8 ``(C, H, W)`` with C = 1 for ``L`` and 3 for ``RGB``.
    """
    if size is None:
        return image_array(open_image(path, mode))
    image = open_image(path, mode, min_side=eval_resize_side(size, crop_fraction))
    return eval_transform(image, int(size), crop_fraction)


def open_image(path: str | os.PathLike, mode: str | None = None, min_side: int | None = None) -> Any:
    """Decode one image file into a Pillow image, upright, in ``L`` or ``RGB``, refusing bombs.

    Args:
        path: the image file.
        mode: ``"L"``, ``"RGB"`` or None, as :func:`to_model_mode` takes it.
        min_side: the smallest side the caller needs (pixels); a JPEG whose both sides are at
            least twice that is decoded at a reduced scale (Pillow's draft mode: 1/2, 1/4 or 1/8)
            that keeps both sides ``>= min_side``. None decodes at full size.

    Returns:
        A loaded Pillow image.

    Raises:
        NotFoundError: no such file. DataFormatError: not an image, truncated, or too many pixels
        (more than Pillow's ``Image.MAX_IMAGE_PIXELS``; a possible decompression bomb).
    """
    from PIL import Image

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return _draft_and_load(image, mode, min_side)
    except FileNotFoundError as err:
        raise NotFoundError(f"{path}: no such file") from err
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise DataFormatError(f"{path}: refused: image too large (possible decompression bomb)") from err
    except Exception as err:  # Pillow raises many types on corrupt input
        raise DataFormatError(f"{path}: cannot decode image: {first_line(err)}") from err


def check_image_header(path: str | os.PathLike) -> str | None:
    """The cheap check made when a folder is listed: the header alone (no pixel data) is read.

    Returns:
        None when Pillow recognises the file as an image of an accepted size, else the reason
        (one line: not an image, unreadable header, or too many pixels).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width < 1 or height < 1:
                    return f"empty image ({width}x{height})"
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        return "refused: image too large (possible decompression bomb)"
    except UnidentifiedImageError:
        return "not a readable image: no image format recognised"
    except Exception as err:  # Pillow raises many types on corrupt input
        return f"not a readable image: {first_line(err)}"
    return None
