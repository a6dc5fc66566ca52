"""Load test of the search service on loopback: throughput and latency of ``POST /api/search``.

Starts ``python -m deephash.serve`` on a free 127.0.0.1 port, sends a bounded number of searches
(image uploads by default) with a fixed number in flight, and writes the
"## Search service (bench/serve_load.py)" section of BENCHMARKS.md.

Without ``--index``/``--run`` it builds a demo first: an untrained compact CNN (48-bit hash head)
and an index over the data set's train split (Fashion-MNIST: 60,000 items). Untrained codes do
not change the cost of a search; they make the results meaningless, which a load test ignores.

    python bench/serve_load.py                      # 2,000 uploads, 16 at a time
    python bench/serve_load.py --index IDX --run RUN --requests 500 --mode code
"""

from __future__ import annotations

import dataclasses
import argparse
import asyncio
import datetime as dt
import io
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

SECTION = "## Search service (bench/serve_load.py)"
ROOT = Path(__file__).resolve().parents[1]


def build_demo(root: Path, dataset: str, bits: int) -> tuple[Path, Path]:
    """A run with an untrained small CNN and an index over ``dataset``'s train split."""
    import torch

    from deephash import runs
    from deephash.config import config_from_dict
    from deephash.models import build_model
    config = config_from_dict({"data": {"dataset": dataset}, "device": "cpu",
                               "model": {"backbone": "fmnist-cnn", "backbone_params": {"width": 8}, "bits": bits}})
    torch.manual_seed(0)
    dataset_train = runs.load_split(config, "train")
    model = build_model(dataclasses.replace(config.model, in_channels=dataset_train.data.shape[1])).eval()
    run_dir, index_dir = root / "run", root / "index"
    run_dir.mkdir(parents=True)
    classes = dataset_train.classes or []
    runs.save_model(run_dir / "model.pt", model, config, classes)
    runs.build_index(run_dir, split="train", out=index_dir)
    return run_dir, index_dir


def query_pngs(run_dir: Path, n: int) -> list[bytes]:
    """PNG files of ``n`` test-split images of the run's data set (queries the index has not seen)."""
    from PIL import Image

    from deephash import runs

    _, config = runs.load_run(run_dir, device="cpu")
    images = runs.load_split(config, config.data.query_split, run_dir).data[:n].numpy()
    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(index_dir: Path, run_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "deephash", "serve", str(index_dir), "--run", str(run_dir),
                                 "--host", "127.0.0.1", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("server did not answer /healthz within 180 s")


async def load(base: str, bodies: list[dict], concurrency: int, max_seconds: float) -> tuple[list[float], list[float], int, float]:
    """Send every request, ``concurrency`` at a time; returns latencies (s), server took_ms, errors, wall s."""
    latencies: list[float] = []
    took: list[float] = []
    errors = 0
    queue: asyncio.Queue = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    deadline = time.monotonic() + max_seconds

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.monotonic() < deadline:
            try:
                body = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            tic = time.perf_counter()
            try:
                response = await client.post(f"{base}/api/search", **body)
                ok = response.status_code == 200 and len(response.json()["results"]) > 0
                if ok:
                    took.append(response.json()["took_ms"])
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - tic)
            errors += not ok

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        tic = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - tic
    errors += queue.qsize()  # requests never sent because the time ran out count as errors
    return latencies, took, errors, wall


def cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"Model name:\s*(.+)", text)
        return match.group(1).strip() if match else platform.processor()
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown CPU"


def write_section(path: Path, text: str) -> None:
    """Replace (or append) this benchmark's section of BENCHMARKS.md, leaving the others alone."""
    from deephash._io import atomic_write_text

    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text, old, count=1) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    atomic_write_text(path, new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, help="index directory (default: build a demo)")
    parser.add_argument("--run", type=Path, help="run directory of the index's model")
    parser.add_argument("--dataset", default="fashion-mnist", help="data set of the demo (default: fashion-mnist)")
    parser.add_argument("--bits", type=int, default=48, help="code length of the demo model (default: 48)")
    parser.add_argument("--requests", type=int, default=2000, help="searches to send (default: 2000)")
    parser.add_argument("--concurrency", type=int, default=16, help="searches in flight (default: 16)")
    parser.add_argument("--k", type=int, default=10, help="results per search (default: 10)")
    parser.add_argument("--mode", choices=("upload", "code"), default="upload",
                        help="upload: PNG images (decode + encode + search); code: random hex codes (search only)")
    parser.add_argument("--max-seconds", type=float, default=600, help="stop sending after this long (default: 600)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="file to write the section into")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    args = parser.parse_args(argv)
    if (args.index is None) != (args.run is None):
        parser.error("give both --index and --run, or neither (demo)")

    with tempfile.TemporaryDirectory(prefix="deephash-serve-bench-") as tmp:
        tmp = Path(tmp)
        demo = args.index is None
        if demo:
            print(f"building a demo index over {args.dataset} ...", flush=True)
            args.run, args.index = build_demo(tmp, args.dataset, args.bits)
        rng = np.random.default_rng(0)
        if args.mode == "upload":
            pngs = query_pngs(args.run, min(args.requests, 1000))
            bodies = [{"files": {"image": ("q.png", pngs[i % len(pngs)], "image/png")}, "data": {"k": str(args.k)}}
                      for i in range(args.requests)]
        else:
            from deephash.retrieval.index import HashIndex

            index = HashIndex.load(args.index)
            codes = np.packbits(rng.integers(0, 2, (args.requests, index.bits)).astype(bool), axis=1)
            bodies = [{"json": {"code": c.tobytes().hex(), "k": args.k}} for c in codes]
        proc, base = start_server(args.index, args.run, tmp / "server.log")
        try:
            info = httpx.get(f"{base}/api/info", timeout=10).json()
            asyncio.run(load(base, bodies[:min(32, len(bodies))], args.concurrency, 60))  # warm-up, not counted
            latencies, took, errors, wall = asyncio.run(load(base, bodies, args.concurrency, args.max_seconds))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()

    ms = np.asarray(latencies) * 1000
    p50, p99 = (float(np.percentile(ms, q)) for q in (50, 99)) if len(ms) else (float("nan"), float("nan"))
    server_ms = float(np.median(took)) if took else float("nan")
    threads = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ)
    command = f"{threads} python bench/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = (
        f"{SECTION}\n\n"
        f"`{command.strip()}` on {dt.date.today().isoformat()}; {cpu_model()}, {os.cpu_count()} logical CPUs "
        f"(load average at the end {os.getloadavg()[0]:.1f}), CPU only, server and client on 127.0.0.1.\n\n"
        f"Index: {info['size']} items, {info['bits']}-bit codes, {info['factory']}, model {info['model']}"
        f"{' (untrained demo)' if demo else ''}. "
        f"Load: {len(latencies)} `POST /api/search` ({args.mode}, k={args.k}), {args.concurrency} in flight.\n\n"
        "| requests | errors | throughput (req/s) | p50 latency (ms) | p99 latency (ms) | server took_ms (median) |\n"
        "|---:|---:|---:|---:|---:|---:|\n"
        f"| {len(latencies)} | {errors} | {len(latencies) / wall:.1f} | {p50:.1f} | {p99:.1f} | {server_ms:.2f} |\n"
    )
    print(section)
    if not args.no_write:
        write_section(args.out, section)
        print(f"section written to {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
