"""The service's image encoder: uint8 images ``(B, C, H, W)`` -> packed codes (+ re-rank vectors).

The search service never calls a model directly; it calls an :class:`ImageEncoder`, so that the
PyTorch model (:class:`TorchEncoder`) and an exported one (ONNX Runtime) plug in alike. The
interface is numpy in, numpy out: no torch in its signature.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["ImageEncoder", "TorchEncoder", "trace_encoder"]

LOG = logging.getLogger("deephash.serve")
#: Batch sizes on which a traced graph must give exactly the eager model's outputs (none is the
#: trace's own size, so a batch size baked into the graph is caught).
TRACE_CHECK_BATCHES = (1, 3)


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
        trace: on the CPU, run the model as one traced graph (:func:`trace_encoder`) where it
            traces to the same outputs; False, a model on a GPU (whose fused kernels could differ
            from the checked ones), or a model that does not trace: layer by layer in Python.
    """

    def __init__(self, model: torch.nn.Module, input_shape: tuple[int, int, int], name: str = "",
                 crop_fraction: float = 1.0, trace: bool = True) -> None:
        self.model = model
        self.crop_fraction = float(crop_fraction)
        self.bits = int(getattr(model, "bits", 0) or 0)
        self.input_shape = tuple(int(v) for v in input_shape)
        self.name = name or type(model).__name__
        #: the traced graph the encoder runs, or None (the eager model)
        parameter = next(model.parameters(), None)
        self._device = parameter.device if parameter is not None else None
        on_cpu = self._device is None or self._device.type == "cpu"
        self.graph = trace_encoder(model, self.input_shape) if trace and on_cpu else None

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """See :meth:`ImageEncoder.encode`."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
            if self._device is not None and self._device.type != "cpu":
                x = x.to(self._device)
            bits, vectors = self.graph(x) if self.graph is not None else _encoding(self.model, x)
            if bits.device.type != "cpu":  # one call each: every torch call lets the GIL go, and waits to take it back
                bits, vectors = bits.cpu(), vectors.cpu()
            return np.packbits(bits.numpy(), axis=1, bitorder="big"), vectors.numpy() if vectors.numel() else None


def _encoding(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images ``(B, C, H, W)`` -> (bits bool ``(B, bits)``: where the model's output is
    ``+1`` by the sign rule, float32 re-rank vectors ``(B, D)`` or an empty tensor): what the
    traced graph computes."""
    from deephash.signs import is_plus

    x = images.float().div(255)
    if hasattr(model, "encode_with_rerank"):
        out, vectors = model.encode_with_rerank(x)
    else:
        out, vectors = model(x), None
    return is_plus(out), x.new_empty(0) if vectors is None else vectors.float()


def trace_encoder(model: torch.nn.Module, input_shape: tuple[int, int, int]) -> Any | None:
    """The model's encoding (``encode_with_rerank``, or its output) as one TorchScript graph.

    Why: a traced graph runs every layer in C++ without taking Python's GIL between layers, so a
    batch encodes on one core while the server's event loop parses requests on the other; the
    eager model needs the GIL between every two layers and waits for the event loop each time
    (BENCHMARKS, "Search service": the batched PyTorch server stayed at one core). The graph runs
    the same kernels as the eager model and must give bit-identical outputs on batches of
    ``TRACE_CHECK_BATCHES`` images (other sizes than the trace's own); otherwise, or where the
    model does not trace (``torch.jit`` is deprecated in PyTorch and may go), None, with one
    warning line, and the encoder runs the model eagerly.

    Args:
        model: the hash model in eval mode.
        input_shape: ``(C, H, W)`` of its input.

    Returns:
        a callable ``uint8 (B, C, H, W) -> (bits bool (B, bits), re-rank vectors float32 (B, D) or
        empty)``, as :func:`_encoding` (the pixels are scaled to ``[0, 1]`` inside), or None.
    """
    import torch

    class _Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return _encoding(self.model, images)

    try:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else "cpu"
        generator = torch.Generator().manual_seed(0)

        def pixels(n: int) -> torch.Tensor:
            return torch.randint(0, 256, (n, *input_shape), generator=generator, dtype=torch.uint8).to(device)

        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python values it records as constants
            graph = torch.jit.trace(_Graph().eval(), pixels(2), check_trace=False)
            for n in TRACE_CHECK_BATCHES:
                x = pixels(n)
                if not all(torch.equal(a, b) for a, b in zip(graph(x), _encoding(model, x))):
                    raise ValueError(f"the traced graph's outputs differ from the model's on a batch of {n}")
    except Exception as error:  # noqa: BLE001 (any failure to trace means: serve the model eagerly)
        from deephash.errors import first_line

        LOG.warning("serving the model layer by layer: it does not trace to one graph (%s)", first_line(error))
        return None
    return graph
