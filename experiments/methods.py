"""Benchmark: hashing methods side by side on Fashion-MNIST, every cell through `deephash train`.

Each cell is the shipped config ``fashion-mnist-{bits}`` with ``--set`` overrides
(printed with the results), trained into ``OUT/{bits}-{method}`` and evaluated as `deephash
evaluate` does: the 10,000 test images against the 60,000 training images, Hamming ranking.
Methods other than ``recipe`` drop the auxiliary classifier (and with it the ``posterior`` code
rule: their codes are the sign of the hash head) and the loss settings of the recipe,
and train for ``--epochs`` epochs with the recipe's backbone, data, optimizer and schedule, so
that only the loss (and its selector) differs between them.

``dtsh-ramp`` is DTSH on all triplets with the quantization weight ramped from 1 to 16 over the
epochs (per bit; the seed fork's best finding); ``dtsh-ramp-<selector>`` the same with another
selector. ``triplet-sign`` trains an embedding head of ``bits`` dimensions with the online
triplet loss and semihard negatives; its sign is the hash code, and the same embeddings ranked by
Euclidean distance give the real-valued baseline.

Usage: ``python experiments/methods.py --bits 48 --methods dtsh-semihard,dsh,csq --epochs 2 [--out DIR]``;
prints a Markdown table (rows appended to ``OUT/results.jsonl`` as they finish; a rerun skips cells
already there).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from deephash.config import load_config
from deephash.runs import encode_split, evaluate_run, load_run, load_split, train_run
from deephash.retrieval.codes import pack_codes
from deephash.retrieval.metrics import evaluate_codes

ROOT = Path(__file__).resolve().parents[1]
SELECTORS = ["all", "hardest", "random", "semihard", "batch-hard"]
PLAIN = ["model.aux_classes=0", "train.aux_weight=0.0", 'model.code_rule="sign"']
METHODS = ["recipe", "csq", "dsh", *(f"dtsh-{s}" for s in SELECTORS), "dtsh-ramp",
           *(f"dtsh-ramp-{s}" for s in SELECTORS[1:]), "triplet-sign"]


def overrides(method: str, bits: int, epochs: int) -> list[str]:
    """``--set`` overrides that turn the recipe config into ``method``."""
    if method == "recipe":
        return []
    common = PLAIN + [f"train.epochs={epochs}"]
    if method == "csq":
        return common + ['loss.name="csq"', "loss.params={quantization_weight=1e-4}"]
    if method == "dsh":
        return common + ['loss.name="dsh"', "loss.params={}"]
    if method.startswith("dtsh-"):
        # dtsh-<selector>: λ = 1; dtsh-ramp[-<selector>] (all triplets by default): the seed fork's
        # schedule, quantization weight 1 -> 16, read per bit, because our λ multiplies the sum over
        # bits of (b − u)² where DeepHash-pytorch's and the fork's multiply the mean over bits
        rest = method.removeprefix("dtsh-")
        ramp = rest == "ramp" or rest.startswith("ramp-")
        selector = rest.removeprefix("ramp").removeprefix("-") if ramp else rest
        selector = selector or "all"
        if selector not in SELECTORS:
            raise SystemExit(f"unknown selector in {method!r}; known: {', '.join(SELECTORS)}")
        # the selector's margin is DTSH's α converted by the library (deephash.losses.margins: 4α = bits)
        margin: list[str] = []
        schedule = [f"schedules=[{{attribute=\"quantization_weight\",start={1 / bits!r},end={16 / bits!r}}}]"] if ramp else []
        return common + ['loss.name="dtsh"', "loss.params={}", f'selector.name="{selector}"'] + margin + schedule
    if method == "triplet-sign":
        return common + ['model.head="embedding"', f"model.embedding_dim={bits}", 'loss.name="online-triplet"',
                         "loss.params={margin=1.0}", 'selector.name="semihard"']
    raise SystemExit(f"unknown method {method!r}")


def train_time(run: Path) -> float:
    """Seconds of training: the sum of the epochs' times in metrics.jsonl."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return sum(r["seconds"] for r in records if r.get("type") == "epoch")


def sign_metrics(run: Path) -> dict:
    """Metrics of the sign of an embedding model's outputs as hash codes."""
    model, config = load_run(run)
    encoded = {}
    for split in (config.data.query_split, config.data.database_split):
        embeddings, labels = encode_split(run, model, config, split, load_split(config, split, run))
        encoded[split] = (pack_codes(np.asarray(embeddings)), labels)
    (q, ql), (db, dbl) = encoded[config.data.query_split], encoded[config.data.database_split]
    return evaluate_codes(q, ql, db, dbl, model.embedding_dim, ks=config.eval.ks, radius=config.eval.radius,
                          knn_k=config.eval.knn_k, splits=(config.data.query_split, config.data.database_split))


def row(metrics: dict, knn_k: int = 10, radius: int = 2) -> dict:
    """The table's columns from an evaluate_codes / evaluate_embeddings dict (no ball for real values)."""
    keys = {"mAP tie-aware": "mAP@all/tie-aware", "mAP stable": "mAP@all/stable",
            "mAP@1000": "mAP@1000/tie-aware", "P@100": "P@100/tie-aware",
            f"P@r≤{radius}": f"P@r<={radius}", "kNN acc": f"kNN-acc@{knn_k}"}
    # real-valued metrics have one key per measure (distinct float distances: both tie rules agree)
    return {name: metrics.get(key, metrics.get(key.split("/")[0])) for name, key in keys.items()}


def run_cell(bits: int, method: str, epochs: int, out: Path) -> list[dict]:
    config_name = f"fashion-mnist-{bits}"  # a shipped config
    sets = overrides(method, bits, epochs)
    run = out / f"{bits}-{method}"
    if run.exists():
        shutil.rmtree(run)
    train_run(load_config(config_name, sets), run, progress=False)
    seconds = train_time(run)
    command = f"deephash train {config_name} " + " ".join(f"--set '{s}'" for s in sets)
    base = {"bits": bits, "method": method, "train_s": round(seconds), "command": command}
    result = evaluate_run(run)
    if method == "triplet-sign":
        return [{**base, **row(sign_metrics(run))},
                {**base, "method": "real-valued (same run, Euclidean)", **row(result["metrics"])}]
    return [{**base, **row(result["metrics"])}]


def fmt(value) -> str:
    return "—" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", default="48", help="comma-separated code lengths")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epochs", type=int, default=2, help="epochs of every method but the recipe")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "methods")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    done = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    for bits in (int(b) for b in args.bits.split(",")):
        for method in args.methods.split(","):
            if any(r["bits"] == bits and r["method"] == method for r in done):
                continue
            for record in run_cell(bits, method, args.epochs, args.out):
                done.append(record)
                with results.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(json.dumps(record), flush=True)
    columns = ["bits", "method", "mAP tie-aware", "mAP stable", "mAP@1000", "P@100", "P@r≤2", "kNN acc", "train_s"]  # noqa: RUF001
    print("| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns))
    for r in done:
        print("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
