"""Load test of the search service on loopback: throughput and latency of ``POST /api/search``,
read-only and mixed with adds (``POST /api/items``), and the cost of an fsync.

Starts ``python -m deephash.serve`` on a free 127.0.0.1 port with writes enabled (a token in a
temporary file; the index is a temporary copy, so adds never touch ``--index``), sends a bounded
number of searches (image uploads by default) with a fixed number in flight, then the same number
of requests of which ``--adds`` (default 10 %) are adds of new images, then the searches again
(the machine's drift), and writes the
"## Search service (bench/serve_load.py)" section of BENCHMARKS.md with both workloads side by
side. Every add is journaled and fsynced before its answer; the fsync itself is timed apart, in
the index's folder.

Without ``--index``/``--run`` it builds a demo first: an untrained compact CNN (48-bit hash head)
and an index over the data set's train split (Fashion-MNIST: 60,000 items). Untrained codes do
not change the cost of a search; they make the results meaningless, which a load test ignores.

    python bench/serve_load.py                      # 2,000 uploads, 16 at a time; then 2,000 mixed
    python bench/serve_load.py --index IDX --run RUN --requests 500 --mode code --adds 0.2
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
import shutil
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


def start_server(index_dir: Path, run_dir: Path, log: Path, token_file: Path | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    writes = ["--token-file", str(token_file)] if token_file is not None else []
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "deephash", "serve", str(index_dir), "--run", str(run_dir),
                                 "--host", "127.0.0.1", "--port", str(port), *writes], stdout=out, stderr=subprocess.STDOUT)
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


@dataclasses.dataclass
class Outcome:
    """Latencies (s) and errors per request kind ("search", "add"), server took_ms of searches, wall s."""

    latencies: dict[str, list[float]]
    errors: dict[str, int]
    took: list[float]
    wall: float


async def load(base: str, requests: list[tuple[str, dict]], concurrency: int, max_seconds: float,
               headers: dict[str, str] | None = None) -> Outcome:
    """Send every ``(kind, body)`` request, ``concurrency`` at a time: a search is ``POST /api/search``
    (must answer 200 with results), an add ``POST /api/items`` (must answer 201)."""
    outcome = Outcome({"search": [], "add": []}, {"search": 0, "add": 0}, [], 0.0)
    queue: asyncio.Queue = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    deadline = time.monotonic() + max_seconds

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            try:
                kind, body = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            tic = time.perf_counter()
            try:
                if kind == "search":
                    response = await client.post(f"{base}/api/search", **body)
                    ok = response.status_code == 200 and len(response.json()["results"]) > 0
                    if ok:
                        outcome.took.append(response.json()["took_ms"])
                else:
                    response = await client.post(f"{base}/api/items", headers=headers, **body)
                    ok = response.status_code == 201
            except httpx.HTTPError:
                ok = False
            outcome.latencies[kind].append(time.perf_counter() - tic)
            outcome.errors[kind] += not ok

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        tic = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        outcome.wall = time.perf_counter() - tic
    while not queue.empty():  # requests never sent because the time ran out count as errors
        outcome.errors[queue.get_nowait()[0]] += 1
    return outcome


def fsync_cost(folder: Path, bits: int, n: int = 200) -> dict[str, float]:
    """Median and p99 ms of one journal record's write, and of its fsync, in ``folder``
    (the filesystem of the served index); and of a stored item image written durably vs not."""
    from deephash.retrieval.codes import n_bytes
    from deephash.retrieval.journal import Record, encode_record
    from deephash.runs.index_updates import save_item_image

    data = encode_record(Record("add", 1, np.array([1]), np.zeros((1, n_bytes(bits)), np.uint8), np.array([0])))
    probe = folder / "fsync-probe.log"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    write, sync = [], []
    try:
        for _ in range(n):
            tic = time.perf_counter()
            os.write(fd, data)
            mid = time.perf_counter()
            os.fsync(fd)
            write.append(mid - tic)
            sync.append(time.perf_counter() - mid)
    finally:
        os.close(fd)
        probe.unlink()
    image = np.zeros((1, 28, 28), np.uint8)
    durable, plain = [], []
    for i in range(n // 4):
        for kind, times in ((True, durable), (False, plain)):
            tic = time.perf_counter()
            save_item_image(folder / "probe", i, image, durable=kind)
            times.append(time.perf_counter() - tic)
    shutil.rmtree(folder / "probe")
    ms = lambda xs, q: float(np.percentile(np.asarray(xs) * 1000, q))  # noqa: E731
    return {"record": len(data), "write_p50": ms(write, 50), "fsync_p50": ms(sync, 50), "fsync_p99": ms(sync, 99),
            "image_durable_p50": ms(durable, 50), "image_plain_p50": ms(plain, 50)}


def stats(latencies: list[float], errors: int, wall: float) -> str:
    """A table row's numbers: requests, errors, throughput, p50, p99."""
    ms = np.asarray(latencies) * 1000
    p50, p99 = (float(np.percentile(ms, q)) for q in (50, 99)) if len(ms) else (float("nan"), float("nan"))
    return f"{len(latencies)} | {errors} | {len(latencies) / wall:.1f} | {p50:.1f} | {p99:.1f}"


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
    parser.add_argument("--index", type=Path, help="index directory (default: build a demo); adds go to a copy")
    parser.add_argument("--run", type=Path, help="run directory of the index's model")
    parser.add_argument("--dataset", default="fashion-mnist", help="data set of the demo (default: fashion-mnist)")
    parser.add_argument("--bits", type=int, default=48, help="code length of the demo model (default: 48)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per workload (default: 2000)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default: 16)")
    parser.add_argument("--k", type=int, default=10, help="results per search (default: 10)")
    parser.add_argument("--mode", choices=("upload", "code"), default="upload",
                        help="upload: PNG images (decode + encode + search); code: random hex codes (search only)")
    parser.add_argument("--adds", type=float, default=0.1,
                        help="share of adds in the mixed workload (default: 0.1; 0 skips it)")
    parser.add_argument("--max-seconds", type=float, default=600, help="stop sending after this long (default: 600)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="file to write the section into")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    args = parser.parse_args(argv)
    if (args.index is None) != (args.run is None):
        parser.error("give both --index and --run, or neither (demo)")
    if not 0 <= args.adds <= 1:
        parser.error("--adds is a share between 0 and 1")

    with tempfile.TemporaryDirectory(prefix="deephash-serve-bench-") as tmp:
        tmp = Path(tmp)
        demo = args.index is None
        if demo:
            print(f"building a demo index over {args.dataset} ...", flush=True)
            args.run, args.index = build_demo(tmp, args.dataset, args.bits)
        else:  # the mixed workload adds items: serve a copy
            shutil.copytree(args.index, tmp / "index")
            args.index = tmp / "index"
        rng = np.random.default_rng(0)
        if args.mode == "upload":
            pngs = query_pngs(args.run, min(args.requests, 1000))
            searches = [("search", {"files": {"image": ("q.png", pngs[i % len(pngs)], "image/png")}, "data": {"k": str(args.k)}})
                        for i in range(args.requests)]
        else:
            from deephash.retrieval.index import HashIndex

            index = HashIndex.load(args.index)
            codes = np.packbits(rng.integers(0, 2, (args.requests, index.bits)).astype(bool), axis=1)
            searches = [("search", {"json": {"code": c.tobytes().hex(), "k": args.k}}) for c in codes]
            pngs = query_pngs(args.run, min(args.requests, 1000))
        is_add = rng.random(args.requests) < args.adds
        mixed = [("add", {"files": {"image": ("new.png", pngs[(i * 7 + 3) % len(pngs)], "image/png")}}) if add else searches[i]
                 for i, add in enumerate(is_add)]
        token = rng.integers(0, 2**63, 2).tobytes().hex()
        token_file = tmp / "token"
        token_file.write_text(token)
        proc, base = start_server(args.index, args.run, tmp / "server.log", token_file)
        try:
            info = httpx.get(f"{base}/api/info", timeout=10).json()
            asyncio.run(load(base, searches[:min(32, len(searches))], args.concurrency, 60))  # warm-up, not counted
            read_only = asyncio.run(load(base, searches, args.concurrency, args.max_seconds))
            both = again = None
            if args.adds > 0:
                both = asyncio.run(load(base, mixed, args.concurrency, args.max_seconds,
                                        headers={"Authorization": f"Bearer {token}"}))
                again = asyncio.run(load(base, searches, args.concurrency, args.max_seconds))  # the machine's drift
            size_after = httpx.get(f"{base}/api/info", timeout=10).json()["size"]
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        fsync = fsync_cost(args.index.parent, info["bits"])

    errors = sum(sum(o.errors.values()) for o in (read_only, both, again) if o is not None)
    server_ms = float(np.median(read_only.took)) if read_only.took else float("nan")
    threads = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ)
    command = f"{threads} python bench/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = [f"| read-only | searches | {stats(read_only.latencies['search'], read_only.errors['search'], read_only.wall)} |"]
    if both is not None:
        every = both.latencies["search"] + both.latencies["add"]
        rows += [f"| mixed ({args.adds:.0%} adds) | all | {stats(every, sum(both.errors.values()), both.wall)} |",
                 f"| mixed | searches | {stats(both.latencies['search'], both.errors['search'], both.wall)} |",
                 f"| mixed | adds | {stats(both.latencies['add'], both.errors['add'], both.wall)} |",
                 f"| read-only, again after the mixed one | searches | {stats(again.latencies['search'], again.errors['search'], again.wall)} |"]
    section = (
        f"{SECTION}\n\n"
        f"`{command.strip()}` on {dt.date.today().isoformat()}; {cpu_model()}, {os.cpu_count()} logical CPUs "
        f"(load average at the end {os.getloadavg()[0]:.1f}; the machine is shared with other jobs), CPU only, "
        "server and client on 127.0.0.1, one run.\n\n"
        f"Index: {info['size']} items, {info['bits']}-bit codes, {info['factory']}, model {info['model']}"
        f"{' (untrained demo)' if demo else ''}; served with writes enabled ({size_after} items at the end). "
        f"Load: {args.requests} requests per workload ({args.mode} searches, k={args.k}; adds upload a PNG), "
        f"{args.concurrency} in flight; the read-only workload runs before and after the mixed one, so the "
        "two read-only rows show how much the shared machine drifted meanwhile; throughput is each workload's requests over its wall time (a kind's share "
        f"of it for the per-kind rows). Server took_ms of a read-only search (median): {server_ms:.2f}.\n\n"
        "| workload | kind | requests | errors | throughput (req/s) | p50 latency (ms) | p99 latency (ms) |\n"
        "|---|---|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
        f"Cost of fsync per add: an add is answered after 3 fsyncs (its journal record, its stored PNG, the PNG's "
        f"folder). On this disk one fsync of a {fsync['record']}-byte journal record takes {fsync['fsync_p50']:.2f} ms "
        f"(median; p99 {fsync['fsync_p99']:.2f} ms) against {fsync['write_p50'] * 1000:.0f} µs for the write itself, and "
        f"storing the PNG durably {fsync['image_durable_p50']:.2f} ms against {fsync['image_plain_p50']:.2f} ms without "
        f"fsync: about {fsync['fsync_p50'] + fsync['image_durable_p50'] - fsync['image_plain_p50']:.1f} ms of each add's "
        "latency is waiting for the disk.\n\n"
    )
    print(section)
    if not args.no_write:
        write_section(args.out, section)
        print(f"section written to {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
