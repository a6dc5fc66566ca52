"""Encoding a run's data: codes (hash models) or embeddings, cached per model, written as code files."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deephash._io import atomic_savez
from deephash.config import Config
from deephash.retrieval.codes import pack_codes, save_codes
from deephash.runs.data import load_split, source_dataset
from deephash.runs.layout import CODES_DIR, MODEL_FILE
from deephash.runs.model_file import is_hash_model, load_run
from deephash.train.distributed import Strategy, current_strategy

__all__ = ["encode", "encode_run", "encode_sharded", "encode_split", "encode_split_with_rerank", "encode_with_rerank"]


@torch.inference_mode()
def encode_with_rerank(model: nn.Module, dataset: Any, batch_size: int = 1024, device: str | torch.device | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Codes (hash model) or embeddings of every image of ``dataset``, in order, and the model's
    re-rank vectors (``model.rerank``) from the same pass.

    Args:
        model: a RetrievalModel; put in eval mode here.
        dataset: an ``ArrayDataset`` (uint8 images ``(N, C, H, W)``, int64 targets).
        batch_size: images per forward pass.
        device: where to run; default the model's device.

    Returns:
        ``(codes, labels, vectors)``: packed uint8 ``(N, ceil(bits/8))`` for a hash model, else
        float32 embeddings ``(N, D)``; int64 labels ``(N,)``; float16 ``(N, D_r)`` re-rank vectors,
        or None when the model keeps none.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval().to(device)
    outputs, vectors = [], []
    pass_of = getattr(model, "encode_with_rerank", None)
    for start in range(0, len(dataset), batch_size):
        x = dataset.data[start:start + batch_size].to(device).float().div_(255)
        out, vec = pass_of(x) if pass_of is not None else (model(x), None)
        outputs.append(out.float().cpu())
        if vec is not None:
            vectors.append(vec.to(torch.float16).cpu())
    out = torch.cat(outputs) if outputs else torch.empty(0, getattr(model, "embedding_dim", 0))
    labels = dataset.targets.numpy().astype(np.int64)
    kept = torch.cat(vectors).numpy() if vectors else None
    if is_hash_model(model):
        return pack_codes(out), labels, kept
    return out.numpy().astype(np.float32), labels, kept


def encode(model: nn.Module, dataset: Any, batch_size: int = 1024,
           device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`encode_with_rerank` without the re-rank vectors: ``(codes or embeddings, labels)``."""
    codes, labels, _ = encode_with_rerank(model, dataset, batch_size, device)
    return codes, labels


def encode_sharded(model: nn.Module, dataset: Any, strategy: Strategy | None = None, batch_size: int = 1024
                   ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """:func:`encode_with_rerank` with the work split over the processes of ``strategy``: rank 0
    gets the whole result in dataset order, the other ranks ``(None, None, None)``."""
    strategy = strategy or current_strategy()
    return strategy.map_shards(len(dataset), lambda part: encode_with_rerank(
        model, dataset if len(part) == len(dataset) else dataset.subset(torch.arange(part.start, part.stop)),
        batch_size))


def _model_digest(run_dir: Path) -> str:
    digest = hashlib.sha256()
    with open(run_dir / MODEL_FILE, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def encode_split(run_dir: str | os.PathLike, model: nn.Module, config: Config, split: str,
                 dataset: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`encode` of one split of a run's data, cached in ``run_dir/codes/SPLIT.npz``.

    The cache records the SHA-256 of ``model.pt``; a cache written by another model (a retrained
    or resumed run) is ignored and replaced, so ``evaluate``, ``index build`` and ``report`` encode
    each split once per model. Written atomically, read with ``allow_pickle=False``.

    Returns:
        ``(codes, labels)`` as :func:`encode` returns them.
    """
    codes, labels, _ = encode_split_with_rerank(run_dir, model, config, split, dataset)
    return codes, labels


def encode_split_with_rerank(run_dir: str | os.PathLike, model: nn.Module, config: Config, split: str,
                             dataset: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`encode_split` with the split's re-rank vectors float16 ``(N, D_r)`` (None when the model
    keeps none), from one read of the same cache."""
    run_dir = Path(run_dir)
    stamp = _model_digest(run_dir)
    cache = run_dir / CODES_DIR / f"{split}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as stored:
                if str(stored["model_sha256"]) == stamp:
                    return stored["codes"], stored["labels"], stored["rerank"] if "rerank" in stored.files else None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # a stale or torn cache is simply rebuilt
    dataset = dataset if dataset is not None else load_split(config, split, run_dir)
    codes, labels, vectors = encode_with_rerank(model, dataset)
    extra = {"rerank": vectors} if vectors is not None else {}
    atomic_savez(cache, codes=codes, labels=labels, model_sha256=np.str_(stamp), **extra)
    return codes, labels, vectors


def encode_run(run_dir: str | os.PathLike, split: str | None = None, images: str | os.PathLike | None = None,
               out: str | os.PathLike = "codes.npz") -> Path:
    """Encode a split (or an image folder) with a run's model and write a code file.

    A hash model writes the code file of the retrieval contract (``codes`` packed uint8,
    ``labels``, ``bits``, the items' ``ids`` = their positions in the split or folder, and for a
    folder each image's ``paths`` relative to it); an embedding model writes ``embeddings``
    float32 ``(N, D)`` with the same ``labels``, ``ids`` and ``paths``.
    """
    run_dir = Path(run_dir)
    model, config = load_run(run_dir)
    dataset = source_dataset(config, run_dir, split, images)
    codes, labels, vectors = encode_sharded(model, dataset)
    if codes is None:  # another rank of a distributed job: rank 0 writes
        return Path(out)
    out = Path(out)
    extra: dict[str, np.ndarray] = {"ids": np.arange(len(labels), dtype=np.int64)}
    if images is not None and dataset.paths is not None:
        root = Path(images)
        extra["paths"] = np.array([Path(p).relative_to(root).as_posix() if Path(p).is_relative_to(root) else str(p)
                                   for p in dataset.paths])
    if is_hash_model(model):
        save_codes(out, codes, labels, model.bits, **extra, rerank=vectors)
    else:
        atomic_savez(out, embeddings=codes, labels=labels, **extra)
    return out
