"""Pretrained starting points: ``model.pretrained_path`` (safetensors / weights-only torch files),
``model.pretrained`` through timm's own API, the input settings taken from timm's pretrained
configuration, ``optimizer.backbone_lr_scale`` and a frozen-backbone warm-up.

Oracles: the tensors saved to the file, a hand-computed SGD step, the weights before a frozen
epoch, an uninterrupted run, and for timm a stand-in module that records how deephash calls timm's
public API (timm itself cannot be installed beside the pinned CPU torch: it needs torchvision).
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from safetensors.torch import save_file
from helpers import install_stand_in_timm, stand_in_pretrained_weight

from deephash.config import config_from_dict
from deephash.data import ArrayDataset, BatchLoader
from deephash.data.samplers import RandomBatchSampler
from deephash.errors import ConfigError, DeephashError, NotFoundError
from deephash.models import build_model, load_state_dict_file
from deephash.runs import load_run
from deephash.runs.components import build_optimizer, with_pretrained_inputs
from deephash.train import fit
from deephash.train.callbacks import FreezeBackbone
from deephash.train.optim import WarmupCosineLR, create_scheduler

SPEC = {"backbone": "fmnist-cnn", "backbone_params": {"width": 4, "depth": [1, 1], "fc": 0}, "in_channels": 3,
        "bits": 16}


def donor_state() -> dict[str, torch.Tensor]:
    """A backbone's weights as another program saved them: random values, a classifier beside them."""
    torch.manual_seed(7)
    return {**random_like(build_model(SPEC).backbone.state_dict()), "classifier.weight": torch.randn(10, 8)}


def random_like(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Other weights of the same shapes (BatchNorm variances kept positive, counters as they are)."""
    return {k: (torch.rand_like(v) + 0.5 if k.endswith("running_var") else torch.randn_like(v)) if v.is_floating_point() else v
            for k, v in state.items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_weights_file_becomes_the_backbone_and_only_the_backbone(suffix, tmp_path):
    state = donor_state()
    path = tmp_path / f"w{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model = build_model({**SPEC, "pretrained_path": str(path)})
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    fresh = build_model({**SPEC, "pretrained_path": str(path)}, weights=False)  # a saved run's model: random until loaded
    assert not torch.equal(fresh.backbone.state_dict()["features.0.weight"], state["features.0.weight"])


def test_weights_files_that_do_not_fit_are_refused_naming_the_problem(tmp_path):
    state = donor_state()
    save_file({k: v for k, v in state.items() if k != "features.0.weight"}, tmp_path / "short.safetensors")
    with pytest.raises(DeephashError, match="lacks 1 of the backbone's .* 'features.0.weight'"):
        build_model({**SPEC, "pretrained_path": str(tmp_path / "short.safetensors")})
    save_file({**state, "features.0.weight": torch.zeros(4, 12, 3, 3)}, tmp_path / "shape.safetensors")
    with pytest.raises(DeephashError, match=r"'features.0.weight' has shape \(4, 12, 3, 3\)"):
        build_model({**SPEC, "pretrained_path": str(tmp_path / "shape.safetensors")})
    with pytest.raises(NotFoundError, match="do not exist"):
        build_model({**SPEC, "pretrained_path": str(tmp_path / "none.pth")})
    (tmp_path / "torn.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(DeephashError, match="not a readable weights file"):
        load_state_dict_file(tmp_path / "torn.safetensors")
    torch.save({"lr": 0.1, "epochs": [1, 2]}, tmp_path / "no-tensors.pth")
    with pytest.raises(DeephashError, match="holds no state dict"):
        load_state_dict_file(tmp_path / "no-tensors.pth")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling would create the file


def test_a_weights_file_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"features.0.weight": torch.zeros(1), "payload": _RunsCode(marker)}, tmp_path / "evil.pth")
    with pytest.raises(DeephashError, match="evil.pth is not a readable weights file"):
        build_model({**SPEC, "pretrained_path": str(tmp_path / "evil.pth")})
    assert not marker.exists()


def test_pretrained_needs_a_timm_backbone():
    with pytest.raises(ConfigError, match="model.pretrained_path instead"):
        config_from_dict({"model": {**SPEC, "pretrained": True}})
    with pytest.raises(ConfigError, match="model.pretrained_path instead"):
        build_model({**SPEC, "pretrained": True})


@pytest.fixture
def fake_timm(monkeypatch):
    return install_stand_in_timm(monkeypatch)


def test_timm_pretrained_goes_through_timms_loader_and_its_input_settings(fake_timm):
    model = build_model({"backbone": "timm:tiny", "in_channels": 3, "bits": 16, "pretrained": True})
    assert fake_timm[-1] == {"name": "tiny", "pretrained": True, "num_classes": 0, "in_chans": 3}
    assert torch.equal(model.backbone.features[0].weight, stand_in_pretrained_weight(3)) and model.backbone.out_features == 16
    build_model({"backbone": "timm:tiny", "in_channels": 3, "bits": 16, "pretrained": True}, weights=False)
    assert fake_timm[-1]["pretrained"] is False  # loading a trained run downloads nothing

    table = {"data": {"dataset": "folder", "images": "photos"}, "model": {"backbone": "timm:tiny", "pretrained": True}}
    resolved = with_pretrained_inputs(config_from_dict(table))
    assert (resolved.model.mean, resolved.model.std, resolved.data.image_size) == ([0.5, 0.4, 0.3], [0.2, 0.2, 0.25], 160)
    table["data"]["image_size"] = 96
    table["model"]["mean"] = [0.1, 0.1, 0.1]
    mine = with_pretrained_inputs(config_from_dict(table))  # what the config sets wins
    assert (mine.model.mean, mine.model.std, mine.data.image_size) == ([0.1, 0.1, 0.1], [0.2, 0.2, 0.25], 96)
    scratch = config_from_dict({"data": {"dataset": "folder", "images": "photos"}, "model": {"backbone": "timm:tiny"}})
    assert with_pretrained_inputs(scratch) == scratch  # from scratch: the images' own statistics, 224 px


def test_grey_images_take_one_mean_and_a_name_without_pretrained_config_takes_none(fake_timm, monkeypatch):
    table = {"data": {"dataset": "folder", "images": "photos", "channels": 1}, "model": {"backbone": "timm:tiny", "pretrained": True}}
    grey = with_pretrained_inputs(config_from_dict(table))
    assert grey.model.mean == pytest.approx([0.4]) and grey.model.std == pytest.approx([0.65 / 3])
    arrays = with_pretrained_inputs(config_from_dict({"model": {"backbone": "timm:tiny", "pretrained": True}}))  # fashion-mnist
    assert arrays.model.mean == pytest.approx([0.4])

    def unregistered(name, key):
        raise RuntimeError(f"Model architecture ({name}) has no pretrained cfg registered.")

    monkeypatch.setattr(sys.modules["timm"], "get_pretrained_cfg_value", unregistered)
    custom = config_from_dict({"data": {"dataset": "folder", "images": "photos"},
                               "model": {"backbone": "timm:mine", "pretrained_path": "w.safetensors"}})
    resolved = with_pretrained_inputs(custom)  # the images' own statistics and 224 px, as from scratch
    assert (resolved.model.mean, resolved.data.image_size) == ([], 0)


def test_a_runs_own_model_file_is_a_weights_file_for_the_same_backbone(tmp_path):
    torch.manual_seed(5)
    trained = build_model(SPEC)
    torch.save({"state_dict": trained.state_dict(), "spec": {"bits": 16}}, tmp_path / "model.pt")  # as save_model keeps it
    model = build_model({**SPEC, "bits": 32, "pretrained_path": str(tmp_path / "model.pt")})
    assert all(torch.equal(v, trained.backbone.state_dict()[k]) for k, v in model.backbone.state_dict().items())


def test_the_backbone_learning_rate_scale_holds_through_a_step_and_the_schedule():
    table = {"model": SPEC, "optimizer": {"name": "sgd", "lr": 0.5, "momentum": 0.0, "backbone_lr_scale": 0.1}}
    torch.manual_seed(0)
    model = build_model(SPEC)
    scaled, plain = copy.deepcopy(model), copy.deepcopy(model)
    opt = build_optimizer(config_from_dict(table), scaled)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.05])  # the heads first: the logged rate
    x = torch.rand(6, 3, 16, 16)
    for net in (scaled, plain):
        net(x).square().sum().backward()
    opt.step()
    for (name, after), before, grad in zip(scaled.named_parameters(), model.parameters(), (p.grad for p in plain.parameters())):
        lr = 0.05 if name.startswith("backbone.") else 0.5
        assert torch.allclose(after, before - lr * grad, atol=1e-6), name  # SGD: w - lr * g, per group
    schedule = WarmupCosineLR(opt, lr=0.5, n_epochs=2, warmup=0.5)
    for step in (1, 3, 7):
        schedule.on_batch_start(0, step, 8)
        assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * opt.param_groups[0]["lr"])
    cycle = create_scheduler("onecycle", opt, lr=0.5, epochs=4, max_lr=0.2)  # a scalar peak is scaled per group
    assert [g["max_lr"] for g in cycle.optimizer.param_groups] == pytest.approx([0.2, 0.02])
    with pytest.raises(ConfigError, match="backbone_lr_scale"):
        config_from_dict({"optimizer": {"backbone_lr_scale": -1.0}})


def test_a_frozen_backbone_keeps_its_weights_and_statistics_then_trains(pinned_threads):
    torch.manual_seed(0)
    model = build_model(SPEC)
    data = ArrayDataset((torch.rand(24, 3, 16, 16) * 255).to(torch.uint8), torch.arange(24) % 3)
    loader = BatchLoader(data, RandomBatchSampler(24, 8, torch.Generator().manual_seed(0)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = copy.deepcopy(model.state_dict())
    hook = FreezeBackbone(model.backbone, 1)

    def loss(out, labels):
        return out.square().mean()

    fit(loader, None, model, loss, opt, None, 1, "cpu", 10, callbacks=[hook], progress=False)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("backbone."))  # BN buffers too
    assert not torch.equal(after["head.linear.weight"], before["head.linear.weight"])
    fit(loader, None, model, loss, opt, None, 2, "cpu", 10, start_epoch=1, callbacks=[hook], progress=False)
    assert not torch.equal(model.state_dict()["backbone.features.0.weight"], before["backbone.features.0.weight"])
    assert not torch.equal(model.state_dict()["backbone.features.1.running_mean"], before["backbone.features.1.running_mean"])
    with pytest.raises(ConfigError, match="freeze_backbone_epochs"):
        config_from_dict({"train": {"epochs": 2, "freeze_backbone_epochs": 2}})


def test_a_run_from_a_weights_file_with_a_frozen_warm_up_resumes_and_loads_without_the_file(tmp_path, tiny_fmnist, pinned_threads):
    from deephash import runs

    root, _ = tiny_fmnist
    weights = tmp_path / "w.safetensors"
    torch.manual_seed(3)
    donor = build_model({**SPEC, "in_channels": 1}).backbone.state_dict()
    save_file(random_like(donor), weights)
    table = {"data": {"root": str(root)}, "device": "cpu",
             "model": {**SPEC, "in_channels": 1, "pretrained_path": str(weights)},
             "sampler": {"kind": "random", "batch_size": 12}, "loss": {"name": "csq"},
             "optimizer": {"name": "adamw", "lr": 1e-2, "backbone_lr_scale": 0.1},
             "scheduler": {"name": "warmup-cosine"}, "train": {"epochs": 3, "freeze_backbone_epochs": 2}}
    whole = runs.train_run(config_from_dict(table), tmp_path / "whole", progress=False)

    class Interrupt:
        def on_epoch_end(self, epoch, record):
            if epoch == 0:
                raise KeyboardInterrupt  # resumed inside the frozen warm-up

    with pytest.raises(KeyboardInterrupt):
        runs.train_run(config_from_dict(table), tmp_path / "parted", progress=False, callbacks=[Interrupt()])
    checkpoint = torch.load(tmp_path / "parted" / "checkpoints" / "last.pt", weights_only=True)
    weights.rename(tmp_path / "gone.safetensors")  # neither resuming nor loading reads the file again
    runs.train_run(config_from_dict(table), tmp_path / "parted", resume=True, progress=False)
    a, b = (torch.load(d / "model.pt", weights_only=True)["state_dict"] for d in (whole, tmp_path / "parted"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model, _ = load_run(whole)
    assert torch.equal(model.state_dict()["backbone.features.0.weight"], a["backbone.features.0.weight"])
    assert checkpoint["epoch"] == 1
