"""Tanh continuation: β per step, what the hash head returns with it, and its config checks."""

from __future__ import annotations

import pytest
import torch

from deephash.config import load_config
from deephash.errors import ConfigError
from deephash.models import HashHead, build_model
from deephash.train import TanhContinuation, fit


def test_beta_rises_linearly_per_step_from_start_to_end():
    head = HashHead(4, 8)
    c = TanhContinuation(head, 1.0, 5.0, n_epochs=2)
    values = [c.value(epoch, step, 3) for epoch in range(2) for step in range(1, 4)]  # steps are 1-based
    assert values == pytest.approx([1.0, 1.8, 2.6, 3.4, 4.2, 5.0])
    c.on_batch_start(1, 2, 3)
    assert head.scale == pytest.approx(4.2)
    assert TanhContinuation(head, 2.0, 2.0, 1).value(0, 1, 1) == 2.0  # one step: start


def test_the_head_returns_tanh_of_beta_times_a_and_the_same_sign():
    head = HashHead(6, 16)
    x = torch.randn(5, 6)
    a = head.linear(x)
    codes = head.binary(x)
    head.scale = 3.0
    torch.testing.assert_close(head.relaxed(x), torch.tanh(3.0 * a))
    assert torch.equal(head.binary(x), codes) and torch.equal(head.eval()(x), codes)


def test_fit_applies_it_before_every_batch():
    model = build_model({"backbone": "seed-cnn", "head": "hash", "bits": 8})
    seen: list[float] = []

    class Record:
        def on_batch_end(self, epoch, step, n_steps):
            seen.append(model.head.scale)

    batches = [(torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 0, 1]))] * 3
    loss = lambda u, y: u.mean()  # noqa: E731
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    fit(batches, None, model, loss, optimizer, None, 2, torch.device("cpu"), 100,
        callbacks=[TanhContinuation(model.head, 1.0, 6.0, 2), Record()], progress=False)
    assert seen == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])


def test_config_checks(tmp_path):
    def config(value: str):
        path = tmp_path / "c.toml"
        path.write_text(f'name = "x"\n[model]\nbackbone = "seed-cnn"\nhead = "{value[0]}"\n[train]\ntanh_scale = {value[1]}\n')
        return load_config(path)

    assert config(("hash", "[1, 10]")).train.tanh_scale == [1.0, 10.0]
    for bad in (("hash", "[1]"), ("hash", "[0, 5]"), ("embedding", "[1, 5]")):
        with pytest.raises(ConfigError, match="train.tanh_scale must be"):
            config(bad)
    with pytest.raises(ConfigError, match="hash head"):
        TanhContinuation(torch.nn.Linear(2, 2), 1.0, 2.0, 1)
