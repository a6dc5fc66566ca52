"""Benchmark: memory layout and pooling order of the shipped CPU backbones.

Training steps (forward + backward + AdamW, batch 128) and encoding (inference, batch 1024) of
fmnist-cnn and seed-cnn, in one process, default NCHW layout against channels-last parameters and
inputs (what ``deephash.models.channels_last_on_cpu`` does on the CPU). Then the Fashion-MNIST recipe's
network (width 24, fc 256) with its three stage layouts, all channels-last: max-pool after
BatchNorm + ReLU, ``pool_first`` and the ``space-to-depth`` stem; then the recipe networks
themselves (with their aux classifier and batch size: the previous one, the shipped one and the
variants of BENCHMARKS.md's 48-bit table). Both comparisons are interleaved over ``--rounds``
rounds so that the machine's drift hits each alike (median images/s and ratios to the first).

Usage: ``python bench/layout.py [--rounds 5] [--only layout|stages|recipes]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from deephash.models import channels_last_on_cpu
from deephash.models import build_model

SPECS = {
    "fmnist-cnn (1,2,2)": {"backbone": "fmnist-cnn", "backbone_params": {"width": 32, "depth": [1, 2, 2]},
                           "head": "hash", "bits": 48, "in_channels": 1},
    "seed-cnn": {"backbone": "seed-cnn", "head": "hash", "bits": 48, "in_channels": 1},
}


def images_per_second(spec: dict, channels_last: bool, batch: int = 128) -> tuple[float, float]:
    """Training and encoding images/s of one model spec (training: 6,144 timed images)."""
    torch.manual_seed(0)
    model = build_model(spec)
    if channels_last:
        channels_last_on_cpu(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.rand(batch, 1, 28, 28)
    steps = max(6144 // batch, 4)
    model.train()
    for step in range(steps + 3):
        if step == 3:
            start = time.perf_counter()
        optimizer.zero_grad()
        if model.aux is not None:
            codes, logits = model.forward_with_logits(x)
            (codes.square().mean() + logits.square().mean()).backward()
        else:
            model(x).square().mean().backward()
        optimizer.step()
    train = steps * batch / (time.perf_counter() - start)
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


# The recipe networks: (backbone params, batch size); every one with the 10-class aux classifier.
NETWORKS = {
    "previous recipe: depth (1,2,2), fc 512, batch 128": ({"depth": [1, 2, 2], "fc": 512}, 128),
    "shipped: depth (1,1,2), fc 512, batch 256": ({"depth": [1, 1, 2], "fc": 512}, 256),
    "depth (1,1,2), fc 512, batch 128": ({"depth": [1, 1, 2], "fc": 512}, 128),
    "depth (1,1,2), fc 256, batch 128": ({"depth": [1, 1, 2], "fc": 256}, 128),
}


def interleaved(title: str, variants: dict[str, tuple[dict, int]], rounds: int) -> None:
    """Print median train / encode images/s of fmnist-cnn variants, measured round-robin.

    ``variants`` maps a row name to (spec keys over the width-24 hash model, training batch size).
    """
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (extra, batch) in variants.items():
            spec = {"backbone": "fmnist-cnn", "head": "hash", "bits": 48, "in_channels": 1, **extra}
            runs[name].append(images_per_second(spec, True, batch))
    medians = {name: (statistics.median(t for t, _ in r), statistics.median(e for _, e in r)) for name, r in runs.items()}
    base = next(iter(medians.values()))
    print(f"\n| {title}, channels-last ({rounds} rounds, medians) | train img/s | encode img/s |")
    print("| --- | --- | --- |")
    for name, (train, encode) in medians.items():
        print(f"| {name} | {train:.0f} ({train / base[0]:.2f}×) | {encode:.0f} ({encode / base[1]:.2f}×) |")


def stage_layouts(rounds: int) -> None:
    """The recipe's network (width 24, fc 256) under each stage layout."""
    variants = {name: ({"backbone_params": {**RECIPE, **params}}, 128) for name, params in STAGES.items()}
    interleaved("fmnist-cnn width 24 + fc 256", variants, rounds)


def recipe_networks(rounds: int) -> None:
    """The previous and the shipped Fashion-MNIST recipe networks, with their batch sizes."""
    variants = {name: ({"backbone_params": {"width": 24, "pool_first": True, **params}, "aux_classes": 10}, batch)
                for name, (params, batch) in NETWORKS.items()}
    interleaved("fmnist-cnn width 24, pool_first, aux classifier", variants, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the two comparisons")
    parser.add_argument("--only", choices=["layout", "stages", "recipes"], help="run one part only")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.only in (None, "layout"):
        print("| backbone | layout | train img/s | encode img/s |")
        print("| --- | --- | --- | --- |")
        for name, spec in SPECS.items():
            base = images_per_second(spec, False)
            fast = images_per_second(spec, True)
            print(f"| {name} | NCHW | {base[0]:.0f} | {base[1]:.0f} |")
            print(f"| {name} | channels-last | {fast[0]:.0f} ({fast[0] / base[0]:.2f}×) | {fast[1]:.0f} ({fast[1] / base[1]:.2f}×) |")
    if args.only in (None, "stages"):
        stage_layouts(args.rounds)
    if args.only in (None, "recipes"):
        recipe_networks(args.rounds)


if __name__ == "__main__":
    main()
