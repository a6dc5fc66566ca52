"""``OnnxEncoder``: a run's exported encoder (``deephash export``) on ONNX Runtime, without PyTorch.

It implements the service's encoder interface (``bits``, ``input_shape``, ``name``,
``encode(uint8 images) -> (packed codes, re-rank vectors)``) from an export folder:
``encoder.json`` says how images become the graph's input and how its outputs become codes
(see :mod:`deephash.runs.export`, which writes it). This module imports numpy, Pillow (through
the one image decoder) and onnxruntime, never torch: a server on it needs no PyTorch install.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from deephash.data.images import RESIZE_FILTER, decode_image
from deephash.errors import DataFormatError, DeephashError, NotFoundError, first_line
from deephash.signs import is_plus
from deephash.export_format import DESCRIPTION_FILE, FORMAT, FORMAT_VERSION
from deephash.retrieval.codes import pack_codes

__all__ = ["OnnxEncoder"]

LOG = logging.getLogger("deephash.serve")


class OnnxEncoder:
    """Images -> packed codes (+ re-rank vectors) with an exported encoder on ONNX Runtime.

    Args:
        model_dir: a folder written by ``deephash export RUN --format onnx``.
        threads: ONNX Runtime's intra-op threads (0: its default, every core).

    Attributes:
        bits: code length.
        input_shape: ``(C, H, W)`` of the images ``encode`` takes.
        name: the run's backbone and the runtime, e.g. ``"fmnist-cnn (onnxruntime)"``.
        classes: class names of the run's data set (may be empty).
        rerank_dim: size of the re-rank vectors, None when the run keeps none.
        crop_fraction: the run's model view's centre crop (``input.decode.crop_fraction``; 1.0,
            the whole shorter side, for an export written before it was recorded, with a warning).

    ``encode`` may be called from several threads at once (``InferenceSession.run`` is thread-safe).

    Raises:
        NotFoundError: no such folder or file. DataFormatError: ``encoder.json`` or the graph is
        not a deephash export (the file and key named). DeephashError: onnxruntime is missing.
    """

    def __init__(self, model_dir: str | os.PathLike, threads: int = 0) -> None:
        self.model_dir = Path(model_dir)
        self.description = _read_description(self.model_dir)
        d = self.description
        self.bits = int(d["bits"])
        self.input_shape = (int(d["input"]["channels"]), int(d["input"]["height"]), int(d["input"]["width"]))
        self.crop_fraction = float(d["input"]["decode"]["crop_fraction"])
        self.name = f"{d['run'].get('backbone') or 'model'} (onnxruntime)"
        self.classes = [str(c) for c in d.get("classes") or []]
        channels = self.input_shape[0]
        self._mean = np.asarray(d["input"]["mean"], dtype=np.float32).reshape(1, channels, 1, 1)
        self._std = np.asarray(d["input"]["std"], dtype=np.float32).reshape(1, channels, 1, 1)
        self._input = str(d["input"]["name"])
        self._outputs = [str(d["code_values"])] + ([str(d["rerank"]["output"])] if d.get("rerank") else [])
        self.rerank_dim = int(d["rerank"]["dim"]) if d.get("rerank") and d["rerank"].get("dim") else None
        self._session = _open_session(self.model_dir / str(d["model_file"]), self._input, self._outputs, threads)

    def normalise(self, images: np.ndarray) -> np.ndarray:
        """The graph's input: float32 ``(pixel / 255 - mean[c]) / std[c]`` of uint8 ``(B, C, H, W)``,
        the operations (and float32 rounding) of the run's model."""
        x = np.asarray(images).astype(np.float32) / np.float32(255)
        return (x - self._mean) / self._std

    def code_values(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The graph's outputs for uint8 ``(B, C, H, W)`` images: code values float32 ``(B, bits)``
        (their sign is the code) and re-rank vectors float32 ``(B, D)`` or None."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise DeephashError(f"the encoder takes uint8 images (B, {', '.join(map(str, self.input_shape))}), "
                                f"got {images.dtype} {tuple(images.shape)}")
        outputs = self._session.run(self._outputs, {self._input: self.normalise(images)})
        values = np.asarray(outputs[0], dtype=np.float32)
        return values, (np.asarray(outputs[1], dtype=np.float32) if len(outputs) > 1 else None)

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Packed codes uint8 ``(B, ceil(bits/8))`` (most significant bit first) and re-rank vectors
        float32 ``(B, D)`` (None when the run keeps none) of uint8 images ``(B, C, H, W)``."""
        values, vectors = self.code_values(images)
        return pack_codes(is_plus(values)), vectors

    def encode_image(self, data: bytes, max_pixels: int = 16_000_000) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`encode` of one image file's bytes, decoded by the one image decoder and fitted by
        the run's model view (``deephash.data.images.decode_image`` with ``crop_fraction``): the
        pixels ``deephash index build --images`` gives the same file."""
        return self.encode(decode_image(data, self.input_shape, max_pixels, crop_fraction=self.crop_fraction)[None])


def _read_description(model_dir: Path) -> dict[str, Any]:
    """``encoder.json`` of an export folder, checked key by key."""
    path = model_dir / DESCRIPTION_FILE
    if not model_dir.is_dir():
        raise NotFoundError(f"model folder {model_dir} does not exist (write one with `deephash export RUN --format onnx --out DIR`)")
    if not path.is_file():
        raise NotFoundError(f"{model_dir} is not an exported model: no {DESCRIPTION_FILE}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataFormatError(f"{path}: not valid JSON ({first_line(error)})") from None

    def bad(key: str, problem: str) -> DataFormatError:
        return DataFormatError(f"{path}: '{key}' {problem}")

    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise DataFormatError(f"{path}: not a deephash ONNX export ('format' is not {FORMAT!r})")
    if d.get("format_version") != FORMAT_VERSION:
        raise bad("format_version", f"is {d.get('format_version')!r}; this deephash reads {FORMAT_VERSION}")
    for key in ("bits", "input", "model_file", "code_values", "run"):
        if key not in d:
            raise bad(key, "is missing")
    if isinstance(d["bits"], bool) or not isinstance(d["bits"], int) or d["bits"] < 1:
        raise bad("bits", f"must be a positive integer, got {d['bits']!r}")
    spec = d["input"]
    if not isinstance(spec, dict):
        raise bad("input", "must be an object")
    for key in ("channels", "height", "width"):
        value = spec.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(f"input.{key}", f"must be a positive integer, got {value!r}")
    for key in ("mean", "std"):
        value = spec.get(key)
        if (not isinstance(value, list) or len(value) != spec["channels"]
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise bad(f"input.{key}", f"must be {spec['channels']} numbers (one per channel), got {value!r}")
    if not all(v > 0 for v in spec["std"]):
        raise bad("input.std", f"must be positive, got {spec['std']}")
    if not isinstance(spec.get("name"), str):
        raise bad("input.name", "must be the graph input's name")
    if spec["height"] != spec["width"]:
        raise bad("input.width", f"must equal input.height (the model view is square), got {spec['width']}")
    decode = spec.get("decode")
    if not isinstance(decode, dict):
        raise bad("input.decode", "must be an object")
    if decode.get("resize") != RESIZE_FILTER:
        raise bad("input.decode.resize", f"is {decode.get('resize')!r}; this deephash resizes {RESIZE_FILTER!r}")
    if "crop_fraction" not in decode:  # an export from before the model view was recorded
        LOG.warning("deephash: %s: no 'input.decode.crop_fraction' (an older export): uploads take the whole "
                    "shorter side (1.0); export the run again to record its own crop", path)
        spec["decode"] = dict(decode, crop_fraction=1.0)
    fraction = spec["decode"]["crop_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise bad("input.decode.crop_fraction", f"must be a number in (0, 1], got {fraction!r}")
    if not isinstance(d["run"], dict):
        raise bad("run", "must be an object")
    rerank = d.get("rerank")
    if rerank is not None and (not isinstance(rerank, dict) or not isinstance(rerank.get("output"), str)):
        raise bad("rerank", "must be null or an object with the output's name")
    if not isinstance(d["model_file"], str) or Path(d["model_file"]).name != d["model_file"]:
        raise bad("model_file", f"must be a file name inside the folder, got {d['model_file']!r}")
    return d


def _open_session(path: Path, input_name: str, outputs: list[str], threads: int) -> Any:
    """An ONNX Runtime session on the CPU whose input and outputs are the ones the description names."""
    try:
        import onnxruntime
    except ImportError as error:
        raise DeephashError(f"an exported model needs onnxruntime: pip install onnxruntime ({error})") from None
    if not path.is_file():
        raise NotFoundError(f"{path}: no such file (the export's graph)")
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    try:
        session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own types for a corrupt or foreign file
        raise DataFormatError(f"{path}: not a readable ONNX graph ({first_line(error)})") from None
    inputs = [i.name for i in session.get_inputs()]
    produced = {o.name for o in session.get_outputs()}
    if inputs != [input_name] or not set(outputs) <= produced:
        raise DataFormatError(f"{path}: the graph takes {inputs} and gives {sorted(produced)}, "
                              f"but {DESCRIPTION_FILE} names {input_name!r} and {outputs}")
    return session
