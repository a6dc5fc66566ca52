"""Photo loader throughput: images per second decoded by StreamLoader at 0, 1, 2, ... workers.

    python scripts/make_photo_collection.py --out /tmp/photos --n 2000 --workers 2
    PYTHONPATH=src python bench/photo_loader.py /tmp/photos/train --size 96 --workers 0 1 2

Each setting reads the whole folder once (training transform: random resized crop, flip and
colour jitter; ``--eval`` for the resize + centre crop) in batches of ``--batch``, after one warm-up
batch (worker start-up excluded); the numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import time

import torch

from deephash.data import ImageFolder, StreamLoader


def images_per_second(dataset: ImageFolder, workers: int, batch: int, train: bool) -> float:
    order = [range(s, min(s + batch, len(dataset))) for s in range(0, len(dataset), batch)]
    loader = StreamLoader(dataset, order, num_workers=workers, random_crops=train, generator=torch.Generator().manual_seed(0))
    batches = iter(loader.decoded())
    first = next(batches)  # warm-up: the workers start
    count, tic = 0, time.perf_counter()
    for decoded in batches:
        count += len(decoded.images)
    seconds = time.perf_counter() - tic
    del first
    return count / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval", action="store_true", help="the evaluation transform instead of the training one")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset = ImageFolder(args.folder, image_size=args.size)
    print(f"{len(dataset)} images ({len(dataset.bad_files)} bad when listed), {args.size} px, "
          f"{'evaluation' if args.eval else 'training'} transform, batches of {args.batch}")
    for workers in args.workers:
        rate = images_per_second(dataset, workers, args.batch, not args.eval)
        print(f"  {workers} workers: {rate:7.1f} images/s")


if __name__ == "__main__":
    main()
