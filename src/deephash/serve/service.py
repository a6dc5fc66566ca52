"""``SearchService``: a loaded index, the run's model and the database images, no HTTP.

The web app (:mod:`deephash.serve.app`) is a thin shell over this class: every method here takes
and returns plain Python / numpy values and raises :class:`~deephash.errors.DeephashError`
subclasses for bad input, which the app maps to status codes.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deephash.errors import CodeLengthError, DataFormatError, DeephashError, NotFoundError

#: Formats a query upload may have; anything else is refused before decoding.
UPLOAD_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM")


class UnsupportedImageError(DataFormatError):
    """The upload is not an image in one of :data:`UPLOAD_FORMATS` (HTTP 415)."""


class CorruptImageError(DataFormatError):
    """The upload looks like an image but does not decode (HTTP 400)."""


class ImageTooLargeError(DataFormatError):
    """The image has more pixels than the service accepts, e.g. a decompression bomb (HTTP 413)."""


@dataclass(frozen=True)
class Hit:
    """One search result: index id, Hamming distance, label (class name, int, list or None)."""

    id: int
    distance: int
    label: Any
    has_image: bool


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
        raise CorruptImageError(f"image header does not decode: {_first_line(error)}") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLargeError(f"image of {width}x{height} pixels refused: the limit is {max_pixels} pixels")
        try:
            image.load()
            channels, rows, cols = shape
            converted = image.convert("L" if channels == 1 else "RGB")
            if converted.size != (cols, rows):
                converted = converted.resize((cols, rows), Image.Resampling.BILINEAR)
            array = np.array(converted, dtype=np.uint8)
        except Exception as error:
            raise CorruptImageError(f"image does not decode: {_first_line(error)}") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy()


def png_bytes(image: np.ndarray, max_side: int = 512) -> bytes:
    """Encode uint8 ``(C, H, W)`` (C = 1 or 3) as PNG, shrunk to fit ``max_side`` pixels."""
    from PIL import Image

    array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    picture = Image.fromarray(np.ascontiguousarray(array))
    picture.thumbnail((max_side, max_side))
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def parse_hex_code(text: str, bits: int) -> np.ndarray:
    """A packed code from its hex string: uint8 ``(1, ceil(bits/8))``.

    Raises:
        CodeLengthError: wrong number of hex digits (names both lengths).
        DeephashError: not hexadecimal, or non-zero padding bits.
    """
    from deephash.retrieval.codes import n_bytes, padding_is_zero

    text = text.strip().lower().removeprefix("0x")
    want = 2 * n_bytes(bits)
    if len(text) != want:
        raise CodeLengthError(f"code has {len(text)} hex digits but the index holds {bits}-bit codes ({want} hex digits)")
    try:
        packed = np.frombuffer(bytes.fromhex(text), dtype=np.uint8)[None, :].copy()
    except ValueError:
        raise DeephashError("code is not a hexadecimal string") from None
    if not padding_is_zero(packed, bits):
        raise DeephashError(f"code has non-zero padding bits beyond bit {bits}")
    return packed


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


class SearchService:
    """Query an index with images or codes, and fetch its database images.

    Args:
        index: a loaded ``HashIndex`` (labels and metadata as ``build_index`` writes them).
        model: the run's hash model (eval mode); ``model.encode(x)`` gives ±1 codes.
        input_shape: the model's ``(C, H, W)``.
        images: database images: uint8 ``(N, C, H, W)`` rows addressed by id (a data-set split),
            a list of N file paths addressed by id (an image folder), or None.
        classes: class names, ``classes[label]``.
        max_pixels: largest ``width * height`` of an upload.
        seed: seed of the random-item generator.
    """

    def __init__(
        self,
        index: Any,
        model: torch.nn.Module,
        input_shape: tuple[int, int, int],
        images: torch.Tensor | list[str] | None = None,
        classes: list[str] | None = None,
        max_pixels: int = 16_000_000,
        seed: int = 0,
        model_name: str = "",
    ) -> None:
        if getattr(model, "bits", None) != index.bits:
            raise CodeLengthError(f"the model makes {getattr(model, 'bits', None)}-bit codes but the index holds {index.bits}-bit codes")
        self.index = index
        self.model = model
        self.input_shape = tuple(int(v) for v in input_shape)
        self.images = images
        self.classes = list(classes or [])
        self.max_pixels = int(max_pixels)
        self.model_name = model_name
        self._rng = np.random.default_rng(seed)
        ids = np.asarray(index.ids, dtype=np.int64)
        self._order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._order]
        self._ids = ids
        self._codes = np.asarray(index.codes)
        labels = index.labels
        self._labels = None if labels is None else np.asarray(labels)

    @classmethod
    def load(cls, index_dir: str | os.PathLike, run_dir: str | os.PathLike, max_pixels: int = 16_000_000) -> SearchService:
        """Open an index folder and the run that built it (model on the CPU).

        Database images come from the index metadata: ``paths`` (an image folder) or
        ``source = "split:NAME"`` (that split of the run's data set); they are optional.

        Raises:
            NotFoundError / DataFormatError: no such index or run. CodeLengthError: the run's
            code length differs from the index's.
        """
        from deephash import experiment
        from deephash.retrieval.index import HashIndex

        index_dir, run_dir = Path(index_dir), Path(run_dir)
        if not index_dir.is_dir():
            raise NotFoundError(f"index directory {index_dir} does not exist")
        index = HashIndex.load(index_dir)
        model, config = experiment.load_run(run_dir, device="cpu")
        meta = index.metadata if isinstance(index.metadata, dict) else {}
        images: torch.Tensor | list[str] | None = None
        if meta.get("paths"):
            images = [str(p) for p in meta["paths"]]
        elif str(meta.get("source", "")).startswith("split:"):
            images = experiment.load_split(config, str(meta["source"])[len("split:"):], run_dir).data
        if isinstance(images, torch.Tensor):
            shape = tuple(images.shape[1:])
        else:  # an image folder: the size the run's training images had
            shape = experiment.model_input_shape(config, run_dir)
        classes = meta.get("classes") or list(getattr(model, "classes", []) or [])
        spec = getattr(model, "spec", None) or {}
        return cls(index, model, shape, images, classes, max_pixels, seed=config.seed,
                   model_name=str(spec.get("backbone", type(model).__name__)))

    # ------------------------------------------------------------------ facts
    @property
    def bits(self) -> int:
        """Code length of the index."""
        return int(self.index.bits)

    def info(self) -> dict[str, Any]:
        """bits, size, model, factory, classes and the model's input shape."""
        return {"bits": self.bits, "size": len(self._ids), "model": self.model_name,
                "factory": str(self.index.factory), "classes": self.classes,
                "input_shape": list(self.input_shape), "has_images": self.images is not None}

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        """Rows of the given ids in the index (``-1`` for unknown ids): int64 like ``ids``."""
        if len(self._sorted_ids) == 0:
            return np.full(ids.shape, -1, dtype=np.int64)
        where = np.searchsorted(self._sorted_ids, ids).clip(max=len(self._sorted_ids) - 1)
        return np.where(self._sorted_ids[where] == ids, self._order[where], -1)

    def label_of(self, position: int) -> Any:
        """Label of an index row: its class name when known, else the int (a list for multi-hot)."""
        if self._labels is None:
            return None
        value = self._labels[position]
        if value.ndim == 1:
            return [self._name(int(c)) for c in np.flatnonzero(value)]
        return self._name(int(value))

    def _name(self, label: int) -> Any:
        return self.classes[label] if 0 <= label < len(self.classes) else label

    def has_image(self, ident: int) -> bool:
        """Whether the database image of this id can be served."""
        return self.images is not None and 0 <= ident < len(self.images)

    # ------------------------------------------------------------------ work
    @torch.inference_mode()
    def encode_image(self, data: bytes) -> np.ndarray:
        """The packed code of an uploaded image: uint8 ``(1, ceil(bits/8))``."""
        from deephash.retrieval.codes import pack_codes

        image = decode_image(data, self.input_shape, self.max_pixels)
        x = torch.from_numpy(image)[None].float().div_(255)
        device = next(self.model.parameters()).device
        codes = self.model.encode(x.to(device)) if hasattr(self.model, "encode") else torch.where(self.model(x.to(device)) >= 0, 1.0, -1.0)
        return pack_codes(codes.cpu())

    def item(self, ident: int) -> tuple[np.ndarray, Any]:
        """Stored packed code ``(1, B)`` and label of a database item.

        Raises:
            NotFoundError: no item with this id.
        """
        in_range = -(2**63) <= ident < 2**63
        position = int(self._positions(np.array([ident], dtype=np.int64))[0]) if in_range else -1
        if position < 0:
            raise NotFoundError(f"no item with id {ident} in the index")
        return self._codes[position:position + 1], self.label_of(position)

    def random_id(self) -> int:
        """A uniformly drawn id of the index."""
        if len(self._ids) == 0:
            raise NotFoundError("the index is empty")
        return int(self._ids[self._rng.integers(len(self._ids))])

    def search(self, packed: np.ndarray, k: int, radius: int | None = None) -> list[Hit]:
        """The ``k`` nearest items of one packed code ``(1, B)``, within ``radius`` when given.

        Results are nearest first; fewer than ``k`` when the index is smaller or the radius cuts.
        """
        distances, ids = self.index.search(packed, int(k))
        keep = ids[0] >= 0
        if radius is not None:
            keep &= distances[0] <= min(int(radius), self.bits)
        distances, ids = distances[0][keep], ids[0][keep]
        positions = self._positions(ids)
        return [Hit(int(i), int(d), self.label_of(int(p)), self.has_image(int(i)))
                for i, d, p in zip(ids.tolist(), distances.tolist(), positions.tolist())]

    def image_png(self, ident: int) -> bytes:
        """The database image of an id as PNG bytes.

        Raises:
            NotFoundError: unknown id, or the index has no reachable images.
        """
        if self.images is None:
            raise NotFoundError("this index has no database images to show")
        if not self.has_image(ident) or int(self._positions(np.array([ident], dtype=np.int64))[0]) < 0:
            raise NotFoundError(f"no image for item {ident}")
        if isinstance(self.images, list):
            from deephash.data.sources import read_image

            return png_bytes(read_image(self.images[ident]))
        return png_bytes(self.images[ident].numpy())
