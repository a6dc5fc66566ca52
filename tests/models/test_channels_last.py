"""channels_last_on_cpu: channels-last parameters and inputs on the CPU give the same outputs and gradients."""

import torch

from deephash.models import build_model, channels_last_on_cpu


def test_channels_last_model_matches_the_default_layout():
    spec = {"backbone": "fmnist-cnn", "backbone_params": {"width": 8, "depth": [1, 2]}, "head": "hash",
            "bits": 16, "in_channels": 1, "aux_classes": 3}
    torch.manual_seed(0)
    plain = build_model(spec)
    fast = build_model(spec)
    fast.load_state_dict(plain.state_dict())
    assert channels_last_on_cpu(fast) is fast and fast.channels_last and not plain.channels_last
    conv = next(m for m in fast.backbone.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    x = torch.rand(6, 1, 28, 28)
    for model in (plain, fast):
        u, logits = model.forward_with_logits(x)
        (u.sum() + logits.square().sum()).backward()
    torch.testing.assert_close(fast.forward_with_logits(x)[0], plain.forward_with_logits(x)[0], rtol=1e-5, atol=1e-5)
    for p, q in zip(plain.parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4)  # float32 sums in another order
    plain.eval(), fast.eval()
    assert torch.equal(fast.encode(x), plain.encode(x))
