"""Plots of embeddings, training curves, retrieval metrics and retrieval results, written as PNG.

Every function takes plain arrays (numpy arrays or CPU tensors) and an output path, draws on a
:class:`matplotlib.figure.Figure` with the Agg canvas (no pyplot, so no global backend switch and
no figure registry), writes the PNG atomically and returns its path.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from deephash._io import atomic_write_bytes
from deephash.data.datasets import FASHION_MNIST_CLASSES  # noqa: F401  (re-exported by deephash.viz)

#: matplotlib's tab10 colours, the ones the original siamese-triplet README plots use.
TAB10 = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip



# Keys of an epoch record that are not metrics to plot.
_NON_METRIC_KEYS = {"epoch", "step", "seconds", "images_per_s", "lr", "time", "kind", "split", "images"}


def _figure(width: float, height: float) -> Any:
    """A Figure on an Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Render ``fig`` to PNG bytes and write them atomically to ``path``."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def class_colors(n: int) -> list[str]:
    """``n`` distinct colours: tab10 for up to 10 classes, tab20 then a hue wheel beyond."""
    if n <= 10:
        return list(TAB10[:n])
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["tab20"] if n <= 20 else colormaps["hsv"]
    return [to_hex(cmap(i / (20 if n <= 20 else n))) for i in range(n)]


def _class_names(labels: np.ndarray, class_names: Sequence[str] | None) -> list[str]:
    n = int(labels.max()) + 1 if labels.size else 0
    names = list(class_names) if class_names is not None else []
    return names + [str(i) for i in range(len(names), n)]


def _scatter(ax: Any, points: np.ndarray, labels: np.ndarray, names: list[str], **kwargs: Any) -> None:
    """One scatter call per class, coloured by label, with a legend of the class names."""
    colors = class_colors(len(names))
    for label in np.unique(labels):
        mask = labels == label
        ax.scatter(points[mask, 0], points[mask, 1], alpha=0.5, color=colors[label],
                   label=names[label], **kwargs)
    if labels.size:
        ax.legend(loc="best", markerscale=1.5, framealpha=0.8)


def _as_labels(labels: Any, n: int) -> np.ndarray:
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if labels.shape[0] != n:
        raise ValueError(f"got {labels.shape[0]} labels for {n} points")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative class indices")
    return labels


def plot_embeddings_2d(
    embeddings: Any,
    labels: Any,
    class_names: Sequence[str] | None,
    path: str | os.PathLike,
    title: str | None = None,
    xlim: tuple[float, float] | None = None,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """Scatter of 2-D embeddings, one tab10 colour per class (the siamese-triplet README style).

    Args:
        embeddings: float ``(N, 2)``.
        labels: int ``(N,)`` class indices.
        class_names: names indexed by label (missing names become the label number).
        path: output PNG path.
        title: optional figure title.
        xlim, ylim: optional axis limits.

    Returns:
        The PNG path.
    """
    points = np.asarray(embeddings, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"plot_embeddings_2d needs (N, 2) embeddings, got {points.shape}")
    labels = _as_labels(labels, points.shape[0])
    fig = _figure(10, 10)
    ax = fig.add_subplot()
    _scatter(ax, points, labels, _class_names(labels, class_names))
    if xlim is not None:
        ax.set_xlim(*xlim)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def tsne_2d(features: Any, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """t-SNE of ``features`` ``(N, D)`` to float ``(N, 2)``; perplexity lowered for small N.

    scikit-learn needs ``perplexity < N``; we use ``min(perplexity, (N - 1) / 3)`` (at least 1)
    so each point has a few effective neighbours. With fewer than 3 distinct rows (tiny inputs,
    or codes that collapsed to one or two values, where scikit-learn's PCA start is undefined
    and its Barnes-Hut solver crashes) t-SNE is meaningless: each distinct row is placed at its
    own x position instead, with a little seeded jitter so that coinciding points stay visible.
    """
    x = np.asarray(features, dtype=np.float32)
    n = x.shape[0]
    group = np.unique(x, axis=0, return_inverse=True)[1].reshape(-1) if n >= 3 else np.arange(n)
    if group.max(initial=-1) < 2:
        jitter = np.random.default_rng(seed).normal(scale=0.05, size=(n, 2))
        return np.stack([group.astype(np.float64), np.zeros(n)], axis=1) + jitter
    from sklearn.manifold import TSNE

    perplexity = max(1.0, min(perplexity, (n - 1) / 3.0))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                random_state=seed)
    return tsne.fit_transform(x).astype(np.float64)


def plot_tsne(
    features: Any,
    labels: Any,
    class_names: Sequence[str] | None,
    path: str | os.PathLike,
    max_points: int = 2000,
    seed: int = 0,
    title: str | None = None,
) -> Path:
    """t-SNE scatter of codes or embeddings on a seeded subsample.

    Args:
        features: float ``(N, D)`` embeddings, or ±1 / {0,1} codes (already unpacked).
        labels: int ``(N,)`` class indices.
        class_names: names indexed by label.
        path: output PNG path.
        max_points: at most this many points, drawn without replacement with ``seed``.
        seed: seed of the subsample and of t-SNE.
        title: figure title (default says how many points).

    Returns:
        The PNG path.
    """
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"plot_tsne needs (N, D) features, got {x.shape}")
    labels = _as_labels(labels, x.shape[0])
    if x.shape[0] > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(x.shape[0], max_points, replace=False))
        x, labels = x[keep], labels[keep]
    points = tsne_2d(x, seed=seed)
    fig = _figure(10, 10)
    ax = fig.add_subplot()
    _scatter(ax, points, labels, _class_names(labels, class_names), s=12)
    ax.set_title(title or f"t-SNE of {x.shape[0]} points (D={x.shape[1]})")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return _save(fig, path)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_training_curves(records: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Training curves from ``fit``'s history or the records of a run's ``metrics.jsonl``.

    Epoch records carry ``epoch`` and ``train_loss``/``val_loss`` (plus any metric); step
    records carry ``loss`` and ``step`` (or ``epoch`` and ``batch``) and are drawn thinly behind
    the epoch losses. Other numeric keys of epoch records are drawn in a second panel.

    Args:
        records: sequence of dicts.
        path: output PNG path.

    Returns:
        The PNG path.
    """
    records = list(records)
    epochs = [r for r in records if "epoch" in r and ("train_loss" in r or "val_loss" in r)]
    steps = [r for r in records if _is_number(r.get("loss")) and "train_loss" not in r]
    metric_names = sorted({
        key for r in epochs for key, value in r.items()
        if _is_number(value) and key not in _NON_METRIC_KEYS and not key.endswith("_loss")
    })
    fig = _figure(12 if metric_names else 8, 5)
    ax = fig.add_subplot(1, 2 if metric_names else 1, 1)
    if steps:
        ax.plot(_step_positions(steps, len(epochs)), [r["loss"] for r in steps], color="0.7",
                linewidth=0.8, label="train loss (steps)")
    for key, color in (("train_loss", TAB10[0]), ("val_loss", TAB10[1])):
        points = [(r["epoch"], r[key]) for r in epochs if _is_number(r.get(key))]
        if points:
            # Epoch e's loss is an average over that epoch: draw it at the epoch's end.
            xs, ys = zip(*points)
            ax.plot(np.asarray(xs) + 1, ys, marker="o", color=color, label=key.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    if epochs or steps:
        ax.legend(loc="best")
    else:
        ax.text(0.5, 0.5, "no training history", ha="center", va="center", transform=ax.transAxes)
    if metric_names:
        mx = fig.add_subplot(1, 2, 2)
        for i, name in enumerate(metric_names):
            points = [(r["epoch"] + 1, r[name]) for r in epochs if _is_number(r.get(name))]
            xs, ys = zip(*points)
            mx.plot(xs, ys, marker="o", color=class_colors(len(metric_names))[i], label=name)
        mx.set_xlabel("epoch")
        mx.set_title("metrics")
        mx.legend(loc="best")
    fig.tight_layout()
    return _save(fig, path)


def _step_positions(steps: list[Mapping[str, Any]], n_epochs: int) -> np.ndarray:
    """x positions (in epochs) of step records: spread evenly over their epoch ``[e, e + 1]``.

    Records without an ``epoch`` key are spread evenly over ``[0, max(n_epochs, 1)]``.
    """
    n = len(steps)
    if not all("epoch" in r for r in steps):
        return (np.arange(n) + 1) / n * max(n_epochs, 1)
    epoch = np.asarray([int(r["epoch"]) for r in steps])
    counts = np.bincount(epoch)
    order = np.argsort(epoch, kind="stable")
    within = np.empty(n)
    within[order] = np.arange(n) - np.searchsorted(epoch[order], epoch[order])
    return epoch + (within + 1) / counts[epoch]


def plot_precision_at_k(
    ks: Any, precisions: Any, path: str | os.PathLike, label: str | None = None,
    title: str = "precision@k",
) -> Path:
    """Precision of the top k results against k.

    Args:
        ks: int ``(M,)`` cut-offs.
        precisions: float ``(M,)`` in [0, 1].
        path: output PNG path.
        label: optional legend label.
        title: figure title.

    Returns:
        The PNG path.
    """
    ks, precisions = np.asarray(ks, dtype=np.float64), np.asarray(precisions, dtype=np.float64)
    if ks.shape != precisions.shape:
        raise ValueError(f"ks {ks.shape} and precisions {precisions.shape} differ in shape")
    fig = _figure(7, 5)
    ax = fig.add_subplot()
    ax.plot(ks, precisions, marker="o", color=TAB10[0], label=label)
    if ks.size and ks.min() > 0 and ks.max() / ks.min() >= 20:
        ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("k (number of results)")
    ax.set_ylabel("precision@k")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if label:
        ax.legend(loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_pr_curves(
    curves: Sequence[tuple[str, Any, Any]], path: str | os.PathLike,
    title: str = "precision-recall",
) -> Path:
    """Several precision-recall curves in one plot.

    Args:
        curves: ``(label, precision (M,), recall (M,))`` triples.
        path: output PNG path.
        title: figure title.

    Returns:
        The PNG path.
    """
    fig = _figure(7, 6)
    ax = fig.add_subplot()
    colors = class_colors(max(1, len(curves)))
    for (label, precision, recall), color in zip(curves, colors):
        precision = np.asarray(precision, dtype=np.float64)
        recall = np.asarray(recall, dtype=np.float64)
        if precision.shape != recall.shape:
            raise ValueError(f"precision {precision.shape} and recall {recall.shape} differ in shape")
        ax.plot(recall, precision, marker=".", color=color, label=label or None)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if any(label for label, _, _ in curves):
        ax.legend(loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_pr_curve(
    precision: Any, recall: Any, path: str | os.PathLike, label: str = "",
    title: str = "precision-recall",
) -> Path:
    """One precision-recall curve; see :func:`plot_pr_curves` for several."""
    return plot_pr_curves([(label, precision, recall)], path, title=title)
