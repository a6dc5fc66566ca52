"""WeightAverage: an EMA of the state dict against a direct loop, and its checkpoint round trip."""

import pytest
import torch
from torch import nn

from deephash.train.ema import WeightAverage


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))


def _train_steps(net: nn.Module, n: int, callback=None) -> list[dict]:
    """``n`` SGD steps; the state dict after each (copies)."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    states = []
    for step in range(n):
        x = torch.randn(8, 1, 6, 6)
        optimizer.zero_grad()
        net(x).square().mean().backward()
        optimizer.step()
        if callback is not None:
            callback.on_batch_end(0, step + 1, n)
        states.append({k: v.clone() for k, v in net.state_dict().items()})
    return states


def test_average_follows_the_ema_recursion_on_parameters_and_float_buffers():
    net, decay = _net(), 0.9
    average = WeightAverage(net, decay)
    states = _train_steps(net, 5, average)
    expected = {k: v.clone() for k, v in states[0].items()}
    for state in states[1:]:
        for key, value in state.items():
            if value.is_floating_point():
                expected[key] = decay * expected[key] + (1 - decay) * value
            else:
                expected[key] = value.clone()
    assert average.steps == 5
    for key, value in expected.items():
        assert torch.allclose(average.average[key], value, atol=1e-6), key
    assert int(average.average["1.num_batches_tracked"]) == 5  # integer buffers are copied
    assert not torch.allclose(average.average["3.weight"], net.state_dict()["3.weight"])

    target = _net()
    average.copy_to(target)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in average.average.items())


def test_state_round_trip_continues_the_same_average():
    decay = 0.8
    whole_net, parted_net = _net(), _net()
    whole = WeightAverage(whole_net, decay)
    torch.manual_seed(1)
    _train_steps(whole_net, 6, whole)

    first = WeightAverage(parted_net, decay)
    torch.manual_seed(1)
    weights = _train_steps(parted_net, 3, first)[-1]
    saved = {"average": {k: v.clone() for k, v in first.state_dict()["average"].items()},
             "steps": first.state_dict()["steps"]}
    rng = torch.get_rng_state()
    resumed_net = _net()  # re-seeds: restore the stream afterwards
    torch.set_rng_state(rng)
    resumed_net.load_state_dict(weights)
    second = WeightAverage(resumed_net, decay)
    second.load_state_dict(saved)
    _train_steps(resumed_net, 3, second)  # continues the global RNG stream of the whole run
    assert second.steps == 6
    assert all(torch.allclose(second.average[k], whole.average[k], atol=1e-6) for k in whole.average)


def test_bad_decay_and_mismatched_state_are_refused():
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(_net(), 1.0)
    average = WeightAverage(_net(), 0.5)
    with pytest.raises(KeyError, match="keys"):
        average.load_state_dict({"average": {"x": torch.zeros(1)}, "steps": 1})
