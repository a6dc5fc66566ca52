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
from deephash.config import config_to_dict
from deephash.errors import DataFormatError, NotFoundError
from deephash.retrieval.codes import unpack_codes
from deephash.retrieval.index import HashIndex
from deephash.retrieval.metrics import precision_recall_curve_at_k
from deephash.retrieval.search import DEFAULT_SHORTLIST, search
from deephash.runs import evaluate_run, load_run, load_split
from deephash.runs.encoding import encode_split_with_rerank
from deephash.runs.layout import CONFIG_FILE, LOG_FILE, METRICS_FILE
from deephash.train import read_jsonl
from deephash.viz import (
    plot_embeddings_2d,
    plot_pr_curve,
    plot_precision_at_k,
    plot_retrieval_grid,
    plot_training_curves,
    plot_tsne,
)

#: Cut-offs of the precision@k plot (those beyond the database size are dropped).
PLOT_KS = (1, 5, 10, 20, 50, 100, 200, 500, 1000)
#: Points of a 2-D embedding scatter; larger splits show a seeded uniform sample of this size.
SCATTER_POINTS = 10_000


@dataclass
class Encoded:
    """One split encoded by a run's model.

    Attributes:
        features: packed uint8 ``(N, ceil(bits/8))`` codes (hash models) or float32 ``(N, D)`` embeddings.
        labels: int64 ``(N,)``.
        images: uint8 ``(N, C, H, W)``.
        rerank: float16 ``(N, D)`` re-rank vectors (``model.rerank``), or None.
    """

    features: np.ndarray
    labels: np.ndarray
    images: torch.Tensor
    rerank: np.ndarray | None = None


def _encode_split(model: torch.nn.Module, config: Any, split: str, run_dir: Path) -> Encoded:
    """Encode a split (cached by ``deephash.runs.encode_split``): packed codes or embeddings, and
    the re-rank vectors when the model keeps them."""
    dataset = load_split(config, split, run_dir)
    codes, labels, vectors = encode_split_with_rerank(run_dir, model, config, split, dataset)
    return Encoded(codes, labels, dataset.data, vectors)


def scatter_sample(encoded: Encoded, max_points: int = SCATTER_POINTS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` rows of a split for a scatter: float ``(m, D)`` features, int ``(m,)`` labels.

    A seeded uniform sample without replacement, in split order (class proportions and density kept).
    """
    n = len(encoded.labels)
    keep = np.arange(n) if n <= max_points else np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
    return np.asarray(encoded.features)[keep], encoded.labels[keep]


def nearest(query: Encoded, database: Encoded, bits: int | None, k: int = 10,
            shortlist: int = DEFAULT_SHORTLIST) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``k`` nearest database rows and their distances, int64 / float ``(nq, k')``:
    through the search engine (a ``HashIndex``, two-stage over a Hamming shortlist of
    ``shortlist`` when the run keeps re-rank vectors) for codes, by Euclidean distance for embeddings."""
    k = min(k, len(database.labels))
    if bits is not None:
        index = HashIndex(bits)
        index.add(database.features, rerank=database.rerank)
        found = search(index, query.features, k, rerank=query.rerank, shortlist=shortlist)
        return np.stack([f.positions for f in found]), np.stack([f.distances for f in found]).astype(np.float64)
    d = torch.cdist(torch.from_numpy(query.features), torch.from_numpy(database.features))
    order = torch.sort(d, dim=1, stable=True).indices[:, :k]
    return order.numpy(), d.gather(1, order).numpy()


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
    """``metrics.json``, computed by ``deephash.runs.evaluate_run`` when missing."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        evaluate_run(run_dir)
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


def _embedding_section(query: Encoded, database: Encoded, config: Any, bits: int | None, classes: Any,
                       run_dir: Path) -> tuple[str, str]:
    """The 2-D scatters of a 2-D embedding (database and queries), else a t-SNE of the queries."""
    out, query_split, db_split = run_dir / "report", config.data.query_split, config.data.database_split
    if bits is None and np.asarray(query.features).shape[1] == 2:
        pictures = []
        for split, encoded in ((db_split, database), (query_split, query)):
            points, labels = scatter_sample(encoded)
            shown = "" if len(labels) == len(encoded.labels) else f" ({len(labels):,} of {len(encoded.labels):,}, uniform sample)"
            pictures.append(plot_embeddings_2d(points, labels, classes, out / f"embeddings_{split}.png",
                                               title=f"{split} embeddings{shown}"))
        return "Embeddings", "".join(_img(p, run_dir, p.stem) for p in pictures)
    kind = "codes" if bits is not None else "embeddings"
    points = unpack_codes(query.features, bits).astype(np.float32) * 2 - 1 if bits is not None else query.features
    tsne = plot_tsne(points, query.labels, classes, out / "tsne.png", title=f"t-SNE of {query_split} {kind}")
    return f"t-SNE of the {kind}", _img(tsne, run_dir, "t-SNE")


def _curves_section(query: Encoded, database: Encoded, config: Any, bits: int | None, n_curve: int,
                    run_dir: Path) -> tuple[str, str]:
    """Precision@k and the PR curve of the first ``n_curve`` queries, from the metrics engine."""
    out = run_dir / "report"
    n_db = len(database.labels)
    plot_ks = [k for k in PLOT_KS if k <= n_db]
    precision, recall = precision_recall_curve_at_k(query.features[:n_curve], query.labels[:n_curve],
                                                    database.features, database.labels, plot_ks + _pr_ks(n_db),
                                                    bits=bits, ties="stable")
    n_plot = len(plot_ks)
    pk_png = plot_precision_at_k(plot_ks, precision[:n_plot], out / "precision_at_k.png")
    pr_png = plot_pr_curve(precision[n_plot:], recall[n_plot:], out / "pr_curve.png",
                           label=f"{bits} bits" if bits is not None else "embeddings")
    note = (f'<p class="note">The first {n_curve} {html.escape(config.data.query_split)} queries against the whole '
            f"{html.escape(config.data.database_split)} database, ranked by "
            f"{'Hamming' if bits is not None else 'Euclidean'} distance, ties broken by database order; precision "
            "and recall at rank cut-offs (recall over the queries that have a relevant item, as "
            "<code>deephash.retrieval.metrics</code> defines it).</p>")
    return "Precision@k and precision-recall", note + _img(pk_png, run_dir, "precision at k") + _img(pr_png, run_dir, "PR curve")


def _grid_section(query: Encoded, database: Encoded, bits: int | None, n_grid: int, classes: Any,
                  run_dir: Path, shortlist: int = DEFAULT_SHORTLIST) -> tuple[str, str] | None:
    """The first ``n_grid`` queries and their nearest database images (None when there are none)."""
    if n_grid <= 0 or len(database.labels) == 0:
        return None
    grid_query = Encoded(query.features[:n_grid], query.labels[:n_grid], query.images[:n_grid],
                         None if query.rerank is None else query.rerank[:n_grid])
    ids, distances = nearest(grid_query, database, bits, shortlist=shortlist)
    grid = plot_retrieval_grid(
        query.images[:n_grid].numpy(), database.images[torch.from_numpy(ids)].numpy(),
        database.labels[ids] == query.labels[:n_grid, None], run_dir / "report" / "retrieval_grid.png",
        query_labels=query.labels[:n_grid], result_labels=database.labels[ids],
        distances=distances, class_names=classes,
    )
    order = (f"the Hamming shortlist of {shortlist} (ties included) re-ranked by the model's re-rank vectors, "
             "as evaluate (d = Hamming distance)"
             if query.rerank is not None and database.rerank is not None else "d = distance")
    return ("Retrieval examples", '<p class="note">Each row: a query, then its top '
            f"{ids.shape[1]} results; green frame = same class, red = different class; "
            f"{order}.</p>" + _img(grid, run_dir, "retrieval grid"))


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
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise NotFoundError(f"{run_dir} is not a run directory (no config.toml)")
    model, config = load_run(run_dir)
    out = run_dir / "report"
    bits = model.bits if getattr(model, "is_hash", False) else None
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

    log = run_dir / LOG_FILE
    records = read_jsonl(log) if log.is_file() else []
    curves = plot_training_curves(records, out / "training_curves.png")
    sections.append(("Training", _img(curves, run_dir, "training curves")))

    sections.append(_embedding_section(query, database, config, bits, classes, run_dir))
    n_curve = min(curve_queries, len(query.labels))
    sections.append(_curves_section(query, database, config, bits, n_curve, run_dir))
    grid = _grid_section(query, database, bits, min(max_queries, n_curve), classes, run_dir,
                         shortlist=config.eval.rerank_shortlist)
    if grid is not None:
        sections.append(grid)

    page = _page(f"deephash report: {config.name}", sections)
    path = run_dir / "report.html"
    atomic_write_text(path, page)
    return path
