"""What several test modules share: tiny data in the real on-disk formats, seeded batches, a live server.

Importable from every test folder (``pythonpath = ["tests"]`` in pyproject.toml); fixtures built
on these live in ``tests/conftest.py``.
"""

from __future__ import annotations

import gzip
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

#: IDX type codes of the numpy dtypes the format knows.
IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(array: np.ndarray, code: int | None = None) -> bytes:
    """The IDX format written by hand: 0, 0, type code, ndim, big-endian uint32 dims, big-endian data.

    ``code`` defaults to the array's dtype's code; another one writes a header that lies.
    """
    code = IDX_CODES[array.dtype.type] if code is None else code
    head = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray) -> None:
    """A gzipped uint8 IDX file (as Fashion-MNIST ships)."""
    path.write_bytes(gzip.compress(idx_bytes(np.asarray(array).astype(np.uint8))))


def tiny_fashion_mnist(root: Path, n_classes: int = 3, per_class_train: int = 16,
                       per_class_test: int = 8, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST's four IDX files under ``root``: classes of 28x28 noise, each with a bright
    band of its own rows (easy to learn). Returns ``{"train", "test"}: (uint8 images, int64 labels)``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    data = {}
    for prefix, per_class in (("train", per_class_train), ("t10k", per_class_test)):
        labels = rng.permutation(np.repeat(np.arange(n_classes), per_class))
        images = rng.integers(0, 60, size=(len(labels), 28, 28))
        for c in range(n_classes):
            images[labels == c, 3 + 8 * c: 9 + 8 * c, 4:24] += 180
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
        data["train" if prefix == "train" else "test"] = (images.astype(np.uint8), labels.astype(np.int64))
    return data


def labelled_batch(n_classes: int = 4, n_samples: int = 5, dim: int = 3, seed: int = 0,
                   scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 embeddings ``(P*K, dim)`` of ``scale`` · N(0, 1) and int64 labels, K per class, shuffled."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(n_samples)
    labels = labels[torch.randperm(len(labels), generator=g)]
    return torch.randn(len(labels), dim, generator=g, dtype=torch.float64) * scale, labels


def squared_distance(e: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """``|e_i - e_j|^2`` by a plain loop over coordinates (a 0-d tensor that keeps autograd): the
    oracle the miners and losses are checked against."""
    return sum((e[i, k] - e[j, k]) ** 2 for k in range(e.shape[1]))


def gaussian_blobs(n_classes: int, n_per_class: int, dim: int, seed: int, spread: float = 3.0,
                   shuffle: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable Gaussian blobs around fixed random centers (``spread`` · N(0, 1), seed 100):
    float32 ``(N, dim)``, int64 ``(N,)``; shuffled with ``seed`` unless ``shuffle`` is False."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(100)) * spread
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = centers[y] + torch.randn(len(y), dim, generator=gen)
    if not shuffle:
        return x, y
    perm = torch.randperm(len(y), generator=gen)
    return x[perm], y[perm]


DIGIT_CLASSES = [str(d) for d in range(10)]


def png_of(pixels: np.ndarray) -> bytes:
    """The PNG bytes of a uint8 ``(H, W)`` or ``(H, W, 3)`` image (an upload, a stored item)."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def random_code_index(root: Path, bits: int, n: int, seed: int) -> tuple[Path, Path]:
    """:func:`tiny_digits_run`'s run and an index of ``n`` items with the train split's metadata and
    labels but random codes drawn from ``seed`` (the untrained model gives most images one code)."""
    from deephash.retrieval.index import HashIndex

    run_dir, index_dir, _ = tiny_digits_run(root, bits)
    built = HashIndex.load(index_dir)
    rng = np.random.default_rng(seed)
    index = HashIndex(bits, metadata=built.metadata)
    index.add(np.packbits(rng.integers(0, 2, (n, bits)).astype(bool), axis=1), labels=built.labels[:n])
    index.save(index_dir)
    return run_dir, index_dir


def tiny_digits_run(root: Path, bits: int = 12, centred: bool = False, index: bool = True, model_extra: dict | None = None):
    """An untrained tiny CNN on scikit-learn's 8x8 digits saved as a run (``root/run``) and, with
    ``index``, an index of its train split (``root/index``). ``centred`` sets the hash layer's bias
    so that codes vary (an untrained one gives most images one code); ``model_extra``: more keys of the
    config's model section (e.g. ``{"rerank": "head"}`` for an index that keeps re-rank vectors).

    Returns:
        ``(run_dir, index_dir, config)``.
    """
    from deephash import runs
    from deephash.config import config_from_dict
    from deephash.models import build_model

    config = config_from_dict({
        "data": {"dataset": "digits"},
        "model": {"backbone": "fmnist-cnn", "backbone_params": {"width": 4, "depth": [1, 1]}, "bits": bits, **(model_extra or {})},
        "device": "cpu",
    })
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    if centred:
        x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (256, 1, 8, 8), dtype=np.uint8)).float() / 255
        with torch.no_grad():
            features = model.backbone(model.normalize(x))
            model.head.linear.bias.copy_(-(features.mean(0) @ model.head.linear.weight.T))
    run_dir, index_dir = root / "run", root / "index"
    run_dir.mkdir(parents=True)
    runs.save_model(run_dir / "model.pt", model, config, DIGIT_CLASSES)
    if index:
        runs.build_index(run_dir, split="train", out=index_dir)
    return run_dir, index_dir, config


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(index_dir: Path, run_dir: Path | None, log: Path, *extra: str,
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``python -m deephash serve`` on a free loopback port with ``extra`` arguments (``env``:
    the process's environment; ``run_dir`` None: ``extra`` names the model, e.g. ``--model DIR``);
    wait until /healthz answers. The log is appended to (restarts)."""
    port = free_port()
    model = ["--run", str(run_dir)] if run_dir is not None else []
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "deephash", "serve", str(index_dir), *model,
                                 "--host", "127.0.0.1", "--port", str(port), *extra],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    pytest.fail(f"server did not answer /healthz within 120 s: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Terminate a server, killing it when it does not stop within 15 s."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def playwright_api(chromium: str | None = None):
    """Playwright's ``(sync_playwright, expect)``; a missing browser or package fails (never skips)
    with what to install."""
    chromium = chromium or CHROMIUM
    if not Path(chromium).exists():
        pytest.fail(f"{chromium} not found: run make test as root (it installs it), or apt-get install chromium chromium-driver")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("the playwright Python package is missing: pip install playwright (a dev dependency)")
    return sync_playwright, expect


def learning_seeds() -> list[int]:
    """Seeds the learning tests run with: ``[0]``, or the comma-separated list in the environment
    variable ``DEEPHASH_LEARNING_SEEDS`` (set only to check that a learning test holds for several
    seeds, RELIABILITY.md)."""
    return [int(s) for s in os.environ.get("DEEPHASH_LEARNING_SEEDS", "0").split(",")]


#: What the stand-in timm says its pretrained weights expect, by model name (timm's ImageNet mean and
#: std; input sizes small, for tiny test runs: timm's resnet50 says 224).
STAND_IN_TIMM_CFG = {
    "resnet50": {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "input_size": (3, 32, 32)},
    "tiny": {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.2, 0.25), "input_size": (3, 160, 160)},
}


def stand_in_pretrained_weight(in_chans: int) -> torch.Tensor:
    """The stand-in timm's "downloaded" first convolution: fixed random values, (8, in_chans, 3, 3)."""
    return torch.randn(8, in_chans, 3, 3, generator=torch.Generator().manual_seed(1234))


def install_stand_in_timm(monkeypatch) -> list[dict]:
    """Put a stand-in for timm's public API in ``sys.modules`` (timm cannot be installed beside the
    pinned CPU torch: it needs torchvision): ``create_model(name, pretrained, num_classes, in_chans,
    **kwargs)`` returns a small CNN (deephash's ``fmnist-cnn``, 16 features) whose first convolution is
    :func:`stand_in_pretrained_weight` when ``pretrained`` (the "downloaded weights"), and
    ``get_pretrained_cfg_value(name, key)`` reads :data:`STAND_IN_TIMM_CFG`. Returns the list of
    ``create_model`` calls, appended to as made."""
    import types

    from torch import nn

    calls: list[dict] = []

    def create_model(name, pretrained=False, num_classes=1000, in_chans=3, **kwargs):
        calls.append({"name": name, "pretrained": pretrained, "num_classes": num_classes, "in_chans": in_chans, **kwargs})
        from deephash.models.backbones import FMnistCNN

        net = FMnistCNN(in_chans, width=8, depth=(1, 1))  # features: 16, from "features.0" (a 3x3 convolution)
        net.num_features = 16
        if pretrained:
            with torch.no_grad():
                net.features[0].weight.copy_(stand_in_pretrained_weight(in_chans))
        return net

    module = types.SimpleNamespace(
        create_model=create_model,
        get_pretrained_cfg_value=lambda name, key: STAND_IN_TIMM_CFG.get(name, {}).get(key))
    monkeypatch.setitem(sys.modules, "timm", module)
    return calls
