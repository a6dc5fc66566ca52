"""Fuzz every reader: mutated valid files, random bytes and hostile files.

Contract (issue 7): a reader either returns or raises a ``DeephashError`` subclass whose message
is one line. Any other exception, a crash or a large allocation is a bug. Failing inputs found
while writing this file are kept as explicit ``@example`` regressions.

Hypothesis is derandomised, so every run tries the same inputs; budgets keep the file fast.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import pickletools
import struct
import subprocess
import tempfile
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import idx_bytes
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from deephash.config import load_config
from deephash.data.images import check_image_header, read_image
from deephash.data.photos import DecodeFailure, ImageFolder
from deephash.data.sources import MAX_IDX_BYTES, parse_cifar_batch, read_idx
from deephash.errors import DeephashError
from deephash.retrieval.codes import load_codes, save_codes
from deephash.retrieval.index import HashIndex
from deephash.train.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint


def fuzz(max_examples: int) -> settings:
    """Deterministic hypothesis settings with an example budget."""
    return settings(derandomize=True, max_examples=max_examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


WORK = Path(tempfile.mkdtemp(prefix="deephash-fuzz-"))  # one scratch folder, files overwritten per example


def outcome(fn, *args):
    """Call a reader; return its result or the DeephashError it raised (anything else fails)."""
    try:
        return fn(*args)
    except DeephashError as error:
        assert str(error) and "\n" not in str(error), f"multi-line message: {str(error)!r}"
        return error


# ----------------------------------------------------------------------------- mutation strategy

@st.composite
def mutated(draw, valid: bytes, header: int = 64) -> bytes:
    """``valid`` after 1 to 4 edits: bit flips (biased to the header), truncation, insertions,
    overwrites with random bytes, or a slice duplicated."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "flip_header", "truncate", "insert", "overwrite", "dup"]))
        n = len(data)
        if kind in ("flip", "flip_header") and n:
            pos = draw(st.integers(0, min(n, header) - 1 if kind == "flip_header" else n - 1))
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[draw(st.integers(0, n)):]
        elif kind == "insert":
            pos = draw(st.integers(0, n))
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "overwrite" and n:
            pos = draw(st.integers(0, n - 1))
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[pos:pos + len(chunk)] = chunk
        elif kind == "dup" and n:
            a = draw(st.integers(0, n - 1))
            data[a:a] = data[a:a + draw(st.integers(1, 32))]
    return bytes(data)


# ------------------------------------------------------------------------------------------- IDX

VALID_IDX = idx_bytes(np.arange(2 * 5 * 4, dtype=np.uint8).reshape(2, 5, 4))
VALID_IDX_F4 = idx_bytes(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), code=0x0D)


def check_idx(data: bytes, name: str) -> None:
    path = WORK / name
    path.write_bytes(data)
    result = outcome(read_idx, path)
    if isinstance(result, np.ndarray):
        assert result.dtype.isnative
        assert result.nbytes <= len(data) * 8 + 64  # never larger than what the file holds


@fuzz(150)
@given(st.one_of(mutated(VALID_IDX, header=16), mutated(VALID_IDX_F4, header=16), st.binary(max_size=64)))
@example(b"\x00\x00\x08\x04" + b"\xff" * 16)  # 4 dims of 2^32-1: refused by the size limit
@example(b"\x00\x00\x0d\x01\x00\x00\x00\x01" + b"\x00" * 4)  # one float32
def test_fuzz_idx_raw(data):
    check_idx(data, "raw.idx")


@fuzz(100)
@given(st.one_of(
    mutated(VALID_IDX, header=16).map(gzip.compress),  # header edits inside a valid gzip stream
    mutated(gzip.compress(VALID_IDX), header=24),  # damage to the gzip stream itself
))
def test_fuzz_idx_gzip(data):
    check_idx(data, "file.idx.gz")


@pytest.mark.parametrize("compress", [False, True])
def test_idx_header_claiming_1e16_bytes_is_refused_before_allocation(compress):
    claim = b"\x00\x00\x08\x04" + struct.pack(">IIII", 10_000, 10_000, 10_000, 10_000)  # 1e16 bytes
    assert 10**16 > MAX_IDX_BYTES
    data = claim + bytes(1024)
    path = WORK / ("huge.gz" if compress else "huge")
    path.write_bytes(gzip.compress(data) if compress else data)
    tracemalloc.start()
    try:
        with pytest.raises(DeephashError, match="10000000000000000 bytes") as info:
            read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "\n" not in str(info.value)
    assert peak < 1 << 20, f"{peak} bytes allocated for a refused header"


def test_idx_gzip_claim_under_the_limit_reads_only_what_is_there():
    """A gzip IDX claiming 2^33 bytes (within the limit) but holding 1 KiB: memory stays small."""
    path = WORK / "claim.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x02" + struct.pack(">II", 1 << 16, 1 << 17) + bytes(1024)))
    tracemalloc.start()
    try:
        with pytest.raises(DeephashError, match="truncated"):
            read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20


# ----------------------------------------------------------------------------------------- CIFAR

def cifar_pickle(n: int = 3, protocol: int = 2, fine: bool = False) -> bytes:
    rng = np.random.default_rng(n)
    batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"fine_labels" if fine else b"labels": [int(v) for v in rng.integers(0, 10, n)]}
    return pickle.dumps(batch, protocol=protocol)


VALID_CIFAR = [cifar_pickle(2, p) for p in (2, 4)] + [cifar_pickle(1, 5, fine=True)]


@fuzz(200)
@given(st.one_of(st.sampled_from(VALID_CIFAR).flatmap(lambda b: mutated(b, header=48)), st.binary(max_size=96)))
@example(b"\x80\x02]q\x00.")  # a list, not a dict
@example(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00N.")
def test_fuzz_cifar_batches(data):
    result = outcome(parse_cifar_batch, data, "batch")
    if not isinstance(result, DeephashError):
        images, labels = result
        assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3) and labels.dtype == np.int64


def _global_call(module: str, name: str, arg: str) -> bytes:
    """A protocol-2 pickle calling ``module.name(arg)`` (GLOBAL + TUPLE1 + REDUCE)."""
    text = arg.encode()
    return (b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\nX" + struct.pack("<I", len(text))
            + text + b"\x85R.")


def _hostile_pickles(marker: Path) -> dict[str, bytes]:
    class Popen:
        def __reduce__(self):
            return (subprocess.Popen, (["touch", str(marker)],))

    touch = f"touch {marker}"
    return {
        "os.system": _global_call("os", "system", touch),
        "posix.system": _global_call("posix", "system", touch),
        "subprocess.Popen": pickle.dumps({b"data": Popen(), b"labels": [0]}, protocol=2),
        "subprocess.getoutput": _global_call("subprocess", "getoutput", touch),
        "builtins.eval": _global_call("builtins", "eval", f"__import__('os').system({touch!r})"),
        "builtins.exec": _global_call("builtins", "exec", f"import os; os.system({touch!r})"),
        "__builtin__.eval": _global_call("__builtin__", "eval", f"__import__('os').system({touch!r})"),
        "numpy object array": pickle.dumps({b"data": np.array([Popen()], dtype=object), b"labels": [0]}, protocol=2),
        "numpy object array (protocol 5)": pickle.dumps({b"data": np.array([1, "x"], dtype=object), b"labels": [0]},
                                                        protocol=5),
        "numpy.load": _global_call("numpy", "load", str(marker)),
        "_codecs.encode utf-7 trick": _global_call("_codecs", "encode", "x"),
    }


@pytest.mark.parametrize("name", sorted(_hostile_pickles(Path("m"))))
def test_hostile_cifar_pickles_are_refused_without_running(name, tmp_path):
    """os.system is also covered in tests/data/test_formats.py; here every other way in."""
    marker = tmp_path / "pwned"
    data = _hostile_pickles(marker)[name]
    pickletools.dis(data, out=io.StringIO())  # the payload is a well-formed pickle
    result = outcome(parse_cifar_batch, data, tmp_path / "evil")
    assert isinstance(result, DeephashError), name
    assert not marker.exists()


# ---------------------------------------------------------------------------------------- images

def _png(width: int = 6, height: int = 5, mode: str = "RGB") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(width)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 120, dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming width x height 8-bit grey pixels, with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


VALID_IMAGES = [_png(), _png(3, 4, "L"), _jpeg()]


@fuzz(120)
@given(st.one_of(st.sampled_from(VALID_IMAGES).flatmap(lambda b: mutated(b, header=40)), st.binary(max_size=64)),
       st.sampled_from([None, "L", "RGB"]))
@example(bomb_png(), None)
@example(bomb_png(12_000, 12_000), "RGB")  # 1.44e8 pixels: over the limit, under twice it (a warning in Pillow)
def test_fuzz_images(data, mode):
    path = WORK / "image.png"
    path.write_bytes(data)
    result = outcome(read_image, path, mode)
    if isinstance(result, np.ndarray):
        assert result.dtype == np.uint8 and result.ndim == 3 and result.shape[0] in (1, 3)


@pytest.mark.parametrize("size", [(100_000, 100_000), (12_000, 12_000)])
def test_decompression_bomb_is_refused_by_name(size):
    path = WORK / "bomb.png"
    path.write_bytes(bomb_png(*size))
    with pytest.raises(DeephashError, match="decompression bomb"):
        read_image(path)


def _exif_png(orientation: int) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(np.arange(30, dtype=np.uint8).reshape(5, 6)).save(buffer, "PNG", exif=exif)
    return buffer.getvalue()


@fuzz(100)
@given(st.one_of(st.sampled_from([*VALID_IMAGES, _exif_png(6)]).flatmap(lambda b: mutated(b, header=40)),
                 st.binary(max_size=64)))
@example(bomb_png())
@example(bomb_png(12_000, 12_000))
@example(_exif_png(0))  # orientations outside 1..8 are ignored
@example(_exif_png(65535))
def test_fuzz_streamed_photo_items(data):
    """The streaming path (a photo folder): the header check made when listing returns None or a
    one-line reason; an item decodes (evaluation and training transforms) to uint8 (3, 8, 8) or
    comes back from the worker as a DecodeFailure with a one-line reason, never raising."""
    folder = WORK / "stream"
    folder.mkdir(exist_ok=True)
    (folder / "item.png").write_bytes(data)
    reason = check_image_header(folder / "item.png")
    assert reason is None or (reason and "\n" not in reason)
    dataset = ImageFolder(folder, image_size=8, check=False)
    for key in (0, (0, (1, 2))):
        item = dataset[key]
        if isinstance(item, DecodeFailure):
            assert item.reason and "\n" not in item.reason
        else:
            assert item[0].dtype == torch.uint8 and item[0].shape == (3, 8, 8)


@pytest.mark.parametrize("size", [(100_000, 100_000), (12_000, 12_000)])
def test_decompression_bomb_in_a_photo_folder_is_skipped_by_name(size):
    folder = WORK / "bombs"
    folder.mkdir(exist_ok=True)
    (folder / "bomb.png").write_bytes(bomb_png(*size))
    (folder / "fine.png").write_bytes(_png())
    listed = ImageFolder(folder, image_size=4)  # refused at listing, from the header alone
    assert len(listed) == 1 and "decompression bomb" in listed.bad_files.found[str(folder / "bomb.png")]
    unchecked = ImageFolder(folder, image_size=4, check=False)  # and again by the worker's decoder
    failure = unchecked[unchecked.paths.index(str(folder / "bomb.png"))]
    assert isinstance(failure, DecodeFailure) and "decompression bomb" in failure.reason


# ------------------------------------------------------------------------------------ code files

def _valid_npz() -> bytes:
    path = WORK / "valid.npz"
    save_codes(path, np.array([[1, 0] * 6] * 3, dtype=bool), np.arange(3), bits=12, ids=np.array([7, 8, 9]))
    return path.read_bytes()


VALID_NPZ = _valid_npz()


def _npz_with_bad_header() -> bytes:
    """VALID_NPZ with the codes member's header dict broken (zip CRCs recomputed, so it opens)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(VALID_NPZ)) as src, zipfile.ZipFile(buffer, "w") as dst:
        for info in src.infolist():
            body = src.read(info)
            dst.writestr(info.filename, body.replace(b"(3, 2)", b"(3, 2(") if info.filename == "codes.npy" else body)
    return buffer.getvalue()
DTYPES = st.sampled_from(["u1", "i1", "i4", "i8", "u8", "f4", "f8", "b1", "U3", "S2", "c8", "O", "V4"])


@st.composite
def npz_arrays(draw):
    """An npz of arbitrary keys (mostly the expected ones) holding arrays of arbitrary dtype/shape."""
    keys = draw(st.lists(st.sampled_from(["codes", "labels", "bits", "ids", "extra"]), unique=True, max_size=5))
    arrays = {}
    for key in keys:
        dtype = draw(DTYPES)
        shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
        size = int(np.prod(shape))
        if dtype == "O":
            arrays[key] = np.array([None] * size, dtype=object).reshape(shape)
        else:
            arrays[key] = np.frombuffer(draw(st.binary(min_size=size * np.dtype(dtype).itemsize,
                                                       max_size=size * np.dtype(dtype).itemsize)),
                                        dtype=dtype).reshape(shape)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # allow_pickle defaults to True here: object arrays get pickled
    return buffer.getvalue()


@fuzz(120)
@given(st.one_of(npz_arrays(), mutated(VALID_NPZ, header=128), st.binary(max_size=64)))
@example(b"")
@example(b"PK\x05\x06" + bytes(18))  # an empty zip archive
@example(_npz_with_bad_header())  # SyntaxError from numpy's header parser escaped load_codes
def test_fuzz_code_files(data):
    path = WORK / "codes.npz"
    path.write_bytes(data)
    result = outcome(load_codes, path)
    if not isinstance(result, DeephashError):
        assert result.codes.dtype == np.uint8 and result.labels.shape[0] == len(result) == len(result.ids)


def test_object_array_code_file_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.npz"
    np.savez(path, codes=np.array([Evil()], dtype=object), labels=np.zeros(1, np.int64), bits=np.array(8))
    with pytest.raises(DeephashError, match="evil.npz"):
        load_codes(path)
    assert not marker.exists()


# --------------------------------------------------------------------------------- index folders

def _saved_index(backend: str) -> dict[str, bytes]:
    index = HashIndex(12, backend=backend)
    rng = np.random.default_rng(0)
    index.add(rng.integers(0, 2, (5, 12)).astype(bool), ids=np.array([3, 1, 4, 15, 9]), labels=np.arange(5),
              paths=["a.png", "b/c.png", "", "é.png", "d.png"])
    folder = WORK / f"index-{backend}"
    index.save(folder)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


INDEX_FILES = {"faiss": _saved_index("faiss"), "torch": _saved_index("torch")}
META = json.loads(INDEX_FILES["faiss"]["meta.json"])
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2, 2**70) | st.floats() | st.text(max_size=5),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                           max_leaves=6)


@st.composite
def damaged_index(draw):
    backend = draw(st.sampled_from(["faiss", "torch"]))
    files = dict(INDEX_FILES[backend])
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["meta_value", "meta_text", "drop", "mutate", "truncate_faiss", "swap"]))
        if how == "meta_value":
            meta = dict(META)
            meta[draw(st.sampled_from([*META, "other"]))] = draw(JSON_VALUES)
            files["meta.json"] = json.dumps(meta).encode()
        elif how == "meta_text":
            files["meta.json"] = draw(st.one_of(st.binary(max_size=40), JSON_VALUES.map(lambda v: json.dumps(v).encode())))
        elif how == "drop" and files:
            files.pop(draw(st.sampled_from(sorted(files))))
        elif how == "mutate" and files:
            name = draw(st.sampled_from(sorted(files)))
            files[name] = draw(mutated(files[name], header=96))
        elif how == "truncate_faiss" and "index.faiss" in files:
            files["index.faiss"] = files["index.faiss"][: draw(st.integers(0, len(files["index.faiss"])))]
        elif how == "swap":  # a file of the other backend's index / another array (mismatched counts)
            name = draw(st.sampled_from(["codes.npy", "ids.npy", "labels.npy", "paths.npy"]))
            other = draw(st.sampled_from(["codes.npy", "ids.npy", "labels.npy", "paths.npy"]))
            arrays = {"codes.npy": np.zeros((4, 2), np.uint8), "ids.npy": np.arange(6),
                      "labels.npy": np.zeros((5, 2), np.int64), "paths.npy": np.array(["x"] * 4)}
            buffer = io.BytesIO()
            np.save(buffer, arrays[other])
            files[name] = buffer.getvalue()
    return backend, files


def _bad_npy_header(data: bytes) -> bytes:
    """A .npy whose header dict has a broken tuple: numpy's parser raised SyntaxError/TokenError."""
    return data.replace(b"(5, 2)", b"(5, 2(", 1).replace(b"(5,)", b"(5,(", 1)


@fuzz(120)
@given(damaged_index(), st.sampled_from([None, "torch", "faiss"]))
@example(("faiss", {**INDEX_FILES["faiss"], "codes.npy": _bad_npy_header(INDEX_FILES["faiss"]["codes.npy"])}), None)
@example(("torch", {**INDEX_FILES["torch"], "ids.npy": _bad_npy_header(INDEX_FILES["torch"]["ids.npy"])}), "torch")
def test_fuzz_index_folders(damaged, backend):
    _, files = damaged
    folder = WORK / "fuzz-index"
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    result = outcome(HashIndex.load, folder, backend)
    if not isinstance(result, DeephashError):
        distances, ids = result.search(np.zeros((1, 2), np.uint8), k=2)
        assert distances.shape == ids.shape == (1, 2)


# --------------------------------------------------------------------------------------- configs

SECTIONS = {"": ["name", "seed", "device", "bogus"],
            "data": ["dataset", "root", "augment", "train_split", "protocol", "images", "nope"],
            "model": ["backbone", "backbone_params", "bits", "head", "embedding_dim", "mean"],
            "loss": ["name", "params", "margin"], "sampler": ["kind", "n_classes", "n_samples", "batch_size"],
            "optimizer": ["name", "lr", "weight_decay"], "scheduler": ["name"],
            "train": ["epochs", "log_interval", "eval_every", "num_threads"], "eval": ["ks", "radius", "knn_k"],
            "schedules": ["attribute", "start"], "unknown_section": ["x"]}
TOML_VALUES = st.one_of(
    st.integers(-(2**63), 2**63 - 1).map(str), st.floats(allow_nan=True).map(lambda f: repr(f).replace("inf", "inf")),
    st.text(max_size=6).map(json.dumps), st.booleans().map(lambda b: str(b).lower()),
    st.sampled_from(["1979-05-27", "07:32:00", "1979-05-27T07:32:00Z", "[]", "[1, 'a']", "{}", "{ a = 1 }",
                     "[[1], [2]]", "'fmnist-cnn'", "'cpu'", "'csq'", "nan", "-inf", "0x10", "1e400"]))


@st.composite
def toml_documents(draw):
    lines = []
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)), unique=True, max_size=4)):
        if section:
            lines.append(f"[[{section}]]" if section == "schedules" else f"[{section}]")
        for key in draw(st.lists(st.sampled_from(SECTIONS[section]), unique=True, max_size=3)):
            lines.append(f"{key} = {draw(TOML_VALUES)}")
    return "\n".join(lines).encode()


@fuzz(150)
@given(st.one_of(toml_documents(), st.text(max_size=60).map(str.encode), st.binary(max_size=40)))
@example(b"seed = 1979-05-27")
@example(b"[train]\nepochs = 1e400")
@example(b"[model]\nbackbone_params = 3")
def test_fuzz_configs(data):
    path = WORK / "config.toml"
    path.write_bytes(data)
    outcome(load_config, path)


# ----------------------------------------------------------------------------------- checkpoints

def _checkpoint() -> bytes:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    path = WORK / "valid.pt"
    save_checkpoint(path, model, optimizer, None, 1, [{"epoch": 0, "train_loss": 1.0}],
                    generators=[torch.Generator().manual_seed(1)])
    return path.read_bytes()


VALID_CHECKPOINT = _checkpoint()


def _load_into_fresh_model(path: Path) -> dict:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = load_checkpoint(path, model, optimizer, generators=[torch.Generator()], rng=False)
    return state


@fuzz(120)
@given(st.one_of(mutated(VALID_CHECKPOINT, header=256), st.binary(max_size=64)))
def test_fuzz_checkpoints(data):
    path = WORK / "fuzz.pt"
    path.write_bytes(data)
    outcome(_load_into_fresh_model, path)


def test_mutated_pickle_inside_a_valid_checkpoint_zip_is_refused(tmp_path):
    """Bit flips that keep the zip intact: damage only the pickled ``data.pkl`` member."""
    with zipfile.ZipFile(io.BytesIO(VALID_CHECKPOINT)) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    pkl = next(name for name in members if name.endswith("data.pkl"))
    rng = np.random.default_rng(0)
    for trial in range(30):
        data = bytearray(members[pkl])
        for pos in rng.integers(0, len(data), 3):
            data[pos] ^= 1 << int(rng.integers(0, 8))
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for name, body in members.items():
                archive.writestr(name, bytes(data) if name == pkl else body)
        path = tmp_path / f"{trial}.pt"
        path.write_bytes(buffer.getvalue())
        outcome(_load_into_fresh_model, path)


def test_checkpoint_with_a_malicious_reduce_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state = torch.load(io.BytesIO(VALID_CHECKPOINT), weights_only=True)
    state["extra"] = {"x": Evil()}
    path = tmp_path / "evil.pt"
    torch.save(state, path)  # the file pickles a call to os.system
    with pytest.raises(DeephashError, match="weights_only") as info:
        read_checkpoint(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()
