"""``deephash export RUN --format onnx --out DIR``: a run's encoder as an ONNX graph plus a JSON
that says everything around it, so that a process without PyTorch (``deephash serve --model``,
:class:`deephash.serve.onnx_encoder.OnnxEncoder`) makes the run's codes.

The folder holds ``encoder.onnx`` and ``encoder.json``. The graph maps normalised images
float32 ``(B, C, H, W)`` (a dynamic batch) to ``code_values`` float32 ``(B, bits)``, the values
whose sign (0 ↦ +1) is the code, and, when the run keeps re-rank vectors, ``rerank`` float32
``(B, D_r)``. Each code rule's steps before its sign are inside the graph, fitted tensors included:

- ``sign``: the hash head's linear layer;
- ``pca``: ``(pca_rows(source, power) - mean) @ projection`` (`deephash.models.pca_codes.pca_values`);
- ``posterior``: the whole rule (`posterior_path_codes` over the aux classifier's logits and
  the class hash centers), so its values are already ±1 and the sign leaves them unchanged.

Outside the graph, written in ``encoder.json``: decoding (Pillow, mode ``L`` or ``RGB``) and the
run's model view (``input.decode``: the shorter side resized bilinearly to ``floor(H / crop_fraction)``,
then the centre ``H x W``; ``deephash.data.images.eval_transform``), the normalisation
``(pixel / 255 - mean[c]) / std[c]`` and the sign.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deephash._io import atomic_replace_dir
from deephash._version import __version__
from deephash.errors import DeephashError, first_line
from deephash.signs import is_plus
from deephash.export_format import DESCRIPTION_FILE, ENCODER_FILE, FORMAT, FORMAT_VERSION, INPUT, RERANK, VALUES
from deephash.models.heads import HashHead
from deephash.models.pca_codes import pca_values
from deephash.models.posterior_codes import posterior_path_codes
from deephash.models.retrieval_model import RERANK_VECTORS
from deephash.data.images import RESIZE_FILTER
from deephash.runs.data import eval_crop_fraction, model_input_shape
from deephash.runs.model_file import load_run

__all__ = ["EXPORT_FORMATS", "EncoderGraph", "export_run"]

EXPORT_FORMATS = ("onnx",)
OPSET = 17
#: How far the ONNX Runtime outputs may lie from PyTorch's on the check batch of an export.
CHECK_TOLERANCE = 1e-4


def _sign_rule_values(model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    return model.head.linear(feats)


def _posterior_rule_values(model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    return posterior_path_codes(model.aux(feats), model.code_centers, model.code_temperature)


def _pca_rule_values(model: nn.Module, source: torch.Tensor) -> torch.Tensor:
    return pca_values(source, model.code_mean, model.code_projection, model.code_power)


#: Each code rule's values before its sign: ``values(model, code input)`` -> float (B, bits).
_RULE_VALUES = {"sign": _sign_rule_values, "posterior": _posterior_rule_values, "pca": _pca_rule_values}
#: What ``encoder.json`` says about each rule (its fitted tensors are constants of the graph).
_RULE_NOTES = {
    "sign": "code_values = the hash head's linear layer; code = sign(code_values), 0 -> +1",
    "posterior": "code_values = posterior_path_codes(aux logits, code_centers, temperature), already +-1",
    "pca": "code_values = (pca_rows(source, power) - code_mean) @ code_projection; code = sign(code_values), 0 -> +1",
}


class EncoderGraph(nn.Module):
    """What the exported graph computes: normalised images -> code values (+ re-rank vectors).

    Args:
        model: a hash ``RetrievalModel`` in eval mode; a copy without its ``Normalize`` is kept.

    Shapes:
        forward: float (B, C, H, W), already ``(x - mean) / std`` -> float (B, bits)
        [, float (B, D_r) when ``model.rerank``].
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        inner = copy.deepcopy(model).eval().to(device="cpu", memory_format=torch.contiguous_format)
        inner.channels_last = False
        inner.normalize = nn.Identity()  # done outside the graph, by the description's mean and std
        self.model = inner

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        with_map = "map" in (m.code_source, m.rerank_source if m.rerank else "")
        feats, mapped = m.features_and_map(x, with_map)
        values = _RULE_VALUES[m.code_rule](m, mapped if m.code_source == "map" else feats)
        if not m.rerank:
            return (values,)
        rerank_input = mapped if m.rerank_source == "map" else feats
        return values, RERANK_VECTORS.get(m.rerank)(m, feats, rerank_input)


def _check_exportable(model: nn.Module, run_dir: Path) -> None:
    if not isinstance(getattr(model, "head", None), HashHead):
        raise DeephashError(f"{run_dir} holds an embedding model; export needs a hash model (model.head = 'hash')")
    if model.code_rule not in _RULE_VALUES:
        raise DeephashError(f"{run_dir}: code_rule {model.code_rule!r} cannot be exported (known: {sorted(_RULE_VALUES)})")


def _description(model: nn.Module, config: Any, shape: tuple[int, int, int], run_dir: Path,
                 rerank_dim: int | None) -> dict[str, Any]:
    """The content of ``encoder.json`` (``rerank_dim``: the width of the graph's re-rank output)."""
    channels, height, width = shape
    rule: dict[str, Any] = {"name": model.code_rule, "in_graph": _RULE_NOTES[model.code_rule]}
    if model.code_rule == "posterior":
        rule.update(temperature=model.code_temperature, fitted={"code_centers": list(model.code_centers.shape)})
    elif model.code_rule == "pca":
        rule.update(source=model.code_source, power=model.code_power,
                    fitted={"code_mean": list(model.code_mean.shape), "code_projection": list(model.code_projection.shape)})
    spec = model.spec
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "deephash_version": __version__,
        "model_file": ENCODER_FILE,
        "opset": OPSET,
        "run": {"name": config.name, "path": str(run_dir.resolve()), "backbone": spec.backbone if spec else ""},
        "input": {
            "name": INPUT, "layout": "NCHW", "dtype": "float32", "channels": channels, "height": height, "width": width,
            "decode": {"mode": "L" if channels == 1 else "RGB", "resize": RESIZE_FILTER,
                       "crop_fraction": eval_crop_fraction(config),
                       "view": "the shorter side resized to floor(height / crop_fraction), then the centre height x width"},
            "mean": [float(v) for v in model.normalize.mean.flatten()],
            "std": [float(v) for v in model.normalize.std.flatten()],
            "normalise": "x = (pixel / 255 - mean[c]) / std[c], float32",
        },
        "bits": int(model.bits),
        "code_values": VALUES,
        "code_rule": rule,
        "sign": "bit = 1 where code_value >= 0 (0 -> +1), packed most significant bit first",
        "rerank": {"output": RERANK, "kind": model.rerank, "dim": rerank_dim} if model.rerank else None,
        "classes": list(getattr(model, "classes", []) or []),
    }


def _check_batch(shape: tuple[int, int, int]) -> torch.Tensor:
    """8 seeded noise images in [0, 1], float32 (8, C, H, W): the export's trace and check batch."""
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (8, *shape), dtype=np.uint8)).float().div_(255)


def _check_codes(model: nn.Module, images: torch.Tensor, values: np.ndarray) -> None:
    """The graph's code values against the model's own codes (``encode``) of [0, 1] ``images``:
    the same sign wherever a value is further than `CHECK_TOLERANCE` from 0. A never-fitted code
    rule raises its ConfigError here."""
    with torch.inference_mode():
        codes = model.encode(images).numpy()
    clear = np.abs(values) > CHECK_TOLERANCE
    if not np.array_equal(is_plus(values)[clear], (codes > 0)[clear]):
        raise DeephashError(f"the exported graph's codes differ from the model's ({model.code_rule} rule)")


def _onnx_bytes(graph: EncoderGraph, x: torch.Tensor, outputs: list[str]) -> bytes:
    """The graph as ONNX (TorchScript exporter: the dynamo one needs onnxscript, and this graph has no control flow)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's DeprecationWarning and tracer notes
        torch.onnx.export(graph, (x,), buffer, dynamo=False, opset_version=OPSET, input_names=[INPUT],
                          output_names=outputs, dynamic_axes={name: {0: "batch"} for name in [INPUT, *outputs]})
    return buffer.getvalue()


def _check_onnx(data: bytes, graph: EncoderGraph, x: torch.Tensor, outputs: list[str]) -> list[np.ndarray]:
    """ONNX's checker, then ONNX Runtime against PyTorch on ``x``: every output within `CHECK_TOLERANCE`.
    Returns ONNX Runtime's outputs."""
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise DeephashError(f"export to ONNX needs onnx and onnxruntime: pip install onnx onnxruntime ({error})") from None
    onnx.checker.check_model(onnx.load_model_from_string(data))
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(outputs, {INPUT: x.numpy()})
    with torch.inference_mode():
        want = [t.numpy() for t in graph(x)]
    for name, a, b in zip(outputs, got, want):
        gap = float(np.abs(a - b).max()) if a.size else 0.0
        if a.shape != b.shape or not gap <= CHECK_TOLERANCE:
            raise DeephashError(f"the exported graph's {name} differs from PyTorch's by {gap:.3g} (shape {a.shape} vs {b.shape})")
    return got


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, format: str = "onnx") -> Path:
    """Export a run's hash encoder to ``out`` (``encoder.onnx`` + ``encoder.json``, see the module docstring).

    The folder is written whole or not at all (an older export there is replaced). The graph is
    checked with ONNX's checker and against PyTorch on 8 seeded images before it is kept.

    Args:
        run_dir: a finished run with a hash model.
        out: the folder to write.
        format: ``"onnx"`` (the only one).

    Returns:
        ``out`` as a Path.

    Raises:
        DeephashError: an unknown format, an embedding model, a code rule that was never fitted,
        or missing onnx / onnxruntime packages. NotFoundError: no such run.
    """
    if format not in EXPORT_FORMATS:
        raise DeephashError(f"export format must be one of {EXPORT_FORMATS}, got {format!r}")
    run_dir, out = Path(run_dir), Path(out)
    model, config = load_run(run_dir, device="cpu")
    _check_exportable(model, run_dir)
    shape = tuple(int(v) for v in model_input_shape(config, run_dir))
    graph = EncoderGraph(model).eval()
    images = _check_batch(shape)
    with torch.no_grad():  # not inference mode: the exporter traces with x
        model.encode(images[:1])  # a never-fitted rule says so here (ConfigError), before the export
        x = model.normalize(images)  # the graph's input
    outputs = [VALUES, RERANK] if model.rerank else [VALUES]
    try:
        data = _onnx_bytes(graph, x, outputs)
    except DeephashError:
        raise
    except Exception as error:  # the exporter's own errors: an operator it cannot write, say
        raise DeephashError(f"{run_dir}: the model does not export to ONNX ({first_line(error)})") from None
    checked = _check_onnx(data, graph, x, outputs)
    _check_codes(model, images, checked[0])
    rerank_dim = int(checked[1].shape[1]) if len(checked) > 1 else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / ENCODER_FILE).write_bytes(data)
        text = json.dumps(_description(model, config, shape, run_dir, rerank_dim), indent=2) + "\n"
        (tmp / DESCRIPTION_FILE).write_text(text, encoding="utf-8")
        atomic_replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
