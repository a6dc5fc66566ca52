"""Photo loader throughput: images per second decoded by StreamLoader at 0, 1, 2, ... workers,
optionally beside timm's own loader (``--timm``) on the same folder in the same run.

    python scripts/make_photo_collection.py --out /tmp/photos --n 2000 --workers 2
    PYTHONPATH=src python bench/photo_loader.py /tmp/photos/train --size 96 --workers 0 1 2
    python bench/photo_loader.py /tmp/photos/train --size 96 --workers 0 1 2 --timm [--eval]

Each setting reads the whole folder ``--passes`` times (training transform: random resized crop,
flip and colour jitter; ``--eval`` for the resize + centre crop) in batches of ``--batch``, after
one warm-up batch (worker start-up excluded); the numbers depend on the machine and on what else
runs on it.

``--timm`` (needs timm, hence torchvision, in the same environment) measures
``timm.data.create_dataset`` + ``create_loader`` beside ours, interleaved (ours, timm) at each
worker count and the whole sweep ``--repeats`` times, and prints the ratio ours / timm and the
CPU milliseconds per image (this process + the loader's workers, from ``/proc``: the figure that
other jobs on a shared machine hardly move). Both take
the same folder, batch size, output size and policy: training = random resized crop (scale
0.08-1, ratio 3/4-4/3, bilinear) + flip (p 0.5) + brightness/contrast/saturation jitter 0.4, no
auto-augment, no random erasing, batches in a random order; evaluation = shorter side resized to
``floor(size / 0.875)`` (bilinear) + centre crop, in order. Both end as float32 ``(B, 3, S, S)``
batches in the main process: timm through its prefetcher on the CPU (uint8 from the workers,
normalised with ImageNet mean/std in the main process), ours through ``StreamLoader.__iter__``
(uint8 from the workers, scaled to [0, 1] in the main process). What still differs:

- ours decodes a JPEG at 1/2, 1/4 or 1/8 scale (Pillow's draft mode) when both sides are at least
  twice what the transform needs; timm decodes every file at full size;
- ours applies the EXIF orientation and composites transparent images over white; timm's
  ``convert("RGB")`` does neither (cheaper, and wrong for those files);
- ours leaves out the files whose header does not read when the folder is listed and drops a
  file that fails to decode from its batch; timm lists every file and, when one fails to decode,
  gives the next file in its place (a duplicate), so it delivers more images per pass;
- timm's colour jitter (torchvision's) applies the three factors in a random order, ours in a
  fixed one (the same three Pillow enhancers);
- timm's folder listing knows .png/.jpg/.jpeg only by default: the bench gives it deephash's
  extensions (``timm.data.set_img_extensions``) so both read the same files.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import cpu_seconds  # noqa: E402

from deephash.data import ImageFolder, StreamLoader  # noqa: E402
from deephash.data.images import EVAL_CROP_FRACTION, IMAGE_EXTENSIONS  # noqa: E402


def _batches(n: int, batch: int, shuffle: bool, seed: int) -> list[list[int]]:
    """Index lists of ``batch`` items over ``n`` (a random order when ``shuffle``)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist() if shuffle else list(range(n))
    return [order[s:s + batch] for s in range(0, n, batch)]


def _worker_pids(data_loader: torch.utils.data.DataLoader) -> list[int]:
    """The worker processes of a DataLoader with persistent workers, once it has been iterated."""
    iterator = getattr(data_loader, "_iterator", None)
    return [w.pid for w in getattr(iterator, "_workers", [])]


def _timed(batches: Any, data_loader: torch.utils.data.DataLoader, passes: int) -> tuple[int, float, float]:
    """Images, wall seconds and CPU seconds (this process + the loader's workers) over ``passes``
    passes of ``batches`` (an iterable of ``(x, y)`` over ``data_loader``), the first batch of the
    first pass excluded (warm-up: the workers start). The CPU seconds count the work per image,
    whatever else runs on the machine."""
    count, tic, cpu, pids = 0, 0.0, 0.0, [os.getpid()]
    for epoch in range(passes):
        iterator = iter(batches)
        if epoch == 0:
            next(iterator)
            pids += _worker_pids(data_loader)
            tic, cpu = time.perf_counter(), cpu_seconds(pids)
        for x, _ in iterator:
            count += len(x)
    return count, time.perf_counter() - tic, cpu_seconds(pids) - cpu


def ours_rate(dataset: ImageFolder, workers: int, batch: int, train: bool, passes: int = 1) -> tuple[int, float, float]:
    """StreamLoader over ``dataset``: ``(images, seconds, cpu_seconds)`` as :func:`_timed` counts them
    (float32 batches in [0, 1], as training consumes them)."""
    loader = StreamLoader(dataset, _batches(len(dataset), batch, train, 0), num_workers=workers,
                          random_crops=train, generator=torch.Generator().manual_seed(0))
    return _timed(loader, loader._data_loader(), passes)


def timm_rate(folder: str, size: int, workers: int, batch: int, train: bool, passes: int = 1) -> tuple[int, float, float]:
    """timm's ``create_dataset`` + ``create_loader`` over ``folder`` with the policy described in the
    module docstring: ``(images, seconds, cpu_seconds)`` as :func:`_timed` counts them."""
    import timm.data

    timm.data.set_img_extensions(IMAGE_EXTENSIONS)
    dataset = timm.data.create_dataset("", root=folder, split="train" if train else "validation", is_training=train)
    loader = timm.data.create_loader(
        dataset, input_size=(3, size, size), batch_size=batch, is_training=train, no_aug=False, re_prob=0.0,
        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, vflip=0.0, color_jitter=0.4, auto_augment=None,
        interpolation="bilinear", crop_pct=EVAL_CROP_FRACTION, crop_mode="center", num_workers=workers,
        pin_memory=False, device=torch.device("cpu"), use_prefetcher=True, persistent_workers=True)
    return _timed(loader, loader.loader, passes)


def _row(values: list[tuple[float, float]], k: int) -> str:
    """One column of the summary: item ``k`` of each sweep's ``(images/s, CPU ms per image)``."""
    return " / ".join(f"{v[k]:.1f}" if k == 0 else f"{v[k]:.2f}" for v in values)


def _load_average() -> str:
    try:
        return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "load average unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval", action="store_true", help="the evaluation transform instead of the training one")
    parser.add_argument("--passes", type=int, default=1, help="passes over the folder per measurement")
    parser.add_argument("--timm", action="store_true", help="measure timm's loader beside ours (needs timm)")
    parser.add_argument("--repeats", type=int, default=2, help="sweeps over the worker counts with --timm")
    args = parser.parse_args()
    if args.timm:
        try:
            import timm.data  # noqa: F401
        except ImportError as error:
            sys.exit(f"photo_loader: --timm needs timm (and torchvision) importable beside torch: {error}")
    torch.set_num_threads(1)
    logging.getLogger("deephash.data").setLevel(logging.ERROR)  # one warning line per bad file otherwise
    logging.getLogger("timm.data.dataset").setLevel(logging.ERROR)
    train = not args.eval
    dataset = ImageFolder(args.folder, image_size=args.size)
    print(f"{len(dataset)} images ({len(dataset.bad_files)} bad when listed), {args.size} px, "
          f"{'training' if train else 'evaluation'} transform, batches of {args.batch}, {args.passes} pass(es)")
    if not args.timm:
        for workers in args.workers:
            count, seconds, _ = ours_rate(dataset, workers, args.batch, train, args.passes)
            print(f"  {workers} workers: {count / seconds:7.1f} images/s")
        return
    import timm

    print(f"torch {torch.__version__}, timm {timm.__version__}; {_load_average()}")
    rates: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for repeat in range(args.repeats):
        for workers in args.workers:
            for name in ("ours", "timm"):
                if name == "ours":
                    count, seconds, cpu = ours_rate(dataset, workers, args.batch, train, args.passes)
                else:
                    count, seconds, cpu = timm_rate(args.folder, args.size, workers, args.batch, train, args.passes)
                rates.setdefault((name, workers), []).append((count / seconds, 1000 * cpu / count))
                print(f"  sweep {repeat + 1}, {workers} workers, {name}: {count / seconds:7.1f} images/s "
                      f"({count} images in {seconds:.2f} s; {1000 * cpu / count:.2f} CPU ms per image)", flush=True)
    print(f"after: {_load_average()}")
    print("images/s per sweep (ratio ours / timm), then CPU ms per image (main process + workers) per sweep")
    print("workers | ours images/s | timm images/s | ours / timm | ours CPU ms/image | timm CPU ms/image")
    for workers in args.workers:
        ours, theirs = rates[("ours", workers)], rates[("timm", workers)]
        ratios = " / ".join(f"{o[0] / t[0]:.2f}" for o, t in zip(ours, theirs))
        print(f"{workers:7d} | {_row(ours, 0)} | {_row(theirs, 0)} | {ratios} | {_row(ours, 1)} | {_row(theirs, 1)}")

if __name__ == "__main__":
    main()
