"""Train only a re-rank head on a trained run's frozen backbone and measure near-duplicate recall.

The head's input (``features`` or ``map``), size, stage epochs and temperature vary; everything
else is the run's. Uses the library's own stage (``deephash.runs.rerank_head.train_rerank_head``)
and protocol (``deephash.runs.evaluation.near_duplicate_recall``): the issue's perturbation with
seed 0, and crop 0.85 + JPEG quality 50-80 with seed 1.

Run: PYTHONPATH=src python experiments/open_set/rerank_head_probe.py RUN map 64 --epochs 4 --temperature 0.1
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from deephash.models import build_model, channels_last_on_cpu
from deephash.runs import load_run, load_split
from deephash.runs.encoding import encode_with_rerank
from deephash.runs.evaluation import near_duplicate_recall
from deephash.runs.rerank_head import train_rerank_head

p = argparse.ArgumentParser()
p.add_argument("run")
p.add_argument("source", choices=["features", "map"])
p.add_argument("dim", type=int)
p.add_argument("--epochs", type=int, default=2)
p.add_argument("--temperature", type=float, default=0.2)
p.add_argument("--threads", type=int, default=1)
args = p.parse_args()
torch.set_num_threads(args.threads)
model, config = load_run(args.run)
spec = dataclasses.replace(config.model, rerank="instance", rerank_source=args.source, rerank_dim=args.dim)
head = dataclasses.replace(config.rerank_head, epochs=args.epochs, temperature=args.temperature)
config = dataclasses.replace(config, model=spec, rerank_head=head)
torch.manual_seed(0)
probe = build_model(spec)
probe.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("rerank_head")}, strict=False)
probe = channels_last_on_cpu(probe)
out = Path(f"/tmp/rerank-probe-{args.source}-{args.dim}-{args.epochs}-{args.temperature}")
out.mkdir(exist_ok=True)
tic = time.perf_counter()
train_rerank_head(config, probe, load_split(config, "train", args.run, training=True), torch.device("cpu"), out, progress=False)
stage_s = time.perf_counter() - tic
database = load_split(config, "train", args.run)
codes, _, vectors = encode_with_rerank(probe, database)
crop_jpeg = {"seed": 1, "shift": 0, "crop": 0.85, "brightness": 0.0, "contrast": 0.0, "noise": 0.0, "jpeg_quality": [50, 80]}
for name, change in {"issue": {}, "crop+jpeg": crop_jpeg}.items():
    settings = dataclasses.replace(config.eval.near_duplicates, n=500, **change)
    result = near_duplicate_recall(probe, database, codes, settings, db_vectors=vectors, shortlist=config.eval.rerank_shortlist)
    line = {"run": args.run, **vars(args), "perturbation": name, "stage_s": round(stage_s, 1),
            **{k: round(v, 4) for k, v in result.items() if k != "protocol"}}
    print(json.dumps(line), flush=True)
    with (Path(__file__).with_name("results") / "rerank_head_probe.jsonl").open("a") as fh:
        fh.write(json.dumps(line) + "\n")
