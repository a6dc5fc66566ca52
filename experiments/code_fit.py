"""Benchmark: where a trained run's codes land, and how that splits its mAP.

For a finished run of a Fashion-MNIST config with ``RUN/codes/test.npz`` and
``RUN/codes/train.npz`` (the code caches `deephash evaluate RUN` writes; the code length comes
from ``RUN/config.toml``), each class's center is taken as the bitwise majority of its database
codes (for a CSQ run, its hash center once the database fits). Reported:

* ``db_nearest_own``: share of database codes nearest (in Hamming distance) to their own class's
  center, ``db_on_center``: share exactly on it;
* ``query_nearest_own``: the same share for the queries (a nearest-center classifier's accuracy);
* ``ap_right`` / ``ap_wrong``: tie-aware mAP@all over the queries nearest to their own center and
  over the others. mAP@all = query_nearest_own × ap_right + (1 − query_nearest_own) × ap_wrong.

Usage: ``python experiments/code_fit.py RUN [RUN ...]`` prints one Markdown row per run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from deephash.config import load_config
from deephash.retrieval import mean_average_precision
from deephash.retrieval.codes import pack_codes, unpack_codes
from deephash.retrieval.hamming import hamming_distances


def code_fit(run: Path) -> dict[str, float]:
    """The shares and the mAP split of one run (see the module docstring)."""
    with np.load(run / "codes" / "test.npz", allow_pickle=False) as q, \
            np.load(run / "codes" / "train.npz", allow_pickle=False) as d:
        q_packed, q_labels, d_packed, d_labels = q["codes"], q["labels"], d["codes"], d["labels"]
    bits = load_config(run / "config.toml").model.bits
    d_bits = unpack_codes(d_packed, bits)
    classes = np.unique(d_labels)
    centers = pack_codes(np.stack([d_bits[d_labels == c].mean(0) > 0.5 for c in classes]))

    def nearest(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        distance = hamming_distances(codes, centers)
        return classes[distance.argmin(1)], distance.min(1)

    d_pred, d_dist = nearest(d_packed)
    q_pred, _ = nearest(q_packed)
    right = q_pred == q_labels

    def split_map(mask: np.ndarray) -> float:
        if not mask.any():
            return float("nan")
        return float(mean_average_precision(q_packed[mask], q_labels[mask], d_packed, d_labels, bits))

    share, ap_right, ap_wrong = float(right.mean()), split_map(right), split_map(~right)
    return {
        "db_nearest_own": float((d_pred == d_labels).mean()),
        "db_on_center": float(((d_pred == d_labels) & (d_dist == 0)).mean()),
        "query_nearest_own": share,
        "ap_right": ap_right,
        "ap_wrong": ap_wrong,
        # mAP@all is the mean of the per-query APs: the two groups' means weighted by their shares
        "map": sum(w * ap for w, ap in ((share, ap_right), (1 - share, ap_wrong)) if w > 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories evaluated by `deephash evaluate`")
    args = parser.parse_args()
    keys = ["db_nearest_own", "db_on_center", "query_nearest_own", "ap_right", "ap_wrong", "map"]
    print("| run | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for run in args.runs:
        row = code_fit(run)
        print(f"| {run.name} | " + " | ".join(f"{row[k]:.4f}" for k in keys) + " |", flush=True)


if __name__ == "__main__":
    main()
