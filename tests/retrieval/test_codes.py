"""Codes: binarize, MSB-first packing against a bit loop, code files and their validation."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch

from deephash.errors import CodeLengthError, DataFormatError, NotFoundError
from deephash.retrieval import (
    binarize,
    load_codes,
    pack_codes,
    save_codes,
    unpack_codes,
)


def _pack_reference(bits_2d: np.ndarray) -> np.ndarray:
    n, bits = bits_2d.shape
    out = np.zeros((n, (bits + 7) // 8), dtype=np.uint8)
    for i in range(n):
        for j in range(bits):
            if bits_2d[i, j]:
                out[i, j // 8] |= 1 << (7 - j % 8)
    return out


def test_binarize_maps_zero_to_plus_one():
    x = torch.tensor([[-0.5, 0.0, 2.0]])
    assert binarize(x).tolist() == [[-1.0, 1.0, 1.0]]
    assert binarize(np.array([-3, 0, 1])).tolist() == [-1.0, 1.0, 1.0]


@pytest.mark.parametrize("bits", [1, 7, 8, 12, 48, 65])
def test_pack_is_msb_first_and_round_trips_for_every_input_kind(bits):
    rng = np.random.default_rng(bits)
    b = rng.integers(0, 2, (9, bits)).astype(bool)
    expected = _pack_reference(b)
    for codes in (b, b.astype(np.int64), np.where(b, 1.0, -1.0), torch.from_numpy(np.where(b, 1.0, -1.0)).float()):
        packed = pack_codes(codes)
        assert packed.dtype == np.uint8 and packed.shape == (9, (bits + 7) // 8)
        np.testing.assert_array_equal(packed, expected)
    unpacked = unpack_codes(expected, bits)
    assert unpacked.dtype == np.uint8
    np.testing.assert_array_equal(unpacked, b.astype(np.uint8))


def test_pack_reads_real_values_by_sign_and_unpack_checks_length():
    assert pack_codes(np.array([[0.3, -1.0, 0.0, -0.2]])).tolist() == [[0b10100000]]
    with pytest.raises(CodeLengthError, match="2 bytes"):
        unpack_codes(np.zeros((1, 2), np.uint8), 24)


@pytest.mark.parametrize("multi", [False, True])
def test_code_file_round_trip(tmp_path, multi):
    rng = np.random.default_rng(0)
    codes = pack_codes(rng.integers(0, 2, (6, 12)))
    labels = rng.integers(0, 2, (6, 3)) if multi else rng.integers(0, 5, 6)
    save_codes(tmp_path / "a.npz", codes, labels, 12)
    loaded = load_codes(tmp_path / "a.npz")
    np.testing.assert_array_equal(loaded.codes, codes)
    np.testing.assert_array_equal(loaded.labels, labels)
    assert loaded.bits == 12 and loaded.labels.dtype == np.int64
    np.testing.assert_array_equal(loaded.ids, np.arange(6))
    with np.load(tmp_path / "a.npz", allow_pickle=False) as raw:
        assert set(raw.files) == {"codes", "labels", "bits", "ids"} and raw["bits"].shape == ()
    save_codes(tmp_path / "b.npz", torch.ones(6, 12), torch.from_numpy(np.asarray(labels)), 12, ids=np.arange(10, 16))
    loaded = load_codes(tmp_path / "b.npz")
    np.testing.assert_array_equal(loaded.ids, np.arange(10, 16))
    assert (loaded.codes == pack_codes(np.ones((6, 12)))).all()


def _write(path, **arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.write_bytes(buffer.getvalue())


GOOD = {"codes": np.zeros((3, 2), np.uint8), "labels": np.zeros(3, np.int64), "bits": np.array(12, np.int64)}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"codes": None}, "missing key 'codes'"),
        ({"labels": None}, "missing key 'labels'"),
        ({"bits": None}, "missing key 'bits'"),
        ({"codes": np.zeros((3, 2), np.int32)}, "'codes' must be uint8"),
        ({"codes": np.zeros((3, 3), np.uint8)}, "3 bytes per code but 12 bits need 2"),
        ({"codes": np.full((3, 2), 0x0F, np.uint8)}, "padding bits"),
        ({"labels": np.zeros(3, np.float32)}, "'labels' must be int64"),
        ({"labels": np.zeros(4, np.int64)}, "4 labels for 3 codes"),
        ({"bits": np.array([12])}, "'bits' must be a positive 0-d integer"),
        ({"ids": np.zeros(2, np.int64)}, "'ids' must be int64"),
    ],
)
def test_load_codes_rejects_malformed_files(tmp_path, change, message):
    arrays = {**GOOD, **change}
    _write(tmp_path / "bad.npz", **{k: v for k, v in arrays.items() if v is not None})
    with pytest.raises(DataFormatError, match="bad.npz") as info:
        load_codes(tmp_path / "bad.npz")
    assert message in str(info.value)


def test_load_codes_rejects_non_npz_pickles_and_missing_files(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(DataFormatError, match="junk.npz"):
        load_codes(tmp_path / "junk.npz")
    _write(tmp_path / "obj.npz", **{**GOOD, "labels": np.array([None, 1, 2], dtype=object)})
    with pytest.raises(DataFormatError, match="obj.npz"):
        load_codes(tmp_path / "obj.npz")
    with zipfile.ZipFile(tmp_path / "trunc.npz", "w") as archive:
        archive.writestr("codes.npy", b"\x93NUMPY garbage")
    with pytest.raises(DataFormatError, match="trunc.npz"):
        load_codes(tmp_path / "trunc.npz")
    with pytest.raises(NotFoundError):
        load_codes(tmp_path / "absent.npz")


def test_code_file_root_joins_relative_paths_and_is_checked(tmp_path):
    from deephash.errors import DeephashError
    from deephash.retrieval.codes import load_codes, save_codes

    codes = np.array([[1, -1, 1, 1, -1, 1, 1, 1], [-1, -1, 1, 1, 1, 1, 1, -1]])
    save_codes(tmp_path / "c.npz", codes, np.array([0, 1]), 8, paths=["a/x.png", "b/y.jpg"], root="/photos/test")
    loaded = load_codes(tmp_path / "c.npz")
    assert loaded.root == "/photos/test" and loaded.paths.tolist() == ["a/x.png", "b/y.jpg"]
    assert loaded.full_paths() == ["/photos/test/a/x.png", "/photos/test/b/y.jpg"]
    save_codes(tmp_path / "old.npz", codes, np.array([0, 1]), 8, paths=["a/x.png", "b/y.jpg"])  # no root: as stored
    assert load_codes(tmp_path / "old.npz").full_paths() == ["a/x.png", "b/y.jpg"]
    save_codes(tmp_path / "none.npz", codes, np.array([0, 1]), 8)
    assert load_codes(tmp_path / "none.npz").full_paths() is None
    with pytest.raises(DeephashError, match="root needs paths"):
        save_codes(tmp_path / "bad.npz", codes, np.array([0, 1]), 8, root="/photos")
    arrays = dict(np.load(tmp_path / "c.npz"))
    arrays["root"] = np.array(["/a", "/b"])
    np.savez(tmp_path / "two.npz", **arrays)
    with pytest.raises(DataFormatError, match="'root' must be a 0-d string"):
        load_codes(tmp_path / "two.npz")
