"""Plots: embedding scatter, t-SNE, training curves, precision@k, PR curves, retrieval grid."""

from deephash.viz.grid import plot_retrieval_grid
from deephash.viz.plots import (
    FASHION_MNIST_CLASSES,
    TAB10,
    class_colors,
    plot_embeddings_2d,
    plot_pr_curve,
    plot_pr_curves,
    plot_precision_at_k,
    plot_training_curves,
    plot_tsne,
    tsne_2d,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "TAB10",
    "class_colors",
    "plot_embeddings_2d",
    "plot_pr_curve",
    "plot_pr_curves",
    "plot_precision_at_k",
    "plot_retrieval_grid",
    "plot_training_curves",
    "plot_tsne",
    "tsne_2d",
]
