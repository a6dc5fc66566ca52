"""``deephash evaluate``: retrieval metrics of a run, written to ``metrics.json`` with their protocol."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deephash._io import atomic_write_text
from deephash.config import NearDuplicateConfig
from deephash.data.datasets import ArrayDataset
from deephash.data.perturb import perturb_images
from deephash.retrieval.index import HashIndex
from deephash.retrieval.metrics import (
    evaluate_codes,
    evaluate_embeddings,
    original_recall_at_k,
    original_recall_of_lists,
    ranked_list_metrics,
)
from deephash.retrieval.search import DEFAULT_SHORTLIST, ranked_positions, search
from deephash.runs.data import load_split
from deephash.runs.encoding import encode_split_with_rerank, encode_with_rerank
from deephash.runs.layout import METRICS_FILE
from deephash.runs.model_file import is_hash_model, load_run

__all__ = ["evaluate_run", "format_metrics"]


def evaluate_run(run_dir: str | os.PathLike, query: str | None = None, database: str | None = None,
                 ks: Sequence[int] | None = None, near_duplicates: int | None = None) -> dict[str, Any]:
    """Retrieval metrics of a run's model: queries ranked against a database, Hamming distances.

    Writes ``run_dir/metrics.json`` (atomically) with the metrics and the protocol: data set,
    splits and their sizes, the class split, the tie rules, the cut-offs and the radius. With
    ``near_duplicates`` (or ``eval.near_duplicates.n``) > 0 it adds the near-duplicate protocol:
    that many perturbed database images searched for in the database (:func:`near_duplicate_recall`).

    Returns:
        The dict written.
    """
    run_dir = Path(run_dir)
    model, config = load_run(run_dir)
    query = query or config.data.query_split
    database = database or config.data.database_split
    ks = [int(k) for k in (ks or config.eval.ks)]
    q_set, db_set = load_split(config, query, run_dir), load_split(config, database, run_dir)
    tic = time.perf_counter()
    q_codes, q_labels, q_vectors = encode_split_with_rerank(run_dir, model, config, query, q_set)
    db_codes, db_labels, db_vectors = encode_split_with_rerank(run_dir, model, config, database, db_set)
    encode_seconds = time.perf_counter() - tic
    recall_ks = [int(k) for k in config.eval.recall_ks]
    if is_hash_model(model):
        metrics = evaluate_codes(q_codes, q_labels, db_codes, db_labels, model.bits, ks=ks, radius=config.eval.radius,
                                 knn_k=config.eval.knn_k, splits=(query, database), recall_ks=recall_ks)
        kind = f"hamming ranking of {model.bits}-bit codes"
        if db_vectors is not None and q_vectors is not None and np.ndim(q_labels) == 1:
            kind += (f"; the '/rerank' columns: the two-stage search, the Hamming shortlist of "
                     f"{config.eval.rerank_shortlist} nearest codes (ties included) ranked by the re-rank vectors")
            metrics.update(two_stage_metrics(model.bits, q_codes, q_vectors, q_labels, db_codes, db_vectors, db_labels, ks=ks,
                                             recall_ks=recall_ks, knn_k=config.eval.knn_k,
                                             shortlist=config.eval.rerank_shortlist))
    else:
        metrics = evaluate_embeddings(q_codes, q_labels, db_codes, db_labels, ks=ks, knn_k=config.eval.knn_k,
                                      splits=(query, database), recall_ks=recall_ks)
        kind = f"euclidean ranking of {q_codes.shape[1]}-d embeddings"
    settings = config.eval.near_duplicates
    if near_duplicates is not None:
        settings = dataclasses.replace(settings, n=int(near_duplicates))
    duplicates = None
    if settings.n > 0:
        duplicates = near_duplicate_recall(model, db_set, db_codes, settings, db_vectors=db_vectors,
                                           shortlist=config.eval.rerank_shortlist)
    result = {
        "protocol": {
            "dataset": config.data.dataset,
            "split_protocol": config.data.protocol or "the data set's own splits",
            "query_split": query, "n_query": len(q_set),
            "database_split": database, "n_database": len(db_set),
            "ranking": kind,
            "relevance": "same label",
            "ties": "tie-aware = expected AP over random orders within tied distances; "
                    "stable = ties broken by database order",
            "ks": ks, "radius": config.eval.radius, "knn_k": config.eval.knn_k, "recall_ks": recall_ks,
            "class_split": ({"seen": list(config.data.seen_classes), "unseen": list(config.data.unseen_classes),
                             "training": "seen classes only", "queries and database": "unseen classes only"}
                            if config.data.seen_classes else "none"),
        },
        "metrics": _jsonable(metrics),
        "encode_seconds": round(encode_seconds, 3),
    }
    if duplicates is not None:
        result["near_duplicates"] = _jsonable(duplicates)
    atomic_write_text(run_dir / METRICS_FILE, json.dumps(result, indent=2) + "\n")
    return result


def two_stage_metrics(bits: int, q_codes: np.ndarray, q_vectors: np.ndarray, q_labels: np.ndarray, db_codes: np.ndarray,
                      db_vectors: np.ndarray, db_labels: np.ndarray, ks: Sequence[int], recall_ks: Sequence[int],
                      knn_k: int | None, shortlist: int) -> dict[str, float]:
    """P@k, Recall@K and kNN accuracy of the two-stage search (the ``shortlist`` nearest codes and
    every tie at the cut, ordered by the re-rank vectors: ``retrieval.search``), keys ``.../rerank``."""
    index = HashIndex(bits)
    index.add(db_codes, rerank=db_vectors)
    depth = min(max([*ks, *recall_ks, knn_k or 0, 1]), len(db_codes))
    found = search(index, q_codes, depth, rerank=q_vectors, shortlist=max(shortlist, depth))
    return ranked_list_metrics(ranked_positions(found, depth), q_labels, db_labels, ks, recall_ks, knn_k)


def near_duplicate_recall(model: nn.Module, database: Any, db_codes: np.ndarray, settings: NearDuplicateConfig,
                          ks: Sequence[int] = (1, 10), db_vectors: np.ndarray | None = None,
                          shortlist: int = DEFAULT_SHORTLIST) -> dict[str, Any]:
    """``settings.n`` database images, drawn with ``settings.seed``, perturbed (``data.perturb``) and
    encoded as queries; the relevant item of each is its original. Returns the protocol and the
    recall@k of the originals, tie-aware and stable (``retrieval.metrics.original_recall_at_k``), by
    Hamming ranking and, given the database's re-rank vectors, by the two-stage search too
    (``recall@k/rerank``: the ``shortlist`` nearest codes ranked by their vectors)."""
    generator = torch.Generator().manual_seed(settings.seed)
    n = min(settings.n, len(database))
    targets = torch.randperm(len(database), generator=generator)[:n].sort().values
    copies = perturb_images(database.data[targets], generator, shift=settings.shift, crop=settings.crop,
                            brightness=settings.brightness, contrast=settings.contrast, noise=settings.noise,
                            jpeg_quality=settings.jpeg_quality)
    perturbed = ArrayDataset(copies, database.targets[targets], database.classes)
    q_codes, _, q_vectors = encode_with_rerank(model, perturbed)
    bits = model.bits if is_hash_model(model) else None
    recall = original_recall_at_k(q_codes, db_codes, targets.numpy(), ks, bits=bits)
    if db_vectors is not None and q_vectors is not None and bits is not None:  # the search engine's two stages
        index = HashIndex(bits)
        index.add(db_codes, rerank=db_vectors)
        found = search(index, q_codes, max(ks), rerank=q_vectors, shortlist=shortlist)
        recall["rerank"] = original_recall_of_lists(ranked_positions(found, max(ks)), targets.numpy(), len(db_codes), ks)
    out: dict[str, Any] = {"protocol": {"n": n, **{k: v for k, v in dataclasses.asdict(settings).items() if k != "n"},
                                        "relevant": "the original database item only"}}
    if "rerank" in recall:
        out["protocol"]["rerank"] = (f"{model.rerank} vectors, {db_vectors.shape[1]} float16 values = "
                                     f"{2 * db_vectors.shape[1]} bytes per item; Hamming shortlist of {shortlist}")
    for rule, values in recall.items():
        for k, value in zip(ks, values):
            out[f"recall@{k}/{rule}"] = float(value)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else repr(float(value))
    if isinstance(value, np.integer):
        return int(value)
    return value


def format_metrics(result: dict[str, Any]) -> str:
    """:func:`evaluate_run`'s result as a table: one row per metric, one column per tie rule."""
    p = result["protocol"]
    rows: dict[str, dict[str, float]] = {}
    entries = dict(result["metrics"])
    entries.update({f"near-dup {k}": v for k, v in result.get("near_duplicates", {}).items() if k != "protocol"})
    for key, value in entries.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        base, _, rule = key.rpartition("/")
        if rule not in ("tie-aware", "stable", "rerank"):
            base, rule = key, "value"
        rows.setdefault(base, {})[rule] = float(value)
    columns = [c for c in ("tie-aware", "stable", "rerank", "value") if any(c in r for r in rows.values())]
    width = max([len(k) for k in rows] + [6])
    split = p.get("class_split")
    classes = f", unseen classes {split['unseen']} (trained on {split['seen']})" if isinstance(split, dict) else ""
    if "near_duplicates" in result:
        d = result["near_duplicates"]["protocol"]
        classes += f"; near-duplicates: {d['n']} perturbed database images, the original relevant"
    lines = [f"{p['dataset']}: {p['n_query']} queries ({p['query_split']}) vs {p['n_database']} "
             f"database items ({p['database_split']}){classes}, {p['ranking']}",
             f"  {'metric':<{width}}" + "".join(f"  {c:>9}" for c in columns)]
    for name, values in rows.items():
        cells = "".join(f"  {values[c]:>9.4f}" if c in values else f"  {'-':>9}" for c in columns)
        lines.append(f"  {name:<{width}}{cells}")
    return "\n".join(lines)
