"""Benchmark: channels-last vs default memory layout for the shipped CPU backbones.

Training steps (forward + backward + AdamW, batch 128) and encoding (inference, batch 1024) of
fmnist-cnn and seed-cnn, in one process, default NCHW layout against channels-last parameters and
inputs (what ``deephash.experiment.fast_layout`` does on the CPU). Prints images/s and ratios.

Usage: ``python bench/layout.py``
"""

from __future__ import annotations

import time

import torch

from deephash.experiment import fast_layout
from deephash.models import build_model

SPECS = {
    "fmnist-cnn (1,2,2)": {"backbone": "fmnist-cnn", "backbone_params": {"width": 32, "depth": [1, 2, 2]},
                           "head": "hash", "bits": 48, "in_channels": 1},
    "seed-cnn": {"backbone": "seed-cnn", "head": "hash", "bits": 48, "in_channels": 1},
}


def images_per_second(spec: dict, channels_last: bool) -> tuple[float, float]:
    torch.manual_seed(0)
    model = build_model(spec)
    if channels_last:
        fast_layout(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.rand(128, 1, 28, 28)
    model.train()
    for step in range(19):
        if step == 3:
            start = time.perf_counter()
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    train = 16 * 128 / (time.perf_counter() - start)
    model.eval()
    with torch.inference_mode():
        xe = torch.rand(1024, 1, 28, 28)
        model(xe)
        start = time.perf_counter()
        for _ in range(3):
            model(xe)
        encode = 3 * 1024 / (time.perf_counter() - start)
    return train, encode


def main() -> None:
    torch.set_num_threads(2)
    print("| backbone | layout | train img/s | encode img/s |")
    print("| --- | --- | --- | --- |")
    for name, spec in SPECS.items():
        base = images_per_second(spec, False)
        fast = images_per_second(spec, True)
        print(f"| {name} | NCHW | {base[0]:.0f} | {base[1]:.0f} |")
        print(f"| {name} | channels-last | {fast[0]:.0f} ({fast[0] / base[0]:.2f}×) | {fast[1]:.0f} ({fast[1] / base[1]:.2f}×) |")


if __name__ == "__main__":
    main()
