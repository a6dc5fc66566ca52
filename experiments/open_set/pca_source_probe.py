"""Issue-16 probe: what the ``pca`` code rule of a finished open-set run should project.

For each run (a ``deephash train fashion-mnist-open-48`` directory), the trained network's sources
on the run's own splits (fitted on its training images, the seen classes; ranked: its queries
against its database, the unseen classes), each PCA-hashed to the run's bits with the library's
``pca_projection`` / ``pca_codes`` (which L2-normalise the rows) and scored by ``evaluate_codes``:

* ``map``: the last feature map (the shipped ``code_source = "map"``);
* ``map-sqrt``: its element-wise square root first (power normalisation of the ReLU map);
* ``features``: the fully connected layer's features (``code_source = "features"``);
* ``cat``: the L2-normalised map and the L2-normalised features side by side.

Usage: ``python experiments/open_set/pca_source_probe.py RUN [RUN ...]``; prints a Markdown table
and appends one JSON line per run to ``results/pca_source_probe.jsonl``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from deephash.models import pca_codes, pca_projection
from deephash.retrieval.codes import pack_codes
from deephash.retrieval.metrics import evaluate_codes
from deephash.runs import load_run, load_split

SOURCES = {
    "map": lambda f, m: m,
    "map-sqrt": lambda f, m: m.clamp(min=0).sqrt(),
    "features": lambda f, m: f,
    "cat": lambda f, m: torch.cat([F.normalize(m, dim=1), F.normalize(f, dim=1)], 1),
}


@torch.no_grad()
def sources(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, F) and last map (N, D) of uint8 images, one pass, in batches."""
    pairs = [model.features_and_map(images[i:i + 1024].float().div_(255)) for i in range(0, len(images), 1024)]
    return torch.cat([f for f, _ in pairs]), torch.cat([m for _, m in pairs])


def probe(run: Path) -> dict:
    model, config = load_run(run)
    model.eval()
    train = load_split(config, config.data.train_split, run, training=True)
    query = load_split(config, config.data.query_split, run)
    database = load_split(config, config.data.database_split, run)
    (ft, mt), (fq, mq), (fd, md) = sources(model, train.data), sources(model, query.data), sources(model, database.data)
    bits = config.model.bits
    out = {"run": str(run), "seed": config.seed}
    for name, make in SOURCES.items():
        mean, projection = pca_projection(make(ft, mt).split(4096), bits)
        q = pack_codes(pca_codes(make(fq, mq), mean, projection))
        d = pack_codes(pca_codes(make(fd, md), mean, projection))
        m = evaluate_codes(q, query.targets.numpy(), d, database.targets.numpy(), bits, ks=[100], knn_k=config.eval.knn_k)
        out[name] = {"mAP@all": m["mAP@all/tie-aware"], "kNN": m[f"kNN-acc@{config.eval.knn_k}"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    print("| run | seed | " + " | ".join(f"{s} mAP / kNN" for s in SOURCES) + " |")
    print("|---|---:|" + "---|" * len(SOURCES))
    for run in args.runs:
        row = probe(run)
        cells = " | ".join(f"{row[s]['mAP@all']:.4f} / {row[s]['kNN']:.4f}" for s in SOURCES)
        print(f"| {run.name} | {row['seed']} | {cells} |", flush=True)
        with (Path(__file__).with_name("results") / "pca_source_probe.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
