"""Seed networks, backbones (one test over every registered one), heads and RetrievalModel."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deephash.errors import ConfigError, DeephashError
from deephash.models import (
    ClassificationNet,
    EmbeddingHead,
    EmbeddingNet,
    EmbeddingNetL2,
    HashHead,
    Normalize,
    RetrievalModel,
    SiameseNet,
    TripletNet,
    build_model,
    create_backbone,
    list_backbones,
    model_spec,
)

torch.set_num_threads(1)


def images(b: int = 4, c: int = 1, size: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, size, size, generator=torch.Generator().manual_seed(seed))


def test_seed_embeddingnet_layers():
    net = EmbeddingNet(in_channels=1, embedding_dim=2)
    conv_shapes = [tuple(m.weight.shape) for m in net.convnet if isinstance(m, nn.Conv2d)]
    fc_shapes = [tuple(m.weight.shape) for m in net.fc if isinstance(m, nn.Linear)]
    assert conv_shapes == [(32, 1, 5, 5), (64, 32, 5, 5)]
    assert fc_shapes == [(256, 1024), (256, 256), (2, 256)]
    kinds = [type(m).__name__ for m in net.convnet] + [type(m).__name__ for m in net.fc]
    assert kinds == ["Conv2d", "PReLU", "MaxPool2d", "Conv2d", "PReLU", "MaxPool2d",
                     "Linear", "PReLU", "Linear", "PReLU", "Linear"]
    assert [m.kernel_size for m in net.convnet if isinstance(m, nn.MaxPool2d)] == [2, 2]
    x = images()
    assert net(x).shape == (4, 2) and torch.equal(net.get_embedding(x), net(x))
    assert EmbeddingNet(3, 7)(images(c=3)).shape == (4, 7)


def test_l2_net_is_unit_norm_and_matches_the_plain_net():
    torch.manual_seed(0)
    net = EmbeddingNetL2(embedding_dim=5)
    plain = EmbeddingNet(embedding_dim=5)
    plain.load_state_dict(net.state_dict())
    x = images()
    out = net(x)
    raw = plain(x)
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-6)
    assert torch.allclose(out, raw / raw.norm(dim=1, keepdim=True), atol=1e-6)
    out.sum().backward()  # fails if a tensor needed for the gradient was modified in place
    assert all(p.grad is not None for p in net.parameters())


def test_classification_siamese_triplet_wrappers():
    torch.manual_seed(0)
    emb = EmbeddingNet(embedding_dim=3)
    clf = ClassificationNet(emb, n_classes=10)
    x = images()
    logp = clf(x)
    assert logp.shape == (4, 10) and torch.allclose(logp.exp().sum(1), torch.ones(4), atol=1e-5)
    feat = clf.get_embedding(x)
    assert torch.allclose(feat, clf.nonlinear(emb(x)))
    assert torch.allclose(logp, F.log_softmax(clf.fc1(feat), dim=-1))
    x2, x3 = images(seed=1), images(seed=2)
    o1, o2 = SiameseNet(emb)(x, x2)
    assert torch.equal(o1, emb(x)) and torch.equal(o2, emb(x2))
    t = TripletNet(emb)
    outs = t(x, x2, x3)
    assert all(torch.equal(o, emb(i)) for o, i in zip(outs, (x, x2, x3)))
    assert torch.equal(t.get_embedding(x), emb(x)) and torch.equal(SiameseNet(emb).get_embedding(x), emb(x))


INPUTS = {"resnet18-cifar": (3, 32)}


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_shapes_finite_and_gradients(name):
    torch.manual_seed(0)
    channels, size = INPUTS.get(name, (1, 28))
    backbone = create_backbone(name, in_channels=channels)
    out = backbone(images(b=3, c=channels, size=size))
    assert out.shape == (3, backbone.out_features)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in backbone.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_backbone_parameters_and_errors():
    assert create_backbone("seed-cnn").out_features == 256
    assert create_backbone("resnet18-cifar", in_channels=3).out_features == 512
    narrow = create_backbone("fmnist-cnn", width=8, depth=(1, 1, 1, 1))
    assert narrow.out_features == 64 and narrow(images(b=2)).shape == (2, 64)
    assert create_backbone("fmnist-cnn", width=64).out_features == 256
    with pytest.raises(ConfigError, match="nope"):
        create_backbone("nope")
    with pytest.raises(ConfigError, match="fmnist-cnn"):
        create_backbone("fmnist-cnn", colour=True)
    flat = create_backbone("fmnist-cnn", width=8, depth=(1, 1, 1), fc=32)
    assert flat.out_features == 32 and flat.fc[0].in_features == 32 * 7 * 7
    flat.eval()
    assert flat(images(b=3)).shape == (3, 32)
    with pytest.raises(DeephashError, match="pool a 28x28 image to nothing"):
        create_backbone("fmnist-cnn", width=8, depth=(1,) * 6, fc=32)



def test_space_to_depth_stem_is_a_stride_2_convolution_of_the_image():
    """Oracle: a 3x3 convolution of the 2x2-folded image equals a 6x6, stride-2 convolution of the
    image itself whose kernel interleaves the folded kernel's four channels."""
    torch.manual_seed(0)
    net = create_backbone("fmnist-cnn", width=8, depth=(1, 2), fc=16, stem="space-to-depth")
    conv = net.features[1]
    assert isinstance(net.features[0], torch.nn.PixelUnshuffle) and conv.in_channels == 4
    x = images(b=3)
    folded = conv(net.features[0](x))
    w = conv.weight.detach()  # (8, 4, 3, 3); folded channel 2i + j holds pixel offset (i, j)
    kernel = torch.zeros(8, 1, 6, 6)
    for i in range(2):
        for j in range(2):
            kernel[:, 0, i::2, j::2] = w[:, 2 * i + j]
    direct = torch.nn.functional.conv2d(x, kernel, stride=2, padding=2)
    assert torch.allclose(folded, direct, atol=1e-5)
    # the same output size as the pooling stem, one max-pool fewer
    pooled = create_backbone("fmnist-cnn", width=8, depth=(1, 2), fc=16)
    assert net.fc[0].in_features == pooled.fc[0].in_features == 16 * 14 * 14
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net.features) == 0
    assert net.eval()(x).shape == (3, 16)
    with pytest.raises(DeephashError, match="unknown stem 'fold'"):
        create_backbone("fmnist-cnn", stem="fold")
    with pytest.raises(DeephashError, match="space-to-depth stem needs >= 2 stages and an even image size"):
        create_backbone("fmnist-cnn", depth=(2,), stem="space-to-depth")
    with pytest.raises(DeephashError, match="got 3 stages and 27"):
        create_backbone("fmnist-cnn", image_size=27, stem="space-to-depth")


def test_pool_first_computes_the_same_function_when_batchnorm_scales_are_positive():
    """max-pool commutes with BatchNorm (eval, positive scale) and ReLU, both increasing maps."""
    torch.manual_seed(0)
    after = create_backbone("fmnist-cnn", width=8, depth=(1, 2, 1), fc=16)
    first = create_backbone("fmnist-cnn", width=8, depth=(1, 2, 1), fc=16, pool_first=True)
    layers = lambda net: [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d))]  # noqa: E731
    for bn in (m for m in layers(after) if isinstance(m, torch.nn.BatchNorm2d)):
        bn.weight.data.uniform_(0.5, 2.0)
        bn.bias.data.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    for source, target in zip(layers(after), layers(first), strict=True):
        target.load_state_dict(source.state_dict())
    first.fc.load_state_dict(after.fc.state_dict())
    kinds = lambda net: [type(m).__name__ for m in net.features]  # noqa: E731
    assert kinds(first)[:4] == ["Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU"]
    assert kinds(after)[:4] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    x = images(b=5)
    assert torch.allclose(after.eval()(x), first.eval()(x), atol=1e-5)
    # a negative scale breaks the identity: the option is a different network, not a reordering
    layers(first)[1].weight.data[0] = -1.0
    assert not torch.allclose(after(x), first(x), atol=1e-3)

def test_timm_backbone():
    if importlib.util.find_spec("timm") is None:
        with pytest.raises(DeephashError, match="timm"):
            create_backbone("timm:resnet18", in_channels=3)
    else:  # with timm installed: a feature extractor without downloads
        backbone = create_backbone("timm:resnet18", in_channels=3)
        assert backbone(images(b=2, c=3, size=32)).shape == (2, backbone.out_features)


@pytest.mark.parametrize("bits", [8, 12, 13, 48])
def test_hash_head_train_eval(bits):
    torch.manual_seed(0)
    head = HashHead(16, bits)
    feats = torch.randn(5, 16)
    z = head.linear(feats)
    assert torch.allclose(head(feats), torch.tanh(z))
    head.eval()
    codes = head(feats)
    assert codes.shape == (5, bits) and codes.dtype == torch.float32
    assert torch.equal(codes, torch.where(z >= 0, 1.0, -1.0))
    assert torch.allclose(head.relaxed(feats), torch.tanh(z))


def test_hash_head_zero_is_plus_one_and_bits_checked():
    head = HashHead(4, 9).eval()
    nn.init.zeros_(head.linear.weight)
    nn.init.zeros_(head.linear.bias)
    assert torch.equal(head(torch.randn(2, 4)), torch.ones(2, 9))
    for bad in (7, 0, 12.0, True):
        with pytest.raises(DeephashError, match="bits"):
            HashHead(4, bad)


def test_normalize_and_embedding_head():
    norm = Normalize((0.5, 0.25, 0.0), (0.5, 0.5, 2.0))
    assert set(dict(norm.named_buffers())) == {"mean", "std"}
    x = torch.rand(2, 3, 4, 4)
    expected = torch.stack([(x[:, 0] - 0.5) / 0.5, (x[:, 1] - 0.25) / 0.5, x[:, 2] / 2.0], dim=1)
    assert torch.allclose(norm(x), expected)
    with pytest.raises(DeephashError):
        Normalize((0.5,), (0.0,))
    head = EmbeddingHead(8, 6, normalize=True)
    out = head(torch.randn(3, 8))
    assert out.shape == (3, 6) and torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-6)


def test_retrieval_model_forward_encode_and_aux():
    torch.manual_seed(0)
    model = build_model({"backbone": "fmnist-cnn", "backbone_params": {"width": 8}, "bits": 13,
                         "mean": [0.3], "std": [0.4], "aux_classes": 10})
    assert model.is_hash and model.bits == 13 and model.embedding_dim == 13
    x = images()
    model.eval()
    feats = model.backbone((x - 0.3) / 0.4)
    assert torch.allclose(model(x), model.head(feats))
    codes = model.encode(x)
    assert torch.equal(codes, model(x)) and set(codes.unique().tolist()) <= {-1.0, 1.0}
    model.train()
    u, logits = model.forward_with_logits(x)
    assert u.shape == (4, 13) and logits.shape == (4, 10) and (u.abs() < 1).all()
    assert torch.equal(model.get_embedding(x).sign(), model.encode(x))
    emb = build_model({"head": "embedding", "embedding_dim": 16, "backbone": "seed-cnn"})
    assert not emb.is_hash and emb.bits is None and emb.embedding_dim == 16
    with pytest.raises(ConfigError, match="aux_classes"):
        emb.forward_with_logits(x)


def test_build_model_spec_round_trip_and_unknown_key():
    torch.manual_seed(0)
    spec = {"backbone": "fmnist-cnn", "backbone_params": {"width": 8, "depth": [1, 1]}, "bits": 24,
            "mean": [0.286], "std": [0.353]}
    model = build_model(spec).eval()
    stored = model_spec(model)
    assert stored["bits"] == 24 and stored["backbone_params"] == {"width": 8, "depth": [1, 1]}
    clone = build_model(stored).eval()
    clone.load_state_dict(model.state_dict())
    x = images()
    assert torch.equal(clone(x), model(x))
    with pytest.raises(ConfigError, match="'bitz'"):
        build_model({"bitz": 48})
    with pytest.raises(ConfigError, match="'tanh'"):
        build_model({"head": "tanh"})
    with pytest.raises(ConfigError, match="build_model"):
        model_spec(RetrievalModel(create_backbone("seed-cnn"), EmbeddingHead(256, 4)))


def test_seed_embeddingnet_spec_is_the_seed_network():
    model = build_model({"backbone": "seed-embeddingnet", "embedding_dim": 2})
    assert isinstance(model.backbone, EmbeddingNet) and model.embedding_dim == 2 and not model.is_hash
    seed = EmbeddingNet(1, 2)
    seed.load_state_dict(model.backbone.state_dict())
    x = images()
    assert torch.equal(model(x), seed(x))
    assert model_spec(model)["head"] == "identity"


def test_rerank_head_on_the_backbone_map():
    """``rerank_source = "map"``: the head reads the last feature map as the fully connected layer does."""
    spec = {"backbone": "fmnist-cnn", "backbone_params": {"width": 4, "depth": [1, 1], "fc": 16}, "bits": 8,
            "rerank": "instance", "rerank_dim": 5, "rerank_source": "map"}
    model = build_model(spec).eval()
    x = torch.rand(3, 1, 28, 28)
    feats, flat = model.backbone.forward_with_map(model.normalize(x))
    assert flat.shape == (3, 8 * 14 * 14) == (3, model.backbone.map_features)
    torch.testing.assert_close(feats, model.features(x))
    torch.testing.assert_close(model.backbone.fc(flat), feats)
    codes, vectors = model.encode_with_rerank(x)
    torch.testing.assert_close(vectors, torch.nn.functional.normalize(model.rerank_head.linear(flat), dim=1))
    assert torch.equal(codes, model(x))
    u, z = model.train().training_outputs(x, logits=False, rerank=True)
    assert u.shape == (3, 8) and z.shape == (3, 5)
    pooled = build_model({**spec, "backbone_params": {"width": 4, "depth": [1, 1]}})  # no fc: the pooled map = the features
    assert pooled.rerank_head.linear.in_features == pooled.backbone.out_features == 8
    with pytest.raises(ConfigError, match="forward_with_map"):
        build_model({**spec, "backbone": "seed-cnn", "backbone_params": {}})
    with pytest.raises(ConfigError, match="rerank_source must be"):
        build_model({**spec, "rerank_source": "pixels"})
