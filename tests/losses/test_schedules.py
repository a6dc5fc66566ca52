"""Loss-weight schedules."""

from __future__ import annotations

import math

import pytest
import torch

from deephash.errors import ConfigError
from deephash.losses.schedules import Constant, LinearRamp, build_schedule


class Dummy:
    quantization_weight = 0.0


def test_linear_ramp_over_the_whole_run():
    ramp = LinearRamp("quantization_weight", 1.0, 16.0)
    assert [ramp.value(e, 6) for e in range(6)] == [1.0, 4.0, 7.0, 10.0, 13.0, 16.0]
    assert ramp.value(0, 1) == 1.0


def test_linear_ramp_with_its_own_length_then_constant():
    ramp = LinearRamp("quantization_weight", 2.0, 0.0, epochs=4)
    assert [ramp.value(e, 10) for e in range(7)] == [2.0, 1.5, 1.0, 0.5, 0.0, 0.0, 0.0]


def test_apply_sets_the_attribute_and_names_missing_ones():
    loss = Dummy()
    ramp = LinearRamp("quantization_weight", 1.0, 3.0)
    assert ramp.apply(loss, 1, 3) == 2.0 and loss.quantization_weight == 2.0
    Constant("quantization_weight", 5.0).apply(loss, 7, 10)
    assert loss.quantization_weight == 5.0
    with pytest.raises(ConfigError, match="'margin'.*Dummy"):
        LinearRamp("margin", 0.0, 1.0).apply(loss, 0, 2)


def test_build_schedule():
    ramp = build_schedule({"type": "linear", "attribute": "quantization_weight", "start": 1, "end": 16, "epochs": 3})
    assert isinstance(ramp, LinearRamp) and ramp.value(3, 10) == 16.0 and ramp.value(1, 10) == 6.0
    const = build_schedule({"type": "constant", "attribute": "alpha", "value": 0.5})
    assert isinstance(const, Constant) and const.value(4, 5) == 0.5
    with pytest.raises(ConfigError, match="'stop'"):
        build_schedule({"type": "linear", "attribute": "a", "start": 1, "stop": 2})
    with pytest.raises(ConfigError, match="'end'"):
        build_schedule({"type": "linear", "attribute": "a", "start": 1})
    with pytest.raises(ConfigError, match="'cosine'"):
        build_schedule({"type": "cosine", "attribute": "a"})
    with pytest.raises(ConfigError, match="epochs"):
        LinearRamp("a", 0, 1, epochs=0)


def test_warmup_cosine_rates_by_step() -> None:
    from deephash.train.optim import WarmupCosineLR

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    schedule = WarmupCosineLR(optimizer, lr=1.0, n_epochs=2, warmup=0.25, eta_min=0.1)
    rates = [schedule.rate(epoch, step, 4) for epoch in range(2) for step in range(1, 5)]  # T = 8, W = 2
    expected = [0.5, 1.0] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / 6)) for i in range(6)]
    assert rates == pytest.approx(expected, abs=1e-12)
    schedule.on_batch_start(1, 2, 4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected[5])
    with pytest.raises(ConfigError, match="warmup must be in"):
        WarmupCosineLR(optimizer, 1.0, 2, warmup=1.0)


def test_warmup_cosine_from_config() -> None:
    from deephash.config import config_from_dict
    from deephash.runs.components import build_scheduler
    from deephash.train.optim import split_schedule

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    config = config_from_dict({"optimizer": {"lr": 0.5}, "train": {"epochs": 3},
                               "scheduler": {"name": "warmup-cosine", "params": {"warmup": 0.0}}})
    schedule = build_scheduler(config, optimizer)
    assert split_schedule(schedule) == (None, schedule)
    assert schedule.rate(0, 1, 10) == pytest.approx(0.5) and schedule.rate(2, 10, 10) == pytest.approx(0.25 * (1 + math.cos(math.pi * 29 / 30)))
    with pytest.raises(ConfigError, match="scheduler.params.warm is not a parameter"):  # refused when the config loads
        config_from_dict({"scheduler": {"name": "warmup-cosine", "params": {"warm": 0.1}}})
