"""What every benchmark here shares: the machine's description and its section of BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

from deephash._io import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"

__all__ = ["BENCHMARKS", "ROOT", "cpu_model", "write_section"]


def cpu_model() -> str:
    """The processor's model name (``lscpu``), or what ``platform`` knows."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"Model name:\s*(.+)", text)
        return match.group(1).strip() if match else platform.processor() or "unknown CPU"
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown CPU"


def write_section(title: str, body: str, path: Path = BENCHMARKS) -> None:
    """Replace the section headed ``title`` (a ``## ...`` line) with ``body``, or append it; the
    other sections stay as they are. Written atomically."""
    section = body if body.startswith(title) else f"{title}\n\n{body}"
    section = section.rstrip("\n") + "\n"
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: section + "\n", old, count=1) if pattern.search(old) else old.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, new)
    print(f"wrote {path}")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by the processes ``pids`` (Linux ``/proc``; a process
    that has gone counts 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")
