"""Issue-26 baselines: label-free 48-bit codes of Fashion-MNIST by linear hashes, scored by the library.

Every row fits a linear hash (``deephash.models.fit_linear_hash``: SimHash, PCA hashing, ITQ) on
the 60,000 training images without their labels, encodes the test images (queries) and the
training images (database) and scores them with ``evaluate_codes`` (tie-aware mAP@all, relevant =
same class): on the raw pixels in [0, 1], and on an untrained network's 512-d features and last
map (the fashion-mnist-unlabelled-48 backbone at its initial weights, seed 0; the map
square-rooted and L2-normalised as the pca code rule does).

Usage: ``PYTHONPATH=src OMP_NUM_THREADS=1 python experiments/unlabelled/baselines.py [--bits 48]``;
prints a Markdown table and appends one JSON line per row to ``results/baselines.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from deephash.config import load_config
from deephash.data import load_dataset
from deephash.models import build_model, fit_linear_hash, linear_hash_codes, pca_rows
from deephash.retrieval.codes import pack_codes
from deephash.retrieval.metrics import evaluate_codes


@torch.no_grad()
def untrained_sources(images: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """The shipped unlabelled config's network at its initial weights: features (N, 512) and the
    square-rooted, L2-normalised last map of uint8 images."""
    config = load_config("fashion-mnist-unlabelled-48")
    torch.manual_seed(seed)
    spec = config.model
    spec.in_channels = 1
    model = build_model(spec).eval()
    pairs = [model.features_and_map(images[i:i + 1024].float().div_(255)) for i in range(0, len(images), 1024)]
    return {"features": torch.cat([f for f, _ in pairs]), "map": pca_rows(torch.cat([m for _, m in pairs]), 0.5)}


def score(train: torch.Tensor, query: torch.Tensor, yq: torch.Tensor, yd: torch.Tensor, bits: int,
          method: str, seed: int) -> dict[str, float]:
    """Fit on ``train`` (also the database) without labels; tie-aware mAP@all and kNN accuracy."""
    mean, projection = fit_linear_hash(train, bits, method, seed)
    q = pack_codes(linear_hash_codes(query, mean, projection))
    d = pack_codes(linear_hash_codes(train, mean, projection))
    m = evaluate_codes(q, yq.numpy(), d, yd.numpy(), bits, ks=[1000], knn_k=10)
    return {"mAP@all": m["mAP@all/tie-aware"], "mAP@1000": m["mAP@1000/tie-aware"], "kNN@10": m["kNN-acc@10"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tr, te = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    sources = {"pixels": (tr.data.flatten(1).float() / 255, te.data.flatten(1).float() / 255)}
    untrained_tr, untrained_te = untrained_sources(tr.data, args.seed), untrained_sources(te.data, args.seed)
    for name in ("features", "map"):
        sources[f"untrained {name}"] = (untrained_tr[name], untrained_te[name])
    print("| source | method | mAP@all | mAP@1000 | kNN@10 | seconds |\n|---|---|---:|---:|---:|---:|")
    for source, (train, query) in sources.items():
        for method in ("simhash", "pca", "itq"):
            start = time.perf_counter()
            row = score(train, query, te.targets, tr.targets, args.bits, method, args.seed)
            row.update(source=source, method=method, bits=args.bits, seed=args.seed, seconds=round(time.perf_counter() - start, 1))
            print(f"| {source} | {method} | {row['mAP@all']:.4f} | {row['mAP@1000']:.4f} | {row['kNN@10']:.4f} | "
                  f"{row['seconds']} |", flush=True)
            with (Path(__file__).with_name("results") / "baselines.jsonl").open("a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
