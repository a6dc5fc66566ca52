"""The encoder the search service calls: images -> packed codes (+ re-rank vectors), no torch in
the signature (``/work/notes/encoder-interface.md``, branch ``serve``). ``TorchEncoder`` runs a
run's model; ``deephash.serve.onnx_encoder.OnnxEncoder`` an exported one without PyTorch. This
module imports torch only inside ``TorchEncoder``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from deephash.retrieval.codes import pack_codes
from deephash.signs import sign

if TYPE_CHECKING:
    import torch

__all__ = ["ImageEncoder", "TorchEncoder"]


class ImageEncoder(Protocol):
    """Images -> packed codes (+ re-rank vectors); ``encode`` may be called from several threads.

    Attributes:
        bits: code length (the service checks it against the index's).
        input_shape: ``(C, H, W)`` the encoder takes; uploads are decoded to it.
        name: shown as the model in ``/api/info``.
    """

    bits: int
    input_shape: tuple[int, int, int]
    name: str

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 ``(B, C, H, W)`` pixels -> packed uint8 ``(B, ceil(bits/8))`` codes and float32
        ``(B, D)`` re-rank vectors (None when the model keeps none); row i from row i."""
        ...


class TorchEncoder:
    """A run's model (eval mode) as an :class:`ImageEncoder`.

    Args:
        model: a hash model: ``encode_with_rerank(x)`` or ``model(x)`` gives ±1 codes of [0, 1] images.
        input_shape: the model's ``(C, H, W)``.
        name: the model's name for ``/api/info``.
    """

    def __init__(self, model: torch.nn.Module, input_shape: tuple[int, int, int], name: str = "") -> None:
        self.model = model
        self.bits = getattr(model, "bits", None)
        self.input_shape = tuple(int(v) for v in input_shape)
        self.name = name

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255)
            device = next(self.model.parameters()).device
            if hasattr(self.model, "encode_with_rerank"):
                codes, vectors = self.model.encode_with_rerank(x.to(device))
            else:
                codes, vectors = sign(self.model(x.to(device))), None
            return pack_codes(codes.cpu()), None if vectors is None else vectors.float().cpu().numpy()
