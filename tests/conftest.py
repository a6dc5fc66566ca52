"""Fixtures every test folder can use (plain helpers are in ``tests/helpers.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import tiny_fashion_mnist


@pytest.fixture(scope="session")
def tiny_fmnist(tmp_path_factory) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A tiny Fashion-MNIST in its real on-disk format, written once per session (read-only):
    3 classes of banded noise, 16 training and 8 test images each. Returns the folder (a config's
    ``data.root``) and ``{"train", "test"}: (uint8 images (N, 28, 28), int64 labels (N,))``."""
    root = tmp_path_factory.mktemp("tiny-fashion-mnist")
    return root, tiny_fashion_mnist(root)
