"""Loss-weight schedules."""

from __future__ import annotations

import pytest

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
