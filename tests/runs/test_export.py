"""``deephash export``: the ONNX encoder against PyTorch on real Fashion-MNIST images, for the code
rules of the shipped configs (posterior + instance re-rank head, pca of the map + head vectors,
plain sign), through the one search engine; the JSON around the graph; its error paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deephash import runs
from deephash.cli import main
from deephash.config import config_from_dict
from deephash.errors import DataFormatError, DeephashError, NotFoundError
from deephash.models import build_model
from deephash.retrieval.index import HashIndex
from deephash.retrieval.search import search
from deephash.runs.encoding import encode_with_rerank
from deephash.runs.export import export_run
from deephash.serve.onnx_encoder import OnnxEncoder

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TOLERANCE = 1e-4
QUERIES = 1000

CONFIG = """
name = "{name}"
seed = 0
device = "cpu"
[data]
dataset = "fashion-mnist"
root = "{root}"
limit = 1000
{data}
[model]
backbone = "fmnist-cnn"
{model}
[sampler]
kind = "random"
batch_size = 100
[train]
epochs = 1
log_interval = 100
num_threads = 1
{train}
"""
#: Tiny versions of the shipped configs' model kinds, trained one epoch on 1,000 images.
RUNS = {
    "posterior": dict(  # fashion-mnist-48: posterior codes, an instance re-rank head on the map
        data="",
        model='backbone_params = { width = 4, depth = [1, 1, 2], fc = 32, pool_first = true }\nbits = 16\n'
              'aux_classes = 10\ncode_rule = "posterior"\ncode_temperature = 2.0\nrerank = "instance"\n'
              'rerank_dim = 8\nrerank_source = "map"\n[loss]\nname = "csq"',
        train='aux_weight = 0.5\n[rerank_head]\nepochs = 1\naugment = { perturb = { shift = 1, noise = 0.02 } }'),
    "pca": dict(  # fashion-mnist-open-48: pca of the square-rooted map, the head's vectors
        data='seen_classes = [0, 2, 4, 6, 8]\nunseen_classes = [1, 3, 5, 7, 9]\nviews = 2\n'
             'augment = { perturb = { shift = 1, noise = 0.02 } }',
        model='backbone_params = { width = 4, depth = [1, 1, 2], fc = 32, pool_first = true }\nbits = 16\n'
              'code_rule = "pca"\ncode_source = "map"\ncode_power = 0.5\nrerank = "head"\n[loss]\nname = "contrastive-hash"',
        train=""),
    "sign": dict(  # mnist-48 / image-folder-48: the sign of the hash head; 12 bits leave 4 padding bits
        data="", model='backbone_params = { width = 4, depth = [1, 1], fc = 0 }\nbits = 12\n[loss]\nname = "csq"', train=""),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each kind: a trained run, its export (through the CLI) and the index of its database split."""
    base = tmp_path_factory.mktemp("export")
    out = {}
    for name, parts in RUNS.items():
        (base / f"{name}.toml").write_text(CONFIG.format(name=name, root=FASHION_MNIST, **parts), encoding="utf-8")
        run = base / name
        assert main(["train", str(base / f"{name}.toml"), "--out", str(run), "--quiet"]) == 0
        assert main(["export", str(run), "--format", "onnx", "--out", str(base / f"{name}-onnx")]) == 0
        runs.build_index(run, split="train", out=base / f"{name}-index")
        out[name] = {"run": run, "onnx": base / f"{name}-onnx", "index": base / f"{name}-index"}
    return out


def torch_outputs(model: torch.nn.Module, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """PyTorch's ±1 codes, the values whose sign they are, and the re-rank vectors of uint8 images.

    The values are computed here from the model's own parts, not by the exporter's graph."""
    x = images.float() / 255
    with torch.inference_mode():
        codes, vectors = model.encode_with_rerank(x)
        feats, mapped = model.features_and_map(x, True)
        if model.code_rule == "sign":
            values = model.head.linear(feats)
        elif model.code_rule == "pca":
            from deephash.models.pca_codes import pca_rows

            values = (pca_rows(mapped, model.code_power) - model.code_mean) @ model.code_projection
        else:
            values = codes  # the posterior rule's output is its code
    return codes.numpy(), values.numpy(), None if vectors is None else vectors.float().numpy()


@pytest.mark.parametrize("kind", list(RUNS))
def test_onnx_matches_pytorch_on_fashion_mnist(exported, kind):
    paths = exported[kind]
    model, config = runs.load_run(paths["run"], device="cpu")
    queries = runs.load_split(config, config.data.query_split, paths["run"])
    assert len(queries) >= QUERIES
    images = queries.data[:QUERIES]
    codes, values, vectors = torch_outputs(model, images)
    encoder = OnnxEncoder(paths["onnx"])
    onnx_values, onnx_vectors = encoder.code_values(images.numpy())
    packed, packed_vectors = encoder.encode(images.numpy())

    np.testing.assert_allclose(onnx_values, values, rtol=0, atol=TOLERANCE)
    assert (vectors is None) == (onnx_vectors is None) == (model.rerank == "")
    if vectors is not None:
        np.testing.assert_allclose(onnx_vectors, vectors, rtol=0, atol=TOLERANCE)
        np.testing.assert_array_equal(packed_vectors, onnx_vectors)
    bits = np.unpackbits(packed, axis=1, count=model.bits, bitorder="big").astype(bool)
    assert not np.unpackbits(packed, axis=1, bitorder="big")[:, model.bits:].any()  # zero padding
    clear = np.abs(values) > TOLERANCE  # the sign of a value this close to 0 may differ by float noise
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(bits[clear], codes[clear] > 0)
    if kind == "posterior":
        np.testing.assert_array_equal(bits, codes > 0)  # ±1 values: every bit

    index = HashIndex.load(paths["index"])
    assert (index.rerank_vectors is None) == (vectors is None)
    want = search(index, encode_with_rerank(model, queries.subset(torch.arange(QUERIES)))[0], k=10, rerank=vectors)
    got = search(index, packed, k=10, rerank=packed_vectors)
    stable = clear.all(axis=1)
    assert stable.sum() >= 0.95 * QUERIES
    for i in np.flatnonzero(stable):
        np.testing.assert_array_equal(got[i].ids, want[i].ids, err_msg=f"query {i}")
        np.testing.assert_array_equal(got[i].distances, want[i].distances)


def test_the_description_says_what_surrounds_the_graph(exported):
    for kind, paths in exported.items():
        model, _ = runs.load_run(paths["run"], device="cpu")
        d = json.loads((paths["onnx"] / "encoder.json").read_text(encoding="utf-8"))
        assert d["format"] == "deephash-onnx-encoder" and d["format_version"] == 1 and d["bits"] == model.bits
        assert d["deephash_version"] == __import__("deephash").__version__
        assert (d["input"]["channels"], d["input"]["height"], d["input"]["width"]) == (1, 28, 28)
        assert d["input"]["mean"] == model.normalize.mean.flatten().tolist()
        assert d["input"]["std"] == model.normalize.std.flatten().tolist()
        assert d["input"]["mean"] != [0.0]  # the run's own statistics
        # the model view of an in-memory data set's run: the whole shorter side, bilinear
        assert (d["input"]["decode"]["resize"], d["input"]["decode"]["crop_fraction"]) == ("bilinear", 1.0)
        assert d["code_rule"]["name"] == kind and d["classes"] == model.classes
        if kind == "posterior":
            assert d["code_rule"]["temperature"] == 2.0 and d["code_rule"]["fitted"] == {"code_centers": [10, 16]}
            assert d["rerank"] == {"output": "rerank", "kind": "instance", "dim": 8}
        elif kind == "pca":
            assert (d["code_rule"]["source"], d["code_rule"]["power"]) == ("map", 0.5)
            assert d["rerank"] == {"output": "rerank", "kind": "head", "dim": 16}
        else:
            assert d["rerank"] is None


def test_the_normalisation_is_the_models_to_the_bit(exported):
    model, config = runs.load_run(exported["pca"]["run"], device="cpu")
    images = runs.load_split(config, "test", exported["pca"]["run"]).data[:64]
    want = model.normalize(images.float() / 255).numpy()
    np.testing.assert_array_equal(OnnxEncoder(exported["pca"]["onnx"]).normalise(images.numpy()), want)


def test_the_batch_axis_is_dynamic_and_rows_are_independent(exported):
    encoder = OnnxEncoder(exported["posterior"]["onnx"])
    model, config = runs.load_run(exported["posterior"]["run"], device="cpu")
    images = runs.load_split(config, "test", exported["posterior"]["run"]).data[:7].numpy()
    packed, vectors = encoder.encode(images)
    for i in range(len(images)):
        one, vector = encoder.encode(images[i:i + 1])
        np.testing.assert_array_equal(one[0], packed[i])
        np.testing.assert_allclose(vector[0], vectors[i], rtol=0, atol=1e-6)


def test_untrained_backbones_export_too(tmp_path):
    """The other backbones of the registry (seed-cnn, ResNet for CIFAR, the space-to-depth stem),
    colour input and a non-trivial mean/std: ONNX Runtime's values equal PyTorch's."""
    specs = {
        "seed-cnn": ({"backbone": "seed-cnn", "bits": 16}, (1, 28, 28)),
        "resnet": ({"backbone": "resnet18-cifar", "backbone_params": {"width": 4}, "bits": 24,
                    "in_channels": 3, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}, (3, 32, 32)),
        "space-to-depth": ({"backbone": "fmnist-cnn", "backbone_params": {"width": 4, "depth": [1, 1],
                            "stem": "space-to-depth"}, "bits": 8, "rerank": "features"}, (1, 28, 28)),
    }
    rng = np.random.default_rng(0)
    for name, (spec, shape) in specs.items():
        dataset = "cifar10" if shape[0] == 3 else "fashion-mnist"
        config = config_from_dict({"data": {"dataset": dataset}, "model": spec, "device": "cpu"})
        torch.manual_seed(0)
        model = build_model(config.model).eval()
        run = tmp_path / name
        run.mkdir()
        runs.save_model(run / "model.pt", model, config, [])
        export_run(run, tmp_path / f"{name}-onnx")
        images = rng.integers(0, 256, (5, *shape), dtype=np.uint8)
        values, vectors = OnnxEncoder(tmp_path / f"{name}-onnx").code_values(images)
        x = torch.from_numpy(images).float() / 255
        with torch.inference_mode():
            feats = model.features(x)
            np.testing.assert_allclose(values, model.head.linear(feats).numpy(), rtol=0, atol=TOLERANCE)
            if spec.get("rerank"):
                np.testing.assert_allclose(vectors, feats.numpy(), rtol=0, atol=TOLERANCE)


def test_export_refuses_what_it_cannot_write(tmp_path, capsys):
    config = config_from_dict({"data": {"dataset": "fashion-mnist"}, "device": "cpu",
                               "model": {"backbone": "seed-cnn", "head": "embedding", "embedding_dim": 2}})
    run = tmp_path / "embedding"
    run.mkdir()
    runs.save_model(run / "model.pt", build_model(config.model), config, [])
    with pytest.raises(DeephashError, match="embedding model; export needs a hash model"):
        export_run(run, tmp_path / "out")
    with pytest.raises(DeephashError, match="export format must be one of"):
        export_run(run, tmp_path / "out", format="tflite")
    assert not (tmp_path / "out").exists()
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_fit_the_run_never_made_is_refused(tmp_path):
    config = config_from_dict({"data": {"dataset": "fashion-mnist"}, "device": "cpu", "model": {
        "backbone": "fmnist-cnn", "backbone_params": {"width": 4, "depth": [1, 1]}, "bits": 8, "code_rule": "pca"}})
    run = tmp_path / "unfitted"
    run.mkdir()
    runs.save_model(run / "model.pt", build_model(config.model), config, [])
    with pytest.raises(DeephashError, match="code_rule 'pca' has no projection"):
        export_run(run, tmp_path / "out")


def test_a_second_export_replaces_the_first(exported, tmp_path):
    out = tmp_path / "again"
    export_run(exported["sign"]["run"], out)
    (out / "stale.txt").write_text("old")
    export_run(exported["sign"]["run"], out)
    assert sorted(p.name for p in out.iterdir()) == ["encoder.json", "encoder.onnx"]
    assert (out / "encoder.onnx").read_bytes() == (exported["sign"]["onnx"] / "encoder.onnx").read_bytes()


def test_the_encoder_refuses_a_bad_folder_naming_the_key(exported, tmp_path):
    with pytest.raises(NotFoundError, match="does not exist"):
        OnnxEncoder(tmp_path / "nothing")
    good = json.loads((exported["sign"]["onnx"] / "encoder.json").read_text(encoding="utf-8"))
    graph = (exported["sign"]["onnx"] / "encoder.onnx").read_bytes()
    cases = {
        "format_version": (dict(good, format_version=2), "'format_version' is 2"),
        "mean": (dict(good, input=dict(good["input"], mean=[0.1, 0.2])), "'input.mean' must be 1 numbers"),
        "std": (dict(good, input=dict(good["input"], std=[0.0])), "'input.std' must be positive"),
        "bits": (dict(good, bits="12"), "'bits' must be a positive integer"),
        "model_file": (dict(good, model_file="../encoder.onnx"), "'model_file' must be a file name"),
        "outputs": (dict(good, code_values="logits"), "names 'images' and \\['logits'\\]"),
        "crop_fraction": (dict(good, input=dict(good["input"], decode=dict(good["input"]["decode"], crop_fraction=1.5))),
                          "'input.decode.crop_fraction' must be a number in \\(0, 1\\]"),
        "resize": (dict(good, input=dict(good["input"], decode=dict(good["input"]["decode"], resize="bicubic"))),
                   "'input.decode.resize' is 'bicubic'"),
        "square": (dict(good, input=dict(good["input"], width=27)), "'input.width' must equal input.height"),
    }
    for name, (description, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "encoder.onnx").write_bytes(graph)
        (folder / "encoder.json").write_text(json.dumps(description), encoding="utf-8")
        with pytest.raises(DataFormatError, match=message):
            OnnxEncoder(folder)
    (tmp_path / "format_version" / "encoder.json").write_text(json.dumps(good), encoding="utf-8")
    (tmp_path / "format_version" / "encoder.onnx").write_bytes(graph[: len(graph) // 2])
    with pytest.raises(DataFormatError, match="not a readable ONNX graph"):
        OnnxEncoder(tmp_path / "format_version")
    encoder = OnnxEncoder(exported["sign"]["onnx"])
    with pytest.raises(DeephashError, match=r"takes uint8 images \(B, 1, 28, 28\)"):
        encoder.encode(np.zeros((2, 1, 28, 27), np.uint8))


def test_an_export_whose_codes_differ_from_the_models_is_not_written(exported, tmp_path, monkeypatch):
    from deephash.runs import export

    monkeypatch.setitem(export._RULE_VALUES, "sign", lambda model, feats: -model.head.linear(feats))
    with pytest.raises(DeephashError, match="the exported graph's codes differ from the model's"):
        export_run(exported["sign"]["run"], tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists() and list(tmp_path.iterdir()) == []


def test_an_export_written_before_the_crop_was_recorded_loads_with_the_whole_shorter_side(exported, tmp_path, caplog):
    """An older ``encoder.json`` (``decode`` without ``crop_fraction``) still loads: uploads take the
    whole shorter side (1.0, what such a run's ``deephash search FILE`` does), with a warning."""
    import io

    from PIL import Image

    folder = tmp_path / "old"
    folder.mkdir()
    d = json.loads((exported["sign"]["onnx"] / "encoder.json").read_text(encoding="utf-8"))
    d["input"]["decode"] = {"mode": "L", "resize": "bilinear"}
    (folder / "encoder.json").write_text(json.dumps(d), encoding="utf-8")
    (folder / "encoder.onnx").write_bytes((exported["sign"]["onnx"] / "encoder.onnx").read_bytes())
    with caplog.at_level("WARNING", logger="deephash.serve"):
        old = OnnxEncoder(folder)
    assert old.crop_fraction == 1.0 and "crop_fraction" in caplog.text
    tall = np.random.default_rng(0).integers(0, 256, (40, 30), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(tall).save(buffer, format="PNG")
    view = np.array(Image.fromarray(tall).resize((28, 37), Image.Resampling.BILINEAR))[4:32]  # 30x40 -> 28x37, centre rows
    want, _ = OnnxEncoder(exported["sign"]["onnx"]).encode(view[None, None])
    got, _ = old.encode_image(buffer.getvalue())
    assert np.array_equal(got, want)
