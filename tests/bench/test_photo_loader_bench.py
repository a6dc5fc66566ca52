"""bench/photo_loader.py counts what it claims: every decodable image once per pass (bar the warm-up
batch), in a random order for training, and --timm without timm stops with one line."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path[:0] = [str(Path(__file__).resolve().parents[2] / "bench")]

import photo_loader  # noqa: E402

from deephash.data import ImageFolder  # noqa: E402


def _folder(root: Path, per_class: int, truncated: int) -> Path:
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            side = int(rng.integers(20, 60))
            Image.fromarray(rng.integers(0, 256, (side, side + 7, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    (root / "c0" / "junk.jpg").write_bytes(b"not an image")  # left out when listed
    for i in range(truncated):  # the header reads, the pixels do not: dropped from its batch
        data = (root / "c1" / f"{i}.png").read_bytes()
        (root / "c1" / f"{i}.png").write_bytes(data[: len(data) // 3])
    return root


def test_batches_cover_every_index_once() -> None:
    for shuffle in (False, True):
        batches = photo_loader._batches(23, 5, shuffle, seed=3)
        assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
        assert sorted(i for b in batches for i in b) == list(range(23))
    assert [i for b in photo_loader._batches(23, 5, False, 0) for i in b] == list(range(23))
    assert [i for b in photo_loader._batches(23, 5, True, 0) for i in b] != list(range(23))


@pytest.mark.parametrize("train", [False, True])
def test_ours_counts_decoded_images_bar_the_first_batch(tmp_path, train) -> None:
    dataset = ImageFolder(_folder(tmp_path / "f", per_class=10, truncated=2), image_size=16)
    assert len(dataset) == 20 and len(dataset.bad_files) == 1
    batches = photo_loader._batches(len(dataset), 4, train, 0)
    truncated = {i for i, p in enumerate(dataset.paths) if Path(p).parent.name == "c1" and Path(p).stem in ("0", "1")}
    # the oracle: the decodable items outside the first batch, once per pass
    per_pass = sum(1 for b in batches for i in b if i not in truncated)
    first = sum(1 for i in batches[0] if i not in truncated)
    count, seconds, cpu = photo_loader.ours_rate(dataset, 0, 4, train, passes=2)
    assert count == 2 * per_pass - first and seconds > 0 and cpu >= 0


def test_cpu_seconds_follow_the_kernel() -> None:
    """The /proc reading against os.times() for this process (the oracle), within clock ticks."""
    import os

    before = os.times()
    ours = photo_loader.cpu_seconds([os.getpid()])
    after = os.times()
    tick = 1 / os.sysconf("SC_CLK_TCK")
    assert before.user + before.system - 2 * tick <= ours <= after.user + after.system + 2 * tick
    assert photo_loader.cpu_seconds([]) == 0


def test_timm_flag_without_timm_is_one_line(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    monkeypatch.setitem(sys.modules, "timm.data", None)
    monkeypatch.setattr(sys, "argv", ["photo_loader.py", str(tmp_path), "--timm"])
    with pytest.raises(SystemExit) as exit_info:
        photo_loader.main()
    message = str(exit_info.value.code)
    assert message.startswith("photo_loader: --timm needs timm") and "\n" not in message
