"""The retrieval grid: each row a query and its nearest database images, framed green (same
class) or red, with the distance under each."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from deephash.viz.plots import _figure, _save

__all__ = ["plot_retrieval_grid"]

CORRECT_RGB = (0.0, 0.75, 0.0)
WRONG_RGB = (0.85, 0.0, 0.0)


def _to_rgb(images: Any) -> np.ndarray:
    """``(..., C, H, W)`` float in [0, 1] or uint8, C in {1, 3} → float ``(..., H, W, 3)``."""
    x = np.asarray(images)
    x = x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)
    if x.shape[-3] not in (1, 3):
        raise ValueError(f"images need 1 or 3 channels, got {x.shape[-3]}")
    x = np.moveaxis(np.clip(x, 0.0, 1.0), -3, -1)
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def _framed(image: np.ndarray, color: tuple[float, float, float] | None, width: int) -> np.ndarray:
    """``image`` ``(H, W, 3)`` padded by a ``width``-pixel frame of ``color`` (white if None)."""
    out = np.empty((image.shape[0] + 2 * width, image.shape[1] + 2 * width, 3))
    out[:] = color if color is not None else (1.0, 1.0, 1.0)
    out[width:width + image.shape[0], width:width + image.shape[1]] = image
    return out


def plot_retrieval_grid(
    query_images: Any,
    result_images: Any,
    correct: Any,
    path: str | os.PathLike,
    query_labels: Any = None,
    result_labels: Any = None,
    distances: Any = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Each row a query and its top results, framed green (correct) or red (wrong).

    The figure is laid out on a regular grid: column 0 holds the queries and column ``j``
    (1-based) the ``j``-th result, each column ``1 / (K + 1)`` of the figure's width.

    Args:
        query_images: ``(Q, C, H, W)`` float in [0, 1] or uint8, C in {1, 3}.
        result_images: ``(Q, K, C, H, W)`` in the same format.
        correct: bool ``(Q, K)``: whether each result is relevant to its query.
        path: output PNG path.
        query_labels: optional int ``(Q,)``, shown above the queries.
        result_labels: optional int ``(Q, K)``, shown above the results.
        distances: optional ``(Q, K)`` numbers, shown under the results.
        class_names: optional names indexed by label.

    Returns:
        The PNG path.
    """
    queries, results = _to_rgb(query_images), _to_rgb(result_images)
    correct = np.asarray(correct, dtype=bool)
    if queries.ndim != 4 or results.ndim != 5 or results.shape[0] != queries.shape[0]:
        raise ValueError(
            f"need query images (Q, C, H, W) and result images (Q, K, C, H, W), got "
            f"{np.shape(query_images)} and {np.shape(result_images)}"
        )
    n_q, k = results.shape[:2]
    if correct.shape != (n_q, k):
        raise ValueError(f"correct must have shape {(n_q, k)}, got {correct.shape}")

    def name(label: Any) -> str:
        label = int(label)
        return class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)

    # One image for the whole grid (one axes: fast to draw), cells of equal size: column 0 the
    # queries, column j the j-th results; white margins above and below each image for text.
    h, w = queries.shape[1:3]
    frame = max(1, round(h / 10))
    pad_x, pad_top, pad_bottom = max(1, w // 6), max(2, round(h * 0.3)), max(2, round(h * 0.3))
    cell_h, cell_w = h + 2 * frame + pad_top + pad_bottom, w + 2 * frame + 2 * pad_x
    canvas = np.ones((max(n_q, 1) * cell_h, (k + 1) * cell_w, 3))
    for row in range(n_q):
        for col in range(k + 1):
            image = queries[row] if col == 0 else results[row, col - 1]
            color = None if col == 0 else (CORRECT_RGB if correct[row, col - 1] else WRONG_RGB)
            top, left = row * cell_h + pad_top, col * cell_w + pad_x
            canvas[top:top + h + 2 * frame, left:left + w + 2 * frame] = _framed(image, color, frame)

    fig = _figure(1.3 * (k + 1), 1.6 * max(n_q, 1))
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.imshow(canvas, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    text = {"ha": "center", "fontsize": 7}
    for row in range(n_q):
        for col in range(k + 1):
            x = (col + 0.5) * cell_w - 0.5
            above, below = row * cell_h + pad_top - 1.5, (row + 1) * cell_h - pad_bottom + 1
            if col == 0:
                top = "query" + (f": {name(query_labels[row])}" if query_labels is not None else "")
                ax.text(x, above, top, va="bottom", fontweight="bold", **text)
                continue
            if result_labels is not None:
                ax.text(x, above, name(np.asarray(result_labels)[row, col - 1]), va="bottom", **text)
            if distances is not None:
                d = float(np.asarray(distances)[row, col - 1])
                ax.text(x, below, f"d={int(d)}" if d.is_integer() else f"d={d:.3g}", va="top", **text)
    return _save(fig, path)
