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

from deephash.data.images import (  # noqa: F401  (the upload errors are part of the service's interface)
    UPLOAD_FORMATS,
    CorruptImageError,
    ImageTooLargeError,
    UnsupportedImageError,
    decode_image,
    read_image,
)
from deephash.errors import CodeLengthError, DeephashError, NotFoundError
from deephash.retrieval.codes import n_bytes, pack_codes, padding_is_zero
from deephash.retrieval.search import IdLookup, search


@dataclass(frozen=True)
class Hit:
    """One search result: index id, Hamming distance, label (class name, int, list or None)."""

    id: int
    distance: int
    label: Any
    has_image: bool


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
        self._ids = np.asarray(index.ids, dtype=np.int64)
        self._lookup = IdLookup(self._ids)
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
        from deephash.runs import load_index, load_run, load_split, model_input_shape

        index_dir, run_dir = Path(index_dir), Path(run_dir)
        index = load_index(index_dir)
        model, config = load_run(run_dir, device="cpu")
        meta = index.metadata if isinstance(index.metadata, dict) else {}
        images: torch.Tensor | list[str] | None = None
        if meta.get("paths"):
            images = [str(p) for p in meta["paths"]]
        elif str(meta.get("source", "")).startswith("split:"):
            images = load_split(config, str(meta["source"])[len("split:"):], run_dir).data
        if isinstance(images, torch.Tensor):
            shape = tuple(images.shape[1:])
        else:  # an image folder: the size the run's training images had
            shape = model_input_shape(config, run_dir)
        classes = meta.get("classes") or list(getattr(model, "classes", []) or [])
        spec = getattr(model, "spec", None)
        return cls(index, model, shape, images, classes, max_pixels, seed=config.seed,
                   model_name=str(spec.backbone if spec is not None else type(model).__name__))

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
        position = self._lookup.position(ident)
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
        (found,) = search(self.index, packed, int(k), radius, lookup=self._lookup)
        return [Hit(int(i), int(d), self.label_of(int(p)), self.has_image(int(i)))
                for i, d, p in zip(found.ids.tolist(), found.distances.tolist(), found.positions.tolist())]

    def image_png(self, ident: int) -> bytes:
        """The database image of an id as PNG bytes.

        Raises:
            NotFoundError: unknown id, or the index has no reachable images.
        """
        if self.images is None:
            raise NotFoundError("this index has no database images to show")
        if not self.has_image(ident) or self._lookup.position(ident) < 0:
            raise NotFoundError(f"no image for item {ident}")
        if isinstance(self.images, list):
            return png_bytes(read_image(self.images[ident]))
        return png_bytes(self.images[ident].numpy())
