"""Issue-26 probe: which label-free code rule of a network trained without labels retrieves best.

For each run (a ``deephash train`` directory), one pass of the trained network over its training
images (fitting, without labels) and its query and database splits, then 48-bit codes by: the
sign of the hash head (``sign``), and PCA hashing / ITQ (``fit_linear_hash``) of the 512-d
features and of the last map, each row first power-normalised and L2-normalised as the ``pca`` /
``itq`` code rules do (``pca_rows``, power 1 for the features, 0.5 for the map). Scored by
``evaluate_codes``: tie-aware mAP@all and kNN accuracy, relevant = same class.

Usage: ``python experiments/unlabelled/code_rule_probe.py RUN [RUN ...] [--rules sign "itq features" ...]``; prints a Markdown table
and appends one JSON line per run to ``results/code_rule_probe.jsonl``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from deephash.models import fit_linear_hash, linear_hash_codes, pca_rows, sign_codes
from deephash.retrieval.codes import pack_codes
from deephash.retrieval.metrics import evaluate_codes
from deephash.runs import load_run, load_split

RULES = ("sign", "pca features", "itq features", "pca map", "itq map")


@torch.no_grad()
def sources(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Head outputs (N, bits), normalised features (N, F) and square-rooted normalised map of uint8 images."""
    out: dict[str, list[torch.Tensor]] = {"head": [], "features": [], "map": []}
    for i in range(0, len(images), 1024):
        feats, mapped = model.features_and_map(images[i:i + 1024].float().div_(255))
        out["head"].append(model.head(feats))
        out["features"].append(pca_rows(feats, 1.0))
        out["map"].append(pca_rows(mapped, 0.5))
    return {k: torch.cat(v) for k, v in out.items()}


def probe(run: Path, rules: tuple[str, ...] = RULES) -> dict:
    model, config = load_run(run, device="cpu")
    model.eval()
    train = load_split(config, config.data.train_split, run, training=True)  # its labels are never read
    query = load_split(config, config.data.query_split, run)
    database = load_split(config, config.data.database_split, run)
    st, sq = sources(model, train.data), sources(model, query.data)
    same = config.data.database_split == config.data.train_split and len(database) == len(train)
    sd = st if same else sources(model, database.data)  # the database is the training images: one pass
    bits = config.model.bits
    out = {"run": str(run), "seed": config.seed, "labels": config.data.labels}
    for rule in rules:
        if rule == "sign":
            q, d = sign_codes(sq["head"]), sign_codes(sd["head"])
        else:
            method, source = rule.split()
            mean, projection = fit_linear_hash(st[source], bits, method, config.seed)
            q, d = linear_hash_codes(sq[source], mean, projection), linear_hash_codes(sd[source], mean, projection)
        m = evaluate_codes(pack_codes(q), query.targets.numpy(), pack_codes(d), database.targets.numpy(), bits, ks=[1000],
                           knn_k=config.eval.knn_k)
        out[rule] = {"mAP@all": m["mAP@all/tie-aware"], "kNN": m[f"kNN-acc@{config.eval.knn_k}"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    args = parser.parse_args()
    rules = tuple(args.rules)
    torch.set_num_threads(1)
    print("| run | seed | " + " | ".join(f"{r} mAP / kNN" for r in rules) + " |")
    print("|---|---:|" + "---|" * len(rules))
    for run in args.runs:
        row = probe(run, rules)
        cells = " | ".join(f"{row[r]['mAP@all']:.4f} / {row[r]['kNN']:.4f}" for r in rules)
        print(f"| {run.name} | {row['seed']} | {cells} |", flush=True)
        with (Path(__file__).with_name("results") / "code_rule_probe.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
