"""The files of a run directory, by name.

- ``config.toml``: the resolved config (every default filled in, ``model.mean``/``std`` and
  ``model.in_channels`` taken from the training images);
- ``metrics.jsonl``: one JSON line per log interval (``type = "step"``) and per epoch (``"epoch"``);
- ``checkpoints/last.pt`` and ``checkpoints/best.pt`` (lowest training or validation loss): model,
  optimizer, scheduler, loss state, epoch, history and every random generator's state;
- ``model.pt``: ``{"spec", "state_dict", "config", "classes"}``, primitives and tensors only, so it
  loads with ``torch.load(weights_only=True)``;
- ``split.npz`` under a split protocol (e.g. DeepHash-pytorch's ``cifar10``): the seeded index lists;
- ``codes/SPLIT.npz``: encoded splits, keyed by the SHA-256 of ``model.pt``;
- ``metrics.json`` after ``evaluate``, and ``report.html`` after ``report``.
"""

from __future__ import annotations

CONFIG_FILE = "config.toml"
LOG_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.pt"
SPLIT_FILE = "split.npz"
CODES_DIR = "codes"
METRICS_FILE = "metrics.json"
SKIPPED_FILE = "skipped.txt"  # photo files skipped as unreadable: one "path<TAB>reason" line each

__all__ = ["CHECKPOINT_DIR", "CODES_DIR", "CONFIG_FILE", "LOG_FILE", "METRICS_FILE", "MODEL_FILE", "SKIPPED_FILE", "SPLIT_FILE"]
