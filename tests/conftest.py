"""Fixtures every test folder can use (plain helpers are in ``tests/helpers.py``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import tiny_fashion_mnist


@pytest.fixture(scope="session")
def tiny_fmnist(tmp_path_factory) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A tiny Fashion-MNIST in its real on-disk format, written once per session (read-only):
    3 classes of banded noise, 16 training and 8 test images each. Returns the folder (a config's
    ``data.root``) and ``{"train", "test"}: (uint8 images (N, 28, 28), int64 labels (N,))``."""
    root = tmp_path_factory.mktemp("tiny-fashion-mnist")
    return root, tiny_fashion_mnist(root)


@pytest.fixture
def pinned_threads() -> Iterator[int]:
    """Runs a learning test on a fixed number of CPU threads (1, or ``DEEPHASH_LEARNING_THREADS``
    when checking that the test holds on others), restoring the previous number afterwards: how a
    float sum is split over threads changes its rounding, and with it a short run's outcome."""
    before = torch.get_num_threads()
    threads = int(os.environ.get("DEEPHASH_LEARNING_THREADS", "1"))
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)
