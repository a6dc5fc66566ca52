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


# ------------------------------------------------------------------ ids, folds, every column

def small_code_file(path: Path, seed: int, n: int = 2) -> tuple[Path, np.ndarray, np.ndarray]:
    """A code file of ``n`` random codes with labels: (file, packed codes, labels)."""
    from deephash.retrieval.codes import save_codes

    rng = np.random.default_rng(seed)
    codes, labels = np.packbits(rng.integers(0, 2, (n, BITS)).astype(bool), axis=1), rng.integers(0, 10, n)
    save_codes(path, codes, labels, BITS)
    return path, codes, labels


def index_info_lines(capsys, index_dir: Path) -> dict[str, str]:
    """`deephash index info`'s lines as a dict."""
    status, out, err = cli(capsys, "index", "info", index_dir)
    assert status == 0, err
    return dict(line.split(None, 1) for line in out.strip().splitlines())


def test_the_cli_never_hands_out_an_id_twice_across_a_crash_a_fold_and_a_restart(tiny, capsys, monkeypatch):
    """Bug: `index add` numbered new items after the largest present id, so removing that item
    gave its id to the next add."""
    index_dir = tiny["index"]
    items = items_of(HashIndex.load(index_dir))
    start = max(items) + 1
    issued = []

    def add(seed: int) -> list[int]:
        code_file, codes, labels = small_code_file(tiny["tmp"] / f"c{seed}.npz", seed)
        status, out, err = cli(capsys, "index", "add", index_dir, "--codes", code_file, "--new-ids")
        assert status == 0, err
        first, last = (int(v) for v in out.strip().rsplit("(ids ", 1)[1].rstrip(")").split(" .. "))
        items.update({first + n: (c.tobytes(), int(l)) for n, (c, l) in enumerate(zip(codes, labels))})
        issued.extend(range(first, last + 1))
        return list(range(first, last + 1))

    def remove(*ids: int) -> None:
        assert cli(capsys, "index", "remove", index_dir, *ids)[0] == 0
        for i in ids:
            del items[i]

    remove(*add(1)[-1:])  # the largest id goes
    remove(*add(2))
    assert issued == list(range(start, start + 4))

    class Killed(BaseException):
        pass

    def die(self):
        raise Killed

    monkeypatch.setattr(LivingIndex, "_fold_locked", die)  # killed before the fold: the add only in the journal
    code_file, codes, labels = small_code_file(tiny["tmp"] / "c3.npz", 3)
    with pytest.raises(Killed):
        cli(capsys, "index", "add", index_dir, "--codes", code_file, "--new-ids")
    monkeypatch.undo()
    capsys.readouterr()
    assert HashIndex.load(index_dir).next_id == start + 6  # replayed from the journal
    items.update({start + 4 + n: (c.tobytes(), int(l)) for n, (c, l) in enumerate(zip(codes, labels))})
    issued += [start + 4, start + 5]
    remove(start + 5)  # replays, then folds
    remove(*add(4))
    assert issued == list(range(start, start + 8))  # every default id once, none twice
    assert_same_as_scratch(index_dir, items)
    lines = index_info_lines(capsys, index_dir)
    assert lines["next_id"] == str(start + 8) and lines["ids"] == f"0 .. {start + 4}"


def test_a_failed_fold_keeps_the_change_and_the_next_command_works(tiny, capsys, monkeypatch):
    """Bug: a failing save made `index add` fail after its change was durable, and kept the
    index locked (the next command in the process was refused)."""
    index_dir = tiny["index"]
    items = items_of(HashIndex.load(index_dir))
    start = max(items) + 1

    def full_disk(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(HashIndex, "save", full_disk)
    code_file, codes, labels = small_code_file(tiny["tmp"] / "c.npz", 5)
    with pytest.warns(UserWarning, match="folding 1 journal records .*No space left on device"):
        status, out, err = cli(capsys, "index", "add", index_dir, "--codes", code_file, "--new-ids")
    assert status == 0 and out.strip() == f"added 2 items to {index_dir} (ids {start} .. {start + 1})"
    items.update({start + n: (c.tobytes(), int(l)) for n, (c, l) in enumerate(zip(codes, labels))})
    assert items_of(HashIndex.load(index_dir)) == items  # durable: in the journal
    assert index_info_lines(capsys, index_dir)["journal"] == "1 records not yet folded into the snapshot"
    monkeypatch.undo()
    status, _, err = cli(capsys, "index", "remove", index_dir, start)  # not locked; folds both records
    assert status == 0, err
    del items[start]
    assert (index_dir / JOURNAL_FILE).stat().st_size == 0
    assert_same_as_scratch(index_dir, items)


def digit_folder(root: Path, seed: int, per_class: int) -> list[Path]:
    """Classes "0" and "1" (the index's own class numbers) of random 8x8 grey PNGs; their files."""
    rng = np.random.default_rng(seed)
    files = []
    for name in ("0", "1"):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            files.append(root / name / f"{seed}-{k}.png")
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(files[-1])
    return files


def test_a_folder_index_with_rerank_vectors_after_adds_and_removes_equals_one_built_from_scratch(tmp_path, capsys):
    """Every column (codes, labels, re-rank vectors, paths) of every id is the one of the file the
    id was given to, computed here image by image; and the index answers as one built from scratch."""
    run_dir = tiny_digits_run(tmp_path, BITS, centred=True, index=False, model_extra={"rerank": "head"})[0]
    index_dir = tmp_path / "folder-index"
    files = {name: digit_folder(tmp_path / name, seed, n) for seed, (name, n) in enumerate([("a", 3), ("b", 2), ("c", 2)])}
    assert cli(capsys, "index", "build", run_dir, "--images", tmp_path / "a", "--out", index_dir)[0] == 0
    assert cli(capsys, "index", "add", index_dir, "--run", run_dir, "--images", tmp_path / "b")[0] == 0
    assert HashIndex.load(index_dir).ids.tolist() == list(range(10))
    assert cli(capsys, "index", "remove", index_dir, 9, 2)[0] == 0  # the largest id, and one built
    assert cli(capsys, "index", "add", index_dir, "--run", run_dir, "--images", tmp_path / "c")[0] == 0

    model, _ = runs.load_run(run_dir)
    expected = {}
    for path in [*files["a"], *files["b"], *files["c"]]:
        pixels = torch.from_numpy(np.array(Image.open(path)))[None, None].float() / 255
        with torch.inference_mode():
            code, vector = model.encode_with_rerank(pixels)
        expected[str(path)] = (np.packbits(code.numpy() > 0, axis=1)[0].tobytes(), int(path.parent.name),
                               vector[0].numpy().astype(np.float16))
    changed = HashIndex.load(index_dir)
    assert changed.ids.tolist() == [0, 1, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13]  # 9 is never given out again
    assert changed.next_id == 14 and (index_dir / "paths.npy").is_file() and (index_dir / "rerank.npy").is_file()
    by_path = dict(zip(changed.paths.tolist(), changed.ids.tolist()))
    assert len(by_path) == 12 and set(by_path) <= set(expected)
    assert sorted(by_path[str(p)] for p in files["c"]) == [10, 11, 12, 13]
    rows = {int(i): (c.tobytes(), int(l), v, str(p)) for i, c, l, v, p in
            zip(changed.ids, changed.codes, changed.labels, changed.rerank_vectors, changed.paths)}
    for ident, (code, label, vector, path) in rows.items():
        assert (code, label) == expected[path][:2]
        np.testing.assert_allclose(vector.astype(np.float32), expected[path][2].astype(np.float32), rtol=1e-2, atol=1e-3)
    ids = np.array(sorted(rows), dtype=np.int64)
    scratch = HashIndex(BITS)
    scratch.add(np.stack([np.frombuffer(rows[i][0], np.uint8) for i in ids]), ids=ids, labels=[rows[i][1] for i in ids],
                rerank=np.stack([rows[i][2] for i in ids]), paths=[rows[i][3] for i in ids])
    scratch.save(tmp_path / "scratch")
    scratch = HashIndex.load(tmp_path / "scratch")
    order = np.argsort(changed.ids)
    np.testing.assert_array_equal(changed.ids[order], scratch.ids)
    for column in ("codes", "labels", "rerank_vectors", "paths"):
        np.testing.assert_array_equal(getattr(changed, column)[order], getattr(scratch, column))
    for query in changed.codes:
        assert sorted(zip(*(a[0].tolist() for a in changed.search(query[None], 12)))) == \
               sorted(zip(*(a[0].tolist() for a in scratch.search(query[None], 12))))
    lines = index_info_lines(capsys, index_dir)
    assert lines["paths"] == "12 image files" and lines["next_id"] == "14"
