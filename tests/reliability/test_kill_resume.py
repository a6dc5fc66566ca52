"""Crash safety: SIGKILL a real ``python -m deephash train`` while it writes a checkpoint; the run
folder stays loadable and ``--resume`` finishes it with the weights of an uninterrupted run.
Also a static scan: product code never opens a final path for writing (only deephash/_io.py does).
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import deephash
from deephash.cli import main
from deephash.config import load_config
from deephash.models import build_model
from deephash.train.checkpoint import load_checkpoint

CONFIG = """
name = "kill"
seed = 5
device = "cpu"
[data]
dataset = "fashion-mnist"
root = "{root}"
[model]
backbone = "fmnist-cnn"
backbone_params = {{ width = 4, depth = [1, 1] }}
bits = 12
[loss]
name = "csq"
[sampler]
n_classes = 3
n_samples = 8
[train]
epochs = {epochs}
log_interval = 1
num_threads = 1
"""


def _train_command(config: Path, out: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "deephash", "train", str(config), "--out", str(out), "--quiet",
            *(["--resume"] if resume else [])]


def _kill_during_checkpoint_write(command: list[str], checkpoints: Path, timeout: float = 240) -> bool:
    """Run ``command``; SIGKILL it as soon as a ``.last.pt.*.tmp`` appears while ``last.pt``
    exists (so an earlier checkpoint is at stake). True when killed, False when it finished."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                names = os.listdir(checkpoints)
            except FileNotFoundError:
                continue
            if "last.pt" in names and any(n.startswith(".last.pt.") and n.endswith(".tmp") for n in names):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
        assert proc.poll() is not None, "training did not finish in time"
        assert proc.returncode == 0, proc.stderr.read().decode()
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def _assert_run_folder_loadable(run: Path) -> int:
    config = load_config(run / "config.toml")
    model = build_model(config.model)
    state = load_checkpoint(run / "checkpoints" / "last.pt", model, rng=False,
                            generators=[torch.Generator() for _ in range(3)])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return int(state["epoch"])


def test_sigkill_while_writing_a_checkpoint_then_resume_gives_the_uninterrupted_weights(tmp_path, tiny_fmnist):
    config = tmp_path / "kill.toml"
    config.write_text(CONFIG.format(root=tiny_fmnist[0], epochs=6), encoding="utf-8")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(["train", str(config), "--out", str(whole), "--quiet"]) == 0

    kills, epochs_at_kill, resume = 0, [], False
    for _ in range(3):  # kill up to twice, resuming in between
        if not _kill_during_checkpoint_write(_train_command(config, killed, resume), killed / "checkpoints"):
            break
        kills += 1
        epochs_at_kill.append(_assert_run_folder_loadable(killed))
        resume = True
        if kills == 2:
            break
    assert kills >= 1, "never caught a checkpoint write in progress"
    assert not (killed / "model.pt").exists()
    assert main(["train", str(config), "--out", str(killed), "--quiet", "--resume"]) == 0
    a = torch.load(whole / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(killed / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), epochs_at_kill


# ------------------------------------------------------------------------- static write scan

PACKAGE = Path(deephash.__file__).parent
#: Calls that write a file; each is refused outside deephash/_io.py unless allow-listed below.
WRITER_NAMES = {"write_text", "write_bytes", "save", "savez", "savez_compressed", "savefig", "tofile",
                "imsave", "dump", "to_csv"}
#: (file relative to the package, source of the call) -> why it is safe.
ALLOWED = {
    ("retrieval/index.py", "(tmp / 'meta.json').write_text(json.dumps(meta, indent=2), encoding='utf-8')"):
        "inside a mkdtemp folder moved into place by atomic_replace_dir",
    ("retrieval/index.py", "np.save(tmp / name, array)"): "same temporary folder (one .npy per per-item column)",
    ("retrieval/index.py", "(tmp / 'index.faiss').write_bytes(data.tobytes())"): "same temporary folder",
    ("runs/export.py", "(tmp / ENCODER_FILE).write_bytes(data)"): "inside a mkdtemp folder moved into place by atomic_replace_dir",
    ("runs/export.py", "(tmp / DESCRIPTION_FILE).write_text(text, encoding='utf-8')"): "same temporary folder",
    ("runs/indexing.py", "index.save(out)"): "HashIndex.save, atomic (above)",
    ("train/checkpoint.py", "torch.save(state, buffer)"): "into an io.BytesIO, then atomic_write_bytes",
    ("viz/plots.py", "fig.savefig(buffer, format='png', dpi=dpi)"): "into an io.BytesIO, then atomic_write_bytes",
    ("data/perturb.py", "picture.save(buffer, format='JPEG', quality=quality)"): "into an io.BytesIO, decoded at once",
    ("train/callbacks.py", "open(self.path, 'a', encoding='utf-8')"):
        "append-only metrics.jsonl, fsynced per line; a torn last line is cut by _repair_tail",
    ("train/callbacks.py", "open(self.path, 'rb+')"): "_repair_tail truncating a torn last line",
    ("cli.py", "os.open(os.devnull, os.O_WRONLY)"): "/dev/null",
    ("retrieval/journal.py", "os.open(self.path, os.O_RDWR | os.O_CREAT, 420)"):
        "append-only journal, fsynced per record; a torn last record is cut before the next append",
    ("retrieval/journal.py", "os.open(self.index_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 420)"): "the flock file (a pid)",
    ("retrieval/living.py", "self.index.save(self.path)"): "HashIndex.save, atomic (above)",
    ("retrieval/item_images.py", "picture.save(out, format='PNG')"):
        "png_bytes: into an io.BytesIO returned as bytes (stored through atomic_write_bytes)",
    ("runs/export.py", "(tmp / ENCODER_FILE).write_bytes(data)"): "inside a mkdtemp folder moved into place by atomic_replace_dir",
    ("runs/export.py", "(tmp / DESCRIPTION_FILE).write_text(text, encoding='utf-8')"): "same temporary folder",
}


def _writes(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name == "open":
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
            if isinstance(mode, ast.Constant) and isinstance(mode.value, str) and mode.value.startswith("r") and "+" not in mode.value:
                continue
            if mode is None and not (isinstance(func, ast.Attribute) and func.attr == "open"
                                     and ast.unparse(func.value) == "os"):
                continue  # open(path) reads; os.open(path, flags) is judged by its flags below
            if isinstance(mode, ast.Attribute) and mode.attr == "O_RDONLY":
                continue
        elif name not in WRITER_NAMES:
            continue
        found.append(ast.unparse(node))
    return found


def test_product_code_writes_files_only_through_deephash_io():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative == "_io.py":
            continue
        offenders += [f"{relative}: {call}" for call in _writes(path) if (relative, call) not in ALLOWED]
    assert not offenders, "write through deephash._io instead:\n" + "\n".join(offenders)


def test_the_scan_catches_direct_writes(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("open(p, 'w').write(x)\nPath(p).write_text(s)\nnp.save(p, a)\ntorch.save(m, p)\n"
                   "fig.savefig(p)\nopen(p, mode='ab')\nos.open(p, os.O_WRONLY | os.O_CREAT)\nopen(p)\nopen(p, 'rb+')\n"
                   "tarfile.open(p, 'r:*')\n",
                   encoding="utf-8")
    assert len(_writes(bad)) == 8  # open(p, 'w') and np.save ... 'rb+'; not .write nor the read-only opens
