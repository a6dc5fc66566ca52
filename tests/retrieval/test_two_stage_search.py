"""Two-stage search (IndexRefine pattern): a Hamming shortlist, ties at the cut kept, ranked by
re-rank vectors; against a brute-force loop, and the vectors' life in HashIndex and the journal."""

from __future__ import annotations

import numpy as np
import pytest

from deephash.errors import DeephashError
from deephash.retrieval import HashIndex, pack_codes
from deephash.retrieval.journal import Record, apply_record, decode_payload, encode_record
from deephash.retrieval.search import search


def _case(seed: int, n: int = 40, bits: int = 8, dim: int = 5):
    rng = np.random.default_rng(seed)
    db_bits, q_bits = rng.integers(0, 2, (n, bits)), rng.integers(0, 2, (4, bits))
    return db_bits, q_bits, rng.normal(size=(n, dim)).astype(np.float16), rng.normal(size=(4, dim)).astype(np.float32)


def _brute(q_bits, q_vec, db_bits, db_vec, ids, k, radius, shortlist):
    dist = (q_bits[None, :] != db_bits).sum(1)
    cut = np.sort(dist)[min(max(shortlist, k or 0), len(dist)) - 1]  # the first stage holds at least k
    if radius is not None:
        cut = min(cut, radius)
    listed = [j for j in range(len(dist)) if dist[j] <= cut]
    score = {j: float(np.linalg.norm(db_vec[j].astype(np.float32) - q_vec)) for j in listed}
    order = sorted(listed, key=lambda j: (score[j], dist[j], ids[j]))[:k]
    return [int(ids[j]) for j in order], [int(dist[j]) for j in order]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k, radius, shortlist", [(5, None, 10), (3, 2, 20), (10, None, 1), (None, 3, 8)])
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_matches_a_brute_force_loop(seed, k, radius, shortlist, backend):
    db_bits, q_bits, db_vec, q_vec = _case(seed)
    ids = np.arange(100, 140)[::-1].copy()  # ids not in row order
    index = HashIndex(8, backend=backend)
    index.add(pack_codes(db_bits), ids=ids, rerank=db_vec)
    found = search(index, pack_codes(q_bits), k, radius, rerank=q_vec, shortlist=shortlist)
    for i, got in enumerate(found):
        want_ids, want_dist = _brute(q_bits[i], q_vec[i], db_bits, db_vec, ids, k, radius, shortlist)
        assert got.ids.tolist() == want_ids and got.distances.tolist() == want_dist
        assert np.all(np.diff(got.scores) >= 0) and np.array_equal(ids[got.positions], got.ids)


def test_a_tie_group_at_the_cut_is_never_split():
    """Every code equal (a class center): the whole group is re-ranked, whatever the shortlist."""
    codes = pack_codes(np.zeros((30, 8), dtype=np.int64))
    vectors = np.arange(30, dtype=np.float16)[:, None] * np.ones((1, 2), dtype=np.float16)
    index = HashIndex(8)
    index.add(codes, rerank=vectors)
    (found,) = search(index, codes[:1], 3, rerank=np.array([[17.2, 17.2]], dtype=np.float32), shortlist=2)
    assert found.ids.tolist() == [17, 18, 16] and found.distances.tolist() == [0, 0, 0]


def test_without_vectors_on_either_side_it_is_the_hamming_search():
    db_bits, q_bits, db_vec, q_vec = _case(1)
    plain, kept = HashIndex(8), HashIndex(8)
    plain.add(pack_codes(db_bits))
    kept.add(pack_codes(db_bits), rerank=db_vec)
    for a, b in ((search(plain, pack_codes(q_bits), 5, rerank=q_vec), search(kept, pack_codes(q_bits), 5)),):
        for x, y in zip(a, b):
            assert x.ids.tolist() == y.ids.tolist() and x.scores is None and y.scores is None


def test_vectors_follow_adds_removes_saves_and_the_journal(tmp_path):
    db_bits, _, db_vec, _ = _case(2)
    index = HashIndex(8)
    index.add(pack_codes(db_bits[:30]), rerank=db_vec[:30])
    index.add(pack_codes(db_bits[30:]), ids=np.arange(50, 60), rerank=db_vec[30:])
    assert index.rerank_bytes_per_item == 10
    index.remove([3, 50])
    keep = [i for i in range(40) if i not in (3, 30)]
    np.testing.assert_array_equal(index.rerank_vectors, db_vec[keep])
    index.save(tmp_path / "idx")
    loaded = HashIndex.load(tmp_path / "idx")
    np.testing.assert_array_equal(loaded.rerank_vectors, db_vec[keep])
    record = Record("add", 1, np.array([70, 71]), pack_codes(db_bits[:2]), rerank=db_vec[:2])
    back = decode_payload(encode_record(record)[12:])
    np.testing.assert_array_equal(back.rerank, db_vec[:2])
    apply_record(loaded, back)
    np.testing.assert_array_equal(loaded.rerank_vectors[-2:], db_vec[:2])
    with pytest.raises(DeephashError, match="every add"):
        loaded.add(pack_codes(db_bits[:1]), ids=[90])
    with pytest.raises(DeephashError, match="have 3 values but the index keeps 5"):
        loaded.add(pack_codes(db_bits[:1]), ids=[91], rerank=np.zeros((1, 3)))
