"""HashIndex against brute-force popcount, FAISS against the torch backend, files and errors."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from deephash.errors import CodeLengthError, DataFormatError, DeephashError
from deephash.retrieval import HashIndex, hamming_distances, pack_codes


def _codes(seed, n, bits):
    return pack_codes(np.random.default_rng(seed).integers(0, 2, (n, bits)))


def _brute(q, db):
    return np.bitwise_count(q[:, None, :] ^ db[None, :, :]).sum(2)


@pytest.mark.parametrize("bits", [5, 12, 64, 70])
def test_hamming_distances_match_numpy_popcount(bits):
    q, db = _codes(0, 13, bits), _codes(1, 29, bits)
    np.testing.assert_array_equal(hamming_distances(q, db), _brute(q, db))


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("bits", [12, 64])
def test_exact_search_matches_brute_force(backend, bits):
    q, db = _codes(2, 20, bits), _codes(3, 300, bits)
    ids = np.arange(300) * 3 + 7
    index = HashIndex(bits, backend=backend)
    index.add(db, ids=ids)
    distances, found = index.search(q, 10)
    ref = _brute(q, db)
    assert distances.dtype == np.int32 and found.dtype == np.int64 and distances.shape == (20, 10)
    np.testing.assert_array_equal(distances, np.sort(ref, 1)[:, :10])
    position = {v: i for i, v in enumerate(ids)}
    got = np.vectorize(position.get)(found)
    np.testing.assert_array_equal(np.take_along_axis(ref, got, 1), distances)
    if backend == "torch":  # ties by insertion order
        np.testing.assert_array_equal(got, np.argsort(ref, 1, kind="stable")[:, :10])


def test_torch_and_faiss_backends_agree_on_distances_and_ranges():
    q, db = _codes(4, 15, 24), _codes(5, 200, 24)
    results = {}
    for backend in ("faiss", "torch"):
        index = HashIndex(24, backend=backend)
        index.add(db)
        results[backend] = (index.search(q, 17)[0], index.range_search(q, 9))
    np.testing.assert_array_equal(results["faiss"][0], results["torch"][0])
    for a, b in zip(results["faiss"][1], results["torch"][1]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_range_search_radius_is_inclusive_and_sorted(backend):
    q, db = _codes(6, 10, 16), _codes(7, 400, 16)
    q[0] = db[5]  # one exact match, so radius 0 has a boundary hit
    index = HashIndex(16, backend=backend)
    index.add(db, ids=np.arange(400)[::-1].copy())
    ref = _brute(q, db)
    for radius in (0, 4, 6):
        lims, distances, ids = index.range_search(q, radius)
        assert lims.dtype == np.int64 and distances.dtype == np.int32 and ids.dtype == np.int64
        for i in range(10):
            positions = np.flatnonzero(ref[i] <= radius)
            expected = sorted((ref[i, p], 399 - p) for p in positions)
            assert list(zip(distances[lims[i] : lims[i + 1]], ids[lims[i] : lims[i + 1]])) == expected
        assert (ref == radius).any()  # the boundary case is exercised


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_k_larger_than_ntotal_pads_with_minus_one(backend):
    index = HashIndex(8, backend=backend)
    index.add(_codes(8, 3, 8))
    distances, ids = index.search(_codes(9, 2, 8), 5)
    assert (ids[:, 3:] == -1).all() and (distances[:, 3:] == -1).all()
    assert (ids[:, :3] >= 0).all() and len(index) == index.ntotal == 3


@pytest.mark.parametrize("factory", ["BFlat", "BHash8", "BHash2x8", "BIVF4"])
def test_every_factory_searches_adds_removes(factory):
    db = _codes(10, 200, 16)
    index = HashIndex(16, factory)
    index.add(db[:100], labels=np.arange(100))
    index.add(db[100:], labels=np.arange(100, 200))
    assert index.ntotal == 200
    _, ids = index.search(db[:5], 1)  # each code finds itself (distance 0 lands in its own bucket)
    distances, _ = index.search(db[:5], 1)
    assert (distances[:, 0] == 0).all()
    assert index.remove([0, 1, 2, 999]) == 3
    assert index.ntotal == 197 and not np.isin([0, 1, 2], index.ids).any()
    np.testing.assert_array_equal(index.labels, index.ids)
    _, ids = index.search(db[:3], 5)
    assert not np.isin([0, 1, 2], ids).any()


def test_wrong_code_length_names_both_lengths():
    index = HashIndex(48)
    index.add(_codes(11, 4, 48))
    with pytest.raises(CodeLengthError) as info:
        index.search(_codes(12, 2, 64), 3)
    assert isinstance(info.value, ValueError)
    assert "8 bytes (64 bits)" in str(info.value) and "48-bit codes (6 bytes)" in str(info.value)
    with pytest.raises(CodeLengthError, match="32 bits .* 48-bit"):
        index.search(np.ones((1, 32)), 3)


def test_unpacked_queries_and_duplicate_ids():
    index = HashIndex(10, backend="torch")
    bits = np.random.default_rng(0).integers(0, 2, (6, 10))
    index.add(np.where(bits > 0, 1.0, -1.0), ids=np.arange(6) + 100)
    _, ids = index.search(bits.astype(bool), 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(6) + 100)
    with pytest.raises(DeephashError, match="unique"):
        index.add(pack_codes(bits[:1]), ids=[100])
    with pytest.raises(DeephashError, match="faiss"):
        HashIndex(16, "BHash8", backend="torch")


@pytest.mark.parametrize("factory, backend", [("BFlat", "faiss"), ("BFlat", "torch"), ("BIVF4", "faiss"), ("BHash8", "faiss")])
def test_save_load_round_trip(tmp_path, factory, backend):
    db = _codes(13, 120, 16)
    index = HashIndex(16, factory, metadata={"run": "r1", "bits": 16}, backend=backend)
    index.add(db, ids=np.arange(120) + 5, labels=np.arange(120) % 7)
    index.remove([5, 6])
    index.save(tmp_path / "ix")
    index.save(tmp_path / "ix")  # replacing an existing folder works
    loaded = HashIndex.load(tmp_path / "ix")
    meta = json.loads((tmp_path / "ix" / "meta.json").read_text())
    assert meta["bits"] == 16 and meta["model"] == {"run": "r1", "bits": 16} and meta["count"] == 118
    assert "created" in meta and loaded.factory == factory and loaded.metadata == meta["model"]
    np.testing.assert_array_equal(loaded.ids, index.ids)
    np.testing.assert_array_equal(loaded.labels, index.labels)
    for a, b in zip(loaded.search(db[:10], 4), index.search(db[:10], 4)):
        np.testing.assert_array_equal(a, b)
    if factory == "BFlat":
        torch_loaded = HashIndex.load(tmp_path / "ix", backend="torch")
        np.testing.assert_array_equal(torch_loaded.search(db[:10], 4)[0], index.search(db[:10], 4)[0])


def _saved(tmp_path):
    index = HashIndex(12, metadata="m")
    index.add(_codes(14, 10, 12), labels=np.arange(10))
    index.save(tmp_path / "ix")
    return tmp_path / "ix"


def _corrupt_faiss(folder):
    data = bytearray((folder / "index.faiss").read_bytes())
    (folder / "index.faiss").write_bytes(bytes(data[:10]))


def _set_meta(folder, **changes):
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(changes)
    for key, value in changes.items():
        if value is None:
            del meta[key]
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "meta.json").unlink(), "missing meta.json"),
        (lambda f: (f / "meta.json").write_text("{not json"), "not valid JSON"),
        (lambda f: _set_meta(f, bits=None), "lacks 'bits'"),
        (lambda f: _set_meta(f, bits="12"), "'bits' must be int"),
        (lambda f: _set_meta(f, count=11), "codes.npy holds"),
        (lambda f: _set_meta(f, format_version=99), "format_version 99"),
        (lambda f: _set_meta(f, factory="BNope"), "unknown binary index factory"),
        (lambda f: (f / "ids.npy").unlink(), "missing ids.npy"),
        (lambda f: (f / "codes.npy").write_bytes(b"garbage"), "codes.npy is not a readable"),
        (lambda f: np.save(f / "ids.npy", np.arange(10, dtype=np.int32)), "ids.npy holds int32"),
        (lambda f: np.save(f / "ids.npy", np.zeros(10, dtype=np.int64)), "duplicate ids"),
        (lambda f: np.save(f / "labels.npy", np.arange(9)), "labels.npy has shape"),
        (lambda f: np.save(f / "labels.npy", np.array([None] * 10, dtype=object)), "labels.npy is not a readable"),
        (_corrupt_faiss, "index.faiss is not a readable"),
        (lambda f: (f / "index.faiss").unlink(), "missing index.faiss"),
    ],
)
def test_corrupt_index_folder_raises_data_format_error(tmp_path, damage, message):
    folder = _saved(tmp_path)
    damage(folder)
    with pytest.raises(DataFormatError, match="ix") as info:
        HashIndex.load(folder, backend="faiss" if "index.faiss" in message else None)
    assert message in str(info.value)


def test_faiss_file_inconsistent_with_ids(tmp_path):
    folder = _saved(tmp_path)
    other = HashIndex(12)
    other.add(_codes(15, 10, 12), ids=np.arange(10) + 50)
    (folder / "index.faiss").write_bytes(faiss.serialize_index_binary(other._faiss_index).tobytes())
    with pytest.raises(DataFormatError, match="ids differ"):
        HashIndex.load(folder)


@pytest.mark.parametrize("bits, width", [(1, 4), (32, 4), (48, 8), (64, 8), (65, 16), (130, 20), (192, 32),
                                         (300, 64), (520, 72)])
def test_faiss_holds_codes_padded_to_a_width_it_counts_fast(bits, width):
    from deephash.retrieval.index import faiss_bytes

    assert faiss_bytes(bits) == width
    index = HashIndex(bits, backend="faiss")
    assert index._faiss_index.d == 8 * width
    db = _codes(20, 150, bits)
    index.add(db)
    assert index.codes.shape == (150, (bits + 7) // 8)  # the index's own column stays unpadded
    q = _codes(21, 12, bits)
    distances, found = index.search(q, 150)  # every item: FAISS's distances are the brute-force ones
    ref = _brute(q, db)
    np.testing.assert_array_equal(np.take_along_axis(ref, found, 1), distances)
    np.testing.assert_array_equal(distances, np.sort(ref, 1))


def _unpadded_faiss(index, factory):
    """The index.faiss an earlier deephash wrote: FAISS's dimension 8 * ceil(bits / 8)."""
    inner = faiss.index_binary_factory(index.n_bytes * 8, factory)
    old = faiss.IndexBinaryIDMap2(inner)
    old.own_fields = True
    inner.this.disown()
    if not old.is_trained:
        old.train(index.codes)
    old.add_with_ids(index.codes, index.ids)
    return faiss.serialize_index_binary(old).tobytes()


@pytest.mark.parametrize("factory, width", [("BFlat", 8), ("BIVF4", 6)])
def test_a_format_1_folder_still_loads_and_searches_alike(tmp_path, factory, width):
    db = _codes(22, 200, 48)
    index = HashIndex(48, factory)
    index.add(db, ids=np.arange(200) * 2)
    index.save(tmp_path / "ix")
    assert json.loads((tmp_path / "ix" / "meta.json").read_text())["format_version"] == 2
    (tmp_path / "ix" / "index.faiss").write_bytes(_unpadded_faiss(index, factory))
    _set_meta(tmp_path / "ix", format_version=1)  # the folder as deephash wrote it before the padding
    loaded = HashIndex.load(tmp_path / "ix")
    assert loaded._faiss_index.d == 8 * width  # BFlat rebuilt padded (exact); a trained factory kept as written
    q = _codes(23, 9, 48)
    distances, found = loaded.search(q, 5)
    ref = _brute(q, db)
    np.testing.assert_array_equal(np.take_along_axis(ref, found // 2, 1), distances)
    if factory == "BFlat":
        np.testing.assert_array_equal(distances, np.sort(ref, 1)[:, :5])
    lims, d, ids = loaded.range_search(q, 20)
    for i in range(len(q)):
        np.testing.assert_array_equal(d[lims[i]:lims[i + 1]], ref[i, ids[lims[i]:lims[i + 1]] // 2])
    loaded.add(_codes(24, 3, 48))  # adds and removes go on at the loaded width
    assert loaded.remove([0, 2]) == 2 and loaded.ntotal == 201


@pytest.mark.parametrize("factory, ok", [("BHash48", True), ("BHash49", False), ("BHash3x16", True), ("BHash4x16", False)])
def test_a_hash_factory_must_fit_the_codes_not_their_padding(factory, ok):
    if ok:
        index = HashIndex(48, factory)
        index.add(_codes(25, 50, 48))
        assert (index.search(_codes(25, 50, 48)[:3], 1)[0][:, 0] == 0).all()
    else:
        with pytest.raises(DeephashError, match=f"{factory}.*the codes have 48"):
            HashIndex(48, factory)
