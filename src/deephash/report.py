"""The run report: ``RUN_DIR/report.html`` with its PNGs in ``RUN_DIR/report/``.

The page opens from disk (relative image paths, inline CSS, no scripts, no external URLs) and
shows the metrics table with its protocol, a config summary, training curves, the embedding
scatter (2-D models) or a t-SNE of the codes, precision@k and PR curves, and a retrieval grid.
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from deephash._io import atomic_write_text
from deephash.errors import DataFormatError, NotFoundError

#: Cut-offs of the precision@k plot (those beyond the database size are dropped).
PLOT_KS = (1, 5, 10, 20, 50, 100, 200, 500, 1000)
#: Points of a 2-D embedding scatter; larger splits show a seeded uniform sample of this size.
SCATTER_POINTS = 10_000


@dataclass
class Encoded:
    """One split encoded by a run's model.

    Attributes:
        features: float32 ``(N, D)``: ±1 codes (hash models) or embeddings.
        labels: int64 ``(N,)``.
        images: uint8 ``(N, C, H, W)``.
    """

    features: torch.Tensor
    labels: torch.Tensor
    images: torch.Tensor


def _encode_split(model: torch.nn.Module, config: Any, split: str, run_dir: Path) -> Encoded:
    """Encode a split (cached by ``deephash.experiment.encode_split``); hash codes unpacked to ±1 floats."""
    from deephash.experiment import encode_split, load_split
    from deephash.retrieval.codes import unpack_codes

    dataset = load_split(config, split, run_dir)
    codes, labels = encode_split(run_dir, model, config, split, dataset)
    bits = getattr(model, "bits", None)
    if bits is not None:
        codes = unpack_codes(codes, bits).astype(np.float32) * 2 - 1
    return Encoded(torch.from_numpy(codes), torch.from_numpy(labels), dataset.data)


def ranking_distances(q: torch.Tensor, db: torch.Tensor, hamming: bool) -> torch.Tensor:
    """Distances ``(nq, n)``: Hamming between ±1 codes (``(bits - q·db) / 2``) or Euclidean."""
    if hamming:
        return (q.shape[1] - q @ db.T) / 2
    return torch.cdist(q, db)


def rank_database(
    query: Encoded, database: Encoded, hamming: bool, ks: Sequence[int], chunk: int = 256
) -> dict[str, torch.Tensor]:
    """Rank the whole database for every query; ties broken by database order (stable sort).

    Args:
        query, database: encoded splits.
        hamming: rank by Hamming distance between ±1 codes (else Euclidean).
        ks: rank cut-offs, each in ``1..len(database)``.
        chunk: queries ranked at once (memory ``chunk × len(database)``).

    Returns:
        ``hits`` int64 ``(nq, len(ks))``: relevant items among the first k results;
        ``relevant`` int64 ``(nq,)``: relevant items in the database;
        ``top_ids`` int64 ``(nq, min(10, n))`` and ``top_dist`` float ``(nq, min(10, n))``:
        the first results and their distances.
    """
    cut = np.asarray(list(ks), dtype=np.int64) - 1
    db_labels = database.labels.numpy()
    if db_labels.size and 0 <= db_labels.min() and db_labels.max() < 256:
        db_labels = db_labels.astype(np.uint8)  # cheaper gathers
    parts: dict[str, list[torch.Tensor]] = {"hits": [], "relevant": [], "top_ids": [], "top_dist": []}
    for start in range(0, len(query.labels), chunk):
        d = ranking_distances(query.features[start:start + chunk], database.features, hamming)
        if hamming:  # integer distances: numpy's stable sort of 8/16-bit integers is a radix sort
            small = d.round().numpy().astype(np.uint8 if query.features.shape[1] <= 255 else np.uint16)
            order = np.argsort(small, axis=1, kind="stable")
        else:
            order = torch.sort(d, dim=1, stable=True).indices.numpy()
        rel = db_labels[order] == query.labels[start:start + chunk, None].numpy()
        cum = np.cumsum(rel, axis=1, dtype=np.int32)
        top = torch.from_numpy(order[:, :10])
        parts["hits"].append(torch.from_numpy(cum[:, cut].astype(np.int64)))
        parts["relevant"].append(torch.from_numpy(cum[:, -1].astype(np.int64)))
        parts["top_ids"].append(top)
        parts["top_dist"].append(d.gather(1, top))
    return {key: torch.cat(value) for key, value in parts.items()}


def scatter_sample(encoded: Encoded, max_points: int = SCATTER_POINTS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` rows of a split for a scatter: float ``(m, D)`` features, int ``(m,)`` labels.

    A seeded uniform sample without replacement, in split order (class proportions and density kept).
    """
    n = len(encoded.labels)
    keep = np.arange(n) if n <= max_points else np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
    return encoded.features.numpy()[keep], encoded.labels.numpy()[keep]


def precision_recall(hits: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Mean precision@k and recall@k over queries: float64 ``(len(ks),)`` each.

    Queries without any relevant item count as recall 0.
    """
    k = torch.as_tensor(list(ks), dtype=torch.float64)
    hits = hits.double()
    return (hits / k).mean(0).numpy(), (hits / relevant.double().clamp_min(1)[:, None]).mean(0).numpy()


def _pr_ks(n: int) -> list[int]:
    """About 40 log-spaced cut-offs from 1 to n (inclusive)."""
    return sorted({int(round(v)) for v in np.geomspace(1, max(n, 1), 40)} | {n})


def _flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        return [row for key, sub in value.items() for row in _flatten(f"{prefix}{key}.", sub)]
    return [(prefix[:-1], value)]


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(v) for v in value)
    return str(value)


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_format(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _metrics(run_dir: Path) -> dict[str, Any]:
    """``metrics.json``, computed by ``deephash.experiment.evaluate_run`` when missing."""
    from deephash import experiment

    path = run_dir / "metrics.json"
    if not path.is_file():
        experiment.evaluate_run(run_dir)
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise DataFormatError(f"{path} is not valid JSON") from None
    return metrics if isinstance(metrics, dict) else {}


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.7em; text-align: left; font-size: 0.9em; }
th { background: #f5f5f5; font-weight: 600; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.3em 0; }
.note { color: #555; font-size: 0.9em; }
"""


def _page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{content}\n" for h, content in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n"
        f"<body><h1>{html.escape(title)}</h1>\n{body}</body></html>\n"
    )


def _img(path: Path, run_dir: Path, alt: str) -> str:
    return f'<img src="{html.escape(path.relative_to(run_dir).as_posix())}" alt="{html.escape(alt)}">'


def write_report(run_dir: str | os.PathLike, max_queries: int = 8, curve_queries: int = 1000) -> Path:
    """Write ``RUN_DIR/report.html`` and its PNGs under ``RUN_DIR/report/``; idempotent.

    Args:
        run_dir: a run directory (``config.toml``, ``model.pt``, ``metrics.jsonl``, and
            ``metrics.json`` after ``deephash evaluate``).
        max_queries: rows of the retrieval grid (the first query-split items).
        curve_queries: the first this many queries give the precision@k / PR curves.

    Returns:
        The path of ``report.html``.

    Raises:
        NotFoundError: the run directory, its config or its model is missing.
    """
    from deephash.config import config_to_dict
    from deephash.experiment import load_run
    from deephash.train import read_jsonl
    from deephash.viz import (
        plot_embeddings_2d,
        plot_pr_curve,
        plot_precision_at_k,
        plot_retrieval_grid,
        plot_training_curves,
        plot_tsne,
    )

    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise NotFoundError(f"{run_dir} is not a run directory (no config.toml)")
    model, config = load_run(run_dir)
    out = run_dir / "report"
    hamming = bool(getattr(model, "is_hash", False))
    query_split, db_split = config.data.query_split, config.data.database_split
    query = _encode_split(model, config, query_split, run_dir)
    database = _encode_split(model, config, db_split, run_dir)
    classes = getattr(model, "classes", None) or None
    sections: list[tuple[str, str]] = []

    result = _metrics(run_dir)
    protocol = result.get("protocol", {}) if isinstance(result.get("protocol"), dict) else {}
    metrics = result.get("metrics", {}) if isinstance(result.get("metrics"), dict) else {}
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    sections.append(("Metrics", _table(rows) + "<h3>Protocol</h3>" + _table(list(protocol.items()))))

    config_rows = [(k, v) for k, v in _flatten("", config_to_dict(config)) if v not in ("", [], {})]
    sections.append(("Configuration", _table(config_rows)))

    log = run_dir / "metrics.jsonl"
    records = read_jsonl(log) if log.is_file() else []
    curves = plot_training_curves(records, out / "training_curves.png")
    sections.append(("Training", _img(curves, run_dir, "training curves")))

    if not hamming and query.features.shape[1] == 2:
        pictures = []
        for split, encoded in ((db_split, database), (query_split, query)):
            points, labels = scatter_sample(encoded)
            shown = "" if len(labels) == len(encoded.labels) else f" ({len(labels):,} of {len(encoded.labels):,}, uniform sample)"
            pictures.append(plot_embeddings_2d(points, labels, classes, out / f"embeddings_{split}.png",
                                               title=f"{split} embeddings{shown}"))
        sections.append(("Embeddings", "".join(_img(p, run_dir, p.stem) for p in pictures)))
    else:
        kind = "codes" if hamming else "embeddings"
        tsne = plot_tsne(query.features.numpy(), query.labels.numpy(), classes, out / "tsne.png",
                         title=f"t-SNE of {query_split} {kind}")
        sections.append((f"t-SNE of the {kind}", _img(tsne, run_dir, "t-SNE")))

    n_curve = min(curve_queries, len(query.labels))
    subset = Encoded(query.features[:n_curve], query.labels[:n_curve], query.images[:n_curve])
    n_db = len(database.labels)
    plot_ks = [k for k in PLOT_KS if k <= n_db]
    pr_ks = _pr_ks(n_db)
    ranked = rank_database(subset, database, hamming, plot_ks + pr_ks)
    top_ids, top_dist = ranked["top_ids"], ranked["top_dist"]
    precision, recall = precision_recall(ranked["hits"], ranked["relevant"], plot_ks + pr_ks)
    n_plot = len(plot_ks)
    pk_png = plot_precision_at_k(plot_ks, precision[:n_plot], out / "precision_at_k.png")
    pr_png = plot_pr_curve(precision[n_plot:], recall[n_plot:], out / "pr_curve.png",
                           label=f"{query.features.shape[1]} bits" if hamming else "embeddings")
    note = (f'<p class="note">The first {n_curve} {html.escape(query_split)} queries against the whole '
            f"{html.escape(db_split)} database, ranked by {'Hamming' if hamming else 'Euclidean'} distance, "
            "ties broken by database order; precision and recall at rank cut-offs.</p>")
    sections.append(("Precision@k and precision-recall",
                     note + _img(pk_png, run_dir, "precision at k") + _img(pr_png, run_dir, "PR curve")))

    n_grid = min(max_queries, n_curve)
    if n_grid > 0 and top_ids.shape[1] > 0:
        ids = top_ids[:n_grid]
        grid = plot_retrieval_grid(
            query.images[:n_grid].numpy(), database.images[ids].numpy(),
            (database.labels[ids] == query.labels[:n_grid, None]).numpy(), out / "retrieval_grid.png",
            query_labels=query.labels[:n_grid].numpy(), result_labels=database.labels[ids].numpy(),
            distances=top_dist[:n_grid].numpy(), class_names=classes,
        )
        sections.append(("Retrieval examples", '<p class="note">Each row: a query, then its top '
                         f"{ids.shape[1]} results; green frame = same class, red = different class; "
                         "d = distance.</p>" + _img(grid, run_dir, "retrieval grid")))

    page = _page(f"deephash report: {config.name}", sections)
    path = run_dir / "report.html"
    atomic_write_text(path, page)
    return path
