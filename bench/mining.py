"""Benchmark: forward+backward time per batch of every selector with its loss, against peers.

Peers: the seed's per-pair loops (``bench/seed_reference.py``) and pytorch-metric-learning's
closest miner + loss. Batches are n_classes × n_samples, dim 64, on the CPU with 2 threads.
Peak memory: the growth of ``ru_maxrss`` (peak resident set size) of a fresh child process over
its RSS after set-up, for deephash at 64×32. The all-triplets peers (which list O(B³) triplets)
run in children capped at MEMORY_CAP_GB of address space and TIMEOUT_S seconds.

Cross-batch memory (``--xbm``): one training step (forward + backward, then the enqueue) of each
selector's loss wrapped in ``deephash.CrossBatchMemory`` with a full memory of M = 4,096 and
16,384 embeddings, at batches 10×25 and 32×32, beside pytorch-metric-learning's
``CrossBatchMemory`` with the same peer loss and miner, whose queue is given M + B slots so that
both mine over the same B + M columns (PML enqueues the batch before mining). Each step gets a
fresh batch; the memory starts full of N(0, 0.15²) embeddings with labels drawn from the batch's
classes. PML peers run in capped child processes (``XBM_CAP_GB``, ``XBM_TIMEOUT_S``). Written to
its own BENCHMARKS.md section.

Usage: ``python bench/mining.py [--quick] [--threads N] [--xbm]``; prints a table and updates
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deephash._io import atomic_write_text  # noqa: E402
from deephash.losses import create_loss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SELECTORS = ["all", "hardest", "random", "semihard", "batch-hard", "all-positive", "hard-negative"]
SHAPES = [(10, 8), (16, 16), (32, 32), (64, 32)]
DIM, MARGIN, THREADS = 64, 1.0, 2
MEMORY_CAP_GB, TIMEOUT_S = 10, 90
PEAK_LIMIT_GB = 1.0  # deephash's steps at 64x32 must run within this much extra address space
PML_EQUIVALENT = {
    "all": "TripletMarginMiner(all) + TripletMarginLoss",
    "hardest": "TripletMarginMiner(hard) + TripletMarginLoss",
    "random": None,
    "semihard": "TripletMarginMiner(semihard) + TripletMarginLoss",
    "batch-hard": "BatchHardMiner + TripletMarginLoss",
    "all-positive": "PairMarginMiner + ContrastiveLoss",
    "hard-negative": "PairMarginMiner + ContrastiveLoss",
}
SECTION = "## Mining (bench/mining.py)"
XBM_SECTION = "## Mining with a cross-batch memory (bench/mining.py --xbm)"
XBM_MEMORY_SIZES = [4096, 16384]
XBM_SHAPES = [(10, 25), (32, 32)]
XBM_CAP_GB, XBM_TIMEOUT_S = 6, 60


def make_loss(impl: str, name: str):
    """A callable ``(embeddings, labels) -> scalar loss`` for one implementation."""
    if impl == "ours":
        triplet = name not in ("all-positive", "hard-negative")
        return create_loss("online-triplet" if triplet else "online-contrastive", margin=MARGIN, selector=name)
    if impl in ("seed", "anchor-loop"):
        from seed_reference import seed_loss

        return seed_loss(name if impl == "seed" else f"{name}-anchor-loop", MARGIN)
    loss, miner = pml_loss_and_miner(name)
    return lambda e, y: loss(e, y, miner(e, y))


def pml_loss_and_miner(name: str):
    """pytorch-metric-learning's closest ``(loss, miner)`` to one of our selectors (`PML_EQUIVALENT`)."""
    from pytorch_metric_learning import distances, losses, miners, reducers

    squared = distances.LpDistance(power=2, normalize_embeddings=False)
    mean = reducers.MeanReducer()
    if name in ("all", "hardest", "semihard"):
        kind = {"all": "all", "hardest": "hard", "semihard": "semihard"}[name]
        miner = miners.TripletMarginMiner(margin=MARGIN, type_of_triplets=kind, distance=squared)
        loss = losses.TripletMarginLoss(margin=MARGIN, distance=squared, reducer=mean)
    elif name == "batch-hard":
        miner = miners.BatchHardMiner(distance=squared)
        loss = losses.TripletMarginLoss(margin=MARGIN, distance=squared, reducer=mean)
    else:
        miner = miners.PairMarginMiner(pos_margin=0.0, neg_margin=MARGIN)
        loss = losses.ContrastiveLoss(pos_margin=0.0, neg_margin=MARGIN, reducer=mean)
    return loss, miner


def make_memory_loss(impl: str, name: str, shape: tuple[int, int], memory_size: int):
    """``(step, buffer_bytes)``: a memory-wrapped loss whose memory is already full, and the bytes
    of its memory buffers (embeddings float32 + labels int64)."""
    g = torch.Generator().manual_seed(1)
    batch = shape[0] * shape[1]
    if impl == "ours":
        from deephash import CrossBatchMemory

        xbm = CrossBatchMemory(make_loss("ours", name), memory_size, DIM)
        xbm.memory.copy_(torch.randn(memory_size, DIM, generator=g) * 0.15)
        xbm.memory_labels.copy_(torch.randint(0, shape[0], (memory_size,), generator=g))
        xbm.filled = memory_size
        return xbm, xbm.memory_bytes()
    from pytorch_metric_learning import losses

    loss, miner = pml_loss_and_miner(name)
    slots = memory_size + batch  # PML enqueues first: its queue then holds the batch + M rows
    xbm = losses.CrossBatchMemory(loss, DIM, memory_size=slots, miner=miner)
    xbm.embedding_memory.copy_(torch.randn(slots, DIM, generator=g) * 0.15)
    xbm.label_memory.copy_(torch.randint(0, shape[0], (slots,), generator=g))
    xbm.has_been_filled, xbm.queue_idx = True, 0
    nbytes = xbm.embedding_memory.numel() * xbm.embedding_memory.element_size() + xbm.label_memory.numel() * 8
    return xbm, nbytes


def time_stream(fn, shape: tuple[int, int], budget_s: float) -> tuple[float, int]:
    """Median seconds of forward+backward over steps on fresh batches that fit ``budget_s`` (at
    least 1, at most 30), after one warm-up step (a fresh memory's first step is not measured)."""
    batches = [make_batch(*shape, seed=seed) for seed in range(31)]

    def step(i: int) -> float:
        embeddings, labels = batches[i]
        x = embeddings.clone().requires_grad_(True)
        start = time.perf_counter()
        fn(x, labels).backward()
        return time.perf_counter() - start

    first = step(0)
    reps = int(max(1, min(30, budget_s // max(first, 1e-9))))
    return statistics.median(step(i + 1) for i in range(reps)), reps


def make_batch(n_classes: int, n_samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(n_samples)
    embeddings = torch.randn(len(labels), DIM, generator=g) * 0.15
    return embeddings, labels


def measure(impl: str, name: str, embeddings: torch.Tensor, labels: torch.Tensor, budget_s: float,
            capped_shape: tuple[int, int] | None = None) -> dict:
    """``{"seconds", "reps"}`` of one implementation: in this process, or, given ``capped_shape``,
    in a memory- and time-capped child (`run_child`) that rebuilds the batch of that shape."""
    if capped_shape is not None:
        return run_child(impl, name, capped_shape, budget_s, cap=True)
    seconds, reps = time_step(make_loss(impl, name), embeddings, labels, budget_s)
    return {"seconds": seconds, "reps": reps}


def time_step(fn, embeddings: torch.Tensor, labels: torch.Tensor, budget_s: float) -> tuple[float, int]:
    """Median seconds of forward+backward over warm steps that fit ``budget_s`` (at most 30).

    The first step only warms up, unless it alone exceeds the budget (a slow peer): then it is
    the one measurement."""

    def step() -> float:
        x = embeddings.clone().requires_grad_(True)
        start = time.perf_counter()
        fn(x, labels).backward()
        return time.perf_counter() - start

    first = step()
    reps = int(min(30, budget_s // max(first, 1e-9)))
    if reps < 1:
        return first, 1
    return statistics.median(step() for _ in range(reps)), reps


def run_child(impl: str, name: str, shape: tuple[int, int], budget_s: float, cap: bool, memory_size: int = 0) -> dict:
    """Time (and measure peak RSS growth) in a fresh process; failures are reported, not hidden.
    ``memory_size`` > 0: one step of the memory-wrapped loss (`make_memory_loss`), capped at
    ``XBM_CAP_GB`` and ``XBM_TIMEOUT_S``."""
    command = [sys.executable, __file__, "--child", impl, name, str(shape[0]), str(shape[1]), str(budget_s),
               "--threads", str(THREADS)]
    if cap:
        command.append("--cap")
    if memory_size:
        command += ["--child-memory", str(memory_size)]
    timeout, cap_gb = (XBM_TIMEOUT_S, XBM_CAP_GB) if memory_size else (TIMEOUT_S, MEMORY_CAP_GB)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f">{timeout}s"}
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        oom = "MemoryError" in done.stderr or "alloc" in done.stderr.lower() or done.returncode < 0
        return {"error": f"out of memory (cap {cap_gb} GB)" if oom else tail[0][:60]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _address_space_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[0]) * resource.getpagesize()


def child(impl: str, name: str, n_classes: int, n_samples: int, budget_s: float, cap: bool, memory_size: int = 0) -> None:
    if memory_size:
        limit = XBM_CAP_GB * 1024**3
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        torch.set_num_threads(THREADS)
        fn, nbytes = make_memory_loss(impl, name, (n_classes, n_samples), memory_size)
        seconds, reps = time_stream(fn, (n_classes, n_samples), budget_s)
        print(json.dumps({"seconds": seconds, "reps": reps, "buffer_bytes": nbytes}))
        return
    if cap:
        limit = MEMORY_CAP_GB * 1024**3
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(THREADS)
    embeddings, labels = make_batch(n_classes, n_samples)
    fn = make_loss(impl, name)
    if not cap:  # memory check: after one warm-up step, allow only PEAK_LIMIT_GB more address space
        x = embeddings.clone().requires_grad_(True)
        fn(x, labels).backward()
        del x
        limit = _address_space_bytes() + int(PEAK_LIMIT_GB * 1024**3)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds, reps = time_step(fn, embeddings, labels, budget_s)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps({"seconds": seconds, "reps": reps, "peak_mb": peak_mb}))


def fmt_ms(result: dict) -> str:
    if "error" in result:
        return result["error"]
    return f"{result['seconds'] * 1e3:.2f} ({result['reps']})"


def fmt_ratio(peer: dict | None, ours: dict) -> str:
    if peer is None:
        return "n/a"
    if "error" in peer:
        if peer["error"] == f">{TIMEOUT_S}s":  # the peer did not finish one step in TIMEOUT_S
            return f"≥{TIMEOUT_S / ours['seconds']:.0f}× (lower bound)"
        return f"n/a (peer {peer['error']})"
    return f"{peer['seconds'] / ours['seconds']:.1f}×"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller time budgets (for a smoke run)")
    parser.add_argument("--child", nargs=5, metavar=("IMPL", "NAME", "C", "K", "BUDGET"))
    parser.add_argument("--cap", action="store_true")
    parser.add_argument("--memory-only", action="store_true", help="only the 64x32 memory check; prints its table")
    parser.add_argument("--threads", type=int, default=THREADS, help=f"torch threads (default {THREADS})")
    parser.add_argument("--xbm", action="store_true", help="only the cross-batch memory rows (own BENCHMARKS section)")
    parser.add_argument("--child-memory", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args.threads)
    if args.child:
        impl, name, c, k, budget = args.child
        child(impl, name, int(c), int(k), float(budget), args.cap, args.child_memory)
        return
    torch.set_num_threads(THREADS)
    if args.xbm:
        xbm_main(args.quick)
        return
    if args.memory_only:
        for name in SELECTORS:
            result = run_child("ours", name, SHAPES[-1], 0.5, cap=False)
            print(f"| {name} | {'yes' if 'error' not in result else 'no: ' + result['error']} |", flush=True)
        return
    budget = {"ours": 1.0, "pml": 1.0, "seed": 1.5}
    if args.quick:
        budget = {key: value / 5 for key, value in budget.items()}
    rows, anchor_rows = [], []
    for name in SELECTORS:
        for shape in SHAPES:
            embeddings, labels = make_batch(*shape)
            result = {"ours": measure("ours", name, embeddings, labels, budget["ours"])}
            for impl in ("seed", "pml"):
                if impl == "pml" and PML_EQUIVALENT[name] is None:
                    result[impl] = None
                else:  # O(B^3) lists, or minutes a step: capped child
                    capped = name == "all" or shape == SHAPES[-1]
                    result[impl] = measure(impl, name, embeddings, labels, budget[impl], shape if capped else None)
            if name == "batch-hard":  # the seed has no batch-hard: also a stronger, per-anchor loop
                anchor = measure("anchor-loop", name, embeddings, labels, budget["seed"], shape if shape == SHAPES[-1] else None)
                anchor_rows.append((shape, result["ours"], anchor))
            rows.append((name, shape, result))
            print(
                f"{name:>13} {shape[0]:>2}×{shape[1]:<2} ours {fmt_ms(result['ours']):>14} "
                f"seed {fmt_ms(result['seed']):>22} pml {fmt_ms(result['pml']) if result['pml'] else 'n/a':>22} "
                f"seed/ours {fmt_ratio(result['seed'], result['ours']):>8} pml/ours {fmt_ratio(result['pml'], result['ours']):>8}",
                flush=True,
            )
    memory = {name: run_child("ours", name, SHAPES[-1], 0.5, cap=False) for name in SELECTORS}
    for name, result in memory.items():
        verdict = "ok" if "error" not in result else result["error"]
        print(f"memory {name:>13} 64×32 within +{PEAK_LIMIT_GB} GB address space: {verdict}", flush=True)
    write_markdown(rows, memory, anchor_rows)


def set_threads(threads: int) -> None:
    global THREADS
    THREADS = threads


def xbm_main(quick: bool) -> None:
    """The cross-batch memory rows: ours in this process, PML in capped children."""
    budget = 0.4 if quick else 2.0
    rows = []
    for shape in XBM_SHAPES:
        for memory_size in XBM_MEMORY_SIZES:
            for name in SELECTORS:
                fn, nbytes = make_memory_loss("ours", name, shape, memory_size)
                seconds, reps = time_stream(fn, shape, budget)
                ours = {"seconds": seconds, "reps": reps, "buffer_bytes": nbytes}
                del fn
                pml = None
                if PML_EQUIVALENT[name] is not None:
                    pml = run_child("pml", name, shape, budget, cap=True, memory_size=memory_size)
                rows.append((name, shape, memory_size, ours, pml))
                print(
                    f"xbm {name:>13} {shape[0]}×{shape[1]} M={memory_size:<6} ours {fmt_ms(ours):>14} "
                    f"pml {fmt_ms(pml) if pml else 'n/a':>26} pml/ours {fmt_ratio_xbm(pml, ours):>8}",
                    flush=True,
                )
    write_xbm_markdown(rows)


def fmt_ratio_xbm(peer: dict | None, ours: dict) -> str:
    if peer is None:
        return "n/a"
    if "error" in peer:
        if peer["error"] == f">{XBM_TIMEOUT_S}s":
            return f"≥{XBM_TIMEOUT_S / ours['seconds']:.0f}× (lower bound)"
        return f"n/a (peer {peer['error']})"
    return f"{peer['seconds'] / ours['seconds']:.1f}×"


def write_xbm_markdown(rows) -> None:
    import pytorch_metric_learning

    lines = [
        XBM_SECTION,
        "",
        f"Command: `OMP_NUM_THREADS={THREADS} .venv/bin/python bench/mining.py --xbm --threads {THREADS}`. "
        f"Date: {datetime.date.today().isoformat()}. Machine: {_machine()}, "
        f"pytorch-metric-learning {pytorch_metric_learning.__version__}.",
        "",
        f"One training step (forward + backward; ours then enqueues the batch) of each selector's loss "
        f"wrapped in `deephash.CrossBatchMemory` with a full memory of M embeddings, dim {DIM}, margin "
        f"{MARGIN}, a fresh N(0, 0.15²) batch per step and memory labels drawn from the batch's classes; "
        "milliseconds are the median over steps (count in brackets). PML: pytorch-metric-learning's "
        "`CrossBatchMemory` around the same peer loss + miner as the table above, its queue given M + B slots "
        "so that both mine over the same B + M columns (PML enqueues before mining), run in a child process "
        f"capped at {XBM_CAP_GB} GB address space and {XBM_TIMEOUT_S} s; its miners list every qualifying "
        "triplet or pair (O(B·(B+M)²) triplets for all/hard/semihard), ours pick per pair or per anchor "
        "(see the selectors' docs), so like the table above these are the closest peers, not the same "
        "computation. Buffer: bytes of the memory's embeddings (float32) and labels (int64); ours also "
        "copies the filled part once per step (the loss's graph keeps it while the enqueue writes the buffer).",
        "",
        "| selector | batch | M | deephash ms | PML ms | PML / deephash | deephash buffer | PML buffer |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, shape, memory_size, ours, pml in rows:
        pml_ms = fmt_ms(pml) if pml else "n/a"
        pml_bytes = f"{pml['buffer_bytes']:,}" if pml and "buffer_bytes" in pml else "n/a"
        lines.append(
            f"| {name} | {shape[0]}×{shape[1]} | {memory_size:,} | {fmt_ms(ours)} | {pml_ms} | "
            f"{fmt_ratio_xbm(pml, ours)} | {ours['buffer_bytes']:,} | {pml_bytes} |"
        )
    write_section(XBM_SECTION, "\n".join(lines) + "\n")


def write_section(title: str, section: str) -> None:
    """Replace (or append) the BENCHMARKS.md section that starts with ``title``."""
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(title) + r".*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, text)
    print(f"wrote {path}")


def _machine() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "?")
    except OSError:
        model = platform.processor() or "?"
    return f"{model}, {THREADS} torch threads, torch {torch.__version__}, Python {platform.python_version()}"


def write_markdown(rows, memory, anchor_rows=()) -> None:
    import pytorch_metric_learning

    lines = [
        SECTION,
        "",
        f"Command: `OMP_NUM_THREADS=2 .venv/bin/python bench/mining.py` (`make bench`). "
        f"Date: {datetime.date.today().isoformat()}. Machine: {_machine()}, "
        f"pytorch-metric-learning {pytorch_metric_learning.__version__}. "
        "Run alone on the machine (no other jobs of ours).",
        "",
        f"Forward+backward milliseconds per batch (median, repetitions in brackets), dim {DIM}, margin {MARGIN}, "
        "embeddings N(0, 0.15²). Ratios are peer time / deephash time (higher is better for deephash). "
        "Seed: the seed's per-pair loops (`bench/seed_reference.py`; the seed has no batch-hard: its "
        "per-pair walk over anchor-positive pairs, keeping each anchor's farthest positive and nearest negative). PML: pytorch-metric-learning's closest miner + loss with squared Lp distance "
        "and MeanReducer; it has no random-negative miner (n/a). All-triplets peers list O(B³) triplets "
        f"and run in a child process capped at {MEMORY_CAP_GB} GB address space and {TIMEOUT_S} s, as does every "
        "peer at the largest shape; a peer that does not finish one step in time gives a lower-bound ratio.",
        "",
        "| selector | batch | deephash ms | seed ms | PML ms | seed / deephash | PML / deephash |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, shape, r in rows:
        pml = fmt_ms(r["pml"]) if r["pml"] else "n/a"
        lines.append(
            f"| {name} | {shape[0]}×{shape[1]} | {fmt_ms(r['ours'])} | {fmt_ms(r['seed'])} | {pml} | "
            f"{fmt_ratio(r['seed'], r['ours'])} | {fmt_ratio(r['pml'], r['ours'])} |"
        )
    lines += [
        "",
        "Batch-hard against a stronger loop than the seed's per-pair walk: one vectorised numpy step per "
        "anchor (`SeedAnchorLoopBatchHardTripletSelector`, same triplets).",
        "",
        "| batch | deephash ms | per-anchor loop ms | loop / deephash |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {s[0]}×{s[1]} | {fmt_ms(ours)} | {fmt_ms(loop)} | {fmt_ratio(loop, ours)} |" for s, ours, loop in anchor_rows]
    lines += [
        "",
        f"Peak memory of deephash at 64×32 (B = 2048): a fresh child process runs one warm-up step, then "
        f"limits its address space (RLIMIT_AS) to what it has mapped plus {PEAK_LIMIT_GB:g} GB and times the "
        "steps; a step that needed more would fail with out-of-memory. (An earlier version compared "
        "`ru_maxrss` before and after, which stayed at the import-time peak and read 0 MB: not a measurement.)",
        "",
        f"| selector | every step within +{PEAK_LIMIT_GB:g} GB |",
        "| --- | --- |",
    ]
    lines += [f"| {name} | yes |" if "error" not in r else f"| {name} | no: {r['error']} |" for name, r in memory.items()]
    write_section(SECTION, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
