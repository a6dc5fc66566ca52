"""Benchmark: exact Hamming kNN of HashIndex against plain FAISS, numpy and torch; encoding speed.

Random 64-bit codes, database of 100k and 1M, k=100, one timed run each, 2 threads everywhere
(``faiss.omp_set_num_threads(2)``, ``torch.set_num_threads(2)``, numpy split over 2 Python threads:
its ufuncs release the GIL). numpy and torch answer fewer queries at 1M (``--slow-queries``) to keep
the run short; queries/s is what is compared. Encoding: images/s of each registered backbone in
eval mode under ``no_grad`` on random images.

Usage: ``python bench/search.py [--quick]``; prints a table and updates BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import time
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import torch

from _report import cpu_model, write_section
from deephash.retrieval import HashIndex
from deephash.retrieval.hamming import hamming_knn

SECTION = "## Search (bench/search.py)"
THREADS = 2
K = 100
BITS = 64


def numpy_knn(q: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN with ``np.bitwise_count`` on 64-bit words, queries split over THREADS threads."""
    db_words = db.view(np.uint64)

    def part(q_part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dist = np.bitwise_count(q_part.view(np.uint64)[:, None, :] ^ db_words[None, :, :]).sum(2, dtype=np.int32)
        top = np.argpartition(dist, k, axis=1)[:, :k]
        d = np.take_along_axis(dist, top, 1)
        order = np.argsort(d, axis=1, kind="stable")
        return np.take_along_axis(d, order, 1), np.take_along_axis(top, order, 1)

    pieces = [q[i : i + 16] for i in range(0, len(q), 16)]
    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(part, pieces))
    return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def search_rows(sizes: list[int], n_queries: int, slow_queries: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        db = rng.integers(0, 256, (n, BITS // 8), dtype=np.uint8)
        q = rng.integers(0, 256, (n_queries, BITS // 8), dtype=np.uint8)
        flat = faiss.IndexBinaryFlat(BITS)
        flat.add(db)
        ours = HashIndex(BITS, "BFlat", backend="faiss")
        ours.add(db)
        flat.search(q[:10], K), ours.search(q[:10], K)  # warm-up
        t_faiss, (d_faiss, _) = timed(flat.search, q, K)
        t_ours, (d_ours, _) = timed(ours.search, q, K)
        assert np.array_equal(d_faiss, d_ours)
        slow = q[: min(slow_queries, n_queries)] if n > 100_000 else q
        t_torch, (d_torch, _) = timed(hamming_knn, slow, db, K)
        t_numpy, (d_numpy, _) = timed(numpy_knn, slow, db, K)
        assert np.array_equal(d_torch, d_faiss[: len(slow)]) and np.array_equal(d_numpy, d_faiss[: len(slow)])
        rows.append(
            {
                "n": n,
                "faiss": n_queries / t_faiss,
                "ours": n_queries / t_ours,
                "overhead": t_ours / t_faiss - 1,
                "torch": len(slow) / t_torch,
                "numpy": len(slow) / t_numpy,
                "slow_queries": len(slow),
            }
        )
        print(rows[-1], flush=True)
    return rows


def _encode_rate(model: torch.nn.Module, channels: int, size: int, batch: int, batches: int) -> float:
    """Images/s of ``model`` in eval mode on random (batch, channels, size, size) inputs."""
    x = torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x)  # warm-up
        start = time.perf_counter()
        for _ in range(batches):
            model(x)
        seconds = time.perf_counter() - start
    return batch * batches / seconds


def encoding_rows(batch: int, batches: int) -> list[dict]:
    """Every registered backbone at its defaults, then the shipped Fashion-MNIST 48-bit network as
    `deephash encode` runs it (the whole model: normalisation, backbone, aux head and posterior
    codes as the config sets them; channels-last)."""
    from deephash.config import load_config
    from deephash.models import channels_last_on_cpu
    from deephash.runs.components import build_loss
    from deephash.models import build_model
    from deephash.models.registry import create_backbone, list_backbones

    rows = []
    for name in list_backbones():
        channels, size = (3, 32) if "cifar" in name else (1, 28)
        model = create_backbone(name, in_channels=channels).eval()
        rows.append({"name": name, "input": f"{channels}x{size}x{size}",
                     "images_per_s": _encode_rate(model, channels, size, batch, batches)})
        print(rows[-1], flush=True)
    config_name = "fashion-mnist-48"  # the shipped config
    config = load_config(config_name)
    model = build_model(config.model)
    if config.model.code_rule == "posterior":  # as training sets them: the CSQ loss's class centers
        model.set_code_centers(build_loss(config, config.model.aux_classes).loss.centers)
    model = channels_last_on_cpu(model).eval()
    rows.append({"name": f"{config_name} (whole model)", "input": "1x28x28",
                 "images_per_s": _encode_rate(model, 1, 28, batch, batches)})
    print(rows[-1], flush=True)
    return rows


def write_search_section(command: str, search: list[dict], encoding: list[dict]) -> None:
    lines = [
        SECTION,
        "",
        f"`{command}` on {cpu_model()}, {THREADS} threads, {datetime.date.today().isoformat()}; "
        f"random {BITS}-bit codes, k={K}, one run each (a shared, drifting machine: expect noise).",
        "",
        "| database | faiss.IndexBinaryFlat q/s | HashIndex (BFlat) q/s | our overhead | torch exact q/s | numpy bitwise_count q/s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in search:
        lines.append(
            f"| {r['n']:,} | {r['faiss']:.0f} | {r['ours']:.0f} | {100 * r['overhead']:+.1f}% | "
            f"{r['torch']:.0f} | {r['numpy']:.0f} |"
        )
    slow = [r for r in search if r["slow_queries"] != 1000]
    if slow:
        lines += ["", f"torch and numpy answered {slow[0]['slow_queries']} queries at the larger sizes (FAISS: all)."]
    lines += ["", "Encoding throughput (eval mode, no_grad, batch 256): each backbone at its defaults in NCHW; "
              "last, the shipped 48-bit model whole, channels-last, as `deephash encode` runs it:",
              "", "| backbone | input | images/s |", "| --- | --- | --- |"]
    lines += [f"| {r['name']} | {r['input']} | {r['images_per_s']:.0f} |" for r in encoding]
    write_section(SECTION, "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k database, 100 queries; BENCHMARKS.md untouched")
    parser.add_argument("--slow-queries", type=int, default=200, help="queries for numpy/torch above 100k codes")
    args = parser.parse_args()
    faiss.omp_set_num_threads(THREADS)
    torch.set_num_threads(THREADS)
    if args.quick:
        search_rows([10_000], 100, 100)
        encoding_rows(32, 1)
        return
    search = search_rows([100_000, 1_000_000], 1000, args.slow_queries)
    encoding = encoding_rows(256, 4)
    write_search_section("python bench/search.py", search, encoding)


if __name__ == "__main__":
    main()
