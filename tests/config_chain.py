"""Every ``deephash`` command on one shipped config, each result checked against an independent oracle.

Shared by ``tests/reliability/test_shipped_configs.py`` (every shipped config, the CLI in-process)
and ``tests/packaging/test_wheel.py`` (one config, the installed wheel's ``deephash`` as a
subprocess). A *runner* runs one command line and returns ``(status, stdout, stderr)``.

Tiny data trees in the data sets' exact on-disk formats (:data:`RECIPES`, one per data set name):
a slice of the real Fashion-MNIST files re-written as IDX ``.gz``; generated MNIST IDX files;
generated CIFAR-10 python batches (enough images for DeepHash-pytorch's protocol, 100 queries and
500 training images per class, then shrunk by ``data.limit``); a generated image folder with
``train/`` and ``test/`` sub-folders of PNG and JPEG files.

The chain: ``train`` (every stage the config turns on, sizes shrunk by ``--set``), ``evaluate``
(mAP@all and P@r against a direct formula over the codes ``encode`` writes), ``encode``,
``index build``, ``search`` (against a brute-force popcount), ``index add`` of images, a split and
a code file, ``index remove``, ``index info``, ``report`` and the service's add, search, delete and
graceful shutdown, which folds the journal. After the changes the index must equal one built from
scratch with the same items (codes, labels, re-rank vectors, paths), and no id may be handed out
twice.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import free_port, write_idx

from deephash.config import Config, load_config, shipped_config
from deephash.retrieval.codes import CodeSet, load_codes
from deephash.retrieval.index import HashIndex
from deephash.train.callbacks import read_jsonl

#: ``runner(*args) -> (exit status, stdout, stderr)`` for one ``deephash ARGS...`` command line.
Runner = Callable[..., tuple[int, str, str]]
#: Where Debian's ``dataset-fashion-mnist`` puts the real files.
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TRAIN_PER_CLASS, TEST_PER_CLASS = 4, 3
TOKEN = "chain-token-5e1d"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# ------------------------------------------------------------------------------------- runners


def in_process(capsys: pytest.CaptureFixture) -> Runner:
    """``deephash.cli.main`` in this process; its output read through ``capsys``."""
    from deephash.cli import main

    def run(*args: Any) -> tuple[int, str, str]:
        capsys.readouterr()
        status = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return status, out, err

    return run


def in_subprocess(command: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> Runner:
    """``command ARGS...`` (e.g. an installed ``deephash``) as a child process in ``cwd``."""
    def run(*args: Any) -> tuple[int, str, str]:
        done = subprocess.run([*command, *[str(a) for a in args]], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
        return done.returncode, done.stdout, done.stderr

    return run


def ok(runner: Runner, *args: Any) -> str:
    """Run a command that must succeed; its stdout."""
    status, out, err = runner(*args)
    assert status == 0, f"deephash {' '.join(map(str, args))} exited {status}:\n{out[-2000:]}\n{err[-3000:]}"
    return out


# ------------------------------------------------------------------------------------ data trees


@dataclass
class DataTree:
    """A tiny data set on disk. ``sets``: the ``--set`` overrides that point a config at it and size
    its splits; ``env``: environment variables to the same end (the other way to find data)."""

    root: Path
    sets: list[str]
    n_classes: int
    env: dict[str, str] = field(default_factory=dict)


def _class_images(rng: np.random.Generator, labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 noise ``(N, *shape)`` with a bright band whose rows depend on the label."""
    images = rng.integers(0, 80, size=(len(labels), *shape))
    rows = shape[0]
    for c in np.unique(labels):
        top = int(c) * (rows - 4) // max(int(labels.max()), 1)
        images[labels == c, top:top + 4] += 170
    return images.astype(np.uint8)


def fashion_mnist_slice(root: Path) -> DataTree:
    """The first images of each class of the real Fashion-MNIST files, as Fashion-MNIST's four IDX .gz files."""
    from deephash.data.sources import read_idx

    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"{FASHION_MNIST} lacks the real Fashion-MNIST files: apt-get install dataset-fashion-mnist")
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True)
    for prefix, per_class in (("train", TRAIN_PER_CLASS), ("t10k", TEST_PER_CLASS)):
        images = read_idx(FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz")
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images[keep])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels[keep])
    return DataTree(root, [f"data.root={str(root)!r}"], 10, {"DEEPHASH_DATA": str(root)})


def mnist_files(root: Path) -> DataTree:
    """MNIST's four IDX .gz files, generated: 10 classes of banded noise."""
    rng = np.random.default_rng(11)
    folder = root / "mnist"
    folder.mkdir(parents=True)
    for prefix, per_class in (("train", TRAIN_PER_CLASS), ("t10k", TEST_PER_CLASS)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class))
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", _class_images(rng, labels, (28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return DataTree(root, [f"data.root={str(root)!r}"], 10, {"DEEPHASH_DATA": str(root)})


def cifar10_batches(root: Path, per_class: int = 610, limit: int = 30) -> DataTree:
    """CIFAR-10's extracted ``cifar-10-batches-py/`` (five training batches and a test batch, each a
    pickled dict of uint8 ``data (N, 3072)`` and ``labels``, as the archive holds them), generated:
    ``per_class`` images of each class, enough for the protocol's 600 per class plus a database;
    ``data.limit`` then keeps ``limit`` images of each protocol split."""
    rng = np.random.default_rng(12)
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels = rng.permutation(np.repeat(np.arange(10), per_class))
    images = _class_images(rng, labels, (32, 32, 3))
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, part in zip(names, np.array_split(np.arange(len(labels)), len(names))):
        batch = {b"batch_label": name.encode(), b"labels": labels[part].tolist(),
                 b"data": images[part].transpose(0, 3, 1, 2).reshape(len(part), 3072),
                 b"filenames": [f"{i:05d}.png".encode() for i in part]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return DataTree(root, [f"data.root={str(root)!r}", f"data.limit={limit}"], 10, {"DEEPHASH_DATA": str(root)})


FOLDER_CLASSES = ("disc", "ring", "stripe")


def image_folder(root: Path) -> DataTree:
    """A photo folder ``<root>/photos/{train,test}/<class>/<file>``, PNG and JPEG files alternating,
    generated RGB 24x24 pictures; one training image is 30x20 (resized to the first image's size)."""
    rng = np.random.default_rng(13)
    photos = root / "photos"
    for split, per_class in (("train", 8), ("test", 4)):
        for label, name in enumerate(FOLDER_CLASSES):
            (photos / split / name).mkdir(parents=True)
            for k in range(per_class):
                shape = (20, 30, 3) if (split, label, k) == ("train", 2, 5) else (24, 24, 3)
                pixels = _class_images(rng, np.array([label, 2]), shape)[0]
                suffix = "png" if k % 2 == 0 else "jpg"
                Image.fromarray(pixels).save(photos / split / name / f"{split}-{k:02d}.{suffix}")
    return DataTree(root, [f"data.images={str(photos)!r}"], len(FOLDER_CLASSES))


#: A tiny data tree for every data set a shipped config names (``data.dataset``).
RECIPES: dict[str, Callable[[Path], DataTree]] = {
    "fashion-mnist": fashion_mnist_slice,
    "mnist": mnist_files,
    "cifar10": cifar10_batches,
    "folder": image_folder,
}


def tiny_overrides(config: Config, tree: DataTree) -> list[str]:
    """``--set`` overrides that shrink a config to seconds on tiny data without turning any stage off:
    one epoch (two when the last epochs drop augmentation, so both phases run), small batches,
    a narrow backbone, one epoch of the re-rank head stage."""
    sets = ['device="cpu"', "train.num_threads=1", "train.log_interval=1", *tree.sets]
    if config.train.final_epochs_no_augment > 0:
        sets += ["train.epochs=2", "train.final_epochs_no_augment=1"]
    else:
        sets.append("train.epochs=1")
    if config.data.num_workers > 2:  # a GPU machine's decoding processes: two show the same
        sets.append("data.num_workers=2")
    if config.train.freeze_backbone_epochs > 0:  # a frozen first epoch, then one that trains the backbone
        sets += ["train.epochs=2", "train.freeze_backbone_epochs=1"]
    if config.train.eval_every > 0:
        sets.append("train.eval_every=1")
    if config.data.labelled_fraction < 1:  # a tenth of a tiny set fills no labelled half of a batch
        sets.append("data.labelled_fraction=0.5")
    if config.pseudo_labels.from_epoch > 0:  # an epoch on the starting labels, then one on pseudo labels
        sets += ["train.epochs=2", "pseudo_labels.from_epoch=1"]
    if config.sampler.kind == "balanced":
        sets += [f"sampler.n_classes={min(config.sampler.n_classes, tree.n_classes)}", "sampler.n_samples=2"]
    else:
        sets.append(f"sampler.batch_size={min(config.sampler.batch_size, 16)}")
    if "width" in config.model.backbone_params:
        sets.append("model.backbone_params.width=8")
    if config.rerank_head.epochs > 0:
        sets.append("rerank_head.epochs=1")
    return sets


def set_args(sets: list[str]) -> list[str]:
    return [arg for s in sets for arg in ("--set", s)]


# ---------------------------------------------------------------------------------- the oracles


@dataclass
class Item:
    """What an index must hold for one id."""

    code: bytes
    label: int
    vector: np.ndarray | None = None
    path: str | None = None


def hamming(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    """Brute-force popcount: int64 ``(nq, n)`` Hamming distances between packed uint8 codes."""
    return np.unpackbits(queries[:, None, :] ^ database[None, :, :], axis=-1).sum(-1).astype(np.int64)


def ap_stable(distances: np.ndarray, relevant: np.ndarray) -> float:
    """Average precision of one query over the whole database, ties broken by database order."""
    order = np.argsort(distances, kind="stable")
    hits = relevant[order]
    if not hits.any():
        return 0.0
    ranks = np.flatnonzero(hits) + 1
    return float(np.mean(np.arange(1, len(ranks) + 1) / ranks))


def ball_precision(distances: np.ndarray, relevant: np.ndarray, radius: int) -> float:
    inside = distances <= radius
    return float(relevant[inside].mean()) if inside.any() else 0.0


def brute_list(query: bytes, items: dict[int, Item]) -> list[tuple[int, int]]:
    """Every item as ``(Hamming distance, id)``, sorted."""
    q = np.unpackbits(np.frombuffer(query, np.uint8))
    return sorted((int((np.unpackbits(np.frombuffer(it.code, np.uint8)) != q).sum()), i) for i, it in items.items())


def assert_top_k(got: list[float], got_ids: list[int], score: dict[int, float], k: int, tol: float = 0.0) -> None:
    """``got`` (ascending) are the ``k`` smallest of ``score`` (id -> value) with the right values:
    every hit's value is its own, no item left out is nearer than the farthest hit."""
    assert len(got_ids) == min(k, len(score)) and len(set(got_ids)) == len(got_ids)
    assert got == sorted(got), f"results not in ascending order: {got}"
    for value, ident in zip(got, got_ids):
        assert abs(value - score[ident]) <= tol, f"id {ident}: reported {value}, brute force {score[ident]}"
    left_out = [v for i, v in score.items() if i not in got_ids]
    if left_out and got:
        assert min(left_out) >= max(got) - tol, f"an item at {min(left_out)} was left out of a top {k} reaching {max(got)}"


# ---------------------------------------------------------------------------------- the chain


@dataclass
class Chain:
    """One config's run through every command. ``serve``: ``"app"`` (the app in this process with
    its lifespan), ``"process"`` (``serve_command serve ...`` as a child process, stopped with
    SIGTERM) or ``"none"``."""

    runner: Runner
    work: Path
    name: str
    tree: DataTree
    serve: str = "app"
    serve_command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "deephash"])
    env: dict[str, str] | None = None
    serve_cwd: Path | None = None  # default: this process's (a relative PYTHONPATH=src keeps pointing at the checkout)
    data_sets: list[str] | None = None  # default: tree.sets (the wheel test finds its data by env instead)
    handed_out: set[int] = field(default_factory=set)
    reused: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.run, self.index = self.work / "run", self.work / "index"
        shipped = load_config(shipped_config(self.name))
        self.sets = tiny_overrides(shipped, self.tree)
        if self.data_sets is not None:
            self.sets = [s for s in self.sets if s not in self.tree.sets] + self.data_sets

    # ------------------------------------------------------------------ steps
    def go(self) -> None:
        """Every command, in the order a user runs them."""
        self.train()
        self.encode()
        self.evaluate()
        if not self.hash:
            self.embedding_model_refuses_an_index()
            self.report()
            return
        self.build()
        self.search()
        self.add_and_remove()
        self.info()
        self.report()
        if self.serve != "none":
            self.service()
        assert not self.reused, f"ids handed out twice (after removals): {'; '.join(self.reused)}"

    def train(self) -> None:
        out = ok(self.runner, "train", self.name, "--out", self.run, "--quiet", *set_args(self.sets))
        assert f"run written to {self.run}" in out
        self.config = load_config(self.run / "config.toml")
        for key in ("model.pt", "config.toml", "metrics.jsonl"):
            assert (self.run / key).is_file(), f"train wrote no {key}"
        if self.config.rerank_head.epochs > 0:  # the re-rank head's own stage ran and logged
            assert (self.run / "rerank_head_log.jsonl").read_text().strip(), "the re-rank head stage logged nothing"
        if self.config.pseudo_labels.from_epoch > 0:  # the second epoch trained on pseudo labels
            epochs = [e for e in read_jsonl(self.run / "metrics.jsonl") if e["type"] == "epoch"]
            # (how many got a label depends on the tiny data: the record must be there, any count is right)
            assert "pseudo_labelled" not in epochs[0] and epochs[1]["pseudo_labelled"] >= 0, epochs
        self.hash = self.config.model.head == "hash"
        from deephash.runs import load_run

        model, _ = load_run(self.run, device="cpu")
        self.classes = list(model.classes)
        if self.config.model.code_rule == "pca":  # fitted after training: orthonormal principal directions
            projection = model.code_projection.double()
            assert projection.shape[1] == self.config.model.bits
            gram = projection.T @ projection
            assert torch.allclose(gram, torch.eye(gram.shape[0], dtype=gram.dtype), atol=1e-4), "the PCA code fit did not run"

    def encode(self) -> None:
        data = self.config.data
        self.q_file, self.db_file = self.work / "query.npz", self.work / "database.npz"
        ok(self.runner, "encode", self.run, "--split", data.query_split, "--out", self.q_file)
        ok(self.runner, "encode", self.run, "--split", data.database_split, "--out", self.db_file)
        if not self.hash:
            with np.load(self.q_file) as q, np.load(self.db_file) as db:
                self.q_emb, self.q_labels = q["embeddings"], q["labels"]
                self.db_emb, self.db_labels = db["embeddings"], db["labels"]
            assert self.q_emb.shape[1] == self.config.model.embedding_dim and np.isfinite(self.q_emb).all()
            return
        self.q, self.db = load_codes(self.q_file), load_codes(self.db_file)
        assert self.q.bits == self.db.bits == self.config.model.bits
        np.testing.assert_array_equal(self.db.ids, np.arange(len(self.db)))
        keeps_vectors = self.config.model.rerank != ""
        assert (self.q.rerank is not None) == keeps_vectors and (self.db.rerank is not None) == keeps_vectors
        if data.dataset == "folder":  # the same files encoded as a folder: the same codes, paths relative to it
            folder_file = self.work / "folder.npz"
            ok(self.runner, "encode", self.run, "--images", Path(data.images) / "test", "--out", folder_file)
            by_folder = load_codes(folder_file)
            np.testing.assert_array_equal(by_folder.codes, self.q.codes)
            np.testing.assert_array_equal(by_folder.labels, self.q.labels)
            expected = sorted(f"{c}/{p.name}" for c in FOLDER_CLASSES for p in (Path(data.images) / "test" / c).iterdir())
            assert by_folder.paths.tolist() == expected

    def evaluate(self) -> None:
        out = ok(self.runner, "evaluate", self.run)
        assert f"metrics written to {self.run / 'metrics.json'}" in out

        result = json.loads((self.run / "metrics.json").read_text(encoding="utf-8"))
        protocol, metrics = result["protocol"], result["metrics"]
        if not self.hash:
            assert (protocol["n_query"], protocol["n_database"]) == (len(self.q_labels), len(self.db_labels))
            distances = np.linalg.norm(self.q_emb[:, None, :].astype(np.float64) - self.db_emb[None], axis=-1)
            relevant = self.q_labels[:, None] == self.db_labels[None, :]
            expected = np.mean([ap_stable(d, r) for d, r in zip(distances, relevant)])
            assert metrics["mAP@all"] == pytest.approx(expected, abs=1e-6), f"mAP@all {metrics['mAP@all']}, the direct formula {expected}"
            return
        assert (protocol["n_query"], protocol["n_database"]) == (len(self.q), len(self.db))
        distances = hamming(self.q.codes, self.db.codes)
        relevant = self.q.labels[:, None] == self.db.labels[None, :]
        expected = np.mean([ap_stable(d, r) for d, r in zip(distances, relevant)])
        got = metrics["mAP@all/stable"]
        assert got == pytest.approx(expected, abs=1e-9), f"mAP@all/stable {got}, the direct formula {expected}"
        radius = self.config.eval.radius
        expected = np.mean([ball_precision(d, r, radius) for d, r in zip(distances, relevant)])
        got = metrics[f"P@r<={radius}"]
        assert got == pytest.approx(expected, abs=1e-9), f"P@r<={radius} {got}, the direct formula {expected}"

    def embedding_model_refuses_an_index(self) -> None:
        status, out, err = self.runner("index", "build", self.run, "--split", self.config.data.database_split,
                                       "--out", self.index)
        assert status == 2 and out == "" and err.count("\n") == 1 and "embedding model" in err, err
        assert not self.index.exists()

    def build(self) -> None:
        ok(self.runner, "index", "build", self.run, "--split", self.config.data.database_split, "--out", self.index)
        built = HashIndex.load(self.index)
        np.testing.assert_array_equal(built.codes, self.db.codes)
        np.testing.assert_array_equal(built.labels, self.db.labels)
        np.testing.assert_array_equal(built.ids, self.db.ids)
        if self.db.rerank is not None:
            np.testing.assert_array_equal(built.rerank_vectors, self.db.rerank)
        else:
            assert built.rerank_vectors is None
        meta = built.metadata
        assert meta["classes"] == self.classes
        self.keeps_paths = built.paths is not None
        assert self.keeps_paths == (self.config.data.dataset == "folder")
        paths = self.split_paths(self.config.data.database_split)
        self.items = {int(i): Item(c.tobytes(), int(l), None if self.db.rerank is None else self.db.rerank[n],
                                   paths[n] if paths else None)
                      for n, (i, c, l) in enumerate(zip(self.db.ids, self.db.codes, self.db.labels))}
        self.handed_out |= set(self.items)

    def split_paths(self, split: str) -> list[str] | None:
        """The files of a split of an image-folder data set, as the folder lists them (sorted
        classes, sorted names); None for other data sets."""
        if self.config.data.dataset != "folder":
            return None
        folder = Path(self.config.data.images) / split
        return [str(folder / c / p) for c in FOLDER_CLASSES for p in sorted(q.name for q in (folder / c).iterdir())]

    def search(self) -> None:
        split, k = self.config.data.query_split, 5
        results = json.loads(ok(self.runner, "search", self.index, "--run", self.run,
                                f"{split}:0", f"{split}:1", "-k", k, "--json"))
        printed = ok(self.runner, "search", self.index, "--run", self.run, f"{split}:0", f"{split}:1", "-k", k)
        rows = [line.split() for line in printed.splitlines() if re.match(r"\s+\d+\s+\d+\s+\d+", line)]
        assert [(int(r[0]), int(r[1]), int(r[2])) for r in rows] == [
            (h["rank"], h["id"], h["distance"]) for r in results for h in r["hits"]]  # the table says what --json says
        assert [r["query"] for r in results] == [f"{split}:0", f"{split}:1"]
        rows = hamming(self.q.codes[:2], self.db.codes)
        for n, (row, result) in enumerate(zip(rows, results)):
            assert result["label"] == int(self.q.labels[n]) and result["class"] == self.classes[int(self.q.labels[n])]
            hits = result["hits"]
            assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
            for hit in hits:
                assert hit["distance"] == row[hit["id"]], f"id {hit['id']}: distance {hit['distance']}, brute force {row[hit['id']]}"
                assert hit["label"] == int(self.db.labels[hit["id"]]) and hit["class"] == self.classes[hit["label"]]
                assert hit["path"] == self.items[hit["id"]].path
            ids = [h["id"] for h in hits]
            if self.db.rerank is None:
                assert all(h["score"] is None for h in hits)
                assert_top_k([h["distance"] for h in hits], ids, dict(enumerate(row.tolist())), k)
            else:  # the shortlist (100) holds the whole database: every item, ranked by the re-rank vectors
                query = self.q.rerank[n].astype(np.float32)  # float16 in the code file: off by <= |q| 2**-11
                score = np.linalg.norm(self.db.rerank.astype(np.float32) - query[None], axis=1)
                tol = float(np.linalg.norm(query)) * 2.0**-10 + 1e-4  # and the printed score has 4 decimals
                assert_top_k([h["score"] for h in hits], ids, dict(enumerate(score.tolist())), k, tol=tol)

    # ------------------------------------------------------------------ changes
    def new_ids(self, added: list[int], by: str) -> None:
        """Ids an add handed out: each must be new, never one handed out before (even if removed
        since). A reused id is recorded, and :meth:`go` fails on it after the last command, so it
        hides none of the later checks."""
        assert len(set(added)) == len(added)
        reused = sorted(set(added) & self.handed_out)
        if reused:
            self.reused.append(f"{by} gave ids {reused} again")
        self.handed_out |= set(added)

    def added_ids(self, out: str) -> list[int]:
        match = re.fullmatch(r"added (\d+) items to (.+) \(ids (\d+) \.\. (\d+)\)\n", out)
        assert match, out
        n, first, last = int(match[1]), int(match[3]), int(match[4])
        ids = HashIndex.load(self.index).ids.tolist()[-n:]  # added at the end, in order
        assert (ids[0], ids[-1], len(ids)) == (first, last, n)
        return ids

    def add_and_remove(self) -> None:
        """``index add`` of a split, then (after removing the largest id) a folder of images and a
        code file; ``index remove``; the index equals one built from scratch after each change."""
        split = self.config.data.query_split
        q_items = [Item(c.tobytes(), int(l), None if self.q.rerank is None else self.q.rerank[n], p)
                   for n, (c, l, p) in enumerate(zip(self.q.codes, self.q.labels,
                                                     self.split_paths(split) or [None] * len(self.q)))]
        ids = self.added_ids(ok(self.runner, "index", "add", self.index, "--run", self.run, "--split", split))
        self.new_ids(ids, "index add --split")
        self.items.update(zip(ids, q_items))
        self.assert_index_holds_items()

        largest, smallest = max(self.items), min(self.items)
        out = ok(self.runner, "index", "remove", self.index, largest, smallest)
        assert out.strip() == f"removed 2 items from {self.index}"
        del self.items[largest], self.items[smallest]

        folder, rows = self.image_folder_of_queries(self.work / "new-images", 4)
        # what the same files encode to (`encode --images`): a saved model view is cropped again
        # when read back, so a barely trained model may give it a bit or two other than the split's
        ok(self.runner, "encode", self.run, "--images", folder, "--out", self.work / "new-images.npz")
        by_file = load_codes(self.work / "new-images.npz")
        ids = self.added_ids(ok(self.runner, "index", "add", self.index, "--run", self.run, "--images", folder))
        self.new_ids(ids, "index add --images")
        files = sorted((p for p in folder.rglob("*.png")), key=lambda p: (p.parent.name, p.name))
        assert by_file.paths.tolist() == [f.relative_to(folder).as_posix() for f in files]
        for n, (ident, row, file) in enumerate(zip(ids, rows, files)):
            vector = None if by_file.rerank is None else by_file.rerank[n]
            self.items[ident] = Item(by_file.codes[n].tobytes(), q_items[row].label, vector,
                                     str(file) if self.keeps_paths else None)
            stored = np.asarray(Image.open(self.index / "items" / f"{ident}.png"))
            assert stored.shape[:2] == tuple(self.image_shape[1:])  # the added item's picture is kept
        self.assert_index_holds_items(vector_tol=2e-3)

        ids = self.added_ids(ok(self.runner, "index", "add", self.index, "--codes", self.q_file, "--new-ids"))
        self.new_ids(ids, "index add --codes --new-ids")
        # a folder's code file holds paths relative to the folder and the folder (root): the index
        # keeps them joined, as `index build` does, so the service can show the added items' images
        self.items.update(zip(ids, [Item(it.code, it.label, it.vector, (it.path or "") if self.keeps_paths else None)
                                    for it in q_items]))
        self.assert_index_holds_items(vector_tol=2e-3)

        gone = sorted(self.items)[1::3][:5]
        out = ok(self.runner, "index", "remove", self.index, *gone)
        assert out.strip() == f"removed {len(gone)} items from {self.index}"
        for ident in gone:
            del self.items[ident]
            assert not (self.index / "items" / f"{ident}.png").exists()
        self.assert_index_holds_items(vector_tol=2e-3)
        journal = self.index / "journal.log"
        assert not journal.exists() or journal.stat().st_size == 0, "a command left its change unfolded"

    def image_folder_of_queries(self, folder: Path, n: int) -> tuple[Path, list[int]]:
        """PNG files of the first ``n`` query images whose class name can be a folder name, in
        ``folder/<class name>/``; returns the folder and the query rows in the order it lists them."""
        from deephash.runs import load_split

        query = load_split(self.config, self.config.data.query_split, self.run)
        self.image_shape = tuple(query.data.shape[1:])
        rows = [r for r in range(len(query)) if "/" not in self.classes[int(query.targets[r])]][:n]
        assert rows, "no query image of a class whose name can be a folder name"
        for r in rows:
            target = folder / self.classes[int(query.targets[r])]
            target.mkdir(parents=True, exist_ok=True)
            pixels = query.data[r].numpy()
            Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)).save(target / f"q{r:03d}.png")
        return folder, sorted(rows, key=lambda r: (self.classes[int(query.targets[r])], r))

    def assert_index_holds_items(self, vector_tol: float = 0.0) -> None:
        """The index folder holds exactly ``self.items`` and answers as an index built from them
        from scratch and as a brute-force search."""
        changed = HashIndex.load(self.index)
        ids = changed.ids.tolist()
        assert sorted(ids) == sorted(self.items), f"ids differ: extra {sorted(set(ids) - set(self.items))}, " \
                                                  f"missing {sorted(set(self.items) - set(ids))}"
        rows = {i: n for n, i in enumerate(ids)}
        order = sorted(self.items)
        codes = np.stack([np.frombuffer(self.items[i].code, np.uint8) for i in order])
        labels = np.array([self.items[i].label for i in order], dtype=np.int64)
        at = [rows[i] for i in order]
        np.testing.assert_array_equal(changed.codes[at], codes)
        np.testing.assert_array_equal(changed.labels[at], labels)
        vectors = None
        if self.db.rerank is not None:
            vectors = np.stack([self.items[i].vector for i in order]).astype(np.float32)
            np.testing.assert_allclose(changed.rerank_vectors[at].astype(np.float32), vectors, rtol=vector_tol, atol=vector_tol)
        else:
            assert changed.rerank_vectors is None
        paths = None
        if self.keeps_paths:
            paths = [self.items[i].path or "" for i in order]
            stored = [str(changed.paths[rows[i]]) for i in order]
            assert stored == paths, [(i, a, b) for i, a, b in zip(order, stored, paths) if a != b][:3]
        else:
            assert changed.paths is None
        scratch = HashIndex(changed.bits, metadata=changed.metadata)
        scratch.add(codes, ids=np.array(order, dtype=np.int64), labels=labels, rerank=vectors, paths=paths)
        rng = np.random.default_rng(len(self.items))
        queries = np.concatenate([self.q.codes[:3], np.packbits(rng.integers(0, 2, (2, changed.bits)).astype(bool), axis=1)])
        for query in queries:
            expected = brute_list(query.tobytes(), self.items)
            for index in (changed, scratch):
                _, d, i = index.range_search(query[None], changed.bits)
                assert list(zip(d.tolist(), i.tolist())) == expected
                d, _ = index.search(query[None], 7)
                assert d[0].tolist() == [e[0] for e in expected[:7]]

    def info(self) -> None:
        out = ok(self.runner, "index", "info", self.index)
        lines = dict(line.split(None, 1) for line in out.strip().splitlines())
        assert lines["items"] == str(len(self.items)) and lines["bits"] == str(self.config.model.bits)
        assert lines["ids"] == f"{min(self.items)} .. {max(self.items)}"
        assert int(lines["next_id"]) == max(self.handed_out) + 1, (lines["next_id"], max(self.handed_out))
        assert "journal" not in lines and lines["changed"] == HashIndex.load(self.index).changed

    def report(self) -> None:
        out = ok(self.runner, "report", self.run)
        page = self.run / "report.html"
        assert f"report written to {page}" in out
        text = page.read_text(encoding="utf-8")
        pictures = re.findall(r'<img[^>]* src="([^"]+)"', text)
        assert pictures and all((self.run / p).is_file() for p in pictures), pictures
        assert self.name in text

    # ------------------------------------------------------------------ the service
    def service(self) -> None:
        """Add, search, delete through the service, then a graceful shutdown that folds the journal."""
        seq = int(json.loads((self.index / "meta.json").read_text())["journal_seq"])
        if self.serve == "app":
            from fastapi.testclient import TestClient

            from deephash.serve.app import create_app

            with TestClient(create_app(self.index, self.run, write_token=TOKEN)) as client:
                self.service_writes(client)
        else:
            token = self.work / "token"
            token.write_text(TOKEN + "\n")
            log = self.work / "serve.log"
            proc, base = start_service(self.serve_command, self.index, self.run, log, self.env, self.serve_cwd,
                                       "--token-file", token)
            try:
                with httpx.Client(base_url=base, timeout=60) as client:
                    self.service_writes(client)
            finally:
                proc.send_signal(signal.SIGTERM)  # a graceful shutdown folds the journal into the snapshot
                try:
                    status = proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    raise
            assert status in (0, -signal.SIGTERM), log.read_text()[-3000:]  # uvicorn may re-raise SIGTERM
            assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
        folded = HashIndex.load(self.index)
        journal = self.index / "journal.log"
        assert not journal.exists() or journal.stat().st_size == 0, "the shutdown did not fold the journal"
        assert folded.journal_seq == seq + 4, (folded.journal_seq, seq)
        self.assert_index_holds_items(vector_tol=2e-3)
        status, out, err = self.runner("index", "remove", self.index, max(self.items))  # the write lock was released
        assert status == 0, err
        del self.items[max(self.items)]

    def service_writes(self, client: Any) -> None:
        from deephash.runs import load_split

        bits = self.config.model.bits
        assert client.get("/api/info").json()["size"] == len(self.items)
        query = load_split(self.config, self.config.data.query_split, self.run)
        row = 0
        pixels = query.data[row].numpy()
        view = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)  # the model view of the item
        png = io.BytesIO()
        Image.fromarray(view).save(png, format="PNG")
        if getattr(query, "paths", None) is not None:  # a photo: its file, fitted by the upload as by the split
            png = io.BytesIO(Path(query.paths[row]).read_bytes())
        label = self.classes[int(self.q.labels[row])]
        vector = None if self.q.rerank is None else self.q.rerank[row]

        def add() -> int:
            answer = client.post("/api/items", files={"image": ("q.png", png.getvalue(), "image/png")},
                                 data={"label": label}, headers=AUTH)
            assert answer.status_code == 201, answer.text
            ident = int(answer.json()["id"])
            self.new_ids([ident], "POST /api/items")
            self.items[ident] = Item(self.q.codes[row].tobytes(), int(self.q.labels[row]), vector,
                                     "" if self.keeps_paths else None)
            return ident

        def search_matches_brute_force() -> None:
            for code in (self.q.codes[row], self.q.codes[-1]):
                body = client.post("/api/search", json={"code": code.tobytes().hex(), "k": 1000, "radius": bits})
                assert body.status_code == 200, body.text
                got = [(r["distance"], r["id"]) for r in body.json()["results"]]
                assert got == brute_list(code.tobytes(), self.items)
                labels = {r["id"]: r["label"] for r in body.json()["results"]}
                assert all(labels[i] == self.classes[it.label] for i, it in self.items.items() if it.label >= 0)

        first = add()
        search_matches_brute_force()
        image = client.get(f"/api/items/{first}/image")
        assert image.status_code == 200
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.content))), view)
        assert client.delete(f"/api/items/{first}", headers=AUTH).status_code == 204
        del self.items[first]
        search_matches_brute_force()
        add()  # after the largest id was deleted: a new id all the same
        oldest = min(self.items)
        assert client.delete(f"/api/items/{oldest}", headers=AUTH).status_code == 204
        del self.items[oldest]
        search_matches_brute_force()
        assert client.get("/api/info").json()["size"] == len(self.items)
        out = ok(self.runner, "index", "info", self.index)  # readable while the server holds the write lock
        assert re.search(r"^journal\s+4 records not yet folded", out, re.M), out
        status, _, err = self.runner("index", "remove", self.index, max(self.items))
        assert status == 2 and "locked for writing" in err and "deephash serve" in err, err


def start_service(command: list[str], index: Path, run: Path, log: Path, env: dict[str, str] | None, cwd: Path | None,
                  *extra: Any) -> tuple[subprocess.Popen, str]:
    """``command serve INDEX --run RUN`` on a free loopback port; returns once /healthz answers."""
    port = free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen([*command, "serve", str(index), "--run", str(run), "--host", "127.0.0.1",
                                 "--port", str(port), *map(str, extra)], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"deephash serve exited with {proc.returncode}: {log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return proc, base
        time.sleep(0.25)
    proc.kill()
    pytest.fail(f"deephash serve did not answer /healthz within 120 s: {log.read_text()[-3000:]}")
