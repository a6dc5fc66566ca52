"""Near-duplicate search with re-rank vectors on a saved closed-set model (issue 16).

Compares, per perturbation, recall@1/@10 of the original among all 60,000 train images for:
the model's 48-bit sign codes; a Hamming shortlist (sign codes, or the "posterior" rule's codes)
re-ranked by (a) the model's 48-d head output in float16 (96 bytes/item) or (b) a training-free
pixel descriptor: each image standardised (zero mean, unit std: brightness/contrast removed),
3x3 box-blurred, 2x2 average-pooled to 14x14 and stored as int8 (196 bytes/item).

Run: PYTHONPATH=src OMP_NUM_THREADS=1 python experiments/open_set/neardup_rerank.py MODEL.pt
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import load_fmnist, near_dup_queries, near_dup_recall_codes, near_dup_recall_real, near_dup_recall_rerank  # noqa: E402

from deephash.losses import hash_centers  # noqa: E402
from deephash.models import build_model  # noqa: E402
from deephash.models.posterior_codes import posterior_path_codes  # noqa: E402
from deephash.retrieval.codes import pack_codes  # noqa: E402


def pixel_descriptor(x: torch.Tensor) -> torch.Tensor:
    """int8 (N, 196): standardised, 3x3 box-blurred, 2x2-pooled image, scaled by 32 and clipped."""
    z = (x - x.mean((1, 2, 3), keepdim=True)) / x.std((1, 2, 3), keepdim=True).clamp(min=1e-6)
    z = F.avg_pool2d(F.avg_pool2d(z, 3, 1, 1, count_include_pad=False), 2)
    return (z.flatten(1) * 32).round().clamp(-127, 127).to(torch.int8)


torch.set_num_threads(1)
model = build_model({"backbone": "fmnist-cnn", "backbone_params": {"width": 24, "depth": [1, 1, 2], "fc": 512, "pool_first": True},
                     "head": "hash", "bits": 48, "aux_classes": 10})
model.load_state_dict(torch.load(sys.argv[1]))
model.eval()
centers = hash_centers(10, 48, seed=0)


@torch.no_grad()
def enc(x):
    hs, ps = [], []
    for i in range(0, len(x), 2000):
        f = model.features(x[i:i + 2000])
        hs.append(model.head.linear(f))
        ps.append(posterior_path_codes(model.aux(f), centers, 2.0))
    h = torch.cat(hs)
    return pack_codes(h), pack_codes(torch.cat(ps)), h


d = load_fmnist()
c_all, p_all, h_all = enc(d["xtr"])
desc_all = pixel_descriptor(d["xtr"])
idx, pert = near_dup_queries(d["xtr"], 500, 0)
out = {}
for name, xq in pert.items():
    c, p, h = enc(xq)
    dq = pixel_descriptor(xq)
    out[name] = {
        "sign-codes": near_dup_recall_codes(c, c_all, idx, 48),
        "posterior-codes": near_dup_recall_codes(p, p_all, idx, 48),
        "pixdesc-exhaustive(196B)": near_dup_recall_real(dq, desc_all, idx),
        "h48-exhaustive(96B)": near_dup_recall_real(h.half().float(), h_all.half().float(), idx),
        "sign-shortlist1000+pixdesc": near_dup_recall_rerank(c, c_all, dq, desc_all, idx, 48, 1000),
        "posterior-shortlist10000+pixdesc": near_dup_recall_rerank(p, p_all, dq, desc_all, idx, 48, 10000),
        "posterior-shortlist10000+h48": near_dup_recall_rerank(p, p_all, h.half(), h_all.half(), idx, 48, 10000),
    }
    print(name, {k: tuple(round(v, 3) for v in vals) for k, vals in out[name].items()}, flush=True)
Path(__file__).with_name("results").joinpath("neardup_rerank.json").write_text(json.dumps(out, indent=1))
