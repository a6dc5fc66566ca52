"""``deephash index add / remove / info`` against an index built from scratch on the same items and a
brute-force Hamming search; duplicates, unknown ids and a held lock change nothing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import tiny_digits_run

from deephash import runs
from deephash.cli import main
from deephash.retrieval.index import HashIndex
from deephash.retrieval.journal import (
    JOURNAL_FILE,
    IndexLock,
    Journal,
    TornJournalWarning,
)
from deephash.retrieval.living import LivingIndex
from deephash.runs.index_updates import item_image_path

BITS = 12
CLASSES = [str(d) for d in range(10)]


@pytest.fixture()
def tiny(tmp_path):
    """An untrained tiny CNN on scikit-learn's 8x8 digits and an index over its train split."""
    run_dir, index_dir, config = tiny_digits_run(tmp_path, BITS)
    return {"run": run_dir, "index": index_dir, "config": config, "tmp": tmp_path}


def cli(capsys, *argv) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def items_of(index: HashIndex) -> dict[int, tuple[bytes, int]]:
    return {int(i): (c.tobytes(), int(l)) for i, c, l in zip(index.ids, index.codes, index.labels)}


def brute(query: np.ndarray, items: dict[int, tuple[bytes, int]]) -> list[tuple[int, int]]:
    """Every item as (Hamming distance, id), sorted: a loop over unpacked bits."""
    q = np.unpackbits(query)[:BITS]
    return sorted((int((np.unpackbits(np.frombuffer(c, np.uint8))[:BITS] != q).sum()), i) for i, (c, _) in items.items())


def assert_same_as_scratch(index_dir: Path, items: dict[int, tuple[bytes, int]], seed: int = 0) -> None:
    """The changed index holds exactly ``items`` and answers as an index built from them from scratch
    and as a brute-force search (full lists, tie-free prefixes and radius searches)."""
    changed = HashIndex.load(index_dir)
    assert items_of(changed) == items
    ids = np.array(sorted(items), dtype=np.int64)
    scratch = HashIndex(BITS)
    scratch.add(np.stack([np.frombuffer(items[i][0], np.uint8) for i in ids]), ids=ids,
                labels=np.array([items[i][1] for i in ids]))
    rng = np.random.default_rng(seed)
    queries = np.concatenate([np.packbits(rng.integers(0, 2, (4, BITS)).astype(bool), axis=1), changed.codes[-2:]])
    for query in queries:
        expected = brute(query, items)
        for index in (changed, scratch):
            d, i = index.search(query[None], len(items))
            assert sorted(zip(d[0].tolist(), i[0].tolist())) == expected
            d10, _ = index.search(query[None], 10)
            assert d10[0].tolist() == [e[0] for e in expected[:10]]
            _, rd, ri = index.range_search(query[None], 3)
            assert list(zip(rd.tolist(), ri.tolist())) == [e for e in expected if e[0] <= 3]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_add_a_split_then_remove_matches_an_index_built_from_scratch(tiny, capsys):
    index_dir, run_dir = tiny["index"], tiny["run"]
    items = items_of(HashIndex.load(index_dir))
    start = max(items) + 1
    status, out, err = cli(capsys, "index", "add", index_dir, "--run", run_dir, "--split", "test")
    assert status == 0, err
    model, config = runs.load_run(run_dir)
    test = runs.load_split(config, "test", run_dir)
    codes, labels = runs.encode(model, test)
    assert out.strip() == f"added {len(test)} items to {index_dir} (ids {start} .. {start + len(test) - 1})"
    items.update({start + n: (c.tobytes(), int(l)) for n, (c, l) in enumerate(zip(codes, labels))})
    assert_same_as_scratch(index_dir, items)
    picture = np.asarray(Image.open(item_image_path(index_dir, start + 3)))
    np.testing.assert_array_equal(picture, test.data[3, 0].numpy())  # the added item's image is stored

    (tiny["tmp"] / "ids.txt").write_text(f"10, 11\n12 {start + 3}\n")
    assert cli(capsys, "index", "remove", index_dir, 0, 5, 7)[0] == 0
    status, out, _ = cli(capsys, "index", "remove", index_dir, "--ids-file", tiny["tmp"] / "ids.txt")
    assert status == 0 and out.strip() == f"removed 4 items from {index_dir}"
    for gone in (0, 5, 7, 10, 11, 12, start + 3):
        del items[gone]
    assert_same_as_scratch(index_dir, items, seed=1)
    assert not item_image_path(index_dir, start + 3).exists() and item_image_path(index_dir, start + 4).exists()
    assert not (index_dir / JOURNAL_FILE).exists() or (index_dir / JOURNAL_FILE).stat().st_size == 0  # folded

    status, out, _ = cli(capsys, "index", "info", index_dir)
    lines = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert lines["items"] == str(len(items)) and lines["ids"] == f"1 .. {max(items)}"
    assert lines["changed"] == HashIndex.load(index_dir).changed and lines["changed"].startswith("20")


def test_a_code_file_with_taken_ids_is_refused_and_nothing_is_written(tiny, capsys):
    index_dir, run_dir = tiny["index"], tiny["run"]
    code_file = runs.encode_run(run_dir, split="test", out=tiny["tmp"] / "test.npz")  # ids 0 .. n-1, all taken
    before = folder_bytes(index_dir)
    status, out, err = cli(capsys, "index", "add", index_dir, "--codes", code_file)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("deephash: error: id 0 is already in index") and "nothing was added" in err
    assert folder_bytes(index_dir) == before
    status, _, err = cli(capsys, "index", "add", index_dir, "--codes", code_file, "--ids", *range(3))
    assert status == 2 and "3 ids for" in err and folder_bytes(index_dir) == before

    items = items_of(HashIndex.load(index_dir))
    start = max(items) + 1
    assert cli(capsys, "index", "add", index_dir, "--codes", code_file, "--new-ids")[0] == 0
    stored = np.load(code_file)
    items.update({start + n: (c.tobytes(), int(l)) for n, (c, l) in enumerate(zip(stored["codes"], stored["labels"]))})
    assert_same_as_scratch(index_dir, items)


def test_an_image_folder_is_added_with_its_class_names_mapped(tiny, capsys):
    index_dir, run_dir = tiny["index"], tiny["run"]
    rng = np.random.default_rng(2)
    folder = tiny["tmp"] / "new"
    pixels = {}
    for name in ("3", "8"):
        (folder / name).mkdir(parents=True)
        for k in range(2):
            pixels[(name, k)] = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels[(name, k)]).save(folder / name / f"{k}.png")
    items = items_of(HashIndex.load(index_dir))
    start = max(items) + 1
    status, _, err = cli(capsys, "index", "add", index_dir, "--run", run_dir, "--images", folder)
    assert status == 0, err
    after = HashIndex.load(index_dir)
    model, _ = runs.load_run(run_dir)
    for n, (name, k) in enumerate(sorted(pixels)):
        with torch.inference_mode():
            code = np.packbits(model.encode(torch.from_numpy(pixels[(name, k)])[None, None].float() / 255).numpy() > 0, axis=1)[0]
        items[start + n] = (code.tobytes(), int(name))  # folder class "3" is the index's class 3
        np.testing.assert_array_equal(np.asarray(Image.open(item_image_path(index_dir, start + n))), pixels[(name, k)])
    assert items_of(after) == items
    (folder / "zebra").mkdir()
    Image.fromarray(pixels[("3", 0)]).save(folder / "zebra" / "z.png")
    status, _, err = cli(capsys, "index", "add", index_dir, "--run", run_dir, "--images", folder)
    assert status == 2 and "class 'zebra'" in err and items_of(HashIndex.load(index_dir)) == items


def test_unknown_ids_and_a_held_lock_change_nothing(tiny, capsys):
    index_dir, run_dir = tiny["index"], tiny["run"]
    before = folder_bytes(index_dir)
    status, _, err = cli(capsys, "index", "remove", index_dir, 3, 99999)
    assert status == 2 and err.strip() == f"deephash: error: id 99999 not in index {index_dir}; nothing was removed"
    with IndexLock(index_dir, holder="deephash serve"):
        for argv in (["remove", index_dir, 3], ["add", index_dir, "--run", run_dir, "--split", "test"]):
            status, _, err = cli(capsys, "index", *argv)
            assert status == 2 and err.count("\n") == 1
            assert f"locked for writing by pid {os.getpid()} (deephash serve)" in err
    assert folder_bytes(index_dir) == before
    assert cli(capsys, "index", "remove", index_dir, 3)[0] == 0  # released


def test_a_change_is_all_or_nothing_when_the_process_dies(tiny, monkeypatch):
    """Killed after the journal write: the change is there on the next load. Killed half-way
    through the journal write: the torn record is dropped and the index is as before."""
    index_dir = tiny["index"]
    items = items_of(HashIndex.load(index_dir))

    class Killed(BaseException):
        pass

    def die(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(LivingIndex, "_fold_locked", die)
    living = LivingIndex(index_dir, fold_every=1).open()
    with pytest.raises(Killed):
        living.remove([1, 2])
    living._journal.close()
    living._file_lock.release()  # the process is gone: so is its lock
    del items[1], items[2]
    assert items_of(HashIndex.load(index_dir)) == items  # replayed from the journal

    monkeypatch.undo()
    real_append = Journal.append

    def torn_append(self, record):
        from deephash.retrieval.journal import encode_record

        data = encode_record(record)
        os.write(self._file(), data[:len(data) // 2])
        raise Killed

    monkeypatch.setattr(Journal, "append", torn_append)
    living = LivingIndex(index_dir).open()
    with pytest.raises(Killed):
        living.remove([3])
    living._journal.close()
    living._file_lock.release()
    monkeypatch.setattr(Journal, "append", real_append)
    with pytest.warns(TornJournalWarning):
        assert items_of(HashIndex.load(index_dir)) == items
    with pytest.warns(TornJournalWarning):
        with LivingIndex(index_dir) as living:  # the torn tail is cut; new records follow the good ones
            living.remove([4])
    del items[4]
    assert items_of(HashIndex.load(index_dir)) == items
