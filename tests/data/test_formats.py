"""Readers round-trip files written here in the exact formats; every corrupt file is refused."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import IDX_CODES, idx_bytes
from PIL import Image

from deephash.data import (
    FASHION_MNIST_CLASSES,
    ArrayDataset,
    ImageFolder,
    load_dataset,
    read_cifar_batch,
    read_idx,
    read_image,
)
from deephash.errors import DataFormatError, DeephashError, NotFoundError


def write(path: Path, data: bytes, gz: bool = False) -> Path:
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", list(IDX_CODES))
def test_idx_round_trip(tmp_path, gz, dtype):
    rng = np.random.default_rng(0)
    array = (rng.random((5, 4, 3)) * 100 - 50).astype(dtype) if dtype != np.uint8 else rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    got = read_idx(write(tmp_path / "x.bin", idx_bytes(array), gz))  # no .gz name: detection by content
    assert got.dtype == np.dtype(dtype) and got.shape == (5, 4, 3)
    np.testing.assert_array_equal(got, array)


def test_idx_labels_1d_and_empty(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write(tmp_path / "l", idx_bytes(labels), True)), labels)
    assert read_idx(write(tmp_path / "e", idx_bytes(np.zeros((0, 28, 28), np.uint8)))).shape == (0, 28, 28)


def header(code: int, dims: tuple[int, ...]) -> bytes:
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "shorter than the 4-byte magic"),
        (b"\x01\x00\x08\x01" + b"\x00" * 8, "bad magic"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01x", "type code 0x07"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00\x08\x09", "9 dimensions"),
        (header(8, (3,))[:6], "truncated IDX header"),
        (header(8, (10, 4)) + b"\x00" * 39, "truncated"),
        (header(8, (10, 4)) + b"\x00" * 41, "trailing data"),
        (header(8, (10_000,) * 4), "limit"),  # claims 10^16 bytes
        (header(0x0E, (0xFFFFFFFF,) * 4), "limit"),
    ],
)
def test_idx_corrupt(tmp_path, gz, data, message):
    path = write(tmp_path / "bad-idx", data, gz)
    with pytest.raises(DataFormatError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_idx_gz_huge_claim_reads_bounded(tmp_path):
    """A gz header claiming 8 GiB (under the limit) with 10 bytes of data: truncated, little memory."""
    path = write(tmp_path / "big.gz", header(8, (1 << 11,) * 3) + b"\x00" * 10, gz=True)
    tracemalloc.start()
    with pytest.raises(DataFormatError, match="truncated"):
        read_idx(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50 << 20


@pytest.mark.parametrize("cut", [5, 20, -9])
def test_idx_corrupt_gzip(tmp_path, cut):
    blob = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8).reshape(20, 10)))
    path = tmp_path / "cut.gz"
    path.write_bytes(blob[:cut])
    with pytest.raises(DataFormatError, match=str(path)):
        read_idx(path)
    flipped = bytearray(blob)
    flipped[15] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(DataFormatError):
        read_idx(path)


def test_idx_missing_file(tmp_path):
    with pytest.raises(NotFoundError, match="no such file"):
        read_idx(tmp_path / "nope")


# ------------------------------------------------------------------------------------------ CIFAR


def cifar_dict(n: int, seed: int = 0, key: str = "labels") -> tuple[dict, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    data = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # row-major R, G, B planes as the files
    batch = {b"batch_label": b"training batch 1 of 5", key.encode(): labels.tolist(), b"data": data,
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    return batch, images, labels


def py2_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A CIFAR batch exactly as Python 2 pickled it (protocol 2, str as BINSTRING, numpy.core)."""
    def s(text: bytes) -> bytes:
        return (b"U" + bytes([len(text)]) + text) if len(text) < 256 else b"T" + struct.pack("<i", len(text)) + text

    def K(v: int) -> bytes:
        return b"J" + struct.pack("<i", v)

    dtype = b"cnumpy\ndtype\n" + s(b"u1") + K(0) + K(1) + b"\x87R(" + K(3) + s(b"|") + b"NNN" + K(-1) + K(-1) + K(0) + b"tb"
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + K(0) + b"\x85" + s(b"b") + b"\x87R("
             + K(1) + K(data.shape[0]) + K(data.shape[1]) + b"\x86" + dtype + b"\x89" + s(data.tobytes()) + b"tb")
    label_list = b"](" + b"".join(K(v) for v in labels) + b"e"
    return b"\x80\x02}(" + s(b"data") + array + s(b"labels") + label_list + s(b"batch_label") + s(b"x") + b"u."


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_round_trip(tmp_path, protocol):
    batch, images, labels = cifar_dict(7)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    got_images, got_labels = read_cifar_batch(path)
    assert got_images.dtype == np.uint8 and got_images.shape == (7, 32, 32, 3)
    assert got_labels.dtype == np.int64
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_cifar_python2_pickle_and_fine_labels(tmp_path):
    batch, images, labels = cifar_dict(4)
    path = tmp_path / "py2"
    path.write_bytes(py2_pickle(batch[b"data"], labels.tolist()))
    got_images, got_labels = read_cifar_batch(path)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    batch, _, labels = cifar_dict(3, key="fine_labels")
    path.write_bytes(pickle.dumps(batch, protocol=2))
    np.testing.assert_array_equal(read_cifar_batch(path)[1], labels)


class Hostile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_hostile_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"
    for payload in ({b"data": Hostile(marker)}, Hostile(marker)):
        path = tmp_path / "evil"
        path.write_bytes(pickle.dumps(payload, protocol=2))
        with pytest.raises(DataFormatError, match="refuses to load global (os|posix).system") as info:
            read_cifar_batch(path)
        assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: [1, 2, 3], "not a dict"),
        (lambda b: {b"data": b[b"data"]}, "no 'data' and 'labels'"),
        (lambda b: {**b, b"data": b[b"data"].astype(np.float32)}, "must be uint8"),
        (lambda b: {**b, b"data": b[b"data"][:, :100]}, r"must be uint8 \(N, 3072\)"),
        (lambda b: {**b, b"labels": b[b"labels"][:-1]}, "labels must be 5 integers"),
        (lambda b: {**b, b"labels": [0.5] * 5}, "labels must be"),
        (lambda b: {**b, b"labels": [-1] * 5}, "out of range"),
        (lambda b: {**b, b"labels": "abcde"}, "labels must be"),
    ],
)
def test_cifar_wrong_dict(tmp_path, mutate, message):
    batch, _, _ = cifar_dict(5)
    path = tmp_path / "wrong"
    path.write_bytes(pickle.dumps(mutate(batch), protocol=2))
    with pytest.raises(DataFormatError, match=message):
        read_cifar_batch(path)


@pytest.mark.parametrize("blob", [b"", b"garbage", b"\x80\x02}q\x00", b"\x80\x05\x95" + b"\xff" * 8])
def test_cifar_corrupt_bytes(tmp_path, blob):
    good = pickle.dumps(cifar_dict(2)[0], protocol=2)
    for data in (blob, good[: len(good) // 2]):
        path = tmp_path / "corrupt"
        path.write_bytes(data)
        with pytest.raises(DataFormatError, match="corrupt"):
            read_cifar_batch(path)


# ---------------------------------------------------------------------------------- image folders


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    for cls, n in (("cat", 2), ("ant", 3)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            pixels = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
            expected[f"{cls}/{i}.png"] = pixels
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    # 6x5 (HxW) images at 5 px, the whole shorter side: no resize, the centre 5 rows of 6 from row 0
    data = ImageFolder(tmp_path, image_size=5, crop_fraction=1.0)
    assert data.classes == ["ant", "cat"] and data.data.shape == (5, 3, 5, 5) and data.data.dtype == torch.uint8
    assert data.targets.tolist() == [0, 0, 0, 1, 1]
    for k, path in enumerate(data.paths):
        rel = Path(path).relative_to(tmp_path).as_posix()
        np.testing.assert_array_equal(data.data[k].permute(1, 2, 0).numpy(), expected[rel][:5])
    grey = ImageFolder(tmp_path, image_size=4, channels=1)
    assert grey.data.shape == (5, 1, 4, 4) and grey.data[0].shape == (1, 4, 4)


def test_image_folder_bad_file_and_bomb(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "a" / "ok.png")
    bad = tmp_path / "a" / "zz.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    listed = ImageFolder(tmp_path)  # skipped when listed (header check), recorded with its reason
    assert len(listed) == 1 and list(listed.bad_files.found) == [str(bad)]
    listed.bad_files.max_fraction = 0.25
    with pytest.raises(DataFormatError, match="zz.png"):
        listed.bad_files.check()
    bad.unlink()
    Image.new("1", (20000, 10000)).save(tmp_path / "a" / "zz.png")  # 2e8 pixels, a tiny file
    assert "decompression bomb" in ImageFolder(tmp_path).bad_files.found[str(bad)]
    with pytest.raises(DataFormatError, match="decompression bomb"):
        read_image(bad)
    with pytest.raises(NotFoundError):
        ImageFolder(tmp_path / "missing")


# --------------------------------------------------------------------------------- named data sets


def write_mnist_folder(folder: Path, n_train: int = 12, n_test: int = 5, gz: bool = True) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        suffix = ".gz" if gz else ""
        write(folder / f"{prefix}-images-idx3-ubyte{suffix}", idx_bytes(images), gz)
        write(folder / f"{prefix}-labels-idx1-ubyte{suffix}", idx_bytes(labels), gz)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_load_dataset_from_root(tmp_path, gz):
    arrays = write_mnist_folder(tmp_path / "mnist", gz=gz)
    train = load_dataset("mnist", "train", root=tmp_path)  # found under <root>/mnist
    test = load_dataset("mnist", "test", root=tmp_path / "mnist")
    assert isinstance(train, ArrayDataset) and train.train and not test.train
    assert train.data.shape == (12, 1, 28, 28) and test.data.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(train.data[:, 0].numpy(), arrays["train"][0])
    np.testing.assert_array_equal(test.targets.numpy(), arrays["t10k"][1])
    x, y = train[3]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28) and x.max() <= 1 and isinstance(y, int)
    assert torch.allclose(x * 255, train.data[3].float())


def test_load_dataset_env_var_and_cache(tmp_path, monkeypatch):
    write_mnist_folder(tmp_path / "env")
    monkeypatch.setenv("DEEPHASH_DATA", str(tmp_path / "env"))
    assert len(load_dataset("mnist", "test")) == 5
    monkeypatch.delenv("DEEPHASH_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    write_mnist_folder(tmp_path / "cache" / "deephash" / "mnist", n_test=3)
    assert len(load_dataset("mnist", "test")) == 3


def test_load_dataset_not_found(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPHASH_DATA", str(tmp_path / "nothing"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(NotFoundError) as info:
        load_dataset("mnist", "train", root=tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "nothing") in message and "DEEPHASH_DATA" in message
    with pytest.raises(NotFoundError, match="known: .*fashion-mnist"):
        load_dataset("imagenet", "train")
    with pytest.raises(DeephashError, match="split"):
        load_dataset("mnist", "val", root=tmp_path)


def test_load_dataset_mismatched_files(tmp_path):
    write_mnist_folder(tmp_path)
    write(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(np.zeros(4, np.uint8)), True)
    with pytest.raises(DataFormatError, match="expected 5 uint8 labels"):
        load_dataset("mnist", "test", root=tmp_path)


def test_cifar10_folder_and_tar(tmp_path):
    folder = tmp_path / "a" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    expected = []
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch, images, labels = cifar_dict(2, seed=k)
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        expected.append((images, labels))
    train = load_dataset("cifar10", "train", root=tmp_path / "a")
    assert train.data.shape == (10, 3, 32, 32) and train.classes[0] == "airplane"
    np.testing.assert_array_equal(train.data.permute(0, 2, 3, 1).numpy(), np.concatenate([e[0] for e in expected[:5]]))
    np.testing.assert_array_equal(train.targets.numpy(), np.concatenate([e[1] for e in expected[:5]]))
    (tmp_path / "b").mkdir()
    with tarfile.open(tmp_path / "b" / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    test = load_dataset("cifar10", "test", root=tmp_path / "b")
    np.testing.assert_array_equal(test.data.permute(0, 2, 3, 1).numpy(), expected[5][0])
    assert not (tmp_path / "b" / "cifar-10-batches-py").exists()  # read in place, nothing extracted
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b broken")
    with pytest.raises(DataFormatError, match="corrupt archive"):
        load_dataset("cifar10", "test", root=tmp_path / "c")


def test_digits_split():
    from sklearn.datasets import load_digits

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) + len(test) == 1797 and train.data.shape[1:] == (1, 8, 8)
    assert int(train.data.max()) == 255
    reference = load_digits()
    both = torch.cat([train.targets, test.targets]).sort().values
    assert both.tolist() == sorted(reference.target.tolist())
    assert torch.equal(load_dataset("digits", "test").data, test.data)


def test_fashion_mnist_from_debian_package():
    train = load_dataset("fashion-mnist", "train")
    assert train.data.shape == (60000, 1, 28, 28) and train.data.dtype == torch.uint8
    assert train.classes == list(FASHION_MNIST_CLASSES)
    assert torch.bincount(train.targets).tolist() == [6000] * 10
    assert train.targets[:3].tolist() == [9, 0, 0]  # the official first labels: ankle boot, T-shirt, T-shirt


def test_array_dataset_api():
    images = torch.arange(2 * 1 * 2 * 2, dtype=torch.uint8).reshape(2, 1, 2, 2)
    data = ArrayDataset(images, [1, 0], classes=["a", "b"], name="t")
    x, y = data.batch([1, 0])
    assert x.dtype == torch.float32 and torch.equal(y, torch.tensor([0, 1])) and torch.equal(x[0] * 255, images[1].float())
    sub = data.subset([1])
    assert len(sub) == 1 and sub.labels.tolist() == [0] and sub.classes == ["a", "b"]
    with pytest.raises(DeephashError, match="uint8"):
        ArrayDataset(images.float(), [1, 0])
    with pytest.raises(DeephashError, match="2 integer targets"):
        ArrayDataset(images, [1])


@pytest.mark.parametrize("value", [np.array([None, 1], dtype=object), np.zeros(2, dtype=[("a", "u1"), ("b", "f4")]), np.zeros(2, "U3")])
def test_cifar_refuses_unusual_numpy_state(tmp_path, value):
    """Object, structured and string arrays are never rebuilt: numpy sees no untrusted dtype state."""
    path = tmp_path / "odd"
    path.write_bytes(pickle.dumps({b"data": value, b"labels": [0, 1]}, protocol=2))
    with pytest.raises(DataFormatError, match="not a valid CIFAR batch"):
        read_cifar_batch(path)
