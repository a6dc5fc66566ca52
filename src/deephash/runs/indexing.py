"""``deephash index`` and ``deephash search``: a Hamming index of a run's codes, and queries against it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from deephash.errors import CodeLengthError, DeephashError, NotFoundError
from deephash.retrieval.codes import pack_codes
from deephash.retrieval.index import HashIndex
from deephash.retrieval.search import DEFAULT_SHORTLIST, search
from deephash.runs.data import query_images, source_dataset
from deephash.data.photos import ImageFolder
from deephash.runs.encoding import (PHOTO_BATCH, encode_resumable, encode_sharded, encode_split_with_rerank, model_digest,
                                     write_skipped)
from deephash.runs.model_file import is_hash_model, load_run
from deephash.train.distributed import current_strategy

__all__ = ["build_index", "index_info", "load_index", "search_run"]


def build_index(run_dir: str | os.PathLike, split: str | None = None, images: str | os.PathLike | None = None,
                out: str | os.PathLike = "index", factory: str = "BFlat", labelled: bool | None = None,
                progress: bool = False, batch_size: int = PHOTO_BATCH) -> Path:
    """Encode a split (or a photo folder) with a run's hash model and save a :class:`HashIndex`.

    The index metadata records the run and the source (split or folder); for folders the index
    keeps the path of every item (its ``paths`` column), so :func:`search_run` can name them, and
    the folder's own class names (its labels index them). A folder is encoded resumably: batches of
    ``batch_size`` codes go to ``OUT.partial/`` as they are made, so a build killed midway and
    run again encodes only what is missing and ends with the same index (see
    :func:`~deephash.runs.encoding.encode_resumable`); ``progress`` shows a bar. Files that do not
    decode are left out and listed in ``OUT.skipped.txt``; an unlabelled folder (``labelled``,
    see :func:`~deephash.data.images.list_image_folder`) makes an index without labels.
    """
    run_dir = Path(run_dir)
    model, config = load_run(run_dir)
    if not is_hash_model(model):
        raise DeephashError(f"{run_dir} holds an embedding model; a Hamming index needs a hash model (model.head = 'hash')")
    dataset = source_dataset(config, run_dir, split, images, labelled)
    strategy = current_strategy()
    out = Path(out)
    work_dir = out.with_name(out.name + ".partial")
    positions = None
    if images is None and strategy.world_size == 1:
        codes, labels, vectors = encode_split_with_rerank(run_dir, model, config, split, dataset)
    elif strategy.world_size == 1:
        codes, labels, vectors, positions = encode_resumable(model, dataset, work_dir, model_digest(run_dir), batch_size,
                                                             config.data.num_workers, progress)
    else:
        codes, labels, vectors, positions = encode_sharded(model, dataset, strategy, num_workers=config.data.num_workers,
                                                           with_positions=True)
    if codes is None:  # another rank of a distributed job: rank 0 writes
        return out
    metadata: dict[str, Any] = {
        "run": str(run_dir.resolve()),
        "source": f"images:{Path(images).resolve()}" if images is not None else f"split:{split}",
        # a folder's labels index its own class names; a split's, the run's
        "classes": list(dataset.classes or []) if images is not None
        else list(getattr(model, "classes", []) or dataset.classes or []),
    }
    paths = None
    if dataset.paths is not None:
        kept = positions.tolist() if positions is not None else range(len(dataset.paths))
        paths = [str(dataset.paths[i]) for i in kept]
    unlabelled = isinstance(dataset, ImageFolder) and not dataset.labelled
    index = HashIndex(model.bits, factory=factory, metadata=metadata)
    index.add(codes, labels=None if unlabelled else labels, rerank=vectors, paths=paths)
    index.save(out)
    if isinstance(dataset, ImageFolder):
        write_skipped(dataset, out)
        shutil.rmtree(work_dir, ignore_errors=True)
    return out


def load_index(index_dir: str | os.PathLike) -> HashIndex:
    """A saved :class:`HashIndex`.

    Raises:
        NotFoundError: no such directory.
    """
    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        raise NotFoundError(f"index directory {index_dir} does not exist")
    return HashIndex.load(index_dir)


def index_info(index_dir: str | os.PathLike) -> dict[str, Any]:
    """What an index holds: bits, items, factory, the run that made it, the source, the classes."""
    index = load_index(index_dir)
    meta = dict(index.metadata) if isinstance(index.metadata, dict) else {"model": index.metadata}
    info: dict[str, Any] = {"bits": index.bits, "items": len(index), "factory": index.factory}
    classes = meta.pop("classes", None)
    info.update(meta)
    if classes:
        info["classes"] = ", ".join(classes)
    if index.paths is not None:
        info["paths"] = f"{int((index.paths != '').sum())} image files"
    return info


def search_run(index_dir: str | os.PathLike, run_dir: str | os.PathLike, images: Sequence[str], k: int | None = 10,
               radius: int | None = None, shortlist: int = DEFAULT_SHORTLIST) -> list[dict[str, Any]]:
    """Encode query images with a run's model and look up their neighbours in an index.

    Args:
        index_dir: directory written by :func:`build_index`.
        run_dir: the run whose model built the index.
        images: image files, or ``SPLIT:N`` (item N of a split of the run's data set).
        k: at most this many results per query (None: no limit, with ``radius``).
        radius: only items within this Hamming distance (inclusive); see ``retrieval.search``.
        shortlist: first-stage size of a two-stage search, used when the model and the index keep
            re-rank vectors (``model.rerank``).

    Returns:
        One dict per query: ``query``, ``label``, ``class``, ``hits``: a list of ``{rank, id,
        distance, score, label, class, path}`` (``score`` the re-rank distance of a two-stage
        search, else None; ``path`` the item's image file, None when the index keeps no paths or
        the item has none).

    Raises:
        CodeLengthError: the run's code length differs from the index's.
    """
    run_dir = Path(run_dir)
    index = load_index(index_dir)
    model, config = load_run(run_dir)
    if not is_hash_model(model):
        raise DeephashError(f"{run_dir} holds an embedding model; search needs the hash model that built the index")
    if model.bits != index.bits:
        raise CodeLengthError(f"{run_dir} makes {model.bits}-bit codes but index {index_dir} holds {index.bits}-bit codes")
    queries, query_labels = query_images(config, run_dir, images)
    device = next(model.parameters()).device
    with torch.inference_mode():
        out, vectors = model.encode_with_rerank(queries.to(device).float().div_(255))
    codes = pack_codes(out.cpu())
    vectors = None if vectors is None else vectors.float().cpu().numpy()
    meta = index.metadata if isinstance(index.metadata, dict) else {}
    classes, paths = meta.get("classes") or getattr(model, "classes", []), index.paths
    labels = index.labels

    def class_of(label: int | None) -> str | None:
        return classes[label] if label is not None and 0 <= label < len(classes) else None  # -1: no class

    results = []
    for item, q_label, found in zip(images, query_labels, search(index, codes, k, radius, rerank=vectors,
                                                                    shortlist=shortlist)):
        hits = []
        scores = found.scores.tolist() if found.scores is not None else [None] * len(found)
        for rank, (distance, ident, pos, score) in enumerate(zip(found.distances.tolist(), found.ids.tolist(),
                                                                 found.positions.tolist(), scores), start=1):
            label = int(labels[pos]) if labels is not None and pos >= 0 else None
            hits.append({"rank": rank, "id": int(ident), "distance": int(distance),
                         "score": None if score is None else round(float(score), 4), "label": label,
                         "class": class_of(label), "path": (str(paths[pos]) or None) if paths is not None and pos >= 0 else None})
        results.append({"query": item, "label": q_label, "class": class_of(q_label), "hits": hits})
    return results
