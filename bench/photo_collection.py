"""A photo collection through every command, with the peak memory of each.

    python scripts/make_photo_collection.py --out /work/photos70k --n 70000 --workers 2
    python bench/photo_collection.py /work/photos70k --work /tmp/pc --seed 0 [--set KEY=VALUE ...]

Runs, each as its own ``python -m deephash`` process, on the folder ``COLLECTION`` (``train/`` and
``test/`` inside, class sub-folders in each): ``train`` (the config, ``photos-cpu-48`` by default,
with ``data.images = COLLECTION``), ``evaluate`` (queries: test, database: train), ``index build
--images COLLECTION/train``, ``index add --images COLLECTION/test``, ``search`` with three test
photos, and ``serve``: started, asked ``--requests`` searches by uploaded photo, stopped with SIGTERM.
``--only`` picks some of them (``train`` first when the run directory is new). ``--subset N``
runs on N of the collection's files instead, hard-linked into ``WORK/collection-N`` (each split's
share in proportion, spread evenly over its sorted listing, so every class keeps its share):
the same photos at other sizes, for memory against collection size.

Every 0.1 s the bench sums the resident memory of the command's process and all its descendants
(the decoding workers included): VmRSS (what ``top`` shows; pages shared between the processes
count once per process, so this overstates) and Pss (proportional set size: each shared page
split between the processes sharing it, so the sum is the memory the command really holds). The
peaks of both sums, the wall time and the command's exit status are printed and, with ``--json``,
written as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

COMMANDS = ("train", "evaluate", "index", "add", "search", "serve")


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, from ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def memory_kb(pids: list[int]) -> tuple[int, int]:
    """Summed VmRSS and Pss (kB) of ``pids`` (processes that ended meanwhile count 0)."""
    rss = pss = 0
    for pid in pids:
        try:
            rss += next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if line.startswith("VmRSS:"))
            pss += next(int(line.split()[1]) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                        if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
    return rss, pss


class PeakMemory:
    """Samples a process tree's summed memory every ``interval`` s in a thread until stopped."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid, self.interval = pid, interval
        self.peak_rss_kb = self.peak_pss_kb = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            rss, pss = memory_kb(descendants(self.pid))
            self.peak_rss_kb, self.peak_pss_kb = max(self.peak_rss_kb, rss), max(self.peak_pss_kb, pss)
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def measured(name: str, argv: list[str], log: Path, during=None) -> dict:
    """Run ``python -m deephash ARGV`` (its output appended to ``log``), sampling its memory;
    ``during(proc)`` runs while it does (then the process is sent SIGTERM)."""
    started = time.perf_counter()
    with open(log, "ab") as out:
        out.write(f"\n$ deephash {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen([sys.executable, "-m", "deephash", *argv], stdout=out, stderr=subprocess.STDOUT)
        peak = PeakMemory(proc.pid)
        extra = {}
        try:
            if during is not None:
                extra = during(proc)
                proc.send_signal(signal.SIGTERM)
            rc = proc.wait()
        finally:
            peak.stop()
    row = {"command": name, "rc": rc, "seconds": round(time.perf_counter() - started, 1),
           "peak_rss_mb": round(peak.peak_rss_kb / 1024), "peak_pss_mb": round(peak.peak_pss_kb / 1024), **extra}
    print(json.dumps(row), flush=True)
    return row


def serve_and_search(photos: list[Path], port: int, requests: int):
    """``during`` for the server: wait for /healthz, then upload ``requests`` photos to /api/search."""
    def during(proc: subprocess.Popen) -> dict:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        answered = 0
        with httpx.Client(base_url=base, timeout=60) as client:
            for i in range(requests):
                photo = photos[i % len(photos)]
                reply = client.post("/api/search", files={"image": (photo.name, photo.read_bytes())}, data={"k": "10"})
                answered += reply.status_code == 200 and len(reply.json()["results"]) == 10
        return {"searches_answered": answered, "searches_sent": requests}
    return during


def decodes(path: Path) -> bool:
    """Whether the whole file decodes (the collection's corrupt files do not)."""
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def hard_linked_subset(collection: Path, n: int, out: Path) -> Path:
    """``out`` holding ``n`` of the collection's files as hard links (see ``--subset``)."""
    splits = {split: sorted(p for p in (collection / split).rglob("*") if p.is_file()) for split in ("train", "test")}
    total = sum(len(files) for files in splits.values())
    if not 0 < n <= total:
        raise SystemExit(f"--subset must be in 1..{total}, got {n}")
    for split, files in splits.items():
        k = round(n * len(files) / total)
        for i in range(k):
            source = files[i * len(files) // k]
            target = out / source.relative_to(collection)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(source, target)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("collection", type=Path, help="folder with train/ and test/ class folders")
    parser.add_argument("--work", type=Path, required=True, help="folder for the run, the index and the log")
    parser.add_argument("--config", default="photos-cpu-48")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides for train")
    parser.add_argument("--only", nargs="+", choices=COMMANDS, default=list(COMMANDS))
    parser.add_argument("--subset", type=int, help="run on this many of the collection's files (hard links)")
    parser.add_argument("--requests", type=int, default=50, help="searches sent to the server")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    collection, work = args.collection.resolve(), args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.subset:
        collection = hard_linked_subset(collection, args.subset, work / f"collection-{args.subset}")
    run, index, log = work / "run", work / "index", work / "commands.log"
    tests = [p for p in sorted((collection / "test").rglob("*.jpg"))[:: 97] if decodes(p)][:20]
    steps = {
        "train": lambda: measured("train", ["train", args.config, "--out", str(run), "--quiet",
                                            "--set", f"data.images={collection}", "--set", f"seed={args.seed}",
                                            *[x for item in args.set for x in ("--set", item)]], log),
        "evaluate": lambda: measured("evaluate", ["evaluate", str(run)], log),
        "index": lambda: measured("index build --images", ["index", "build", str(run), "--images",
                                                            str(collection / "train"), "--out", str(index), "--quiet"], log),
        "add": lambda: measured("index add --images", ["index", "add", str(index), "--run", str(run), "--images",
                                                        str(collection / "test")], log),
        "search": lambda: measured("search", ["search", str(index), *map(str, tests[:3]), "--run", str(run), "-k", "10",
                                              "--json"], log),
        "serve": lambda: measured("serve", ["serve", str(index), "--run", str(run), "--host", "127.0.0.1", "--port",
                                            str(args.port)], log, serve_and_search(tests, args.port, args.requests)),
    }
    rows = []
    for name in (n for n in COMMANDS if n in args.only):
        rows.append(steps[name]())
        if rows[-1]["rc"] not in (0, -signal.SIGTERM):
            break  # the next commands need what this one makes
    if args.json:
        args.json.write_text(json.dumps({"collection": str(collection), "seed": args.seed, "set": args.set,
                                         "rows": rows}, indent=1))
    return 0 if all(row["rc"] in (0, -signal.SIGTERM) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
