"""Benchmark: memory layout and pooling order of the shipped CPU backbones.

Training steps (forward + backward + AdamW, batch 128) and encoding (inference, batch 1024) of
fmnist-cnn and seed-cnn, in one process, default NCHW layout against channels-last parameters and
inputs (what ``deephash.experiment.fast_layout`` does on the CPU). Then the Fashion-MNIST recipe's
network (width 24, fc 256) with its three stage layouts, all channels-last: max-pool after
BatchNorm + ReLU, ``pool_first`` and the ``space-to-depth`` stem, interleaved over ``--rounds``
rounds so that the machine's drift hits each alike (median images/s and ratios to the first).

Usage: ``python bench/layout.py [--rounds 5]``
"""

from __future__ import annotations

import argparse
import statistics
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


RECIPE = {"width": 24, "depth": [1, 2, 2], "fc": 256}
STAGES = {"pool after BN+ReLU": {}, "pool_first": {"pool_first": True}, "space-to-depth stem": {"stem": "space-to-depth"}}


def stage_layouts(rounds: int) -> None:
    """Median train / encode images/s of the recipe's network under each stage layout."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in STAGES}
    for _ in range(rounds):
        for name, params in STAGES.items():
            spec = {"backbone": "fmnist-cnn", "backbone_params": {**RECIPE, **params}, "head": "hash", "bits": 48, "in_channels": 1}
            runs[name].append(images_per_second(spec, True))
    medians = {name: (statistics.median(t for t, _ in r), statistics.median(e for _, e in r)) for name, r in runs.items()}
    base = next(iter(medians.values()))
    print(f"\n| fmnist-cnn width 24 + fc 256, channels-last ({rounds} rounds, medians) | train img/s | encode img/s |")
    print("| --- | --- | --- |")
    for name, (train, encode) in medians.items():
        print(f"| {name} | {train:.0f} ({train / base[0]:.2f}×) | {encode:.0f} ({encode / base[1]:.2f}×) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the stage-layout comparison")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("| backbone | layout | train img/s | encode img/s |")
    print("| --- | --- | --- | --- |")
    for name, spec in SPECS.items():
        base = images_per_second(spec, False)
        fast = images_per_second(spec, True)
        print(f"| {name} | NCHW | {base[0]:.0f} | {base[1]:.0f} |")
        print(f"| {name} | channels-last | {fast[0]:.0f} ({fast[0] / base[0]:.2f}×) | {fast[1]:.0f} ({fast[1] / base[1]:.2f}×) |")
    stage_layouts(args.rounds)


if __name__ == "__main__":
    main()
