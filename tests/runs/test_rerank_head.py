"""The re-rank head's own stage: after the main training, on the frozen backbone, leaving every
other weight (so the codes) as a run without it; its config checks; a rerun gives the same head."""

from __future__ import annotations

import json

import pytest
import torch
from pytorch_metric_learning import losses as pml

from deephash.cli import main
from deephash.config import load_config
from deephash.errors import ConfigError
from deephash.losses.contrastive import InstanceContrastiveLoss
import deephash.runs.rerank_head as rerank_stage
from deephash.runs import load_run, load_split

CONFIG = """
name = "stage"
seed = 5
device = "cpu"
[data]
dataset = "fashion-mnist"
root = "{root}"
[model]
backbone = "fmnist-cnn"
backbone_params = {{ width = 4, depth = [1, 1], fc = 16 }}
bits = 16
{model}
[loss]
name = "csq"
[sampler]
kind = "random"
batch_size = 12
[train]
epochs = 1
log_interval = 1
num_threads = 1
{stage}
"""
STAGE = ('rerank = "instance"\nrerank_dim = 8\nrerank_source = "map"',
         "[rerank_head]\nepochs = 2\nlr = 0.01\naugment = { perturb = { shift = 1, noise = 0.02 } }")


class _RecordingLoss(InstanceContrastiveLoss):
    """The stage's loss, keeping a copy of the rows it was given at each step (the rows only: the
    value the test checks is the one the stage logs)."""

    seen: list[torch.Tensor] = []

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.seen.append(features.detach().clone())
        return super().forward(features, labels)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_fmnist):
    base = tmp_path_factory.mktemp("stage")
    out = {}
    for name, (model, stage) in {"plain": ("", ""), "staged": STAGE}.items():
        (base / f"{name}.toml").write_text(CONFIG.format(root=tiny_fmnist[0], model=model, stage=stage), encoding="utf-8")
        _RecordingLoss.seen = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(rerank_stage, "InstanceContrastiveLoss", _RecordingLoss)
            assert main(["train", str(base / f"{name}.toml"), "--out", str(base / name), "--quiet"]) == 0
        out[name] = base / name
        out[f"{name} rows"] = _RecordingLoss.seen
    out["staged log"] = (out["staged"] / "rerank_head_log.jsonl").read_text()  # before a test reruns the stage
    return out


def test_the_stage_changes_only_the_rerank_head(runs):
    plain = torch.load(runs["plain"] / "model.pt", weights_only=True)["state_dict"]
    staged = torch.load(runs["staged"] / "model.pt", weights_only=True)["state_dict"]
    assert set(staged) - set(plain) == {"rerank_head.linear.weight", "rerank_head.linear.bias"}
    for key, value in plain.items():
        assert torch.equal(staged[key], value), key
    # the main training's last checkpoint holds the head untouched by it (no loss reaches it)
    checkpoint = torch.load(runs["staged"] / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert not torch.allclose(staged["rerank_head.linear.weight"], checkpoint["rerank_head.linear.weight"])


def test_codes_equal_the_plain_run_and_the_vectors_are_the_heads(runs):
    (plain, _), (staged, config) = load_run(runs["plain"]), load_run(runs["staged"])
    x = load_split(config, "test", runs["staged"]).data.float() / 255
    with torch.no_grad():
        codes, vectors = staged.encode_with_rerank(x)
        assert torch.equal(codes, plain.encode(x))
        flat = staged.backbone.forward_with_map(staged.normalize(x))[1]  # the map the fully connected layer reads
        torch.testing.assert_close(vectors, staged.rerank_head(flat))
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(len(x)))


def test_the_stage_logs_each_epoch_and_a_resume_trains_the_same_head(runs):
    log = [json.loads(line) for line in (runs["staged"] / "rerank_head_log.jsonl").read_text().splitlines()]
    epochs = [r for r in log if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1]
    before = torch.load(runs["staged"] / "model.pt", weights_only=True)["state_dict"]
    assert main(["train", str(runs["staged"]), "--resume", "--quiet"]) == 0
    after = torch.load(runs["staged"] / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    lines = (runs["staged"] / "rerank_head_log.jsonl").read_text().splitlines()
    assert len(lines) == len(log)  # the rerun's log replaces the first one


def test_each_logged_step_loss_is_ntxent_of_the_views_as_pytorch_metric_learning_computes_it(runs, tiny_fmnist):
    """Oracle: pytorch-metric-learning's NTXentLoss (temperature 0.2, the stage's default) on the
    rows the stage's loss was given, the two views of an image labelled alike (view-major rows)."""
    log = [json.loads(line) for line in runs["staged log"].splitlines()]
    steps = [r for r in log if r["type"] == "step"]
    rows = runs["staged rows"]
    n_train = len(tiny_fmnist[1]["train"][1])
    assert n_train % 12 == 0
    batches = n_train // 12  # sampler.batch_size = 12
    assert len(steps) == len(rows) == 2 * batches and runs["plain rows"] == []  # 2 epochs; no stage in the plain run
    assert [len(z) for z in rows] == [2 * 12] * len(rows)  # two views of each image
    ntxent = pml.NTXentLoss(temperature=0.2)
    for step, z in zip(steps, rows):
        b = len(z) // 2
        torch.testing.assert_close(z.norm(dim=1), torch.ones(len(z)))  # the head's L2-normalised vectors
        expected = ntxent(z.double(), torch.arange(b).repeat(2)).item()
        assert step["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    for epoch in (0, 1):  # an epoch's loss: the mean of its steps
        mean = sum(s["loss"] for s in steps if s["epoch"] == epoch) / batches
        assert next(r for r in log if r["type"] == "epoch" and r["epoch"] == epoch)["train_loss"] == pytest.approx(mean, rel=1e-6)


@pytest.mark.parametrize("model, stage, message", [
    ('rerank = "instance"', "", "set train.rerank_weight > 0"),
    ("", "[rerank_head]\nepochs = 1\naugment = { perturb = { shift = 1 } }", "which is not set"),
    ('rerank = "instance"', "[rerank_head]\nepochs = 1", "an augment table"),
    ('rerank = "instance"', "[rerank_head]\nepochs = 1\nviews = 1\naugment = { perturb = { shift = 1 } }", "views >= 2"),
])
def test_bad_settings_are_one_line_config_errors(tmp_path, model, stage, message):
    path = tmp_path / "c.toml"
    path.write_text(CONFIG.format(root=tmp_path, model=model, stage=stage), encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_config(path)
