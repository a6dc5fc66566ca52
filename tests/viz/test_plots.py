"""Plots write valid PNGs; the retrieval grid frames correct results green and wrong ones red."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deephash.viz import (
    FASHION_MNIST_CLASSES,
    TAB10,
    plot_embeddings_2d,
    plot_pr_curve,
    plot_pr_curves,
    plot_precision_at_k,
    plot_retrieval_grid,
    plot_training_curves,
    plot_tsne,
    tsne_2d,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.load()
        assert image.width > 0 and image.height > 0
        return np.asarray(image.convert("RGB"))


def count_color(pixels: np.ndarray, hex_color: str, tol: int = 8) -> int:
    rgb = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels.astype(int) - rgb).max(axis=-1) <= tol).sum())


def test_embeddings_2d_uses_one_tab10_colour_per_class(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 50)
    points = rng.normal(size=(150, 2)) + 10 * labels[:, None]
    out = plot_embeddings_2d(points, labels, FASHION_MNIST_CLASSES, tmp_path / "a" / "emb.png", "test")
    assert out == tmp_path / "a" / "emb.png"
    pixels = assert_png(out)
    assert pixels.shape[:2] == (1000, 1000)  # 10 x 10 inches at 100 dpi
    # Points are drawn with alpha 0.5 on white: colour c shows as (c + white) / 2.
    blend = lambda c: "#" + "".join(f"{(int(c[i:i + 2], 16) + 255) // 2:02x}" for i in (1, 3, 5))
    for used in TAB10[:3]:
        assert count_color(pixels, blend(used)) > 100
    assert count_color(pixels, blend(TAB10[3])) == 0  # a class that is absent is not drawn


def test_embeddings_2d_one_class_and_bad_shape(tmp_path):
    assert_png(plot_embeddings_2d(np.zeros((4, 2)), np.zeros(4, int), None, tmp_path / "one.png"))
    with pytest.raises(ValueError, match="2"):
        plot_embeddings_2d(np.zeros((4, 3)), np.zeros(4, int), None, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="labels"):
        plot_embeddings_2d(np.zeros((4, 2)), np.zeros(3, int), None, tmp_path / "bad.png")


def test_tsne_separates_clusters_and_is_seeded():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 20)
    codes = np.where(rng.random((40, 16)) < 0.1, -1.0, 1.0)
    codes[labels == 1] *= -1  # two well separated groups of ±1 codes
    a, b = tsne_2d(codes, seed=3), tsne_2d(codes, seed=3)
    np.testing.assert_allclose(a, b)
    centroid = np.stack([a[labels == c].mean(0) for c in (0, 1)])
    spread = max(np.linalg.norm(a[labels == c] - centroid[c], axis=1).mean() for c in (0, 1))
    assert np.linalg.norm(centroid[0] - centroid[1]) > 2 * spread


@pytest.mark.parametrize("n", [1, 2, 5, 12])
def test_tsne_small_n_adjusts_perplexity(tmp_path, n):
    rng = np.random.default_rng(n)
    path = plot_tsne(rng.normal(size=(n, 8)), np.arange(n) % 2, None, tmp_path / "t.png")
    assert_png(path)


def test_tsne_of_collapsed_codes_places_each_distinct_code_apart():
    codes = np.ones((30, 8))
    codes[20:] = -1  # two distinct codes only: no t-SNE (scikit-learn would crash on one)
    points = tsne_2d(codes, seed=0)
    assert np.isfinite(points).all()
    assert np.abs(points[:20].mean(0) - points[20:].mean(0)).max() > 0.5
    assert points[:20].std(0).max() < 0.2 and points[20:].std(0).max() < 0.2
    assert np.isfinite(tsne_2d(np.ones((30, 8)))).all()


def test_tsne_subsamples(tmp_path):
    rng = np.random.default_rng(0)
    path = plot_tsne(rng.normal(size=(300, 4)), rng.integers(0, 10, 300), FASHION_MNIST_CLASSES,
                     tmp_path / "t.png", max_points=40)
    assert_png(path)


def test_training_curves(tmp_path):
    history = [{"epoch": e, "train_loss": 1 / (e + 1), "val_loss": 1.1 / (e + 1), "knn_accuracy": 0.5,
                "seconds": 3.0} for e in range(3)]
    steps = [{"epoch": e, "step": 4 * e + i, "loss": 1.0} for e in range(3) for i in range(4)]
    assert_png(plot_training_curves(history + steps, tmp_path / "c.png"))
    assert_png(plot_training_curves(history[:1], tmp_path / "one.png"))
    assert_png(plot_training_curves(steps, tmp_path / "steps.png"))
    assert_png(plot_training_curves([], tmp_path / "empty.png"))


def test_precision_and_pr_curves(tmp_path):
    assert_png(plot_precision_at_k([1, 10, 100], [0.9, 0.8, 0.5], tmp_path / "pk.png", label="48 bits"))
    assert_png(plot_pr_curve([1.0, 0.8], [0.1, 1.0], tmp_path / "pr.png", label="48 bits"))
    assert_png(plot_pr_curves([("a", [1.0], [0.5]), ("b", [0.5, 0.4], [0.2, 0.9])], tmp_path / "prs.png"))
    with pytest.raises(ValueError, match="shape"):
        plot_precision_at_k([1, 2], [0.5], tmp_path / "bad.png")


def dominant(column: np.ndarray) -> tuple[int, int]:
    """Strongly green and strongly red pixel counts of an RGB crop."""
    c = column.astype(int)
    green = (c[..., 1] > 150) & (c[..., 0] < 60) & (c[..., 2] < 60)
    red = (c[..., 0] > 150) & (c[..., 1] < 60) & (c[..., 2] < 60)
    return int(green.sum()), int(red.sum())


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_retrieval_grid_frames_correct_green_and_wrong_red(tmp_path, dtype):
    k = 10
    grey = 0.5 if dtype == np.float32 else 128
    queries = np.full((2, 1, 16, 16), grey, dtype=dtype)
    results = np.full((2, k, 1, 16, 16), grey, dtype=dtype)
    correct = np.zeros((2, k), dtype=bool)
    correct[0, ::2] = True  # row 0 alternates correct / wrong, row 1 all wrong but the last
    correct[1, -1] = True
    path = plot_retrieval_grid(queries, results, correct, tmp_path / "grid.png",
                               query_labels=[0, 1], result_labels=np.zeros((2, k), int),
                               distances=np.arange(2 * k).reshape(2, k),
                               class_names=FASHION_MNIST_CLASSES)
    pixels = assert_png(path)
    height, width = pixels.shape[:2]
    for row in range(2):
        band = pixels[row * height // 2:(row + 1) * height // 2]
        for col in range(k + 1):
            green, red = dominant(band[:, col * width // (k + 1):(col + 1) * width // (k + 1)])
            if col == 0:  # the query has no frame
                assert green == 0 and red == 0
            elif correct[row, col - 1]:
                assert green > 50 and red == 0
            else:
                assert red > 50 and green == 0


def test_retrieval_grid_rejects_mismatched_shapes(tmp_path):
    with pytest.raises(ValueError, match="correct"):
        plot_retrieval_grid(np.zeros((1, 1, 8, 8)), np.zeros((1, 3, 1, 8, 8)), np.zeros((1, 2), bool),
                            tmp_path / "g.png")
    with pytest.raises(ValueError, match="channels"):
        plot_retrieval_grid(np.zeros((1, 2, 8, 8)), np.zeros((1, 3, 2, 8, 8)), np.zeros((1, 3), bool),
                            tmp_path / "g.png")
