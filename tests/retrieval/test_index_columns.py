"""HashIndex's per-item columns (ids, codes, labels, re-rank vectors, paths) and its id mark.

Oracle: a plain dict ``id -> (code bytes, label, vector, path)`` updated by the same adds and
removes; the expected columns are rebuilt from it by a loop over the index's ids.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from deephash.errors import DataFormatError, DeephashError
from deephash.retrieval import HashIndex, pack_codes

BITS = 12
DIM = 3


def _rows(rng: np.random.Generator, n: int) -> dict:
    return {"codes": pack_codes(rng.integers(0, 2, (n, BITS))), "labels": rng.integers(0, 5, n),
            "rerank": rng.normal(size=(n, DIM)).astype(np.float16),
            "paths": np.array([f"img/{rng.integers(10**6)}-{'x' * int(rng.integers(0, 9))}.png" for _ in range(n)])}


def _expected(index: HashIndex, oracle: dict) -> dict:
    """The columns an index holding ``oracle`` must have, in the index's id order (a plain loop)."""
    ids = index.ids.tolist()
    assert sorted(ids) == sorted(oracle)
    return {"codes": np.array([np.frombuffer(oracle[i][0], np.uint8) for i in ids]).reshape(len(ids), -1),
            "labels": np.array([oracle[i][1] for i in ids], dtype=np.int64),
            "rerank": np.array([oracle[i][2] for i in ids], dtype=np.float16).reshape(len(ids), DIM),
            "paths": [oracle[i][3] for i in ids]}


def _assert_columns(index: HashIndex, oracle: dict) -> None:
    want = _expected(index, oracle)
    np.testing.assert_array_equal(index.codes, want["codes"])
    np.testing.assert_array_equal(index.labels, want["labels"])
    np.testing.assert_array_equal(index.rerank_vectors, want["rerank"])
    assert index.paths.tolist() == want["paths"]


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_saving_twice_keeps_every_optional_column(tmp_path, backend):
    """Bug: the second save hard-linked the old rerank.npy where the new one was (FileExistsError)."""
    rng = np.random.default_rng(0)
    rows = _rows(rng, 7)
    index = HashIndex(BITS, metadata={"run": "r"}, backend=backend)
    index.add(rows["codes"], labels=rows["labels"], rerank=rows["rerank"], paths=rows["paths"])
    (tmp_path / "ix").mkdir()
    (tmp_path / "ix" / "journal.log").write_bytes(b"")  # files save does not own are carried over
    index.save(tmp_path / "ix")
    index.remove([2])
    index.save(tmp_path / "ix")
    index.save(tmp_path / "ix")
    loaded = HashIndex.load(tmp_path / "ix")
    keep = np.arange(7) != 2
    np.testing.assert_array_equal(loaded.ids, np.arange(7)[keep])
    np.testing.assert_array_equal(loaded.codes, rows["codes"][keep])
    np.testing.assert_array_equal(loaded.labels, rows["labels"][keep])
    np.testing.assert_array_equal(loaded.rerank_vectors, rows["rerank"][keep])
    assert loaded.paths.tolist() == rows["paths"][keep].tolist() and loaded.paths.dtype.kind == "U"
    assert (tmp_path / "ix" / "journal.log").exists() and (tmp_path / "ix" / "paths.npy").is_file()
    assert "paths" not in json.loads((tmp_path / "ix" / "meta.json").read_text())["model"]


def test_a_rerank_index_without_labels_saves_twice(tmp_path):
    index = HashIndex(BITS, backend="torch")
    index.add(np.zeros((3, BITS), bool), rerank=np.ones((3, 4)))
    index.save(tmp_path / "ix")
    index.save(tmp_path / "ix")
    np.testing.assert_array_equal(HashIndex.load(tmp_path / "ix").rerank_vectors, np.ones((3, 4), np.float16))


@pytest.mark.parametrize("factory", ["BFlat", "BHash8"])
def test_adds_and_removes_keep_every_column_aligned(factory):
    rng = np.random.default_rng(1)
    index = HashIndex(BITS, factory)
    oracle: dict = {}
    for step in range(12):
        if step % 3 == 2 and oracle:
            gone = rng.choice(sorted(oracle), min(3, len(oracle)), replace=False).tolist() + [10**9]
            assert index.remove(gone) == len(gone) - 1
            for g in gone[:-1]:
                del oracle[g]
        else:
            n = int(rng.integers(1, 6))
            rows = _rows(rng, n)
            ids = None if step % 2 else rng.choice(10**6, n, replace=False) + 1000 * step
            ids = None if ids is not None and np.isin(ids, list(oracle)).any() else ids
            given = list(index.ids)
            index.add(rows["codes"], ids=ids, labels=rows["labels"], rerank=rows["rerank"], paths=rows["paths"])
            new = [i for i in index.ids.tolist() if i not in given]
            for k, i in enumerate(new):
                oracle[i] = (rows["codes"][k].tobytes(), int(rows["labels"][k]), rows["rerank"][k], str(rows["paths"][k]))
        _assert_columns(index, oracle)
        for ident, (code, *_) in oracle.items():  # FAISS's id map agrees with the columns
            d, i = index.search(np.frombuffer(code, np.uint8)[None], len(oracle))
            assert ident in i[0][d[0] == 0].tolist()


def test_paths_default_to_empty_and_an_index_without_paths_refuses_them():
    index = HashIndex(BITS, backend="torch")
    index.add(np.zeros((2, BITS), bool), paths=["a.png", "b.png"])
    index.add(np.ones((1, BITS)))  # an item without a file (an upload): ""
    assert index.paths.tolist() == ["a.png", "b.png", ""]
    plain = HashIndex(BITS, backend="torch")
    plain.add(np.zeros((2, BITS), bool))
    with pytest.raises(DeephashError, match="keeps no paths"):
        plain.add(np.zeros((1, BITS), bool), paths=["c.png"])
    with pytest.raises(DeephashError, match="2 paths for 1 codes"):
        index.add(np.zeros((1, BITS), bool), paths=["c.png", "d.png"])
    assert plain.paths is None and len(plain) == 2 and len(index) == 3


def test_an_emptied_index_takes_the_columns_of_its_next_add():
    index = HashIndex(BITS, backend="torch")
    index.add(np.zeros((2, BITS), bool), labels=[1, 2], rerank=np.ones((2, 4)), paths=["a", "b"])
    index.remove([0, 1])
    index.add(np.ones((3, BITS)))
    assert index.labels is None and index.rerank_vectors is None and index.paths is None
    np.testing.assert_array_equal(index.ids, [2, 3, 4])


# ------------------------------------------------------------------------------ the id mark

@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_default_ids_are_never_handed_out_twice(tmp_path, backend):
    """Bug: default ids followed the largest present id, so removing it gave its id out again."""
    index = HashIndex(BITS, backend=backend)
    index.add(np.zeros((3, BITS), bool))  # 0, 1, 2
    index.remove([2])
    index.add(np.ones((1, BITS)))
    np.testing.assert_array_equal(index.ids, [0, 1, 3])
    assert index.next_id == 4
    index.remove([3, 1])
    index.save(tmp_path / "ix")
    loaded = HashIndex.load(tmp_path / "ix")
    assert loaded.next_id == 4 and json.loads((tmp_path / "ix" / "meta.json").read_text())["next_id"] == 4
    loaded.add(np.ones((2, BITS)))
    np.testing.assert_array_equal(loaded.ids, [0, 4, 5])


def test_explicit_ids_above_the_mark_advance_it_and_below_it_re_add():
    index = HashIndex(BITS, backend="torch")
    index.add(np.zeros((2, BITS), bool), ids=[10, 40])
    assert index.next_id == 41
    index.remove([40])
    index.add(np.zeros((1, BITS), bool), ids=[40])  # a removed item re-added under its old id, on purpose
    index.add(np.zeros((1, BITS), bool), ids=[5])  # below the mark, never used: allowed, the mark stays
    assert index.next_id == 41
    index.add(np.zeros((2, BITS), bool))
    np.testing.assert_array_equal(index.ids, [10, 40, 5, 41, 42])
    index.add(np.zeros((1, BITS), bool), ids=[2**63 - 1])
    assert index.next_id == 2**63
    with pytest.raises(DeephashError, match="no ids left"):
        index.add(np.zeros((1, BITS), bool))


def test_an_old_folder_without_the_mark_or_paths_file_loads(tmp_path):
    index = HashIndex(BITS, metadata={"run": "r", "paths": ["p0", "p1", "p2"]}, backend="torch")
    index.add(np.zeros((3, BITS), bool), ids=[4, 9, 7])
    index.save(tmp_path / "ix")
    meta = json.loads((tmp_path / "ix" / "meta.json").read_text())
    del meta["next_id"]
    (tmp_path / "ix" / "meta.json").write_text(json.dumps(meta))
    old = HashIndex.load(tmp_path / "ix")
    assert old.next_id == 10 and old.paths.tolist() == ["p0", "p1", "p2"] and old.metadata == {"run": "r"}
    old.remove([9])
    assert old.paths.tolist() == ["p0", "p2"]


@pytest.mark.parametrize("damage, message", [
    (lambda f: _set_meta(f, next_id=9), "next_id 9 is not above the largest id 9"),
    (lambda f: _set_meta(f, next_id="12"), "'next_id' must be int"),
    (lambda f: _set_meta(f, next_id=True), "'next_id' must be int"),
    (lambda f: _set_meta(f, journal_seq=[1]), "'journal_seq' must be int"),
    (lambda f: np.save(f / "paths.npy", np.array(["a", "b"])), "paths.npy has shape"),
    (lambda f: np.save(f / "paths.npy", np.arange(3)), "paths.npy holds int64"),
    (lambda f: np.save(f / "paths.npy", np.array(["a", None, "c"], dtype=object)), "paths.npy is not a readable"),
    (lambda f: _set_meta(f, model={"paths": ["a", 3, "c"]}), "meta.json 'model.paths'"),
])
def test_a_bad_mark_or_paths_file_is_refused(tmp_path, damage, message):
    index = HashIndex(BITS, backend="torch")
    index.add(np.zeros((3, BITS), bool), ids=[1, 9, 5], paths=["a", "b", "c"])
    index.save(tmp_path / "ix")
    damage(tmp_path / "ix")
    if "model.paths" in message:
        (tmp_path / "ix" / "paths.npy").unlink()
    with pytest.raises(DataFormatError, match="ix") as info:
        HashIndex.load(tmp_path / "ix")
    assert message in str(info.value)


def _set_meta(folder, **changes):
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(changes)
    (folder / "meta.json").write_text(json.dumps(meta))
