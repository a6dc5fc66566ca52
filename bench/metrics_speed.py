"""Benchmark: ``evaluate_codes`` and ``mean_average_precision`` on 10k queries x 60k database codes.

Two kinds of 48-bit codes with 10 classes of single int labels: uniformly random codes, and
clustered codes (each code is its class's random center with each bit flipped with a
per-code probability drawn from 0..0.25: few distinct distances, many ties, classes overlapping
as with a trained model). Every timing is one run in this process.

References, both timed on the first ``--reference-queries`` queries only and extrapolated per
query (they are slow), and both checked against the new numbers on that subset:

* a plain numpy loop in DeepHash-pytorch's ``CalcTopMap`` style (one query at a time: distances
  from ±1 codes, stable argsort, cumulative precision) for stable mAP@all and mAP@1000;
* with ``--baseline-rev REV``, the ``evaluate_codes`` of ``src/deephash/retrieval/metrics.py`` at
  that git revision (e.g. ``cf9f377``, the version before the one-pass rewrite).

Usage: ``python bench/metrics_speed.py [--baseline-rev cf9f377] [--queries 10000]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from deephash.retrieval import evaluate_codes, mean_average_precision, pack_codes

ROOT = Path(__file__).resolve().parent.parent


def make_codes(kind: str, n: int, bits: int, classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """bool ``(n, bits)`` codes and int64 ``(n,)`` labels, ``kind`` "random" or "clustered"."""
    labels = rng.integers(0, classes, n)
    if kind == "random":
        return rng.integers(0, 2, (n, bits)).astype(bool), labels
    centers = np.random.default_rng(1234).integers(0, 2, (classes, bits)).astype(bool)  # shared by both splits
    flips = rng.random((n, bits)) < rng.uniform(0, 0.25, (n, 1))  # 0 to 12 flipped bits on average
    return centers[labels] ^ flips, labels


def calc_top_map(q_bits: np.ndarray, ql: np.ndarray, db_bits: np.ndarray, dl: np.ndarray, topk: int) -> float:
    """DeepHash-pytorch's CalcTopMap, one query at a time, ties in database order (stable argsort)."""
    q_pm, db_pm = q_bits * 2.0 - 1, db_bits * 2.0 - 1
    aps = []
    for i in range(len(q_pm)):
        hamm = 0.5 * (q_pm.shape[1] - db_pm @ q_pm[i])
        gnd = (dl == ql[i])[np.argsort(hamm, kind="stable")][:topk]
        hits = gnd.sum()
        if hits == 0:
            aps.append(0.0)
            continue
        count = np.arange(1, hits + 1)
        positions = np.flatnonzero(gnd) + 1.0
        aps.append(float(np.mean(count / positions)))
    return float(np.mean(aps))


def load_baseline(rev: str) -> Any:
    """The metrics module at git revision ``rev``, imported under another name."""
    source = subprocess.run(["git", "show", f"{rev}:src/deephash/retrieval/metrics.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_metrics.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("baseline_metrics", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_metrics"] = module
    spec.loader.exec_module(module)
    return module


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    tic = time.perf_counter()
    value = fn()
    return time.perf_counter() - tic, value


def run(kind: str, args: argparse.Namespace, baseline: Any) -> None:
    rng = np.random.default_rng(0)
    db_bits, dl = make_codes(kind, args.database, args.bits, args.classes, rng)
    q_bits, ql = make_codes(kind, args.queries, args.bits, args.classes, rng)
    q, db = pack_codes(q_bits), pack_codes(db_bits)
    nq, m = args.queries, min(args.reference_queries, args.queries)
    print(f"\n### {kind} codes: {nq} queries x {args.database} database, {args.bits} bits, {args.classes} classes")

    seconds, table = timed(lambda: evaluate_codes(q, ql, db, dl, args.bits))
    print(f"evaluate_codes (all metrics, both tie rules): {seconds:.1f} s ({seconds / nq * 1e3:.2f} ms/query)")
    print("  " + ", ".join(f"{k}={v:.4f}" for k, v in table.items() if k != "protocol"))
    new_per_query = seconds / nq
    for ties in ("tie-aware", "stable"):
        for k in (None, 1000):
            seconds, value = timed(lambda: mean_average_precision(q, ql, db, dl, args.bits, k=k, ties=ties))
            print(f"mean_average_precision(k={k}, ties={ties}): {seconds:.1f} s  ({value:.4f})")

    sub = (q[:m], ql[:m], db, dl, args.bits)
    seconds, (ref_all, ref_1000) = timed(lambda: (calc_top_map(q_bits[:m], ql[:m], db_bits, dl, args.database),
                                                  calc_top_map(q_bits[:m], ql[:m], db_bits, dl, 1000)))
    ours = (mean_average_precision(*sub, ties="stable"), mean_average_precision(*sub, k=1000, ties="stable"))
    assert np.allclose(ours, (ref_all, ref_1000), atol=1e-9), (ours, ref_all, ref_1000)
    print(f"numpy CalcTopMap loop (stable mAP@all + mAP@1000 only), {m} queries: {seconds / m * 1e3:.2f} ms/query "
          f"-> {seconds / m * nq:.0f} s for {nq}; evaluate_codes is {seconds / m / new_per_query:.1f}x faster "
          "while computing every metric")
    if baseline is not None:
        seconds, old = timed(lambda: baseline.evaluate_codes(*sub))
        new = evaluate_codes(*sub)
        assert all(abs(old[k] - new[k]) < 1e-9 for k in old if k != "protocol"), "baseline disagrees"
        print(f"baseline evaluate_codes at {args.baseline_rev}, {m} queries: {seconds / m * 1e3:.2f} ms/query "
              f"-> {seconds / m * nq:.0f} s for {nq}; speed-up {seconds / m / new_per_query:.1f}x (same values)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--database", type=int, default=60_000)
    parser.add_argument("--bits", type=int, default=48)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--reference-queries", type=int, default=200)
    parser.add_argument("--baseline-rev", default=None, help="git revision whose metrics.py is the baseline")
    parser.add_argument("--kinds", default="random,clustered")
    args = parser.parse_args()
    baseline = load_baseline(args.baseline_rev) if args.baseline_rev else None
    for kind in args.kinds.split(","):
        run(kind, args, baseline)


if __name__ == "__main__":
    main()
