"""Probe: the 48-bit Fashion-MNIST recipe's choices one at a time, outside the run machinery.

A bare training loop (no checkpoints, no logging) over the same pieces as `deephash train`:
`FMnistCNN`, a linear hash head with tanh, `CSQLoss`, an auxiliary cross-entropy head, batched
crop + flip for the first ``aug`` epochs, AdamW with a per-step warm-up + cosine rate. It prints
what explains tie-aware mAP@all on this protocol: test accuracy of the auxiliary head, training
accuracy, and the share of training images (the database) whose code is exactly, or nearest to,
their class's center. BENCHMARKS.md lists the probes run and what they showed.

Usage: ``python bench/recipe_probe.py width=24 fc=512 epochs=7 aug=0 lr=3e-3``  (key=value pairs;
see DEFAULTS).
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from deephash.data import load_dataset
from deephash.data.augment import build_augment
from deephash.losses.hashing import CSQLoss
from deephash.models.backbones import FMnistCNN
from deephash.retrieval.codes import pack_codes
from deephash.retrieval.metrics import mean_average_precision

DEFAULTS = dict(width=24, depth="1,2,2", fc=512, epochs=7, aug=0, lr=3e-3, wd=5e-4, bs=128, warm=0.1,
                aux=0.5, bits=48, seed=0, q=1e-4)
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics


def parse(argv: list[str]) -> dict:
    args = dict(DEFAULTS)
    for item in argv:
        key, value = item.split("=", 1)
        if key not in args:
            raise SystemExit(f"unknown key {key!r}; known: {', '.join(DEFAULTS)}")
        args[key] = type(DEFAULTS[key])(value)
    return args


def main() -> None:
    a = parse(sys.argv[1:])
    torch.set_num_threads(2)
    torch.manual_seed(a["seed"])
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    x_train, y_train = train.data.float().div_(255), train.targets
    x_test, y_test = test.data.float().div_(255), test.targets
    backbone = FMnistCNN(1, a["width"], tuple(int(d) for d in a["depth"].split(",")), fc=a["fc"])
    head, aux = nn.Linear(backbone.out_features, a["bits"]), nn.Linear(backbone.out_features, 10)
    net = nn.ModuleDict(dict(backbone=backbone, head=head, aux=aux)).to(memory_format=torch.channels_last)
    csq = CSQLoss(a["bits"], 10, quantization_weight=a["q"])
    optimizer = torch.optim.AdamW(net.parameters(), a["lr"], weight_decay=a["wd"])
    steps = len(x_train) // a["bs"]
    total, warm = steps * a["epochs"], int(a["warm"] * steps * a["epochs"])
    rate = lambda t: (t + 1) / warm if t < warm else 0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, total - warm)))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    augment = build_augment({"crop_padding": 2, "hflip": True})

    def features(x: torch.Tensor) -> torch.Tensor:
        return backbone(((x - MEAN) / STD).contiguous(memory_format=torch.channels_last))

    start = time.perf_counter()
    for epoch in range(a["epochs"]):
        net.train()
        tic, order, loss_sum = time.perf_counter(), torch.randperm(len(x_train)), 0.0
        for i in range(steps):
            index = order[i * a["bs"]:(i + 1) * a["bs"]]
            x, y = x_train[index], y_train[index]
            if epoch < a["aug"]:
                x = augment(x)
            f = features(x)
            loss = csq(torch.tanh(head(f)), y) + a["aux"] * F.cross_entropy(aux(f), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item()
        print(f"epoch {epoch} loss {loss_sum / steps:.4f} {time.perf_counter() - tic:.0f} s", flush=True)
    train_s = time.perf_counter() - start

    net.eval()
    with torch.no_grad():
        def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            parts = [(head(f), aux(f)) for f in (features(x[i:i + 1000]) for i in range(0, len(x), 1000))]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

        (h_test, c_test), (h_train, c_train) = encode(x_test), encode(x_train)
    codes_train = torch.where(h_train >= 0, 1.0, -1.0)
    result = {
        "train_s": round(train_s),
        "mAP_tie_aware": round(float(mean_average_precision(pack_codes(h_test >= 0), y_test.numpy(), pack_codes(h_train >= 0),
                                                            y_train.numpy(), a["bits"], ties="tie-aware")), 4),
        "test_acc": round((c_test.argmax(1) == y_test).float().mean().item(), 4),
        "train_acc": round((c_train.argmax(1) == y_train).float().mean().item(), 4),
        "db_on_center": round((codes_train == csq.centers[y_train]).all(1).float().mean().item(), 4),
        "db_nearest_center": round(((codes_train @ csq.centers.T).argmax(1) == y_train).float().mean().item(), 4),
    }
    print("RESULT", json.dumps(a), json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
