"""Determinism: the same config and seed on the CPU give an identical metrics.json.

``metrics.json`` holds one timing field, ``encode_seconds`` (wall clock): it is compared
everywhere else byte for byte after removing that key (decision recorded in RELIABILITY.md).
A different seed must change the weights, so the comparison can fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from test_kill_resume import CONFIG

from deephash.cli import main

TIMING_KEYS = {"encode_seconds"}


def _train_and_evaluate(config: Path, out: Path, seed: int) -> tuple[bytes, dict]:
    sets = ["--set", f"seed={seed}", "--set", "data.augment={ crop_padding = 2, hflip = true }",
            "--set", "loss.name=dtsh", "--set", "selector.name=random", "--set", "selector.params={margin = 2.0}"]
    assert main(["train", str(config), "--out", str(out), "--quiet", *sets]) == 0
    assert main(["evaluate", str(out)]) == 0
    result = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    untimed = {k: v for k, v in result.items() if k not in TIMING_KEYS}
    weights = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    return json.dumps(untimed, sort_keys=True).encode(), weights


def test_same_config_and_seed_give_identical_metrics_json(tmp_path, tiny_fmnist):
    config = tmp_path / "det.toml"
    config.write_text(CONFIG.format(root=tiny_fmnist[0], epochs=2), encoding="utf-8")
    first, w1 = _train_and_evaluate(config, tmp_path / "a", seed=5)
    second, w2 = _train_and_evaluate(config, tmp_path / "b", seed=5)
    other, w3 = _train_and_evaluate(config, tmp_path / "c", seed=6)
    assert first == second
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert set(json.loads(first)) == {"protocol", "metrics"}  # nothing else to exclude
    assert not all(torch.equal(w1[k], w3[k]) for k in w1)  # the seed matters
    steps = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    steps_b = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    losses = [(e["type"], e.get("train_loss"), e.get("loss")) for e in steps]
    assert losses == [(e["type"], e.get("train_loss"), e.get("loss")) for e in steps_b]
