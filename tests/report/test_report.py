"""write_report on tiny run directories that the tests build: files, page content, ranking maths."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_idx
from PIL import Image

import deephash.report as report_module
from deephash._io import atomic_torch_save, atomic_write_text
from deephash.config import config_from_dict, config_to_dict, dump_config
from deephash.errors import NotFoundError
from deephash.models import build_model, model_spec
from deephash.report import Encoded, nearest, write_report
from deephash.retrieval import pack_codes
from deephash.retrieval.metrics import precision_recall_curve_at_k


def make_data(root: Path, n_train: int = 60, n_test: int = 20) -> None:
    """Fashion-MNIST-shaped IDX files: class c is an image of brightness ~ c (learnable)."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 5
        images = np.clip(labels[:, None, None] * 50 + rng.integers(0, 20, (n, 28, 28)), 0, 255)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)


def make_run(tmp_path: Path, spec: dict, metrics: dict | None = None) -> Path:
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    run.mkdir()
    make_data(data)
    config = config_from_dict({"name": "tiny", "data": {"dataset": "fashion-mnist", "root": str(data)},
                               "model": spec, "eval": {"ks": [5, 10]}})
    atomic_write_text(run / "config.toml", dump_config(config))
    torch.manual_seed(0)
    model = build_model(spec)
    atomic_torch_save({"spec": model_spec(model), "state_dict": model.state_dict(),
                       "config": config_to_dict(config), "classes": [f"class{i}" for i in range(10)]},
                      run / "model.pt")
    lines = [{"epoch": 0, "step": i, "loss": 1.0 - 0.1 * i} for i in range(3)]
    lines.append({"epoch": 0, "train_loss": 0.9, "val_loss": 1.0, "seconds": 1.0})
    atomic_write_text(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    if metrics is not None:
        atomic_write_text(run / "metrics.json", json.dumps(metrics))
    return run


def images_in(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def test_report_of_a_hash_run(tmp_path):
    spec = {"backbone": "fmnist-cnn", "head": "hash", "bits": 16}
    metrics = {"protocol": {"query_split": "test", "database_split": "train", "ties": "tie-aware"},
               "metrics": {"map@all": 0.4321, "p@10": 0.5}}
    run = make_run(tmp_path, spec, metrics=metrics)
    path = write_report(run, max_queries=3)
    assert path == run / "report.html"
    page = path.read_text()
    assert "0.4321" in page and "tie-aware" in page and "Hamming" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    srcs = images_in(page)
    assert {Path(s).name for s in srcs} == {"training_curves.png", "tsne.png", "precision_at_k.png",
                                            "pr_curve.png", "retrieval_grid.png"}
    for src in srcs:
        with Image.open(run / src) as image:
            assert image.width > 0 and image.height > 0
    with Image.open(run / "report" / "retrieval_grid.png") as grid:
        assert grid.height == 3 * 160  # three query rows of 1.6 inches at 100 dpi
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["codes", "config.toml", "model.pt", "metrics.jsonl", "metrics.json", "report", "report.html"])
    assert sorted(p.name for p in (run / "codes").iterdir()) == ["test.npz", "train.npz"]  # encode cache


def test_report_of_a_2d_embedding_run_evaluates_when_metrics_are_missing(tmp_path, monkeypatch):
    run = make_run(tmp_path, {"backbone": "seed-embeddingnet", "embedding_dim": 2})
    calls = []

    def fake_evaluate_run(run_dir):  # stands in for the real evaluation (tested elsewhere)
        calls.append(Path(run_dir))
        atomic_write_text(Path(run_dir) / "metrics.json",
                          json.dumps({"protocol": {"query_split": "test"}, "metrics": {"knn_accuracy": 0.8765}}))

    monkeypatch.setattr(report_module, "evaluate_run", fake_evaluate_run)
    page = write_report(run, max_queries=2).read_text()
    assert calls == [run] and "0.8765" in page
    names = {Path(s).name for s in images_in(page)}
    assert {"embeddings_train.png", "embeddings_test.png"} <= names and "tsne.png" not in names
    assert "Euclidean" in page
    before = sorted(p.name for p in (run / "report").iterdir())
    assert write_report(run, max_queries=2).read_text() == page  # idempotent
    assert len(calls) == 1  # metrics.json now exists: not evaluated again
    assert sorted(p.name for p in (run / "report").iterdir()) == before


def test_missing_run_pieces(tmp_path):
    with pytest.raises(NotFoundError, match="config.toml"):
        write_report(tmp_path)
    run = make_run(tmp_path, {"backbone": "fmnist-cnn", "head": "hash", "bits": 8})
    (run / "model.pt").unlink()
    with pytest.raises(NotFoundError, match="model"):
        write_report(run)


@pytest.mark.parametrize("hamming", [True, False])
def test_curves_and_grid_neighbours_match_brute_force(hamming):
    """The report's curves come from the metrics engine and its grid from the search engine:
    both against a per-query loop (stable ties: database order)."""
    gen = torch.Generator().manual_seed(1)
    dim = 16
    q, db = torch.randn(7, dim, generator=gen), torch.randn(30, dim, generator=gen)
    db[5] = db[2]  # tied items
    q_labels, db_labels = torch.randint(0, 3, (7,), generator=gen).numpy(), torch.randint(0, 3, (30,), generator=gen).numpy()
    ks = [1, 3, 10, 30]
    if hamming:
        q_pm, db_pm = torch.where(q >= 0, 1.0, -1.0), torch.where(db >= 0, 1.0, -1.0)
        query, database, bits = Encoded(pack_codes(q_pm), q_labels, torch.empty(0)), Encoded(pack_codes(db_pm), db_labels, torch.empty(0)), dim
        dist = (q_pm[:, None, :] != db_pm[None]).sum(-1).double().numpy()
    else:
        query, database, bits = Encoded(q.numpy(), q_labels, torch.empty(0)), Encoded(db.numpy(), db_labels, torch.empty(0)), None
        dist = torch.cdist(q.double(), db.double()).numpy()
    precision, recall = precision_recall_curve_at_k(query.features, q_labels, database.features, db_labels, ks, bits=bits)
    ids, distances = nearest(query, database, bits)
    want_p, want_r = [], []
    for i in range(7):
        order = sorted(range(30), key=lambda j: (round(dist[i, j], 5), j))  # ties: database order
        relevant = db_labels == q_labels[i]
        want_p.append([relevant[order[:k]].sum() / k for k in ks])
        want_r.append([relevant[order[:k]].sum() / relevant.sum() for k in ks] if relevant.any() else None)
        np.testing.assert_allclose(distances[i], [dist[i, j] for j in order[:10]], rtol=1e-5)
        if not hamming:
            assert ids[i].tolist() == order[:10]
        else:  # FAISS orders a tie its own way: the same distance, and every id within its tie group
            assert all(dist[i, j] == d for j, d in zip(ids[i], distances[i]))
    np.testing.assert_allclose(precision, np.mean(want_p, axis=0))
    np.testing.assert_allclose(recall, np.mean([r for r in want_r if r is not None], axis=0))


def test_scatter_sample_is_a_seeded_uniform_subset_in_split_order():
    from deephash.report import scatter_sample

    features = np.arange(100, dtype=np.float32).reshape(50, 2)
    labels = np.arange(50) % 5
    encoded = Encoded(features, labels, torch.empty(0))
    points, kept = scatter_sample(encoded, max_points=20, seed=1)
    rows = points[:, 0].astype(int) // 2
    assert len(set(rows.tolist())) == 20 and (np.diff(rows) > 0).all()
    np.testing.assert_array_equal(kept, labels[rows])
    np.testing.assert_array_equal(scatter_sample(encoded, max_points=20, seed=1)[0], points)
    everything, all_labels = scatter_sample(encoded, max_points=50)
    np.testing.assert_array_equal(everything, features)
    np.testing.assert_array_equal(all_labels, labels)
