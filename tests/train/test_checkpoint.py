"""Checkpoints: round trip, refusal of bad files, exact resume, SIGKILL while writing, DDP unwrapping."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import gaussian_blobs
from torch import nn

from deephash.errors import ConfigError, DataFormatError, NotFoundError
from deephash.train import (
    CheckpointCallback,
    fit,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)

N_CLASSES, DIM = 6, 8


def blobs(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return gaussian_blobs(N_CLASSES, n_per_class, DIM, seed, spread=2.0, shuffle=False)


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, N_CLASSES),
                         nn.LogSoftmax(dim=1))


def states_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            if not states_equal(x, y):
                return False
        elif isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def test_round_trip_restores_everything(tmp_path):
    torch.manual_seed(0)
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    x, y = blobs(4, 0)
    F.nll_loss(model(x), y).backward()
    opt.step()
    sched.step()
    gen = torch.Generator().manual_seed(5)
    gen_state = gen.get_state()
    history = [{"epoch": 0, "train_loss": np.float64(1.5), "Accuracy": 50.0, "lr": 0.01}]
    rng_state = torch.get_rng_state()
    save_checkpoint(tmp_path / "c.pt", model, opt, sched, 1, history, extra={"config": {"bits": 48}},
                    generators=[gen])

    torch.manual_seed(1)
    torch.rand(10)
    model2 = net()
    opt2 = torch.optim.Adam(model2.parameters(), lr=1.0)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, 1, 0.5)
    gen2 = torch.Generator().manual_seed(6)
    state = load_checkpoint(tmp_path / "c.pt", model2, opt2, sched2, generators=[gen2])
    assert state["epoch"] == 1
    assert state["history"] == [{"epoch": 0, "train_loss": 1.5, "Accuracy": 50.0, "lr": 0.01}]
    assert type(state["history"][0]["train_loss"]) is float
    assert state["extra"] == {"config": {"bits": 48}}
    assert states_equal(model.state_dict(), model2.state_dict())
    assert states_equal(opt.state_dict(), opt2.state_dict())
    assert sched2.state_dict() == sched.state_dict()
    assert torch.equal(gen2.get_state(), gen_state)
    assert torch.equal(torch.get_rng_state(), rng_state)


def test_missing_corrupt_and_foreign_files_are_refused(tmp_path):
    model = net()
    with pytest.raises(NotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt", model)
    save_checkpoint(tmp_path / "good.pt", model, None, None, 0, [])
    data = (tmp_path / "good.pt").read_bytes()
    cases = {"empty.pt": b"", "half.pt": data[: len(data) // 2], "junk.pt": b"\x80\x04junk" * 50,
             "flipped.pt": data[:100] + bytes(b ^ 0xFF for b in data[100:400]) + data[400:]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataFormatError, match=name) as info:
            load_checkpoint(tmp_path / name, model)
        assert "\n" not in str(info.value)
    torch.save({"weight": torch.zeros(3)}, tmp_path / "plain.pt")
    with pytest.raises(DataFormatError, match="plain.pt is not a valid deephash checkpoint"):
        read_checkpoint(tmp_path / "plain.pt")


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_objects_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "pwned"
    good = tmp_path / "good.pt"
    save_checkpoint(good, net(), None, None, 0, [])
    state = torch.load(good, weights_only=True)
    state["extra"] = {"payload": Evil(str(marker))}
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(DataFormatError, match="evil.pt holds objects other than tensors"):
        load_checkpoint(tmp_path / "evil.pt", net())
    assert not marker.exists()


def test_save_refuses_what_weights_only_could_not_load(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['extra'\]\['fn'\] is a function"):
        save_checkpoint(tmp_path / "c.pt", net(), None, None, 0, [], extra={"fn": lambda: 0})
    assert not (tmp_path / "c.pt").exists()


def test_mismatches_are_one_line_errors(tmp_path):
    save_checkpoint(tmp_path / "c.pt", net(), None, None, 0, [], generators=[torch.Generator()])
    with pytest.raises(DataFormatError, match="does not fit the model"):
        load_checkpoint(tmp_path / "c.pt", nn.Linear(3, 3), generators=[torch.Generator()])
    with pytest.raises(DataFormatError, match="1 generator states but 0 generators"):
        load_checkpoint(tmp_path / "c.pt", net())
    model = net()
    with pytest.raises(DataFormatError, match="no optimizer state"):
        load_checkpoint(tmp_path / "c.pt", model, torch.optim.SGD(model.parameters(), lr=0.1),
                        generators=[torch.Generator()])


class NoisyBatches:
    """Balanced batches (P classes × K) with Gaussian input noise from its own generator."""

    def __init__(self, x, y, sampler, noise_gen):
        self.x, self.y, self.sampler, self.noise_gen = x, y, sampler, noise_gen

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        for indices in self.sampler:
            idx = torch.as_tensor(indices)
            xb = self.x[idx]
            yield xb + 0.3 * torch.randn(xb.shape, generator=self.noise_gen), self.y[idx]


def build_run(seed: int):
    """Model, optimizer, scheduler, loaders and the generators to checkpoint, all from ``seed``."""
    from deephash.data.samplers import BalancedBatchSampler

    torch.manual_seed(seed)
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    sampler_gen = torch.Generator().manual_seed(seed + 1)
    noise_gen = torch.Generator().manual_seed(seed + 2)
    x, y = blobs(10, 1)
    sampler = BalancedBatchSampler(y, 3, 4, generator=sampler_gen)
    train = NoisyBatches(x, y, sampler, noise_gen)
    val = [blobs(3, 2)]
    return model, opt, sched, train, val, [sampler_gen, noise_gen]


class Crash:
    def __init__(self, epoch, step):
        self.at = (epoch, step)

    def on_step_end(self, epoch, step, loss_value, n_images):
        if (epoch, step) == self.at:
            raise KeyboardInterrupt  # the process "dies" mid-epoch


def timeless(history):
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in history]


def test_resume_after_a_crash_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    n_epochs = 3
    model, opt, sched, train, val, gens = build_run(0)
    straight = CheckpointCallback(tmp_path / "a", model, opt, sched, generators=gens)
    fit(train, val, model, F.nll_loss, opt, sched, n_epochs, "cpu", 1, callbacks=[straight], progress=False)

    model_b, opt_b, sched_b, train_b, val_b, gens_b = build_run(0)
    first = CheckpointCallback(tmp_path / "b", model_b, opt_b, sched_b, generators=gens_b)
    with pytest.raises(KeyboardInterrupt):
        fit(train_b, val_b, model_b, F.nll_loss, opt_b, sched_b, n_epochs, "cpu", 1,
            callbacks=[first, Crash(epoch=1, step=2)], progress=False)
    assert first.history[-1]["epoch"] == 0

    # a new process: other seeds, other initial weights, a disturbed global RNG
    torch.manual_seed(1234)
    torch.rand(17)
    model_c, opt_c, sched_c, train_c, val_c, gens_c = build_run(7)
    path = latest_checkpoint(tmp_path / "b")
    assert path == tmp_path / "b" / "last.pt"
    state = load_checkpoint(path, model_c, opt_c, sched_c, generators=gens_c)
    assert state["epoch"] == 1
    resumed = CheckpointCallback(tmp_path / "b", model_c, opt_c, sched_c, generators=gens_c,
                                 history=state["history"])
    fit(train_c, val_c, model_c, F.nll_loss, opt_c, sched_c, n_epochs, "cpu", 1,
        start_epoch=state["epoch"], callbacks=[resumed], progress=False)

    for p, q in zip(model.parameters(), model_c.parameters()):
        assert torch.equal(p, q)
    assert timeless(resumed.history) == timeless(straight.history)
    final_a = read_checkpoint(tmp_path / "a" / "last.pt")
    final_c = read_checkpoint(tmp_path / "b" / "last.pt")
    assert final_a["epoch"] == final_c["epoch"] == n_epochs
    assert states_equal(final_a["optimizer"], final_c["optimizer"])
    assert all(torch.equal(s, t) for s, t in zip(final_a["generators"], final_c["generators"]))
    # the weights did move: the comparison is not between untrained models
    assert not torch.equal(model[0].weight, build_run(0)[0][0].weight)


def test_best_and_last_checkpoints(tmp_path):
    model, opt, sched, train, val, gens = build_run(0)
    callback = CheckpointCallback(tmp_path, model, opt, sched, every=2, monitor="val_loss",
                                  generators=gens)
    quiet = CheckpointCallback(tmp_path / "rank1", model, opt, sched, is_main_process=False,
                               generators=gens)
    history = fit(train, val, model, F.nll_loss, opt, sched, 3, "cpu", 5,
                  callbacks=[callback, quiet], progress=False)
    best_epoch = min(history, key=lambda r: r["val_loss"])["epoch"]
    assert read_checkpoint(tmp_path / "best.pt")["epoch"] == best_epoch + 1
    last = read_checkpoint(tmp_path / "last.pt")  # epoch 2 is not a multiple of every: saved at the end
    assert last["epoch"] == 3 and len(last["history"]) == 3
    assert not (tmp_path / "rank1").exists()
    with pytest.raises(ConfigError, match="'val_loss'"):
        fit(train, None, model, F.nll_loss, opt, None, 1, "cpu", 5,
            callbacks=[CheckpointCallback(tmp_path / "x", model, opt, None)], progress=False)
    assert latest_checkpoint(tmp_path / "x") is None


WRITER = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from deephash.train import save_checkpoint
    model = nn.Linear(512, 512)
    epoch = 0
    while True:
        with torch.no_grad():
            model.weight.fill_(epoch)
        save_checkpoint(sys.argv[1], model, None, None, epoch, [{"epoch": epoch}])
        epoch += 1
        if epoch == 3:
            print("ready", flush=True)
""")


def test_sigkill_while_writing_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "ck" / "last.pt"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    model = nn.Linear(512, 512)
    state = load_checkpoint(latest_checkpoint(tmp_path / "ck"), model)
    assert state["epoch"] >= 2
    assert torch.all(model.weight == state["epoch"])  # weights and epoch from the same write


def test_ddp_wrapped_model_is_saved_and_loaded_unwrapped(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        inner = net()
        model = nn.parallel.DistributedDataParallel(inner)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = blobs(4, 3)
        history = fit([(x, y)], None, model, F.nll_loss, opt, None, 1, "cpu", 1,
                      callbacks=[CheckpointCallback(tmp_path, model, opt, None, monitor=None)],
                      progress=False)
        state = read_checkpoint(tmp_path / "last.pt")
        assert set(state["model"]) == set(inner.state_dict())
        fresh = nn.parallel.DistributedDataParallel(net())
        load_checkpoint(tmp_path / "last.pt", fresh)
        assert states_equal(fresh.module.state_dict(), inner.state_dict())
        assert len(history) == 1
    finally:
        dist.destroy_process_group()
