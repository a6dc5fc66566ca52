"""Load test of the search service on loopback: one-at-a-time (``--max-batch 1``) against dynamic
batching, read-only and 90/10 search/add, at 16 and 64 in flight; a sweep of ``--batch-wait-ms``;
and an overload (256 in flight) that must be shed with 503 and recovered from.

The client is Debian's ``wrk`` (``apt-get install -y wrk``) with a generated Lua script holding
prepared multipart bodies (PNG uploads of test-split images; adds upload one too, with the write
token): a compiled client, so that on a 2-core machine the client is not the bottleneck. Its own
CPU use is measured (``wait4``) and reported beside each row. Every server is a fresh
``python -m deephash serve`` on a free 127.0.0.1 port with writes enabled over its own copy of the
index (adds never touch ``--index``); every phase lasts ``--seconds`` (bounded).

The model: ``--run RUN`` (a trained run; the bench copies its model with ``data.limit`` cleared)
and an index of the data set's train split built here (Fashion-MNIST: 60,000 items), or
``--index`` with ``--run`` as they are. Train a quick one with, e.g.::

    deephash train fashion-mnist-48 --set train.epochs=1 --set rerank_head.epochs=1 \\
        --set data.limit=6000 --set device='"cpu"' --out /tmp/fm48-quick
    OMP_NUM_THREADS=1 python bench/serve_load.py --run /tmp/fm48-quick

Engines are server settings by name (``ENGINES``); ``--engines`` picks which run. ``onnx`` is the
slot for the ONNX Runtime encoder: ``deephash serve INDEX --model EXPORT_DIR`` (``--onnx-model``),
batched as the PyTorch one.

``--baseline-src DIR --baseline-run RUN --baseline-index INDEX`` adds one more server to the
side-by-side phases: ``deephash serve`` from another checkout's ``src`` (e.g. a git worktree of the
commit an issue was filed at: the service as it was then), with a run and an index that checkout
made itself (its files may not read the current ones). Its model is trained separately, so its
answers are not compared; it has no ``/api/health``, so its mean batch reads 1 (one at a time).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, cpu_model, cpu_seconds, write_section  # noqa: E402

SECTION = "## Search service: dynamic batching (bench/serve_load.py)"
ENGINES = {
    "one-at-a-time": ["--max-batch", "1"],
    "batched": ["--max-batch", "32", "--batch-wait-ms", "0"],
    "batched --workers 2": ["--max-batch", "32", "--batch-wait-ms", "0", "--workers", "2"],  # read-only
    "onnx": ["--max-batch", "32", "--batch-wait-ms", "0"],  # served with --model EXPORT_DIR instead of --run
    "batched + encode process": ["--max-batch", "32", "--batch-wait-ms", "0", "--encode-processes", "1"],
    "onnx + encode process": ["--max-batch", "32", "--batch-wait-ms", "0", "--encode-processes", "1"],
}
TOKEN = "bench-token-" + "5e7a" * 6
BOUNDARY = "deephashbenchboundary"


# ------------------------------------------------------------------------------ model and index


def hamming_only(index_dir: Path, root: Path, name: str = "index-hamming") -> Path:
    """A copy of the index without its re-rank vectors: searches are Hamming only (one stage)."""
    out = root / name
    shutil.copytree(index_dir, out)
    (out / "rerank.npy").unlink(missing_ok=True)
    return out


def prepare(run: Path, index: Path | None, root: Path) -> tuple[Path, Path]:
    """``(run, index)`` to serve: with no index, the run's model copied with ``data.limit``
    cleared and an index of its train split (the whole of it)."""
    if index is not None:
        return run, index
    from deephash import runs

    model, config = runs.load_run(run, device="cpu")
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, limit=0), device="cpu")
    out = root / "run"
    out.mkdir(parents=True)
    runs.save_model(out / "model.pt", model, config, list(getattr(model, "classes", []) or []))
    print("building the index of the train split ...", flush=True)
    runs.build_index(out, split="train", out=root / "index")
    return out, root / "index"


def query_pngs(run_dir: Path, n: int) -> list[bytes]:
    """PNG files of ``n`` query-split images (images the index has not seen)."""
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


def multipart(png: bytes, fields: dict[str, str]) -> bytes:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
                 f"Content-Type: image/png\r\n\r\n".encode() + png + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def lua_string(data: bytes) -> str:
    return '"' + "".join(f"\\{b}" for b in data) + '"'


def wrk_script(path: Path, pngs: list[bytes], adds: float, k: int) -> None:
    """A wrk Lua script: searches (uploads) and a share ``adds`` of adds, prepared bodies; at the
    end one JSON line of counts and latency percentiles."""
    searches = ",\n".join(lua_string(multipart(p, {"k": str(k)})) for p in pngs)
    uploads = ",\n".join(lua_string(multipart(p, {})) for p in pngs[::-1])
    path.write_text(f"""
local searches = {{ {searches} }}
local uploads = {{ {uploads} }}
local kind = "multipart/form-data; boundary={BOUNDARY}"
local search_headers = {{ ["Content-Type"] = kind }}
local add_headers = {{ ["Content-Type"] = kind, ["Authorization"] = "Bearer {TOKEN}" }}
local n = 0
local thread_id = 0
setup = function(thread) thread_id = thread_id + 1; thread:set("id", thread_id) end
init = function(args) math.randomseed(1000 + (id or 0)); n = (id or 0) * 7 end
request = function()
  n = n + 1
  if math.random() < {adds} then
    return wrk.format("POST", "/api/items", add_headers, uploads[(n % #uploads) + 1])
  end
  return wrk.format("POST", "/api/search", search_headers, searches[(n % #searches) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {{"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d, "mean_us": %.1f}}\\n', summary.requests,
    summary.duration, e.connect, e.read, e.write, e.status, e.timeout, latency:percentile(50),
    latency:percentile(99), latency.mean))
end
""")


# ------------------------------------------------------------------------------ servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class Server:
    name: str
    proc: subprocess.Popen
    base: str
    has_health: bool = True

    def health(self) -> dict:
        """``/api/health``, or empty counters from a server that has none (an older checkout: its
        first answer is 404, and it is not asked again)."""
        if self.has_health:
            answer = httpx.get(f"{self.base}/api/health", timeout=30)
            if answer.status_code != 404:
                return answer.raise_for_status().json()
            self.has_health = False
        return {"batching": {}}

    @property
    def writable(self) -> bool:
        return "--workers" not in ENGINES.get(self.name, [])

    def processes(self) -> list[int]:
        """The server's process and its descendants (``--workers``' children)."""
        parents: dict[int, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
        tree, grown = {self.proc.pid}, True
        while grown:
            more = {pid for pid, parent in parents.items() if parent in tree} - tree
            tree |= more
            grown = bool(more)
        return sorted(tree)

    def rss_mb(self) -> float:
        """Resident memory of the server's processes together, MB."""
        total = 0
        for pid in self.processes():
            try:
                lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            except OSError:
                continue
            total += sum(int(line.split()[1]) for line in lines if line.startswith("VmRSS:"))
        return total / 1024

    def cpu_s(self) -> float:
        """CPU seconds used so far by the server's processes."""
        return cpu_seconds(self.processes())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_server(name: str, extra: list[str], run_dir: Path, index_dir: Path, root: Path,
                 onnx_model: Path | None = None, src: Path | None = None) -> Server:
    """A writable server over a fresh copy of ``index_dir``; waits for /healthz. The ``onnx``
    engine serves ``onnx_model`` (``--model``) instead of the run; ``src`` runs the deephash of
    another checkout (its ``src`` folder first on ``PYTHONPATH``)."""
    model = ["--run", str(run_dir)]
    if name.startswith("onnx"):
        if onnx_model is None:
            raise SystemExit("the onnx engine needs --onnx-model EXPORT_DIR")
        model = ["--model", str(onnx_model)]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    copy = root / f"index-{slug}-{time.monotonic_ns()}"
    shutil.copytree(index_dir, copy)
    token_file = root / "token"
    token_file.write_text(TOKEN)
    writes = ["--token-file", str(token_file)] if "--workers" not in extra else []  # several: read-only
    port = free_port()
    log = root / f"server-{slug}.log"
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src.resolve()), *filter(None, [env.get("PYTHONPATH")])])
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "deephash", "serve", str(copy), *model,
                                 "--host", "127.0.0.1", "--port", str(port), *writes, *extra],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server {name} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return Server(name, proc, base)
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit(f"server {name} did not answer /healthz within 300 s")


# ------------------------------------------------------------------------------ load


@dataclasses.dataclass
class Phase:
    """One wrk run against one server."""

    server: str
    workload: str
    in_flight: int
    requests: int
    errors: int
    status_errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    mean_batch: float
    shed: int
    rss_mb: float
    server_cores: float
    client_cores: float
    search: str = ""

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds


def run_wrk(server: Server, script: Path, in_flight: int, seconds: float, workload: str) -> Phase:
    """``wrk`` with ``in_flight`` connections for ``seconds`` against ``server``."""
    before, cpu_before = server.health().get("batching", {}), server.cpu_s()
    tic = time.perf_counter()
    proc = subprocess.Popen(["wrk", "-t", "1", "-c", str(in_flight), "-d", f"{seconds:g}s", "--timeout", "30s",
                             "-s", str(script), server.base], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - tic
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"wrk failed ({proc.returncode}): {output[-2000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    after, cpu_after = server.health().get("batching", {}), server.cpu_s()
    batches = after.get("batches", 0) - before.get("batches", 0)
    answered = after.get("requests", 0) - before.get("requests", 0)
    if not server.writable:  # several processes: /api/health speaks for whichever one answered
        batches = answered = 0
    errors = sum(result[k] for k in ("connect", "read", "write", "status", "timeout"))
    return Phase(server.name, workload, in_flight, result["requests"], errors, result["status"],
                 result["duration_us"] / 1e6, result["p50_us"] / 1000, result["p99_us"] / 1000,
                 answered / batches if batches else (1.0 if server.writable else float("nan")),
                 after.get("shed", 0) - before.get("shed", 0),
                 server.rss_mb(), (cpu_after - cpu_before) / wall,
                 (usage.ru_utime + usage.ru_stime) / wall)


def same_answers(servers: list[Server], pngs: list[bytes]) -> bool:
    """Whether every server answers the same uploads with the same ids and distances."""
    answers = []
    for server in servers:
        rows = []
        for png in pngs:
            body = httpx.post(f"{server.base}/api/search", files={"image": ("q.png", png, "image/png")},
                              data={"k": "10"}, timeout=30).json()
            rows.append([(r["id"], r["distance"]) for r in body["results"]])
        answers.append(rows)
    return all(a == answers[0] for a in answers)


def checkout_revision(src: Path) -> str:
    """The short commit of the git checkout holding ``src`` (``src`` itself when git cannot tell)."""
    try:
        return subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return str(src)


def busy_processes(limit: int = 6) -> str:
    """The other processes using the CPU now (``ps``), for the record."""
    try:
        text = subprocess.run(["ps", "-eo", "pcpu,args", "--sort=-pcpu"], capture_output=True, text=True,
                              timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    rows = []
    for line in text.splitlines()[1:]:
        cpu, _, args = line.strip().partition(" ")
        if float(cpu or 0) < 5 or "wrk" in args or "deephash serve" in args or "serve_load" in args:
            continue
        rows.append(f"{' '.join(args.split()[:4])[:70]} ({cpu}%)")
        if len(rows) == limit:
            break
    return "; ".join(rows) or "nothing over 5 %"


# ------------------------------------------------------------------------------ report


def row(p: Phase) -> str:
    batch = "n/a" if np.isnan(p.mean_batch) else f"{p.mean_batch:.1f}"
    return (f"| {p.server} | {p.search} | {p.workload} | {p.in_flight} | {p.requests} | {p.errors} | {p.throughput:.1f} | "
            f"{p.p50_ms:.1f} | {p.p99_ms:.1f} | {batch} | {p.rss_mb:.0f} | {p.server_cores:.2f} | "
            f"{p.throughput / max(p.server_cores, 1e-9):.0f} | "
            f"{p.client_cores:.2f} |")


HEADER = ("| server | search | workload | in flight | requests | errors | throughput (req/s) | p50 (ms) | p99 (ms) | "
          "mean batch | server RSS (MB) | server CPU (cores) | req/s per server core | client CPU (cores) |\n"
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a trained run (its model encodes the uploads)")
    parser.add_argument("--index", type=Path, help="an index of --run's model (default: build one of the train split)")
    parser.add_argument("--engines", default="one-at-a-time,batched,batched --workers 2",
                        help=f"servers to compare, by name, comma-separated ({'; '.join(ENGINES)}; default: the first "
                             "three; the read-only processes skip the mixed workload)")
    parser.add_argument("--onnx-model", type=Path, help="an exported model (runs/export.py) for the onnx engine")
    parser.add_argument("--seconds", type=float, default=10, help="length of each measured phase (default: 10)")
    parser.add_argument("--in-flight", default="16,64", help="requests in flight (default: 16,64)")
    parser.add_argument("--adds", type=float, default=0.1, help="share of adds in the mixed workload (default: 0.1)")
    parser.add_argument("--waits", default="0,1,2,5,10", help="--batch-wait-ms values of the sweep (default: 0,1,2,5,10)")
    parser.add_argument("--overload", type=int, default=256, help="in flight in the overload run (default: 256)")
    parser.add_argument("--searches", default="hamming,two-stage",
                        help="hamming: the index served without its re-rank vectors; two-stage: with them "
                             "(default: hamming,two-stage; the sweep and the overload use the first)")
    parser.add_argument("--k", type=int, default=10, help="results per search (default: 10)")
    parser.add_argument("--baseline-src", type=Path, help="another checkout's src folder: its deephash serve joins "
                        "the side-by-side phases (e.g. a worktree of the commit an issue was filed at)")
    parser.add_argument("--baseline-run", type=Path, help="a run made by --baseline-src's deephash")
    parser.add_argument("--baseline-index", type=Path, help="an index made by --baseline-src's deephash of --baseline-run")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    args = parser.parse_args(argv)
    baseline_args = (args.baseline_src, args.baseline_run, args.baseline_index)
    if any(a is not None for a in baseline_args) and not all(a is not None for a in baseline_args):
        parser.error("--baseline-src, --baseline-run and --baseline-index go together")
    baseline = None if args.baseline_src is None else f"at {checkout_revision(args.baseline_src)}"
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed: apt-get install -y wrk")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        parser.error(f"unknown engines {unknown}: choose from {', '.join(ENGINES)}")
    in_flight = [int(v) for v in args.in_flight.split(",")]
    searches = [v.strip() for v in args.searches.split(",") if v.strip()]
    if not searches or set(searches) - {"hamming", "two-stage"}:
        parser.error("--searches: hamming and/or two-stage")
    others_before = busy_processes()
    load_before = os.getloadavg()

    phases: list[Phase] = []
    sweep: list[tuple[float, Phase]] = []
    overload: list[Phase] = []
    infos: dict[str, dict] = {}
    agree = True
    with tempfile.TemporaryDirectory(prefix="deephash-serve-bench-") as tmp:
        root = Path(tmp)
        run_dir, index_dir = prepare(args.run, args.index, root)
        regimes = {"two-stage": index_dir, "hamming": hamming_only(index_dir, root)}
        if baseline is not None:
            baseline_regimes = {"two-stage": args.baseline_index,
                                "hamming": hamming_only(args.baseline_index, root, "index-hamming-baseline")}
        pngs = query_pngs(run_dir, 64)
        read_only, mixed = root / "read.lua", root / "mixed.lua"
        wrk_script(read_only, pngs, 0.0, args.k)
        wrk_script(mixed, pngs, args.adds, args.k)
        for regime in searches:
            servers = [start_server(e, ENGINES[e], run_dir, regimes[regime], root, args.onnx_model) for e in engines]
            if baseline is not None:
                servers.append(start_server(baseline, [], args.baseline_run, baseline_regimes[regime], root,
                                            src=args.baseline_src))
            try:
                infos[regime] = httpx.get(f"{servers[0].base}/api/info", timeout=30).json()
                agree &= same_answers([s for s in servers if s.name != baseline], pngs[:16])
                for server in servers:
                    run_wrk(server, read_only, 16, 2, "warm-up")
                for n in in_flight:  # the servers side by side, phase by phase: the machine drifts alike
                    mixed_name = f"{1 - args.adds:.0%}/{args.adds:.0%} search/add"
                    for script, workload in ((read_only, "read-only"), (mixed, mixed_name)):
                        for server in (s for s in servers if s.writable or script is read_only):
                            phase = dataclasses.replace(run_wrk(server, script, n, args.seconds, workload), search=regime)
                            print(row(phase), flush=True)
                            phases.append(phase)
            finally:
                for server in servers:
                    server.stop()
        regime = searches[0]  # the sweep and the overload: the first kind of search only
        for wait in [float(w) for w in args.waits.split(",") if w.strip()]:
            server = start_server(f"wait-{wait:g}", ["--max-batch", "32", "--batch-wait-ms", f"{wait:g}"], run_dir,
                                  regimes[regime], root)
            try:
                run_wrk(server, read_only, 16, 2, "warm-up")
                phase = dataclasses.replace(run_wrk(server, read_only, 16, args.seconds, "read-only"), search=regime)
                print(f"wait {wait:g} ms: {row(phase)}", flush=True)
                sweep.append((wait, phase))
            finally:
                server.stop()
        overloaded = [(e, ENGINES[e], run_dir, regimes[regime], None) for e in engines if "--workers" not in ENGINES[e]]
        if baseline is not None:
            overloaded.append((baseline, [], args.baseline_run, baseline_regimes[regime], args.baseline_src))
        for name, extra, run, index, src in overloaded:
            server = start_server(name, extra, run, index, root, args.onnx_model, src)
            try:
                run_wrk(server, read_only, 16, 2, "warm-up")
                for n, label in ((args.overload, "overload"), (16, "recovery, right after")):
                    phase = dataclasses.replace(run_wrk(server, read_only, n, args.seconds, label), search=regime)
                    print(row(phase), flush=True)
                    overload.append(phase)
            finally:
                server.stop()
    others_after = busy_processes()
    info = infos[searches[0]]

    def find(server: str, search: str, workload: str, n: int) -> Phase | None:
        key = (server, search, workload, n)
        return next((p for p in phases if (p.server, p.search, p.workload, p.in_flight) == key), None)

    ratios = []
    references = ["one-at-a-time"] if "one-at-a-time" in engines else []
    for reference in references + ([baseline] if baseline is not None else []):
        for name in (e for e in engines if e not in ("one-at-a-time", reference)):
            for p in (p for p in phases if p.server == name):
                base = find(reference, p.search, p.workload, p.in_flight)
                if base is not None:
                    per_core = (p.throughput / max(p.server_cores, 1e-9)) / (base.throughput / max(base.server_cores, 1e-9))
                    ratios.append(f"{name} / {reference}, {p.search}, {p.workload}, {p.in_flight} in flight: "
                                  f"{p.throughput / base.throughput:.2f}x throughput ({per_core:.2f}x per server core), "
                                  f"p99 {p.p99_ms:.0f} vs {base.p99_ms:.0f} ms")
    errors = sum(p.errors for p in phases) + sum(p.errors for p in sweep_phases(sweep))
    command = "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "(unset)") + " python bench/serve_load.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    section = (
        f"{SECTION}\n\n"
        f"`{command.strip()}` on {dt.date.today().isoformat()}; {cpu_model()}, {os.cpu_count()} logical CPUs, CPU only; "
        "server and client on 127.0.0.1, one run. Client: wrk 4.1 (1 thread, one connection per request in flight, "
        "prepared multipart bodies of 64 Fashion-MNIST test images; `--timeout 30s`), its CPU measured with `wait4`. "
        f"The machine is shared: load average {load_before[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
        f"busy beside the bench at the start: {others_before}; at the end: {others_after}. So compare the rows of one "
        "run side by side (the servers take turns phase by phase), not their absolute values.\n\n"
        f"Index: {info['size']} items (the train split), {info['bits']}-bit codes, {info['factory']}, model "
        f"{info['model']} from `{args.run}`, searched two ways: *two-stage* (the index keeps the model's re-rank "
        "vectors: a Hamming shortlist of 100 plus every item tied with its last, re-ranked by the vectors' Euclidean "
        "distance) and *hamming* (the same index without them: one Hamming k-NN search); k = "
        f"{args.k}. Each server is writable (the mixed workload adds items to its own copy) but the one with "
        "`--workers 2` (read-only: it runs the read-only workloads only; its mean batch is n/a, as `/api/health` "
        "speaks for one process; its RSS and CPU are its 3 processes': the supervisor and 2 servers); "
        f"settings: {'; '.join(f'{e}: `' + ' '.join(ENGINES[e]) + '`' for e in engines)}. "
        + (f"*{baseline}*: `deephash serve` of the checkout `{args.baseline_src}` (commit {baseline[3:]}), with "
           f"its own run `{args.baseline_run}` and index `{args.baseline_index}`, made by that checkout from the same "
           "config (its answers are not compared: another training). " if baseline is not None else "")
        + f"Same answers from every server for 16 uploads: {'yes' if agree else 'NO'}. Each phase {args.seconds:g} s; "
        "throughput is answered requests (any status) over the phase; errors are non-2xx answers plus socket "
        "errors and timeouts; mean batch from the server's `/api/health` counters over the phase.\n\n"
        f"{HEADER}\n" + "\n".join(row(p) for p in phases) + "\n\n"
        + ("Ratios measured in this run: " + "; ".join(ratios) + ".\n\n" if ratios else "")
        + f"Sweep of `--batch-wait-ms` (batched, `--max-batch 32`, {searches[0]} search, read-only, 16 in flight):\n\n"
        f"{HEADER.replace('| server |', '| wait (ms) |')}\n"
        + "\n".join(row(dataclasses.replace(p, server=f"{w:g}")) for w, p in sweep) + "\n\n"
        + f"Overload: {args.overload} in flight (batched servers admit at most `--max-queue` = 128 searches at "
        "once and answer the rest 503 with `Retry-After: 1`; the one-at-a-time path has no queue of its own), then 16 in "
        "flight right after on the same server (recovery). Errors here are mostly the 503s; shed = 503s counted by "
        "the server.\n\n"
        f"{HEADER.replace('| mean batch |', '| mean batch (shed) |')}\n"
        + "\n".join(row(p).replace(f"| {p.mean_batch:.1f} |", f"| {p.mean_batch:.1f} ({p.shed}) |") for p in overload)
        + "\n"
    )
    print(section)
    if not args.no_write:
        write_section(SECTION, section)
    return 1 if errors else 0


def sweep_phases(sweep: list[tuple[float, Phase]]) -> list[Phase]:
    return [p for _, p in sweep]


if __name__ == "__main__":
    sys.exit(main())
