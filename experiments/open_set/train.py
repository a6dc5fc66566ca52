"""Issue-16 research runs: train a 48-bit hash model with contrastive terms, measure open set,
closed set and near-duplicates.

Loss (all on the tanh codes u = tanh(W f) of the 48-bit hash head, two augmented views per image):
    w_sup  * SupCon(u, labels, t_sup)            supervised contrastive over both views
  + w_inst * NT-Xent(u, instance ids, t_inst)    instance term (SimCLR / CIBHash style)
  + w_ce   * CE(aux(f), labels)                  auxiliary classifier on the backbone features
  + w_q    * mean((|u| - 1)^2)                   quantisation
Codes = sign(W f). Re-rank vectors for near-duplicates: the 48-d pre-sign head output (float16,
96 bytes) or the backbone features.

Run (one thread): PYTHONPATH=src OMP_NUM_THREADS=1 python experiments/open_set/train.py --mode open --epochs 6 ...
Each run appends one JSON line to experiments/open_set/results/runs.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import (Timer, augment, eval_open_codes, eval_open_real, itq_rotation, load_fmnist, near_dup_queries, near_dup_recall_codes,  # noqa: E402
                    near_dup_recall_real, near_dup_recall_rerank, open_split, to_jsonable)

from deephash.losses import hash_centers  # noqa: E402
from deephash.losses.contrastive import supcon_loss, view_ids  # noqa: E402
from deephash.models.posterior_codes import posterior_path_codes  # noqa: E402
from deephash.models import build_model  # noqa: E402
from deephash.retrieval.codes import pack_codes  # noqa: E402
from deephash.retrieval.metrics import evaluate_codes  # noqa: E402
from deephash.signs import sign  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--mode", choices=["open", "closed"], default="open")
p.add_argument("--epochs", type=float, default=4)
p.add_argument("--subset", type=int, default=0, help="train on this many random training images (0: all)")
p.add_argument("--batch", type=int, default=256)
p.add_argument("--lr", type=float, default=4e-3)
p.add_argument("--wd", type=float, default=5e-4)
p.add_argument("--w-sup", type=float, default=1.0)
p.add_argument("--t-sup", type=float, default=0.2)
p.add_argument("--w-inst", type=float, default=0.0)
p.add_argument("--t-inst", type=float, default=0.2)
p.add_argument("--w-ce", type=float, default=0.0)
p.add_argument("--w-q", type=float, default=0.0)
p.add_argument("--w-pix", type=float, default=0.0, help="pixel-similarity distillation weight")
p.add_argument("--t-pix", type=float, default=0.1, help="temperature of the pixel-similarity target")
p.add_argument("--t-pix-student", type=float, default=0.2)
p.add_argument("--views", type=int, default=2)
p.add_argument("--beta-end", type=float, default=1.0, help="continuation: u = tanh(beta a), beta linear from 1 to this over training")
p.add_argument("--proj", type=int, default=0, help="contrastive terms on an MLP projection (48 -> proj -> proj) of the codes (SimCLR style)")
p.add_argument("--w-bal", type=float, default=0.0, help="bit balance + decorrelation of u over the batch")
p.add_argument("--ste", action="store_true", help="contrastive terms see sign(u) forward, tanh gradient backward (straight-through)")
p.add_argument("--shift", type=int, default=2)
p.add_argument("--jitter", type=float, default=0.2)
p.add_argument("--noise", type=float, default=0.05)
p.add_argument("--erase", type=float, default=0.0)
p.add_argument("--scale", type=float, default=0.0)
p.add_argument("--flip", type=float, default=0.0, help="horizontal flip probability of a training view")
p.add_argument("--head-input", choices=["fc", "map", "both"], default="fc",
               help="the hash head reads the fc features, the flattened last feature map, or both concatenated")
p.add_argument("--width", type=int, default=24)
p.add_argument("--fc", type=int, default=512)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--tag", default="")
p.add_argument("--no-neardup", action="store_true")
p.add_argument("--eval-float", action="store_true", help="also rank the float 48-d head outputs (Euclidean, open set)")
p.add_argument("--eval-feats", action="store_true", help="also rank the 512-d fc features and the flattened last feature map (open set)")
p.add_argument("--save", default="", help="save the model state to this path")
args = p.parse_args()

torch.set_num_threads(1)
torch.manual_seed(args.seed)
g = torch.Generator().manual_seed(args.seed + 1000)
d = load_fmnist()
if args.mode == "open":
    o = open_split(d)
    xtrain, ytrain = o["xtrain"], o["ytrain"]
else:
    xtrain, ytrain = d["xtr"], d["ytr"]
if args.subset:
    keep = torch.randperm(len(xtrain), generator=torch.Generator().manual_seed(args.seed))[: args.subset]
    xtrain, ytrain = xtrain[keep], ytrain[keep]

model = build_model({"backbone": "fmnist-cnn",
                     "backbone_params": {"width": args.width, "depth": [1, 1, 2], "fc": args.fc, "pool_first": True},
                     "head": "hash", "bits": 48, "aux_classes": 10 if args.w_ce > 0 else None})
proj = (torch.nn.Sequential(torch.nn.Linear(48, args.proj), torch.nn.BatchNorm1d(args.proj), torch.nn.ReLU(), torch.nn.Linear(args.proj, args.proj))
        if args.proj else torch.nn.Identity())
if args.head_input != "fc":
    n_in = {"map": model.backbone.map_features, "both": model.backbone.map_features + args.fc}[args.head_input]
    model.head.linear = torch.nn.Linear(n_in, 48)


def head_in(x: torch.Tensor) -> torch.Tensor:
    f, m = model.backbone.forward_with_map(x)
    return {"fc": f, "map": m, "both": torch.cat([f, m], 1) if args.head_input == "both" else f}[args.head_input]


opt = torch.optim.AdamW(list(model.parameters()) + list(proj.parameters()), lr=args.lr, weight_decay=args.wd)
steps_per_epoch = len(xtrain) // args.batch
total = max(1, int(round(args.epochs * steps_per_epoch)))
warm = max(1, int(0.1 * total))


def lr_at(step: int) -> float:
    if step < warm:
        return args.lr * (step + 1) / warm
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


pix_mean = xtrain.mean(0, keepdim=True)
timer = Timer()
model.train()
step = 0
log = []
while step < total:
    perm = torch.randperm(len(xtrain), generator=g)
    for b in range(steps_per_epoch):
        if step >= total:
            break
        ib = perm[b * args.batch:(b + 1) * args.batch]
        x, y = xtrain[ib], ytrain[ib]
        views = [augment(x, g, args.shift, args.jitter, args.noise, args.erase, args.scale, args.flip) for _ in range(args.views)]
        xv, yv = torch.cat(views), y.repeat(args.views)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        feats = head_in(xv)
        beta = 1.0 + (args.beta_end - 1.0) * step / max(1, total - 1)
        u = torch.tanh(beta * model.head.linear(feats))
        loss = torch.zeros(())
        parts = {}
        uc = u + (sign(u) - u).detach() if args.ste else u
        uc = proj(uc)
        if args.w_sup:
            parts["sup"] = supcon_loss(uc, yv, args.t_sup)
            loss = loss + args.w_sup * parts["sup"]
        if args.w_inst:
            parts["inst"] = supcon_loss(uc, view_ids(len(x), args.views), args.t_inst)
            loss = loss + args.w_inst * parts["inst"]
        if args.w_ce:
            parts["ce"] = F.cross_entropy(model.aux(feats), yv)
            loss = loss + args.w_ce * parts["ce"]
        if args.w_pix:  # KL(pixel-space neighbour distribution || code-space one) over the batch, per view
            with torch.no_grad():
                px = F.normalize((x - pix_mean).flatten(1), dim=1)
                eye = torch.eye(len(x), dtype=torch.bool)
                target = torch.softmax((px @ px.T / args.t_pix).masked_fill(eye, float("-inf")), 1)
            kl = 0.0
            for v in range(args.views):
                z = F.normalize(u[v * len(x):(v + 1) * len(x)], dim=1)
                logq = torch.log_softmax((z @ z.T / args.t_pix_student).masked_fill(eye, float("-inf")), 1)
                kl = kl + (target * (target.clamp(min=1e-12).log() - logq.masked_fill(eye, 0.0))).sum(1).mean()
            parts["pix"] = kl / args.views
            loss = loss + args.w_pix * parts["pix"]
        if args.w_bal:
            cov = u.T @ u / len(u)
            parts["bal"] = u.mean(0).pow(2).mean() + (cov - torch.eye(u.shape[1])).pow(2).mean()
            loss = loss + args.w_bal * parts["bal"]
        if args.w_q:
            parts["q"] = ((u.abs() - 1) ** 2).mean()
            loss = loss + args.w_q * parts["q"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            msg = {k: round(float(v.detach()), 4) for k, v in parts.items()}
            print(f"step {step}/{total} loss {float(loss.detach()):.4f} {msg} {timer():.0f}s", flush=True)
        step += 1
train_s = timer()


@torch.no_grad()
def encode(x: torch.Tensor) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Packed sign codes, 48-d pre-sign head outputs, backbone features."""
    model.eval()
    hs, fs = [], []
    for i in range(0, len(x), 2000):
        f = head_in(x[i:i + 2000])
        hs.append(model.head.linear(f))
        fs.append(f)
    h, f = torch.cat(hs), torch.cat(fs)
    return pack_codes(h), h, f


CENTERS = hash_centers(10, 48, seed=0)


@torch.no_grad()
def posterior(x: torch.Tensor, temperature: float = 2.0) -> np.ndarray:
    """Packed codes of the shipped "posterior" rule (CSQ centers, softmax at T over the aux head)."""
    model.eval()
    out = [posterior_path_codes(model.aux(model.features(x[i:i + 2000])), CENTERS, temperature) for i in range(0, len(x), 2000)]
    return pack_codes(torch.cat(out))


res: dict = {"args": vars(args), "train_s": round(train_s, 1), "steps": total}
t2 = Timer()
if args.mode == "open":
    cq, hq, _ = encode(o["xq"])
    cdb, hdb, _ = encode(o["xdb"])
    res["open"] = eval_open_codes(cq, o["yq"], cdb, o["ydb"])
    print("open", res["open"], flush=True)
    # post-hoc code rules fitted on the training images' head outputs (seen classes only)
    _, htr, _ = encode(xtrain)
    mu = htr.mean(0)
    res["open_center"] = eval_open_codes(pack_codes(hq - mu), o["yq"], pack_codes(hdb - mu), o["ydb"])
    print("open centred sign", res["open_center"], flush=True)
    rot = itq_rotation(htr - mu).float()
    res["open_itq"] = eval_open_codes(pack_codes((hq - mu) @ rot), o["yq"], pack_codes((hdb - mu) @ rot), o["ydb"])
    print("open itq", res["open_itq"], flush=True)
    sat = (htr.tanh().abs() > 0.9).float().mean()
    res["saturated_share"] = float(sat)
    print("share of |tanh h| > 0.9 on train:", float(sat), flush=True)
    if args.eval_feats:
        with torch.no_grad():
            model.eval()
            for name, x_ in (("q", o["xq"]), ("db", o["xdb"])):
                pairs = [model.backbone.forward_with_map(x_[i:i + 2000]) for i in range(0, len(x_), 2000)]
                res.setdefault("_f", {})[name] = (torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs]))
        fq, mq = res["_f"]["q"]
        fdb, mdb = res.pop("_f")["db"]
        res["open_fc"] = eval_open_real(fq, o["yq"], fdb, o["ydb"])
        res["open_map"] = eval_open_real(mq, o["yq"], mdb, o["ydb"])
        print("open fc", res["open_fc"], "map", res["open_map"], flush=True)
    if args.eval_float:
        res["open_float_h48"] = eval_open_real(hq, o["yq"], hdb, o["ydb"])
        print("open float h48", res["open_float_h48"], flush=True)
else:
    cq, _, _ = encode(d["xte"])
    cdb, _, _ = encode(d["xtr"])
    r = evaluate_codes(cq, d["yte"].numpy(), cdb, d["ytr"].numpy(), 48, ks=(100,), knn_k=10)
    res["closed"] = {"mAP@all": r["mAP@all/tie-aware"], "kNN": r["kNN-acc@10"], "mAP@100": r["mAP@100/tie-aware"]}
    print("closed", res["closed"], flush=True)
    if args.w_ce:  # the shipped config's posterior code rule on this model's aux classifier
        pq, pdb = posterior(d["xte"]), posterior(d["xtr"])
        r = evaluate_codes(pq, d["yte"].numpy(), pdb, d["ytr"].numpy(), 48, ks=(100,), knn_k=10)
        res["closed_posterior"] = {"mAP@all": r["mAP@all/tie-aware"], "kNN": r["kNN-acc@10"], "mAP@100": r["mAP@100/tie-aware"]}
        print("closed posterior T=2", res["closed_posterior"], flush=True)
if not args.no_neardup:
    call, hall, fall = encode(d["xtr"])
    pall = posterior(d["xtr"]) if args.mode == "closed" and args.w_ce else None
    idx, pert = near_dup_queries(d["xtr"], 500, 0)
    nd = {}
    for name, xq in pert.items():
        c, h, f = encode(xq)
        nd[name] = {"codes": near_dup_recall_codes(c, call, idx, 48),
                    "rerank-h48-fp16(96B)": near_dup_recall_rerank(c, call, h.half(), hall.half(), idx, 48, 1000),
                    "h48-exhaustive": near_dup_recall_real(h, hall, idx),
                    "feat-exhaustive": near_dup_recall_real(f, fall, idx)}
        if args.mode == "closed" and args.w_ce:
            pc = posterior(xq)
            nd[name]["posterior-codes"] = near_dup_recall_codes(pc, pall, idx, 48)
            nd[name]["posterior+rerank-h48(1000)"] = near_dup_recall_rerank(pc, pall, h.half(), hall.half(), idx, 48, 1000)
            nd[name]["posterior+rerank-h48(10000)"] = near_dup_recall_rerank(pc, pall, h.half(), hall.half(), idx, 48, 10000)
        print("neardup", name, {k: tuple(round(v, 3) for v in vals) for k, vals in nd[name].items()}, flush=True)
    res["neardup"] = nd
res["eval_s"] = round(t2(), 1)
if args.save:
    torch.save(model.state_dict(), args.save)
out = Path(__file__).with_name("results") / "runs.jsonl"
out.parent.mkdir(exist_ok=True)
with out.open("a") as fh:
    fh.write(json.dumps(to_jsonable(res)) + "\n")
print(f"train {train_s:.0f}s eval {res['eval_s']:.0f}s")
