"""The service's image encoder: uint8 images ``(B, C, H, W)`` -> packed codes (+ re-rank vectors).

The search service never calls a model directly; it calls an :class:`ImageEncoder`, so that the
PyTorch model (:class:`TorchEncoder`) and an exported one (ONNX Runtime) plug in alike. The
interface is numpy in, numpy out: no torch in its signature.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["ImageEncoder", "TorchEncoder"]


@runtime_checkable
class ImageEncoder(Protocol):
    """What the search service calls to encode images.

    Attributes:
        bits: code length (must equal the index's).
        input_shape: the ``(C, H, W)`` the encoder takes; uploads are decoded to it.
        name: shown as the service's model (``/api/info``).

    An encoder may also have ``crop_fraction`` (float): the centre crop of the model view that
    fits uploads to ``input_shape`` (``deephash.data.images.eval_transform``); without it, 1.0.
    """

    bits: int
    input_shape: tuple[int, int, int]
    name: str

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """One forward pass over a batch; may be called from several threads at once.

        Args:
            images: uint8 ``(B, C, H, W)``, raw pixels 0..255, ``B >= 1``.

        Returns:
            packed codes uint8 ``(B, ceil(bits/8))`` (most significant bit first, as
            :func:`~deephash.retrieval.codes.pack_codes`), and float32 ``(B, D)`` re-rank vectors
            or None when the model keeps none. Row ``i`` belongs to image ``i``.
        """
        ...


class TorchEncoder:
    """The run's PyTorch model as an :class:`ImageEncoder` (pixels scaled to ``[0, 1]``).

    Args:
        model: the hash model in eval mode (``encode_with_rerank`` when it has one, else its
            output's sign is the code).
        input_shape: the model's ``(C, H, W)``.
        name: the model's name for ``/api/info``.
        crop_fraction: the run's model view's centre crop (``runs.eval_crop_fraction``).
    """

    def __init__(self, model: torch.nn.Module, input_shape: tuple[int, int, int], name: str = "",
                 crop_fraction: float = 1.0) -> None:
        self.model = model
        self.crop_fraction = float(crop_fraction)
        self.bits = int(getattr(model, "bits", 0) or 0)
        self.input_shape = tuple(int(v) for v in input_shape)
        self.name = name or type(model).__name__

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """See :meth:`ImageEncoder.encode`."""
        import torch

        from deephash.retrieval.codes import pack_codes
        from deephash.signs import sign

        with torch.inference_mode():
            device = next(self.model.parameters()).device
            x = torch.from_numpy(np.ascontiguousarray(images)).to(device).float().div_(255)
            if hasattr(self.model, "encode_with_rerank"):
                codes, vectors = self.model.encode_with_rerank(x)
            else:
                codes, vectors = sign(self.model(x)), None
            return pack_codes(codes.cpu()), None if vectors is None else vectors.float().cpu().numpy()
