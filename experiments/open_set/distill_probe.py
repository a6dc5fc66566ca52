"""Issue-16 probe: 48-bit codes from the last feature map of a trained, frozen open-set model.

The open-set model's flattened last feature map (96 x 7 x 7 = 4704 floats) ranks the unseen classes
far better (Euclidean: mAP@all 0.744, kNN 0.969 at seed 0) than its 48-d hash head (0.675 / 0.943)
or its codes (0.662 / 0.907): the contrastive loss squeezes the map through a 48-d projection that
was fitted to the seen classes. This probe keeps the backbone and asks which 48-bit projection of
the map keeps most of it, fitted on the seen classes' training images only:

  * ``pca``: sign of the top-48 principal components of the centred map (PCA hashing);
  * ``pca-itq``: the same after an ITQ rotation;
  * ``distill``: a linear map -> 48 trained so that the codes' in-batch similarity distribution
    matches the map's (KL of row softmaxes, cosine similarities, teacher temperature ``--tau-t``,
    student ``--tau-s``), on tanh(beta * a) with beta rising 1 -> ``--beta-end`` (continuation),
    started from the PCA projection.

Run: PYTHONPATH=src OMP_NUM_THREADS=1 python experiments/open_set/distill_probe.py MODEL.pt
(MODEL.pt from ``train.py --save``). Appends one JSON line to results/distill_probe.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import Timer, eval_open_codes, eval_open_real, itq_rotation, load_fmnist, open_split, to_jsonable  # noqa: E402

from deephash.models import build_model  # noqa: E402
from deephash.retrieval.codes import pack_codes  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--width", type=int, default=24)
p.add_argument("--fc", type=int, default=512)
p.add_argument("--epochs", type=float, default=10)
p.add_argument("--batch", type=int, default=512)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--tau-t", type=float, default=0.05)
p.add_argument("--tau-s", type=float, default=0.2)
p.add_argument("--beta-end", type=float, default=5.0)
p.add_argument("--normalize", action="store_true", help="L2-normalise the map before centring (teacher = cosine)")
p.add_argument("--variants", default="map", help="comma list of feature transforms to PCA-hash: map, map-l2, map-sqrt-l2, fc, fc-l2")
p.add_argument("--no-float", action="store_true", help="skip the exhaustive float ranking of each variant")
p.add_argument("--random-init", action="store_true", help="use the untrained network (a baseline)")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--tag", default="")
args = p.parse_args()
torch.set_num_threads(1)
torch.manual_seed(args.seed)

model = build_model({"backbone": "fmnist-cnn",
                     "backbone_params": {"width": args.width, "depth": [1, 1, 2], "fc": args.fc, "pool_first": True},
                     "head": "hash", "bits": 48})
if not args.random_init:
    model.load_state_dict(torch.load(args.model, weights_only=True))
model.eval()
o = open_split(load_fmnist())


@torch.no_grad()
def both(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [model.backbone.forward_with_map(x[i:i + 2000]) for i in range(0, len(x), 2000)]
    return torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs])


def transform(name: str, f: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    if name.startswith("cat"):  # the normalised map and the normalised fc features side by side
        return torch.cat([F.normalize(m, dim=1), F.normalize(f, dim=1)], 1)
    base = m if name.startswith("map") else f
    if "sqrt" in name:
        base = base.clamp(min=0).sqrt()
    return F.normalize(base, dim=1) if name.endswith("l2") else base


def pca_codes(tr: torch.Tensor, q: torch.Tensor, db: torch.Tensor) -> dict:
    mu_ = tr.mean(0)
    xc_ = tr - mu_
    _, vecs = torch.linalg.eigh(xc_.T @ xc_ / len(xc_))
    w_ = vecs[:, -48:].flip(1)
    out = {"pca": eval_open_codes(pack_codes((q - mu_) @ w_), o["yq"], pack_codes((db - mu_) @ w_), o["ydb"])}
    rot_ = itq_rotation(xc_ @ w_).float()
    out["pca-itq"] = eval_open_codes(pack_codes((q - mu_) @ w_ @ rot_), o["yq"],
                                     pack_codes((db - mu_) @ w_ @ rot_), o["ydb"])
    return out


timer = Timer()
(ftr, mtr0), (fq, mq0), (fdb, mdb0) = both(o["xtrain"]), both(o["xq"]), both(o["xdb"])
res: dict = {"args": vars(args), "encode_s": round(timer(), 1)}
for name in args.variants.split(","):
    tr, q, db = (transform(name, f, m) for f, m in ((ftr, mtr0), (fq, mq0), (fdb, mdb0)))
    if not args.no_float:
        res[f"{name}/float"] = eval_open_real(q, o["yq"], db, o["ydb"])
    for k, v in pca_codes(tr, q, db).items():
        res[f"{name}/{k}"] = v
    print(name, {k: {m_: round(x, 4) for m_, x in v.items()} for k, v in res.items() if k.startswith(name + "/")}, flush=True)

mtr, mq, mdb = (transform("map-l2" if args.normalize else "map", f, m) for f, m in ((ftr, mtr0), (fq, mq0), (fdb, mdb0)))
mu = mtr.mean(0)
xc = mtr - mu
evals, evecs = torch.linalg.eigh(xc.T @ xc / len(xc))
pca = evecs[:, -48:].flip(1)  # (D, 48), largest first


def codes(w: torch.Tensor, b: torch.Tensor | None = None) -> tuple:
    def enc(m: torch.Tensor):
        a = (m - mu) @ w + (0 if b is None else b)
        return pack_codes(a)
    return enc(mq), enc(mdb)


# distillation: codes' in-batch similarity distribution -> the map's
w = torch.nn.Parameter(pca / (xc @ pca).std(0))  # PCA directions, unit variance per bit
b = torch.nn.Parameter(torch.zeros(48))
opt = torch.optim.Adam([w, b], lr=args.lr)
steps = int(args.epochs * len(xc) // args.batch)
if steps == 0:
    out = Path(__file__).with_name("results") / "distill_probe.jsonl"
    with out.open("a") as fh:
        fh.write(json.dumps(to_jsonable(res)) + "\n")
    sys.exit(0)
g = torch.Generator().manual_seed(args.seed)
tn = F.normalize(xc, dim=1)
timer = Timer()
for step in range(steps):
    idx = torch.randint(len(xc), (args.batch,), generator=g)
    beta = 1 + (args.beta_end - 1) * step / max(1, steps - 1)
    for group in opt.param_groups:
        group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / steps))
    t = tn[idx]
    eye = torch.eye(args.batch, dtype=torch.bool)
    target = torch.softmax((t @ t.T / args.tau_t).masked_fill(eye, float("-inf")), 1)
    u = F.normalize(torch.tanh(beta * (xc[idx] @ w + b)), dim=1)
    logq = torch.log_softmax((u @ u.T / args.tau_s).masked_fill(eye, float("-inf")), 1).masked_fill(eye, 0.0)
    loss = (target * (target.clamp(min=1e-12).log() - logq)).sum(1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 200 == 0:
        print(f"step {step}/{steps} kl {float(loss.detach()):.4f} {timer():.0f}s", flush=True)
res["distill_s"] = round(timer(), 1)
with torch.no_grad():
    cq, cdb = codes(w.detach(), b.detach())
res["distill"] = eval_open_codes(cq, o["yq"], cdb, o["ydb"])
print("distill", res["distill"], flush=True)
out = Path(__file__).with_name("results") / "distill_probe.jsonl"
with out.open("a") as fh:
    fh.write(json.dumps(to_jsonable(res)) + "\n")
