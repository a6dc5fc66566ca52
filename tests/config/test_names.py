"""Every name a config gives is checked when it loads (file and key in one line), against the
registries; a loss and a selector that cannot train together stop there, not at training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deephash.config import config_from_dict, load_config
from deephash.errors import ConfigError
from deephash.losses import DTSHLoss, dtsh_selector_margin, selector_margin
from deephash.models.backbones import BACKBONES
from deephash.runs import train_run
from deephash.runs.components import build_loss


def _load(tmp_path: Path, toml: str):
    path = tmp_path / "c.toml"
    path.write_text(toml, encoding="utf-8")
    return path, load_config(path)


BAD = [
    ('[model]\nbackbone = "resnet99"\n', "model.backbone must be one of", "'fmnist-cnn'"),
    ('[model]\nbackbone = "timm:"\n', "model.backbone 'timm:' needs a model name", ""),
    ('[model]\nbackbone = "fmnist-cnn"\nbackbone_params = { widht = 4 }\n', "model.backbone_params.widht is not a parameter", "width"),
    ('[model]\nrerank = "vectors"\n', "model.rerank must be one of", "'instance'"),
    ('[data]\naugment = { flip = true }\n', "data.augment: unknown augmentation key 'flip'", "hflip"),
    ('[data]\naugment = { perturb = { angle = 3 } }\n', "data.augment: augmentation 'perturb': bad parameters", "angle"),
    ('[rerank_head]\naugment = { crop = 2 }\n', "rerank_head.augment: unknown augmentation key 'crop'", "crop_padding"),
    ('[loss]\nname = "csq"\nparams = { quantisation_weight = 1 }\n', "loss.params.quantisation_weight is not a parameter", "quantization_weight"),
    ('[loss]\nname = "dtsh"\n[selector]\nname = "semihard"\nparams = { margn = 1 }\n', "selector.params.margn is not a parameter", "margin"),
    ('[scheduler]\nname = "warmup-cosine"\nparams = { warm = 0.1 }\n', "scheduler.params.warm is not a parameter", "warmup"),
    ('[loss]\nname = "csq"\n[selector]\nname = "semihard"\n', "loss 'csq' takes no selector", ""),
    ('[loss]\nname = "online-triplet"\n[selector]\nname = "hard-negative"\n', "picks pairs but loss 'online-triplet' needs a triplet selector", "'semihard'"),
    ('[loss]\nname = "online-contrastive"\n[selector]\nname = "semihard"\n', "needs a pair selector", "'hard-negative'"),
    ('[loss]\nname = "dtsh"\n[selector]\nname = "all-positive"\n', "needs a triplet selector", "'batch-hard'"),
    ('[[schedules]]\nattribute = "quantisation_weight"\n', "schedules[0].attribute 'quantisation_weight' is no parameter of loss 'csq'", ""),
    ('[model]\nhead = "hashy"\n', "model.head must be one of", ""),
    ('[model]\ncode_rule = "tanh"\n', "model.code_rule must be one of", ""),
    ('[loss]\nname = "triplett"\n', "loss.name must be one of", ""),
    ('[sampler]\nkind = "stratified"\n', "sampler.kind must be one of", ""),
    ('[optimizer]\nname = "adagrad"\n', "optimizer.name must be one of", ""),
    ('[scheduler]\nname = "linear"\n', "scheduler.name must be one of", ""),
    ('[data]\ndataset = "fashion"\n', "data.dataset must be one of", ""),
]


@pytest.mark.parametrize("toml, message, hint", BAD, ids=[m.split(" ")[0] + str(i) for i, (_, m, _) in enumerate(BAD)])
def test_a_bad_name_is_a_one_line_error_naming_the_file_and_key(tmp_path, toml, message, hint):
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, toml)
    text = str(caught.value)
    assert "\n" not in text and message in text and str(tmp_path / "c.toml") in text, text
    assert hint in text


def test_timm_backbones_and_registered_names_pass(tmp_path, monkeypatch):
    _, config = _load(tmp_path, '[model]\nbackbone = "timm:resnet18"\nbackbone_params = { pretrained = false }\n')
    assert config.model.backbone == "timm:resnet18"  # timm itself is imported only when the model is built
    BACKBONES.names()  # load the registry, then add a name: validation reads the registry
    monkeypatch.setitem(BACKBONES._factories, "tiny-test-net", lambda in_channels=1, size=3: None)
    _, config = _load(tmp_path, '[model]\nbackbone = "tiny-test-net"\nbackbone_params = { size = 5 }\n')
    assert config.model.backbone_params == {"size": 5}


def test_a_selector_needing_a_margin_from_a_loss_without_one_is_refused(tmp_path, monkeypatch):
    from deephash.losses import registry

    monkeypatch.setitem(registry.LOSSES._factories, "no-margin-loss", lambda selector=None, bits=8: None)
    with pytest.raises(ConfigError, match=r"selector 'semihard' needs a margin and loss 'no-margin-loss' gives none: set "
                                          r"selector.params.margin"):
        config_from_dict({"loss": {"name": "no-margin-loss"}, "selector": {"name": "semihard"}}, "x.toml")
    config_from_dict({"loss": {"name": "no-margin-loss"}, "selector": {"name": "semihard", "params": {"margin": 2.0}}})


def test_dtsh_alpha_becomes_the_selectors_squared_distance_margin():
    """θ = ½·aᵀb on ±1 codes: |a − b|² = 2·bits − 4θ, so the DTSH hinge θ_ap − θ_an < α is
    d_ap − d_an + 4α > 0; checked on every triplet of random 16-bit codes."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2, (12, 16), generator=g).float() * 2 - 1
    alpha = 3.0
    theta = 0.5 * codes @ codes.T
    squared = (codes[:, None] - codes[None]).pow(2).sum(-1)  # exact integers: ties at the boundary stay tied
    assert torch.equal(squared, 2 * 16 - 4 * theta)
    margin = dtsh_selector_margin(alpha)
    assert margin == 12.0
    at_boundary = 0
    for a in range(12):
        for p in range(12):
            for n in range(12):
                dtsh_violated = bool(theta[a, p] - theta[a, n] < alpha)
                assert dtsh_violated == bool(squared[a, p] - squared[a, n] + margin > 0)
                at_boundary += bool(theta[a, p] - theta[a, n] == alpha)
    assert at_boundary > 0  # the strict inequality is pinned on exactly tied values
    assert selector_margin("dtsh", {"bits": 48}) == 48.0 and selector_margin("dtsh", {"alpha": 2}) == 8.0
    assert selector_margin("dtsh", {}) is None
    assert selector_margin("online-triplet", {}) == 1.0 and selector_margin("online-triplet", {"margin": 0.3}) == 0.3
    loss = DTSHLoss("semihard", bits=48)
    assert loss.triplet_selector.margin == 48.0 and loss.margin(48) == 12.0
    assert DTSHLoss("hardest", alpha=2.0).triplet_selector.margin == 8.0
    assert DTSHLoss("random", bits=16, selector_params={"margin": 0.5}).triplet_selector.margin == 0.5


@pytest.mark.parametrize("selector", ["semihard", "hardest", "random"])
def test_dtsh_with_a_margin_selector_builds_from_a_config(selector):
    config = config_from_dict({"model": {"bits": 16}, "loss": {"name": "dtsh"}, "selector": {"name": selector}})
    loss = build_loss(config, n_classes=3, selector_generator=torch.Generator().manual_seed(0))
    assert loss.triplet_selector.margin == 16.0  # 4 · α, α = bits / 4
    u = torch.tanh(torch.randn(12, 16, generator=torch.Generator().manual_seed(1))).requires_grad_()
    value = loss(u, torch.arange(3).repeat(4))
    value.backward()
    assert torch.isfinite(value) and loss.num_selected > 0 and u.grad.abs().sum() > 0


def test_dtsh_with_semihard_trains_a_few_steps(tmp_path, tiny_fmnist):
    root, _ = tiny_fmnist
    config = config_from_dict({
        "name": "dtsh-semihard", "seed": 0, "device": "cpu",
        "data": {"dataset": "fashion-mnist", "root": str(root)},
        "model": {"backbone": "fmnist-cnn", "backbone_params": {"width": 4, "depth": [1, 1]}, "bits": 16},
        "loss": {"name": "dtsh"}, "selector": {"name": "semihard"},
        "sampler": {"n_classes": 3, "n_samples": 4}, "train": {"epochs": 1, "log_interval": 1},
    })
    out = train_run(config, tmp_path / "run", progress=False)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if "loss" in s and "step" in s]
    assert len(losses) >= 2 and all(v == v and abs(v) < float("inf") for v in losses)
