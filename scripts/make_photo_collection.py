"""Render Fashion-MNIST as a folder of colour photos, to try deephash on a real-looking collection.

Each item is scaled into a canvas of random size (128-640 px a side, random aspect ratio) over a
random textured colour background, coloured, placed at random, and saved as JPEG, PNG or WebP;
some are stored rotated with an EXIF orientation that turns them upright, some as CMYK JPEGs,
palette PNGs or RGBA PNGs, and about 1 % are corrupt (cut short, or not an image at all). The
folder is ``OUT/train/<class>/<n>.<ext>`` and ``OUT/test/<class>/<n>.<ext>``, drawn from the
official train and test splits in proportion (6:1); ``--n 70000`` renders every item.

Everything is seeded: the same ``--seed`` and ``--n`` give the same files, whatever ``--workers``.
Files are written atomically, and a second run over the same folder renders only the missing ones,
so an interrupted run resumes.

    python scripts/make_photo_collection.py --out photos --n 2000 --workers 2
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from deephash.data import FASHION_MNIST_CLASSES, load_dataset

#: Share of items per kind: the rest are plain RGB files.
SHARES = {"corrupt": 0.01, "exif": 0.05, "cmyk": 0.03, "palette": 0.03, "rgba": 0.03}
FORMATS = (("jpg", 0.6), ("png", 0.25), ("webp", 0.15))
#: The file type each special kind is stored as (the others take the drawn format).
EXTENSIONS = {"cmyk": "jpg", "palette": "png", "rgba": "png", "exif": "jpg"}


def class_folder(name: str) -> str:
    """A class name as a folder name ("T-shirt/top" -> "T-shirt_top")."""
    return name.replace("/", "_").replace(" ", "_")


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A textured colour background: a two-colour gradient with stripes and noise, uint8 (H, W, 3)."""
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (np.cos(angle) * xx + np.sin(angle) * yy) / max(height, width)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * rng.uniform(0.005, 0.05) + yy * rng.uniform(0.005, 0.05)))
    mix = np.clip(0.7 * t + 0.3 * stripes, 0, 1)[..., None]
    picture = a * (1 - mix) + b * mix + rng.normal(0, rng.uniform(2, 18), (height, width, 1))
    return np.clip(picture, 0, 255).astype(np.uint8)


def render(item: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One 28x28 grey item as a colour photo, uint8 (H, W, 3)."""
    height, width = (int(v) for v in rng.integers(128, 641, 2))
    canvas = background(rng, height, width).astype(np.float32)
    side = int(min(height, width) * rng.uniform(0.45, 0.95))
    mask = np.asarray(Image.fromarray(item).resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    colour = rng.integers(20, 256, 3).astype(np.float32)
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    shade = (0.45 + 0.55 * mask)[..., None] * colour  # the garment's own texture, in its colour
    region = canvas[top:top + side, left:left + side]
    canvas[top:top + side, left:left + side] = region * (1 - mask[..., None]) + shade * mask[..., None]
    return np.clip(canvas, 0, 255).astype(np.uint8)


def encode_file(picture: np.ndarray, kind: str, fmt: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """The file's bytes and extension for a picture of the given kind."""
    out = io.BytesIO()
    image = Image.fromarray(picture)
    if kind == "cmyk":
        image.convert("CMYK").save(out, "JPEG", quality=90)
        return out.getvalue(), "jpg"
    if kind == "palette":
        image.quantize(colors=64).save(out, "PNG")
        return out.getvalue(), "png"
    if kind == "rgba":
        alpha = np.full(picture.shape[:2], 255, np.uint8)
        edge = max(2, picture.shape[0] // 20)
        alpha[:edge], alpha[-edge:] = 0, 128  # a transparent top band and a half-transparent bottom band
        Image.fromarray(np.dstack([picture, alpha]), "RGBA").save(out, "PNG")
        return out.getvalue(), "png"
    if kind == "exif":  # stored turned a quarter left; orientation 6 turns it back right when decoded
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(np.ascontiguousarray(np.rot90(picture, k=1))).save(out, "JPEG", quality=90, exif=exif)
        return out.getvalue(), "jpg"
    if fmt == "jpg":
        image.save(out, "JPEG", quality=int(rng.integers(70, 96)))
    elif fmt == "png":
        image.save(out, "PNG")
    else:
        image.save(out, "WEBP", quality=int(rng.integers(70, 96)))
    return out.getvalue(), fmt


def make_one(job: tuple[int, int, str, str, np.ndarray, Path]) -> str:
    """Render and write one item; returns its kind."""
    seed, number, split, class_name, item, out = job
    rng = np.random.default_rng([seed, number])
    draw = rng.random()
    kind, edge = "plain", 0.0
    for name, share in SHARES.items():
        edge += share
        if draw < edge:
            kind = name
            break
    fmt = str(rng.choice([f for f, _ in FORMATS], p=[p for _, p in FORMATS]))
    folder = out / split / class_folder(class_name)
    target = folder / f"{number:05d}.{EXTENSIONS.get(kind, fmt)}"
    if target.exists():  # written by an earlier, interrupted run: the same seed gives the same bytes
        return kind
    data, _ = encode_file(render(item, rng), "plain" if kind == "corrupt" else kind, fmt, rng)
    if kind == "corrupt":
        data = data[: len(data) // 3] if rng.random() < 0.5 else rng.bytes(512)
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(data)
    partial.replace(target)  # atomic: a killed run leaves no half-written image behind
    return kind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write (train/ and test/ inside)")
    parser.add_argument("--n", type=int, default=2000, help="items in all (70000 = every Fashion-MNIST item)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="processes rendering in parallel")
    parser.add_argument("--root", help="folder with the Fashion-MNIST IDX files (default: deephash's search path)")
    args = parser.parse_args(argv)
    if not 1 <= args.n <= 70000:
        parser.error("--n must be in 1..70000")
    out = Path(args.out)
    n_train = round(args.n * 6 / 7)
    jobs = []
    number = 0
    for split, count in (("train", n_train), ("test", args.n - n_train)):
        data = load_dataset("fashion-mnist", split, root=args.root)
        chosen = np.random.default_rng([args.seed, split == "train"]).permutation(len(data))[:count]
        for index in np.sort(chosen).tolist():
            label = int(data.targets[index])
            jobs.append((args.seed, number, split, FASHION_MNIST_CLASSES[label], data.data[index, 0].numpy(), out))
            number += 1
    if args.workers > 1:
        with multiprocessing.Pool(args.workers) as pool:
            kinds = pool.map(make_one, jobs, chunksize=16)
    else:
        kinds = [make_one(job) for job in jobs]
    counts = {k: kinds.count(k) for k in ("plain", *SHARES)}
    print(f"wrote {len(kinds)} files to {out} ({n_train} train, {args.n - n_train} test): "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
