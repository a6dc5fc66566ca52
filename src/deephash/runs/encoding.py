"""Encoding a run's data: codes (hash models) or embeddings, cached per model, written as code files."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deephash._io import atomic_savez, atomic_write_text
from deephash.data.photos import ImageFolder, StreamLoader
from deephash.config import Config
from deephash.retrieval.codes import pack_codes, save_codes
from deephash.runs.data import load_split, source_dataset
from deephash.runs.layout import CODES_DIR, MODEL_FILE
from deephash.runs.model_file import is_hash_model, load_run
from deephash.train.distributed import Strategy, current_strategy

__all__ = ["PHOTO_BATCH", "encode", "encode_items", "encode_resumable", "encode_run", "encode_sharded", "encode_split",
           "encode_split_with_rerank", "encode_with_rerank", "model_digest", "write_skipped"]


#: Images per forward pass when encoding a photo folder (decoded uint8 batches of 224 px photos are ~19 MB per 128).
PHOTO_BATCH = 128


def _forward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One encoding pass on float images: (head output float32 on the CPU, float16 re-rank vectors or None)."""
    pass_of = getattr(model, "encode_with_rerank", None)
    out, vec = pass_of(x) if pass_of is not None else (model(x), None)
    return out.float().cpu(), None if vec is None else vec.to(torch.float16).cpu()


def _finish(model: nn.Module, outputs: list[torch.Tensor], vectors: list[torch.Tensor]
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """The passes' outputs joined: packed codes (hash model) or float32 embeddings, and the vectors."""
    kept = torch.cat(vectors).numpy() if vectors else None
    if not outputs:  # no image (none decoded): rows of the right width, none of them
        if is_hash_model(model):
            return np.zeros((0, (int(model.bits) + 7) // 8), dtype=np.uint8), kept
        return np.zeros((0, int(getattr(model, "embedding_dim", 0))), dtype=np.float32), kept
    out = torch.cat(outputs)
    return (pack_codes(out) if is_hash_model(model) else out.numpy().astype(np.float32)), kept


@torch.inference_mode()
def encode_items(model: nn.Module, dataset: Any, batch_size: int | None = None, device: str | torch.device | None = None,
                 num_workers: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """:func:`encode_with_rerank` that also says which items the rows are.

    An in-memory data set is encoded whole; a photo folder (:class:`~deephash.data.photos.ImageFolder`)
    is decoded in ``num_workers`` processes, and a file that does not decode is left out (recorded
    in ``dataset.bad_files``), so its rows are fewer than its items.

    Returns:
        ``(codes, labels, vectors, positions)``: as :func:`encode_with_rerank`, plus int64
        ``(n,)`` each row's position in ``dataset``.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval().to(device)
    outputs, vectors = [], []
    if isinstance(dataset, ImageFolder):
        labels, positions = [], []
        for batch in StreamLoader.sequential(dataset, batch_size or PHOTO_BATCH, device, num_workers).decoded():
            if len(batch.images) == 0:  # every file of the batch failed
                continue
            out, vec = _forward(model, batch.images.float().div_(255))
            outputs.append(out)
            vectors += [] if vec is None else [vec]
            labels.append(batch.labels.cpu())
            positions.append(batch.positions)
        label_array = torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64)
        position_array = torch.cat(positions).numpy() if positions else np.zeros(0, dtype=np.int64)
    else:
        batch_size = batch_size or 1024
        for start in range(0, len(dataset), batch_size):
            out, vec = _forward(model, dataset.data[start:start + batch_size].to(device).float().div_(255))
            outputs.append(out)
            vectors += [] if vec is None else [vec]
        label_array = dataset.targets.numpy()
        position_array = np.arange(len(dataset), dtype=np.int64)
    codes, kept = _finish(model, outputs, vectors)
    return codes, label_array.astype(np.int64), kept, position_array


def encode_with_rerank(model: nn.Module, dataset: Any, batch_size: int | None = None,
                       device: str | torch.device | None = None, num_workers: int = 0
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Codes (hash models) or embeddings of every image of ``dataset``, in order, and the model's
    re-rank vectors (``model.rerank``) from the same pass.

    Args:
        model: a RetrievalModel; put in eval mode here.
        dataset: an ``ArrayDataset`` (uint8 images ``(N, C, H, W)``, int64 targets), or a photo
            folder (decoded in ``num_workers`` processes; files that fail are left out).
        batch_size: images per forward pass (default 1024, or :data:`PHOTO_BATCH` for photos).
        device: where to run; default the model's device.
        num_workers: decoding processes for a photo folder.

    Returns:
        ``(codes, labels, vectors)``: packed uint8 ``(N, ceil(bits/8))`` for a hash model, else
        float32 embeddings ``(N, D)``; int64 labels ``(N,)``; float16 ``(N, D_r)`` re-rank vectors,
        or None when the model keeps none.
    """
    codes, labels, vectors, _ = encode_items(model, dataset, batch_size, device, num_workers)
    return codes, labels, vectors


def encode(model: nn.Module, dataset: Any, batch_size: int | None = None,
           device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`encode_with_rerank` without the re-rank vectors: ``(codes or embeddings, labels)``."""
    codes, labels, _ = encode_with_rerank(model, dataset, batch_size, device)
    return codes, labels


def encode_sharded(model: nn.Module, dataset: Any, strategy: Strategy | None = None, batch_size: int | None = None,
                   num_workers: int = 0, with_positions: bool = False) -> tuple[np.ndarray | None, ...]:
    """:func:`encode_with_rerank` with the work split over the processes of ``strategy``: rank 0
    gets the whole result in dataset order, the other ranks ``(None, None, None)``. With
    ``with_positions`` each result has a fourth array, :func:`encode_items`'s positions."""
    strategy = strategy or current_strategy()

    def shard(part: range) -> tuple[np.ndarray | None, ...]:
        subset = dataset if len(part) == len(dataset) else dataset.subset(torch.arange(part.start, part.stop))
        codes, labels, vectors, positions = encode_items(model, subset, batch_size, num_workers=num_workers)
        return codes, labels, vectors, positions + part.start

    out = strategy.map_shards(len(dataset), shard)
    return out if with_positions else out[:3]


def _listing_digest(dataset: ImageFolder) -> str:
    """SHA-256 of a photo folder's listing: each item's relative path, size and label."""
    digest = hashlib.sha256()
    for path, relative, label in zip(dataset.paths, dataset.relative_paths, dataset.targets.tolist()):
        digest.update(f"{relative}\t{os.path.getsize(path)}\t{label}\n".encode("utf-8"))
    digest.update(f"{dataset.shape} {dataset.crop_fraction}".encode())
    return digest.hexdigest()


@torch.inference_mode()
def encode_resumable(model: nn.Module, dataset: ImageFolder, work_dir: str | os.PathLike, model_sha256: str,
                     batch_size: int = PHOTO_BATCH, num_workers: int = 0, progress: bool = True
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """:func:`encode_items` of a photo folder that survives being killed: every batch's rows are
    written atomically to ``work_dir/chunk-NNNNNN.npz`` as soon as they are encoded, and a rerun
    with the same model (``model_sha256``), the same listing and the same ``batch_size`` encodes
    only the batches missing (another model or listing starts afresh). A tqdm bar shows images,
    rate and ETA. The caller deletes ``work_dir`` once the result is saved.

    Returns:
        ``(codes, labels, vectors, positions)`` as :func:`encode_items`; the files that failed
        (in this run or the interrupted one) are in ``dataset.bad_files``.
    """
    from tqdm.auto import tqdm

    work_dir = Path(work_dir)
    manifest = {"model_sha256": model_sha256, "listing_sha256": _listing_digest(dataset), "batch_size": int(batch_size),
                "items": len(dataset)}
    manifest_file = work_dir / "manifest.json"
    try:
        same = json.loads(manifest_file.read_text(encoding="utf-8")) == manifest
    except (OSError, ValueError):
        same = False
    if not same:
        if work_dir.is_dir():
            for stale in work_dir.glob("chunk-*.npz"):
                stale.unlink()
        work_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(manifest_file, json.dumps(manifest, indent=1) + "\n")
    n = len(dataset)
    ranges = [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    chunk = [work_dir / f"chunk-{k:06d}.npz" for k in range(len(ranges))]
    todo = [k for k in range(len(ranges)) if not chunk[k].is_file()]
    device = next(model.parameters()).device
    model.eval()
    bar = tqdm(total=n, initial=n - sum(len(ranges[k]) for k in todo), unit="img", desc="encoding",
               disable=not progress, smoothing=0.1)
    loader = StreamLoader(dataset, [ranges[k] for k in todo], device, num_workers=num_workers)
    try:
        for k, batch in zip(todo, loader.decoded()):
            out, vec = _forward(model, batch.images.float().div_(255)) if len(batch.images) else (None, None)
            codes, kept = _finish(model, [] if out is None else [out], [] if vec is None else [vec])
            extra = {} if kept is None else {"rerank": kept}
            failed_paths = np.array([dataset.paths[f.index] for f in batch.failures], dtype=str)
            failed_reasons = np.array([f.reason for f in batch.failures], dtype=str)
            atomic_savez(chunk[k], codes=codes, labels=batch.labels.cpu().numpy(), positions=batch.positions.numpy(),
                         failed_paths=failed_paths, failed_reasons=failed_reasons, **extra)
            bar.update(len(ranges[k]))
    finally:
        bar.close()
    parts = []
    for path in chunk:
        with np.load(path, allow_pickle=False) as stored:
            parts.append({name: stored[name] for name in stored.files})
        for failed, reason in zip(parts[-1]["failed_paths"].tolist(), parts[-1]["failed_reasons"].tolist()):
            dataset.bad_files.add(failed, reason)
    if not parts:
        codes, vectors = _finish(model, [], [])
        return codes, np.zeros(0, dtype=np.int64), vectors, np.zeros(0, dtype=np.int64)
    with_vectors = [p["rerank"] for p in parts if "rerank" in p]  # a chunk of failures alone has none
    vectors = np.concatenate(with_vectors) if with_vectors else None
    return (np.concatenate([p["codes"] for p in parts]), np.concatenate([p["labels"] for p in parts]).astype(np.int64),
            vectors, np.concatenate([p["positions"] for p in parts]).astype(np.int64))


def model_digest(run_dir: Path) -> str:
    """SHA-256 (hex) of ``run_dir/model.pt``."""
    digest = hashlib.sha256()
    with open(run_dir / MODEL_FILE, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def encode_split(run_dir: str | os.PathLike, model: nn.Module, config: Config, split: str,
                 dataset: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`encode` of one split of a run's data, cached in ``run_dir/codes/SPLIT.npz``.

    The cache records the SHA-256 of ``model.pt`` (and a photo folder's listing); a cache written
    by another model (a retrained or resumed run) or of a folder changed since is ignored and
    replaced, so ``evaluate``, ``index build`` and ``report`` encode each split once per model. Written atomically, read with ``allow_pickle=False``.

    Returns:
        ``(codes, labels)`` as :func:`encode` returns them.
    """
    codes, labels, _ = encode_split_with_rerank(run_dir, model, config, split, dataset)
    return codes, labels


def encode_split_with_rerank(run_dir: str | os.PathLike, model: nn.Module, config: Config, split: str,
                             dataset: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`encode_split` with the split's re-rank vectors float16 ``(N, D_r)`` (None when the model
    keeps none), from one read of the same cache.

    A photo folder's items that do not decode have no row; the ``dataset`` passed in is then
    narrowed in place to the items that have one (:meth:`ImageFolder.keep`), so its images stay
    aligned with the rows (the report's pictures, the near-duplicate queries). A photo folder's
    cache also records its listing (:func:`_listing_digest`: each file's relative path, size and
    label, taken before any narrowing): a folder changed since is encoded again. The files left out
    are listed in ``RUN_DIR/codes/SPLIT.npz.skipped.txt`` (:func:`write_skipped`)."""
    run_dir = Path(run_dir)
    stamp = model_digest(run_dir)
    cache = run_dir / CODES_DIR / f"{split}.npz"
    if dataset is None and config.data.dataset == "folder":
        dataset = load_split(config, split, run_dir)
    listing = _listing_digest(dataset) if isinstance(dataset, ImageFolder) else ""
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as stored:
                cached_listing = str(stored["listing_sha256"]) if "listing_sha256" in stored.files else ""
                if str(stored["model_sha256"]) == stamp and cached_listing == listing:
                    if "positions" in stored.files and isinstance(dataset, ImageFolder):
                        dataset.keep(stored["positions"])
                    return stored["codes"], stored["labels"], stored["rerank"] if "rerank" in stored.files else None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # a stale or torn cache is simply rebuilt
    dataset = dataset if dataset is not None else load_split(config, split, run_dir)
    extra: dict[str, np.ndarray] = {}
    if isinstance(dataset, ImageFolder):
        codes, labels, vectors, positions = encode_items(model, dataset, num_workers=config.data.num_workers)
        write_skipped(dataset, cache)  # RUN_DIR/codes/SPLIT.npz.skipped.txt: the files that have no row
        dataset.keep(positions)
        extra["positions"] = positions
        extra["listing_sha256"] = np.str_(listing)
    else:
        codes, labels, vectors = encode_with_rerank(model, dataset, num_workers=config.data.num_workers)
    if vectors is not None:
        extra["rerank"] = vectors
    atomic_savez(cache, codes=codes, labels=labels, model_sha256=np.str_(stamp), **extra)
    return codes, labels, vectors


def encode_run(run_dir: str | os.PathLike, split: str | None = None, images: str | os.PathLike | None = None,
               out: str | os.PathLike = "codes.npz", labelled: bool | None = None) -> Path:
    """Encode a split (or a photo folder) with a run's model and write a code file.

    A hash model writes the code file of the retrieval contract (``codes`` packed uint8,
    ``labels`` (-1 for an unlabelled folder), ``bits``, the items' ``ids`` = their positions in the
    split or folder listing, and for a folder each image's ``paths`` relative to it and that folder, ``root``); an embedding
    model writes ``embeddings`` float32 ``(N, D)`` with the same ``labels``, ``ids`` and ``paths``.
    Files of a folder that do not decode are left out (no row) and listed in ``OUT.skipped.txt``.

    Args:
        labelled: for ``images``: see :func:`~deephash.data.images.list_image_folder` (None: a
            flat folder is unlabelled, one of sub-folders has a class per sub-folder).
    """
    run_dir = Path(run_dir)
    model, config = load_run(run_dir)
    dataset = source_dataset(config, run_dir, split, images, labelled)
    codes, labels, vectors, positions = encode_sharded(model, dataset, num_workers=config.data.num_workers,
                                                       with_positions=True)
    if codes is None:  # another rank of a distributed job: rank 0 writes
        return Path(out)
    out = Path(out)
    extra: dict[str, np.ndarray] = {"ids": positions.astype(np.int64)}
    if isinstance(dataset, ImageFolder):
        relative = dataset.relative_paths
        extra["paths"] = np.array([relative[i] for i in positions.tolist()], dtype=str)
        extra["root"] = str(Path(dataset.root).resolve())
        write_skipped(dataset, out)
    if is_hash_model(model):
        save_codes(out, codes, labels, model.bits, **extra, rerank=vectors)
    else:
        atomic_savez(out, embeddings=codes, labels=labels, **extra)
    return out


def write_skipped(dataset: Any, out: str | os.PathLike) -> Path | None:
    """``OUT.skipped.txt`` beside an output: the photo files left out (one ``path<TAB>reason`` line
    each); None (and no file, an earlier one removed) when none were."""
    bad = getattr(dataset, "bad_files", None)
    path = Path(out).with_name(Path(out).name + ".skipped.txt")
    if bad is None or not len(bad):
        path.unlink(missing_ok=True)  # an earlier run's list no longer holds
        return None
    bad.write(path)
    return path
