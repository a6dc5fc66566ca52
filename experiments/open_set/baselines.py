"""Issue-16 baselines measured by the same code: raw pixels (Euclidean) and 48-bit PCA hashing,
on the open-set split and on the near-duplicate protocol.

Run: PYTHONPATH=src OMP_NUM_THREADS=1 python experiments/open_set/baselines.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (PERTURBATIONS, Timer, eval_open_codes, eval_open_real, load_fmnist, near_dup_queries,  # noqa: E402
                    near_dup_recall_codes, near_dup_recall_real, open_split, pca_hash)

torch.set_num_threads(1)
d = load_fmnist()
o = open_split(d)
out: dict = {}
t = Timer()
out["open/raw-pixels"] = eval_open_real(o["xq"].flatten(1), o["yq"], o["xdb"].flatten(1), o["ydb"])
print("raw", out["open/raw-pixels"], f"{t():.0f}s", flush=True)
enc = pca_hash(o["xtrain"], 48)
out["open/pca48-seen"] = eval_open_codes(enc(o["xq"]), o["yq"], enc(o["xdb"]), o["ydb"])
print("pca", out["open/pca48-seen"], f"{t():.0f}s", flush=True)
idx, pert = near_dup_queries(d["xtr"], 500, 0)
enc_all = pca_hash(d["xtr"], 48)
db_codes = enc_all(d["xtr"])
for name, xq in pert.items():
    out[f"neardup/{name}/raw-pixels"] = near_dup_recall_real(xq.flatten(1), d["xtr"].flatten(1), idx)
    out[f"neardup/{name}/pca48"] = near_dup_recall_codes(enc_all(xq), db_codes, idx, 48)
    print(name, out[f"neardup/{name}/raw-pixels"], out[f"neardup/{name}/pca48"], f"{t():.0f}s", flush=True)
Path(__file__).with_name("results").joinpath("baselines.json").write_text(json.dumps(out, indent=1))
