"""Distributed training and encoding: 2 gloo processes on loopback against one process.

Two spawned jobs serve every test (starting processes is the expensive part): ``deephash train
--nproc 2`` through the CLI, and one job (:func:`_job`) that checks gradients, trains with an
interruption and resumes, and encodes / indexes with 2 ranks. Rank 0 (and for some checks rank 1)
write their results to files that the tests compare with single-process references computed here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_idx
from torch import nn

from deephash import cli
from deephash.data.samplers import DistributedRandomBatchSampler
from deephash.losses.contrastive import ContrastiveHashLoss
from deephash.losses.hashing import CSQLoss, DSHLoss, DTSHLoss
from deephash.losses.online import OnlineTripletLoss
from deephash.mining import AllTripletSelector, BatchHardTripletSelector
from deephash.retrieval.codes import load_codes
from deephash.retrieval.index import HashIndex
from deephash.train.callbacks import StopTraining
from deephash.train.distributed import (
    DistributedError,
    GatherLoss,
    init_distributed,
    launch,
    rank,
    shard_range,
    spawn_workers,
    world_size,
)

WORLD = 2
BITS = 8
CONFIG = """
name = "tiny-ddp"
seed = 3
device = "cpu"

[data]
dataset = "fashion-mnist"
root = "{root}"
query_split = "test"
database_split = "test"

[model]
backbone = "fmnist-cnn"
backbone_params = {{ width = 4, depth = [1, 1] }}
head = "hash"
bits = 8

[loss]
name = "csq"

[sampler]
kind = "balanced"
n_classes = 4
n_samples = 4

[optimizer]
lr = 0.01

[train]
epochs = 2
log_interval = 2
# one intra-op thread in every rank: the CLI's run and the job's resume must add up floats alike
# (the jobs are spawned, not forked: a child forked after the test process used MKL's OpenMP pool
# deadlocks in its first float64 matrix product)
num_threads = 1
"""

N_TRAIN, N_TEST = 204, 101  # 204 // (16 * 2) = 6 batches per rank; test shards of 51 and 50


def _tiny_fashion_mnist(root: Path) -> None:
    """IDX files: 4 classes of 28x28 noise with a bright class-dependent band."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        labels = np.arange(n) % 4
        images = rng.integers(0, 60, size=(n, 28, 28))
        images[np.arange(n)[:, None], 3 + 6 * labels[:, None] + np.arange(4)[None, :], 4:24] += 180
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)


# --------------------------------------------------------------------------- gradient cases


def _batches() -> tuple[torch.Tensor, torch.Tensor]:
    """Two ranks' float64 inputs ``(WORLD, 10, 6)`` and labels ``(WORLD, 10)``."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(WORLD, 10, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (WORLD, 10), generator=g)
    return x, y


def _model() -> nn.Module:
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, BITS), nn.Tanh()).double()


def _losses() -> dict[str, nn.Module]:
    return {
        "triplet-batch-hard": OnlineTripletLoss(0.5, BatchHardTripletSelector()),
        "triplet-all": OnlineTripletLoss(0.5, AllTripletSelector()),
        "dtsh": DTSHLoss("all"),
        "dsh": DSHLoss(BITS),
        "csq": CSQLoss(BITS, 3, quantization_weight=0.1),
    }


def _gradients(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _gradient_cases(out: Path) -> None:
    """Every loss with global and with local mining under DDP; each rank saves what it saw."""
    x, y = _batches()
    ddp = nn.parallel.DistributedDataParallel(_model())
    results = {}
    for name, loss in _losses().items():
        for mine_globally in (True, False):
            ddp.zero_grad(set_to_none=True)
            loss_fn = GatherLoss(loss, mine_globally=mine_globally)
            value = loss_fn(ddp(x[rank()]), y[rank()])
            value.backward()
            results[f"{name}/{mine_globally}"] = {
                "loss": value.detach(), "grads": _gradients(ddp.module),
                "num_selected": torch.as_tensor(loss_fn.num_selected or 0),
            }
    ddp.zero_grad(set_to_none=True)  # two views per image, stacked view-major in each rank's batch
    loss_fn = GatherLoss(ContrastiveHashLoss(n_views=2), mine_globally=True, n_views=2)
    value = loss_fn(ddp(x[rank()]), _two_view_labels(y)[rank()])
    value.backward()
    results["contrastive-hash-2-views"] = {"loss": value.detach(), "grads": _gradients(ddp.module)}
    torch.save(results, out / f"grads-rank{rank()}.pt")


def _two_view_labels(y: torch.Tensor) -> torch.Tensor:
    """Each rank's 10 rows as 2 views of 5 images: the first 5 labels, twice. ``(WORLD, 10)``."""
    return y[:, :5].repeat(1, 2)


# ---------------------------------------------------------------------------------- the job


class _StopAfterFirstEpoch:
    def on_epoch_end(self, epoch: int, record: dict) -> None:
        raise StopTraining


def _record_checkpoint_writes(out: Path) -> list[str]:
    """Patch the checkpoint module's atomic writer to log the paths this rank writes."""
    import deephash.train.checkpoint as checkpoint

    writes: list[str] = []
    original = checkpoint.atomic_write_bytes

    def logged(path, data):
        writes.append(Path(path).name)
        return original(path, data)

    checkpoint.atomic_write_bytes = logged
    return writes


def _job(out: Path, config_path: Path, full_run: Path) -> None:
    """Runs on each of 2 ranks: gradients, interrupted training + resume, encode, index build."""
    assert world_size() == WORLD
    _gradient_cases(out)

    from deephash import runs
    from deephash.config import load_config

    writes = _record_checkpoint_writes(out)
    resumed = out / "resumed"
    runs.train_run(load_config(config_path), resumed, progress=False, callbacks=[_StopAfterFirstEpoch()])
    interrupted = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)["epoch"]
    assert cli.main(["train", str(resumed), "--resume", "--quiet"]) == 0
    (out / f"writes-rank{rank()}.json").write_text(json.dumps({"writes": writes, "interrupted_at": interrupted}))

    assert cli.main(["encode", str(full_run), "--split", "test", "--out", str(out / "codes-2.npz")]) == 0
    assert cli.main(["index", "build", str(full_run), "--split", "test", "--out", str(out / "index-2")]) == 0


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Run ``deephash train --nproc 2``, then :func:`_job` on 2 ranks; return the folder."""
    out = tmp_path_factory.mktemp("ddp")
    config_path = out / "tiny.toml"
    _tiny_fashion_mnist(out / "data")
    config_path.write_text(CONFIG.format(root=out / "data"))
    full_run = out / "full"
    assert cli.main(["train", str(config_path), "--out", str(full_run), "--nproc", "2", "--quiet"]) == 0
    spawn_workers(_job, WORLD, (out, config_path, full_run), timeout_s=120)
    return out


# ---------------------------------------------------------------------------------- the tests


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(_losses()))
def test_global_mining_matches_one_process_on_the_concatenated_batch(jobs, name):
    x, y = _batches()
    model = _model()
    loss_fn = _losses()[name]
    expected = loss_fn(model(x.reshape(-1, 6)), y.reshape(-1))
    expected.backward()
    for r in range(WORLD):  # every rank computes the global loss; DDP leaves identical gradients
        got = torch.load(jobs / f"grads-rank{r}.pt", weights_only=True)[f"{name}/True"]
        torch.testing.assert_close(got["loss"], expected.detach(), rtol=1e-10, atol=1e-10)
        for g, p in zip(got["grads"], model.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-10)
        assert int(got["num_selected"]) == int(torch.as_tensor(getattr(loss_fn, "num_selected", None) or 0))


@pytest.mark.timeout(600)
def test_global_batch_keeps_the_views_of_an_image_paired(jobs):
    """Gathered rank-major, the views are put back view-major: the instance term pairs each image's
    two views as one process does on the global batch (every rank's first views, then second)."""
    x, y = _batches()
    y = _two_view_labels(y)
    model = _model()
    view_major = lambda t: torch.cat([t[0, :5], t[1, :5], t[0, 5:], t[1, 5:]])  # noqa: E731
    expected = ContrastiveHashLoss(n_views=2)(model(view_major(x)), view_major(y))
    expected.backward()
    rank_major = ContrastiveHashLoss(n_views=2)(model(x.reshape(-1, 6)), y.reshape(-1))
    assert not torch.allclose(rank_major, expected)  # the order matters, so the test can fail
    for r in range(WORLD):
        got = torch.load(jobs / f"grads-rank{r}.pt", weights_only=True)["contrastive-hash-2-views"]
        torch.testing.assert_close(got["loss"], expected.detach(), rtol=1e-6, atol=1e-7)  # supcon_loss works in float32
        for g, p in zip(got["grads"], model.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["triplet-batch-hard", "dsh"])
def test_local_mining_returns_the_rank_loss_and_averages_gradients(jobs, name):
    x, y = _batches()
    model = _model()
    loss_fn = _losses()[name]
    local = [loss_fn(model(x[r]), y[r]) for r in range(WORLD)]
    torch.stack(local).mean().backward()
    for r in range(WORLD):
        got = torch.load(jobs / f"grads-rank{r}.pt", weights_only=True)[f"{name}/False"]
        torch.testing.assert_close(got["loss"], local[r].detach(), rtol=1e-10, atol=1e-10)
        for g, p in zip(got["grads"], model.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-10)
    global_loss = torch.load(jobs / "grads-rank0.pt", weights_only=True)[f"{name}/True"]["loss"]
    assert not torch.allclose(global_loss, local[0].detach())  # the two options differ here


@pytest.mark.timeout(600)
def test_cli_train_nproc_writes_one_log_and_checkpoints(jobs):
    from deephash.train.callbacks import read_jsonl

    run = jobs / "full"
    records = read_jsonl(run / "metrics.jsonl")
    epochs = [r for r in records if r.get("type") == "epoch"]
    steps = [r for r in records if r.get("type") == "step"]
    # 6 batches per rank per epoch, logged every 2 steps, by rank 0 only
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert len(steps) == 2 * 3
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert (run / "model.pt").is_file() and (run / "config.toml").is_file()


@pytest.mark.timeout(600)
def test_checkpoints_written_by_rank_zero_only_and_resume_matches(jobs):
    rank0 = json.loads((jobs / "writes-rank0.json").read_text())
    rank1 = json.loads((jobs / "writes-rank1.json").read_text())
    assert rank1["writes"] == []
    # epoch 1 (last + best), then after resuming epoch 2 (last, and best when it improved)
    assert rank0["writes"][:2] == ["last.pt", "best.pt"] and rank0["writes"].count("last.pt") == 2
    assert rank0["interrupted_at"] == 1
    full = torch.load(jobs / "full" / "model.pt", weights_only=True)["state_dict"]
    resumed = torch.load(jobs / "resumed" / "model.pt", weights_only=True)["state_dict"]
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0, msg=key)
    history = torch.load(jobs / "resumed" / "checkpoints" / "last.pt", weights_only=True)["history"]
    assert [r["epoch"] for r in history] == [0, 1]


@pytest.mark.timeout(600)
def test_two_process_encode_and_index_match_one_process(jobs, tmp_path):
    run = jobs / "full"
    assert cli.main(["encode", str(run), "--split", "test", "--out", str(tmp_path / "codes-1.npz")]) == 0
    one, two = load_codes(tmp_path / "codes-1.npz"), load_codes(jobs / "codes-2.npz")
    assert one.codes.shape == (N_TEST, 1)
    np.testing.assert_array_equal(two.codes, one.codes)
    np.testing.assert_array_equal(two.labels, one.labels)
    assert int(two.bits) == int(one.bits) == BITS

    assert cli.main(["index", "build", str(run), "--split", "test", "--out", str(tmp_path / "index-1")]) == 0
    for name in ("codes.npy", "ids.npy", "labels.npy"):
        np.testing.assert_array_equal(np.load(jobs / "index-2" / name), np.load(tmp_path / "index-1" / name))
    i1, i2 = HashIndex.load(tmp_path / "index-1"), HashIndex.load(jobs / "index-2")
    assert len(i2) == len(i1) == N_TEST and i2.metadata == i1.metadata
    d1, n1 = i1.search(one.codes[:20], 5)
    d2, n2 = i2.search(one.codes[:20], 5)
    np.testing.assert_array_equal(d2, d1)
    np.testing.assert_array_equal(n2, n1)


# ------------------------------------------------------------------------ without processes


@pytest.mark.parametrize("n,world", [(0, 2), (1, 3), (10, 2), (11, 4), (201, 2)])
def test_shard_range_is_contiguous_disjoint_and_covers(n, world):
    shards = [shard_range(n, r, world) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_distributed_random_sampler_gives_disjoint_full_batches():
    samplers = [DistributedRandomBatchSampler(50, 6, 2, r, seed=5) for r in range(2)]
    epochs = []
    for epoch in (0, 1):
        for s in samplers:
            s.set_epoch(epoch)
        batches = [list(s) for s in samplers]
        assert [len(b) for b in batches] == [4, 4] and all(len(x) == 6 for b in batches for x in b)
        items = [i for b in batches for x in b for i in x]
        assert len(items) == len(set(items)) == 48  # 50 // (6 * 2) = 4 full batches per rank
        epochs.append(batches)
    assert epochs[0] != epochs[1]
    samplers[0].set_epoch(0)
    assert list(samplers[0]) == epochs[0][0]  # seeded: the same epoch gives the same batches


def test_init_without_launcher_variables_names_them(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DistributedError, match="RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT"):
        init_distributed()


def test_nproc_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedError, match="nproc-per-node"):
        launch(print, 2)


@pytest.mark.timeout(600)
def test_a_frozen_first_epoch_from_a_weights_file_trains_under_ddp(tmp_path):
    """DDP with a backbone frozen for the first epoch (parameters without gradient in some steps:
    ``find_unused_parameters``) and a scaled backbone rate runs to the end and trains the
    backbone in its second epoch, starting from a weights file."""
    from safetensors.torch import save_file

    from deephash.config import load_config
    from deephash.models import build_model

    _tiny_fashion_mnist(tmp_path / "data")
    config_path = tmp_path / "tiny.toml"
    config_path.write_text(CONFIG.format(root=tmp_path / "data"))
    start = build_model(load_config(config_path).model).backbone.state_dict()
    save_file(start, tmp_path / "start.safetensors")
    sets = [f"model.pretrained_path={str(tmp_path / 'start.safetensors')!r}", "train.freeze_backbone_epochs=1",
            "optimizer.backbone_lr_scale=0.5"]
    argv = ["train", str(config_path), "--nproc", "2", "--quiet", *[a for s in sets for a in ("--set", s)]]
    assert cli.main([*argv, "--out", str(tmp_path / "run")]) == 0
    trained = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["state_dict"]
    weights = dict(build_model(load_config(config_path).model).backbone.named_parameters())  # not BatchNorm's statistics
    assert any(not torch.equal(trained[f"backbone.{k}"], start[k]) for k in weights)  # the second epoch trained the backbone
    groups = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["lr_scale"] for g in groups] == [1.0, 0.5]  # (the frozen epoch itself: tests/models/test_pretrained.py)


def _pseudo_label_job(out: Path, config_path: Path) -> None:
    """Each rank trains with pseudo labels and saves the labels its training set holds each epoch."""
    from deephash import runs
    from deephash.config import load_config
    from deephash.train import pseudo_labels

    relabel, vote, votes = pseudo_labels.PseudoLabels.on_epoch_start, pseudo_labels.knn_pseudo_labels, []

    def recorded(self, epoch: int) -> None:
        relabel(self, epoch)
        torch.save(self.dataset.targets.clone(), out / f"labels-rank{rank()}-epoch{epoch}.pt")
        (out / f"votes-rank{rank()}-epoch{epoch}.txt").write_text(str(len(votes)))

    pseudo_labels.PseudoLabels.on_epoch_start = recorded
    pseudo_labels.knn_pseudo_labels = lambda *args: votes.append(1) or vote(*args)
    sets = ["data.labelled_fraction=0.5", "loss.name='contrastive-hash'", "loss.params={instance_weight=0.0}", "sampler.kind='random'", "sampler.batch_size=16",
            "pseudo_labels.from_epoch=1", "pseudo_labels.k=3", "pseudo_labels.agreement=0.6", "pseudo_labels.every=2",
            "train.epochs=3"]  # votes in epoch 1; epoch 2 trains on that vote's labels
    runs.train_run(load_config(config_path, overrides=sets), out / "run", progress=False)


@pytest.mark.timeout(600)
def test_pseudo_labels_under_ddp_are_rank_zeros_on_every_rank(tmp_path):
    _tiny_fashion_mnist(tmp_path / "data")
    config_path = tmp_path / "tiny.toml"
    config_path.write_text(CONFIG.format(root=tmp_path / "data"))
    spawn_workers(_pseudo_label_job, WORLD, (tmp_path, config_path), timeout_s=300)
    for epoch in (0, 1, 2):
        zero, one = (torch.load(tmp_path / f"labels-rank{r}-epoch{epoch}.pt") for r in range(WORLD))
        assert torch.equal(zero, one)
    start, voted, kept = (torch.load(tmp_path / f"labels-rank0-epoch{e}.pt") for e in (0, 1, 2))
    assert int((start < 0).sum()) == N_TRAIN // 2  # epoch 0: before from_epoch, the kept half only
    assert torch.equal(voted[start >= 0], start[start >= 0]) and int((voted >= 0).sum()) > N_TRAIN // 2
    assert torch.equal(kept, voted)  # between two votes, on every rank
    counts = [[int((tmp_path / f"votes-rank{r}-epoch{e}.txt").read_text()) for e in range(3)] for r in range(WORLD)]
    assert counts == [[0, 1, 1], [0, 0, 0]]  # rank 0 votes once, in epoch 1; rank 1 only receives
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    n_voted = int((voted >= 0).sum()) - N_TRAIN // 2
    assert [e.get("pseudo_labelled") for e in logged if e["type"] == "epoch"] == [None, n_voted, n_voted]
