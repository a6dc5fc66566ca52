"""``deephash index add / remove / info``: change a saved index in place, durably and atomically.

Each command takes the index's write lock (refused while a writing server or another command
holds it), writes one journal record for the whole batch (so it is applied completely or not at
all), folds it into a new snapshot and releases the lock. Images of added items (from a folder,
a split or an upload) are stored as ``INDEX/items/<id>.png``, which the service shows. Items added
from a folder (or a code file that names its files) keep their paths in the index's ``paths``
column when the index keeps one. New ids start at the index's id mark (``next_id``), so an id is
never handed out twice; a failed fold warns and leaves the change in the journal (see
:mod:`deephash.retrieval.living`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deephash.data.photos import ImageFolder
from deephash.errors import CodeLengthError, DeephashError
from deephash.retrieval.codes import load_codes
from deephash.retrieval.item_images import ITEM_IMAGES, drop_item_images, item_image_path, save_item_image  # noqa: F401 (re-exported)
from deephash.retrieval.journal import JOURNAL_FILE, read_journal
from deephash.retrieval.living import LivingIndex
from deephash.runs.data import load_split, source_dataset
from deephash.runs.encoding import encode_items, encode_split_with_rerank, write_skipped
from deephash.runs.indexing import index_info, load_index
from deephash.runs.model_file import is_hash_model, load_run

__all__ = ["ITEM_IMAGES", "add_items", "index_status", "item_image_path", "open_living", "parse_ids", "remove_items",
           "save_item_image"]

def open_living(index_dir: str | os.PathLike, holder: str = "deephash index", fold_every: int = 1000) -> LivingIndex:
    """Open an index folder for writing (its lock taken); close it with ``.close()``."""
    return LivingIndex(index_dir, fold_every=fold_every, holder=holder).open()


def parse_ids(values: list[str] | None = None, ids_file: str | os.PathLike | None = None) -> np.ndarray:
    """Item ids from arguments and/or a file (whitespace- or comma-separated integers): int64 ``(n,)``."""
    words = list(values or [])
    if ids_file is not None:
        words += Path(ids_file).read_text(encoding="utf-8").replace(",", " ").split()
    try:
        return np.array([int(w) for w in words], dtype=np.int64)
    except ValueError as error:
        raise DeephashError(f"ids must be integers: {error}") from None


def _class_map(source: list[str], target: list[str], where: str) -> np.ndarray:
    """Label translation from one class list to another, by name."""
    missing = [name for name in source if name not in target]
    if missing:
        raise DeephashError(f"class {missing[0]!r} of {where} is not one of the index's classes ({', '.join(target)})")
    return np.array([target.index(name) for name in source], dtype=np.int64)


def add_items(index_dir: str | os.PathLike, run_dir: str | os.PathLike | None = None,
              images: str | os.PathLike | None = None, split: str | None = None,
              codes: str | os.PathLike | None = None, ids: np.ndarray | None = None,
              new_ids: bool = False) -> np.ndarray:
    """Add a folder of images, a split or a code file to an index, in one atomic change.

    Args:
        index_dir: the index folder.
        run_dir: the run whose model built the index (needed to encode ``images`` or ``split``;
            with ``codes`` it is only checked).
        images: a folder with one sub-folder per class (class names mapped to the index's), or
            a flat folder of unlabelled images; streamed, files that do not decode left out (and
            listed in ``INDEX/added.skipped.txt``).
        split: a split of the run's data set.
        codes: a code file (``deephash encode``); its ids are used unless ``new_ids``.
        ids: int64 ``(n,)`` ids to give the items; default: from the index's ``next_id`` on (ids
            never handed out before).
        new_ids: ignore a code file's ids.

    Returns:
        int64 ``(n,)`` the new items' ids.

    Raises:
        DuplicateIdError: an id is already there (nothing is written). IndexLockedError: another
        writer holds the index. CodeLengthError: the run or the code file has another code length.
    """
    if sum(x is not None for x in (images, split, codes)) != 1:
        raise DeephashError("give exactly one of images, split and codes")
    index_dir = Path(index_dir)
    probe = load_index(index_dir)
    meta = probe.metadata if isinstance(probe.metadata, dict) else {}
    index_classes = list(meta.get("classes") or [])
    pictures: Any = None
    paths: list[str] | None = None
    if codes is not None:
        code_set = load_codes(codes)
        if code_set.bits != probe.bits:
            raise CodeLengthError(f"code file {codes} holds {code_set.bits}-bit codes but index {index_dir} holds {probe.bits}-bit codes")
        packed, labels, vectors = code_set.codes, code_set.labels, code_set.rerank
        if ids is None and not new_ids:
            ids = code_set.ids
        paths = code_set.full_paths()  # joined to the folder they were encoded from, as `index build` keeps them
        if run_dir is not None:
            _checked_model(run_dir, probe.bits, index_dir)
    else:
        if run_dir is None:
            raise DeephashError("adding images or a split needs --run, the run whose model built the index")
        model, config = _checked_model(run_dir, probe.bits, index_dir)
        run_dir = Path(run_dir)
        if split is not None:
            dataset = load_split(config, split, run_dir)
            packed, labels, vectors = encode_split_with_rerank(run_dir, model, config, split, dataset)
            kept = np.arange(len(labels))
        else:
            dataset = source_dataset(config, run_dir, None, images)
            packed, labels, vectors, kept = encode_items(model, dataset, num_workers=config.data.num_workers)
            if index_classes and dataset.classes:
                labels = _class_map(list(dataset.classes), index_classes, str(images))[labels]
            if isinstance(dataset, ImageFolder) and not dataset.labelled:
                labels = None
            write_skipped(dataset, Path(index_dir) / "added")
        # as `index build` keeps them: the path of every encoded item
        paths = [str(dataset.paths[i]) for i in kept.tolist()] if dataset.paths is not None else None
        # the added items' pictures: an in-memory array, or decoded one at a time from a photo folder
        pictures = dataset.data.numpy() if isinstance(dataset.data, torch.Tensor) else (
            dataset.data[i].numpy() for i in kept.tolist())
    labels = None if labels is None or (probe.labels is None and probe.ntotal) else labels
    paths = None if probe.paths is None and probe.ntotal else paths  # an index built without paths stays without
    if probe.ntotal and probe.rerank_vectors is None:
        vectors = None  # an index built without re-rank vectors stays without them
    elif probe.rerank_vectors is not None and vectors is None:
        raise DeephashError(f"index {index_dir} keeps re-rank vectors, but {codes or run_dir} gives none: encode with "
                            "the run's model (its model.rerank) instead")
    living = open_living(index_dir, holder="deephash index add")
    try:
        def store_images(new: np.ndarray) -> None:
            stale = [i for i in new.tolist() if item_image_path(index_dir, i).exists()]
            drop_item_images(index_dir, np.array(stale, dtype=np.int64))
            if pictures is not None:
                for ident, picture in zip(new.tolist(), pictures):
                    save_item_image(index_dir, ident, picture, durable=False)
                os.sync()  # the images are on disk before the journal record that makes them visible

        return living.add(packed, ids=ids, labels=labels, paths=paths, before=store_images, rerank=vectors)
    finally:
        living.close(fold=True)


def _checked_model(run_dir: str | os.PathLike, bits: int, index_dir: Path) -> tuple[Any, Any]:
    model, config = load_run(run_dir)
    if not is_hash_model(model):
        raise DeephashError(f"{run_dir} holds an embedding model; a Hamming index needs the hash model that built it")
    if model.bits != bits:
        raise CodeLengthError(f"{run_dir} makes {model.bits}-bit codes but index {index_dir} holds {bits}-bit codes")
    return model, config


def remove_items(index_dir: str | os.PathLike, ids: np.ndarray) -> np.ndarray:
    """Remove items by id in one atomic change; every id must be present (else nothing is removed).

    Returns:
        int64 ``(n,)`` the removed ids.
    """
    living = open_living(index_dir, holder="deephash index remove")
    try:
        removed = living.remove(ids)
        drop_item_images(index_dir, removed)  # the removal is durable: their images are only garbage now
    finally:
        living.close(fold=True)
    return removed


def index_status(index_dir: str | os.PathLike) -> dict[str, Any]:
    """:func:`~deephash.runs.index_info` plus the count (``items``), the id range (``ids``), the id
    mark (``next_id``: the id the next add gets by default; no id below it is ever handed out
    again), when it last changed (``changed``: the last add or remove, else when it was built) and
    how many journal records wait to be folded (``journal``, only when some do)."""
    index = load_index(index_dir)
    info = index_info(index_dir)
    ids = index.ids
    status: dict[str, Any] = {"items": len(index),
                              "ids": f"{int(ids.min())} .. {int(ids.max())}" if len(ids) else "(none)",
                              "next_id": index.next_id,
                              "changed": index.changed or _created(index_dir)}
    pending = len(read_journal(Path(index_dir) / JOURNAL_FILE).records)
    if pending:
        status["journal"] = f"{pending} records not yet folded into the snapshot"
    return {**{k: v for k, v in info.items() if k not in status}, **status}


def _created(index_dir: str | os.PathLike) -> str:
    import json

    try:
        return str(json.loads((Path(index_dir) / "meta.json").read_text(encoding="utf-8")).get("created", "unknown"))
    except (OSError, ValueError):
        return "unknown"
