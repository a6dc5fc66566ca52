"""Near-duplicate recall of a run under several perturbations, through the library's own protocol
(``deephash.runs.evaluation.near_duplicate_recall``: seeded perturbations of database images, the
original the one relevant item, codes alone and the two-stage search with the run's re-rank vectors).

Run: PYTHONPATH=src python experiments/open_set/neardup_suite.py RUN [--n 500]
Prints one JSON line per perturbation; appends them to results/neardup_suite.jsonl.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from deephash.runs import load_run, load_split
from deephash.runs.encoding import encode_split_with_rerank
from deephash.runs.evaluation import near_duplicate_recall

#: Perturbations, none of them the training augmentation: the issue's, a stronger photometric one,
#: crop + JPEG, and everything at once.
SUITE = {
    "issue (shift 1, brightness 0.1, contrast 0.1, noise 0.02)": {},
    "shift 2, brightness 0.15, contrast 0.25, noise 0.04": {"shift": 2, "brightness": 0.15, "contrast": 0.25, "noise": 0.04},
    "crop 0.85 + JPEG q 50-80": {"shift": 0, "crop": 0.85, "brightness": 0.0, "contrast": 0.0, "noise": 0.0, "jpeg_quality": [50, 80]},
    "shift 1, crop 0.9, brightness 0.1, contrast 0.1, noise 0.02, JPEG q 60-90": {"crop": 0.9, "jpeg_quality": [60, 90]},
}

p = argparse.ArgumentParser()
p.add_argument("run")
p.add_argument("--n", type=int, default=500)
args = p.parse_args()
model, config = load_run(args.run)
database = load_split(config, config.data.database_split, args.run)
codes, _, vectors = encode_split_with_rerank(args.run, model, config, config.data.database_split, database)
out = Path(__file__).with_name("results") / "neardup_suite.jsonl"
for name, change in SUITE.items():
    settings = dataclasses.replace(config.eval.near_duplicates, n=args.n, seed=1, **change)
    result = near_duplicate_recall(model, database, codes, settings, db_vectors=vectors, shortlist=config.eval.rerank_shortlist)
    line = {"run": str(args.run), "perturbation": name, **{k: round(v, 4) for k, v in result.items() if k != "protocol"}}
    print(json.dumps(line), flush=True)
    with out.open("a") as fh:
        fh.write(json.dumps(line) + "\n")
