"""The ``deephash`` command line end to end on a tiny fake Fashion-MNIST written by the tests.

Oracles: codes recomputed from ``model.pt`` with numpy's own bit packing, Hamming distances by a
popcount loop, mAP by a per-query loop, the protocol split by counting, and an uninterrupted run
for ``--resume``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deephash import runs
from deephash.cli import main
from deephash.config import load_config
from deephash.data.splits import SPLIT_PROTOCOLS, protocol_split
from deephash.errors import ConfigError, DataFormatError, NotFoundError
from deephash.losses.aux import AuxClassificationLoss
from deephash.runs.components import build_loss

N_CLASSES, N_TRAIN, N_TEST = 3, 16, 8  # per class


CONFIG = """
name = "tiny"
seed = 3
device = "cpu"
[data]
dataset = "fashion-mnist"
root = "{root}"
augment = {{ crop_padding = 2, hflip = true }}
[model]
backbone = "fmnist-cnn"
backbone_params = {{ width = 4, depth = [1, 1] }}
bits = 12
aux_classes = 10
[loss]
name = "csq"
[[schedules]]
attribute = "quantization_weight"
start = 0.0
end = 0.5
[sampler]
n_classes = 3
n_samples = 8
[train]
epochs = 2
log_interval = 1
final_epochs_no_augment = 1
aux_weight = 0.5
[eval]
ks = [5, 48]
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_fmnist):
    base = tmp_path_factory.mktemp("cli")
    root, data = tiny_fmnist
    config = base / "tiny.toml"
    config.write_text(CONFIG.format(root=root), encoding="utf-8")
    return base, config, data


@pytest.fixture(scope="module")
def run(tiny):
    base, config, _ = tiny
    out = base / "run"
    assert main(["train", str(config), "--out", str(out), "--quiet"]) == 0
    return out


def _popcount_distances(q: np.ndarray, db: np.ndarray) -> np.ndarray:
    return np.array([[sum(bin(int(a) ^ int(b)).count("1") for a, b in zip(x, y)) for y in db] for x in q])


def test_train_writes_a_run_directory(run, tiny):
    _, config_path, _ = tiny
    saved = load_config(run / "config.toml")
    original = load_config(config_path)
    assert saved.model.bits == 12 and len(saved.model.mean) == 1 and 0 < saved.model.std[0] < 1
    assert saved.model.mean != original.model.mean  # resolved from the training images
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [line for line in lines if line["type"] == "epoch"]
    steps = [line for line in lines if line["type"] == "step"]
    n_batches = (N_CLASSES * N_TRAIN) // (3 * 8)
    assert [e["epoch"] for e in epochs] == [0, 1] and len(steps) == 2 * n_batches
    assert all(np.isfinite(e["train_loss"]) for e in epochs)
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "checkpoints" / "best.pt").is_file()
    saved_model = torch.load(run / "model.pt", weights_only=True)
    assert set(saved_model) == {"spec", "state_dict", "config", "classes"}
    assert saved_model["spec"]["bits"] == 12 and saved_model["classes"][0] == "T-shirt/top"
    assert saved_model["spec"]["aux_classes"] == 10 and any(k.startswith("aux.") for k in saved_model["state_dict"])


def test_encode_writes_the_codes_of_the_model(run, tiny, tmp_path):
    _, _, data = tiny
    out = tmp_path / "q.npz"
    assert main(["encode", str(run), "--split", "test", "--out", str(out)]) == 0
    with np.load(out, allow_pickle=False) as f:
        codes, labels, bits = f["codes"], f["labels"], int(f["bits"])
    assert codes.dtype == np.uint8 and codes.shape == (N_CLASSES * N_TEST, 2) and bits == 12
    np.testing.assert_array_equal(labels, data["test"][1])
    # Oracle: the model rebuilt from model.pt, signs packed by numpy (MSB first, zero padded).
    from deephash.models import build_model

    saved = torch.load(run / "model.pt", weights_only=True)
    model = build_model(saved["spec"])
    model.load_state_dict(saved["state_dict"])
    with torch.no_grad():
        u = model.eval()(torch.from_numpy(data["test"][0][:, None]).float() / 255).numpy()
    np.testing.assert_array_equal(codes, np.packbits(u >= 0, axis=1))


def test_index_build_info_and_search_match_brute_force(run, tiny, tmp_path, capsys):
    _, _, data = tiny
    index = tmp_path / "index"
    assert main(["index", "build", str(run), "--split", "train", "--out", str(index)]) == 0
    assert main(["index", "info", str(index)]) == 0
    info = capsys.readouterr().out
    assert "bits     12" in info and f"items    {N_CLASSES * N_TRAIN}" in info
    assert main(["encode", str(run), "--split", "train", "--out", str(tmp_path / "db.npz")]) == 0
    assert main(["encode", str(run), "--split", "test", "--out", str(tmp_path / "q.npz")]) == 0
    capsys.readouterr()
    assert main(["search", str(index), "--run", str(run), "test:0", "test:5", "-k", "7", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    db, q = np.load(tmp_path / "db.npz"), np.load(tmp_path / "q.npz")
    expected = _popcount_distances(q["codes"][[0, 5]], db["codes"])
    for row, result in zip(expected, results):
        hits = result["hits"]
        assert [h["rank"] for h in hits] == list(range(1, 8))
        assert [h["distance"] for h in hits] == sorted(row)[:7]
        assert all(row[h["id"]] == h["distance"] for h in hits)
        assert all(h["label"] == data["train"][1][h["id"]] for h in hits)
    assert results[0]["label"] == data["test"][1][0]
    # Radius search: every item within the radius, inclusive.
    radius = int(expected[0].min())
    assert main(["search", str(index), "--run", str(run), "test:0", "--radius", str(radius), "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["hits"]
    assert sorted(h["id"] for h in hits) == np.flatnonzero(expected[0] <= radius).tolist()
    # An image file gives the same answer as the split item it shows; the table names classes.
    from PIL import Image

    Image.fromarray(data["test"][0][0]).save(tmp_path / "q0.png")
    assert main(["search", str(index), "--run", str(run), str(tmp_path / "q0.png"), "-k", "7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["hits"] == results[0]["hits"]
    assert main(["search", str(index), "--run", str(run), "test:0", "-k", "3"]) == 0
    table = capsys.readouterr().out
    assert "rank" in table and len(table.strip().splitlines()) == 5


def test_search_names_no_class_for_an_item_labelled_minus_one(run, tmp_path, capsys):
    from deephash.retrieval.index import HashIndex

    index_dir = tmp_path / "index"
    assert main(["index", "build", str(run), "--split", "train", "--out", str(index_dir)]) == 0
    assert main(["encode", str(run), "--split", "test", "--out", str(tmp_path / "q.npz")]) == 0
    index = HashIndex.load(index_dir)
    classes = index.metadata["classes"]
    assert len(classes) > 1
    index.add(np.load(tmp_path / "q.npz")["codes"][:1], ids=[10_000], labels=np.array([-1]))  # no class, distance 0
    index.save(index_dir)
    capsys.readouterr()
    assert main(["search", str(index_dir), "--run", str(run), "test:0", "--radius", "0", "--json"]) == 0
    hits = {h["id"]: h for h in json.loads(capsys.readouterr().out)[0]["hits"]}
    assert hits[10_000]["label"] == -1 and hits[10_000]["class"] is None  # not classes[-1]
    assert all(h["class"] == classes[h["label"]] for i, h in hits.items() if i != 10_000)


def test_image_folder_index_keeps_file_paths(run, tiny, tmp_path, capsys):
    from PIL import Image

    _, _, data = tiny
    folder = tmp_path / "images"
    images, labels = data["test"]
    for i in range(6):
        (folder / f"class{labels[i]}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"class{labels[i]}" / f"{i}.png")
    assert main(["index", "build", str(run), "--images", str(folder), "--out", str(tmp_path / "fi")]) == 0
    capsys.readouterr()
    assert main(["search", str(tmp_path / "fi"), "--run", str(run), str(folder / f"class{labels[0]}" / "0.png"),
                 "-k", "6", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["hits"]
    assert len(hits) == 6 and all(Path(h["path"]).is_file() for h in hits)
    assert sorted(Path(h["path"]).name for h in hits) == [f"{i}.png" for i in range(6)]
    # the item itself is at distance 0
    assert any(h["distance"] == 0 and Path(h["path"]).name == "0.png" for h in hits)


def test_evaluate_writes_metrics_matching_a_per_query_loop(run, tiny, capsys):
    _, _, data = tiny
    assert main(["evaluate", str(run)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((run / "metrics.json").read_text())
    header = next(line.split() for line in printed.splitlines() if line.split()[:1] == ["metric"])
    row = next(line.split() for line in printed.splitlines() if line.split()[:1] == ["mAP@all"])
    assert header == ["metric", "tie-aware", "stable", "value"]
    assert row[1:3] == [f"{result['metrics']['mAP@all/tie-aware']:.4f}", f"{result['metrics']['mAP@all/stable']:.4f}"]
    protocol = result["protocol"]
    assert (protocol["query_split"], protocol["n_query"]) == ("test", N_CLASSES * N_TEST)
    assert (protocol["database_split"], protocol["n_database"]) == ("train", N_CLASSES * N_TRAIN)
    assert protocol["ks"] == [5, 48] and "tie-aware" in protocol["ties"]
    metrics = result["metrics"]
    for key in ("mAP@all/tie-aware", "mAP@5/stable", "P@5/tie-aware", "P@r<=2", "kNN-acc@10"):
        assert 0.0 <= metrics[key] <= 1.0, key
    # Oracle: stable-order mAP@all by a loop over queries.
    model, config = runs.load_run(run)
    q_codes, q_labels = runs.encode(model, runs.load_split(config, "test"))
    db_codes, db_labels = runs.encode(model, runs.load_split(config, "train"))
    dist = _popcount_distances(q_codes, db_codes)
    aps = []
    for i in range(len(q_codes)):
        rel = db_labels[np.argsort(dist[i], kind="stable")] == q_labels[i]
        aps.append(np.mean(np.cumsum(rel)[rel] / (np.flatnonzero(rel) + 1)))
    assert metrics["mAP@all/stable"] == pytest.approx(np.mean(aps), abs=1e-9)


def test_report_writes_html(run):
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text(encoding="utf-8")
    assert "<html" in html.lower() and len(html) > 500


@pytest.mark.parametrize("memory", [None, "{size = 40, warmup_steps = 1}"])
def test_resume_after_interruption_gives_the_same_weights(tiny, tmp_path, memory):
    """DTSH with a random-negative selector and augmentation: every generator is exercised; with a
    cross-batch memory (40 slots: it wraps within an epoch of 24-image batches) the checkpoints
    carry the memory, so the resumed run equals the uninterrupted one too."""
    _, config_path, _ = tiny
    overrides = ["train.epochs=3", "loss.name=dtsh", "selector.name=random", "selector.params={margin = 2.0}",
                 "train.final_epochs_no_augment=0", *([f"loss.memory={memory}"] if memory else [])]
    sets = [arg for o in overrides for arg in ("--set", o)]
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    assert main(["train", str(config_path), "--out", str(whole), "--quiet", *sets]) == 0

    class Interrupt:
        def on_epoch_end(self, epoch, record):
            if epoch == 0:
                raise KeyboardInterrupt

    class InterruptMidEpoch:  # the run is killed during epoch 1, after logging a step of it
        def on_step_end(self, epoch, step, loss, n_images):
            if epoch == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runs.train_run(load_config(config_path, overrides), parted, progress=False, callbacks=[Interrupt()])
    with pytest.raises(KeyboardInterrupt):
        runs.train_run(load_config(config_path, overrides), parted, resume=True, progress=False,
                             callbacks=[InterruptMidEpoch()])
    assert not (parted / "model.pt").exists()
    assert main(["train", str(config_path), "--out", str(parted), "--quiet", "--resume", *sets]) == 0
    a = torch.load(whole / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(parted / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(path: Path) -> list[float]:
        lines = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        return [line["train_loss"] for line in lines if line["type"] == "epoch"]

    assert losses(whole) == losses(parted) and len(losses(whole)) == 3
    steps = [(e["epoch"], e["step"]) for e in map(json.loads, (parted / "metrics.jsonl").read_text().splitlines())
             if e["type"] == "step"]
    assert steps == sorted(set(steps))  # no step logged twice
    extra = torch.load(parted / "checkpoints" / "last.pt", weights_only=True)["extra"]
    if memory:
        loss_state = extra["loss_state"]
        memory_state = next(v for k, v in loss_state.items() if k.endswith("_extra_state"))
        assert memory_state["filled"] == 40 and memory_state["step"] == 3 * 2  # 2 batches an epoch
        assert next(v for k, v in loss_state.items() if k.endswith("memory_labels")).shape == (40,)
    else:
        assert "loss_state" not in (extra or {})


def test_memory_without_global_mining_and_negative_sizes_are_config_errors(tiny):
    _, config_path, _ = tiny
    with pytest.raises(ConfigError, match="mine_globally"):
        load_config(config_path, ["loss.memory={size = 8}", "train.mine_globally=false"])
    with pytest.raises(ConfigError, match="loss.memory.size"):
        load_config(config_path, ["loss.memory={size = -1}"])


def test_split_protocol_is_drawn_once_saved_and_reusable(tiny, tmp_path, monkeypatch):
    base, config_path, data = tiny
    monkeypatch.setitem(SPLIT_PROTOCOLS._factories, "deephash-cifar10",  # 2 queries, 5 training images per class
                        lambda labels, seed: protocol_split(labels, 2, 5, seed))
    config = load_config(config_path, ["data.protocol=deephash-cifar10"])
    query = runs.load_split(config, "query", tmp_path / "run")
    saved = np.load(tmp_path / "run" / "split.npz", allow_pickle=False)
    assert len(query) == 2 * N_CLASSES and len(saved["train"]) == 5 * N_CLASSES
    assert len(saved["database"]) == N_CLASSES * (N_TRAIN + N_TEST) - 7 * N_CLASSES
    pooled_labels = np.concatenate([data["train"][1], data["test"][1]])
    np.testing.assert_array_equal(query.targets.numpy(), pooled_labels[saved["query"]])
    # a run with another seed but the kept split file gets the same split
    other = load_config(config_path, ["data.protocol=deephash-cifar10", "seed=99",
                                      f"data.split_file={tmp_path / 'run' / 'split.npz'}"])
    database = runs.load_split(other, "database", tmp_path / "other")
    np.testing.assert_array_equal(database.targets.numpy(), pooled_labels[saved["database"]])
    with pytest.raises(Exception, match="not one of protocol"):
        runs.load_split(config, "test", tmp_path / "run")


def test_protocol_split_counts_and_determinism():
    labels = np.repeat(np.arange(4), [30, 25, 40, 12])
    split = protocol_split(labels, n_query=3, n_train=10, seed=5)
    assert split == split | {}  # a plain dict
    everything = np.concatenate([split["query"], split["train"], split["database"]])
    assert np.array_equal(np.sort(everything), np.arange(len(labels)))
    for c, total in enumerate([30, 25, 40, 12]):
        assert (labels[split["query"]] == c).sum() == 3
        assert (labels[split["train"]] == c).sum() == min(10, total - 3)  # class 3 has only 12
        assert (labels[split["database"]] == c).sum() == max(total - 13, 0)
    again = protocol_split(labels, 3, 10, seed=5)
    other = protocol_split(labels, 3, 10, seed=6)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    assert not np.array_equal(split["query"], other["query"])


# ------------------------------------------------------------------------------------------ errors


def _one_line_error(capsys, argv: list[str], expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deephash: error: "), err
    assert expected in lines[0], lines[0]
    return lines[0]


def test_user_errors_exit_2_with_one_line(tiny, run, tmp_path, capsys):
    base, config_path, _ = tiny
    _one_line_error(capsys, ["train", str(tmp_path / "missing.toml")], "missing.toml not found")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nbitz = 3\n")
    _one_line_error(capsys, ["train", str(bad)], "unknown key 'model.bitz'")
    bad.write_text("[model]\nbits = 'many'\n")
    _one_line_error(capsys, ["train", str(bad)], "model.bits must be an integer, got str 'many'")
    bad.write_text("[model\n")
    _one_line_error(capsys, ["train", str(bad)], "not valid TOML")
    _one_line_error(capsys, ["train", str(config_path), "--out", str(run)], "already holds a run")
    _one_line_error(capsys, ["train", str(config_path), "--out", str(tmp_path / "fresh"), "--resume"],
                    "cannot resume")
    _one_line_error(capsys, ["encode", str(tmp_path / "norun"), "--split", "test", "--out", str(tmp_path / "x.npz")],
                    "does not exist")
    _one_line_error(capsys, ["evaluate", str(tmp_path)], "not a finished run")
    _one_line_error(capsys, ["search", str(tmp_path / "noindex"), "--run", str(run), "test:0"], "noindex")
    _one_line_error(capsys, ["encode", str(run), "--split", "validation", "--out", str(tmp_path / "x.npz")],
                    "unknown split")
    # no data found: an image-folder data set whose folder holds no images
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    _one_line_error(capsys, ["train", str(config_path), "--out", str(tmp_path / "r"), "--set", "data.dataset=folder",
                             "--set", f"data.images={tmp_path / 'empty'}"], "no images found")
    # a run whose code length differs from the index's
    from deephash.retrieval.index import HashIndex

    other = HashIndex(24)
    other.add(np.zeros((2, 3), dtype=np.uint8))
    other.save(tmp_path / "index24")
    _one_line_error(capsys, ["search", str(tmp_path / "index24"), "--run", str(run), "test:0"],
                    "12-bit codes but index")
    with pytest.raises(NotFoundError):  # --debug lets the exception (and its traceback) through
        main(["--debug", "encode", str(tmp_path / "norun"), "--split", "test", "--out", str(tmp_path / "x.npz")])


def test_python_m_deephash_reports_one_line_and_status_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "deephash", "train", str(tmp_path / "nope.toml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"deephash: error: config file {tmp_path / 'nope.toml'} not found"]
    assert result.stdout == ""


def test_embedding_run_encodes_embeddings_and_refuses_a_hamming_index(tiny, tiny_fmnist, tmp_path, capsys):
    """The seed's 2-D triplet config: online triplet loss, semihard selector, validation every epoch."""
    _, _, data = tiny
    out = tmp_path / "run2d"
    sets = [f"data.root={tiny_fmnist[0]}", "sampler.n_classes=3", "sampler.n_samples=8", "train.epochs=1",
            "train.eval_every=1", "device=cpu"]
    assert main(["train", "fashion-mnist-2d-triplet", "--out", str(out), "--quiet", *[a for s in sets for a in ("--set", s)]]) == 0
    epoch = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert epoch["type"] == "epoch" and np.isfinite(epoch["val_loss"])
    assert main(["encode", str(out), "--split", "test", "--out", str(tmp_path / "e.npz")]) == 0
    model, _ = runs.load_run(out)
    with torch.no_grad():
        expected = model(torch.from_numpy(data["test"][0][:, None]).float() / 255).numpy()
    with np.load(tmp_path / "e.npz", allow_pickle=False) as f:
        assert sorted(f.files) == ["embeddings", "ids", "labels"] and (f["ids"] == np.arange(len(f["labels"]))).all()
        assert f["embeddings"].dtype == np.float32 and f["embeddings"].shape == (N_CLASSES * N_TEST, 2)
        np.testing.assert_allclose(f["embeddings"], expected, rtol=1e-5, atol=1e-6)
    _one_line_error(capsys, ["index", "build", str(out), "--split", "train", "--out", str(tmp_path / "i")],
                    "needs a hash model")


def test_aux_classification_loss_adds_weighted_cross_entropy():
    torch.manual_seed(0)
    u, logits, labels = torch.randn(6, 8), torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])

    def inner(x, y):
        return (x**2).mean() + y.float().mean()

    class Inner(torch.nn.Module):
        def forward(self, x, y):
            return inner(x, y)

    loss = AuxClassificationLoss(Inner(), weight=0.3)
    log_p = logits - logits.exp().sum(1, keepdim=True).log()
    expected = inner(u, labels) - 0.3 * log_p[torch.arange(6), labels].mean()
    assert torch.allclose(loss(u, logits, labels), expected, atol=1e-6)


def test_aux_label_smoothing_mixes_the_uniform_target():
    torch.manual_seed(1)
    u, logits, labels = torch.randn(5, 4), torch.randn(5, 3), torch.tensor([0, 1, 2, 2, 1])
    loss = AuxClassificationLoss(lambda x, y: x.sum() * 0, weight=2.0, label_smoothing=0.3)
    log_p = logits - logits.exp().sum(1, keepdim=True).log()
    target = torch.full((5, 3), 0.3 / 3)
    target[torch.arange(5), labels] += 0.7
    expected = -2.0 * (target * log_p).sum(1).mean()
    assert torch.allclose(loss(u, logits, labels), expected, atol=1e-6)


def test_weight_average_is_saved_as_the_model_and_resumes_exactly(tiny, tmp_path):
    _, config_path, _ = tiny
    overrides = ["train.epochs=2", "train.ema_decay=0.9", "train.aux_label_smoothing=0.1",
                 "train.final_epochs_no_augment=0"]
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    runs.train_run(load_config(config_path, overrides), whole, progress=False)

    class Interrupt:
        def on_epoch_end(self, epoch, record):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runs.train_run(load_config(config_path, overrides), parted, progress=False, callbacks=[Interrupt()])
    runs.train_run(load_config(config_path, overrides), parted, resume=True, progress=False)
    a = torch.load(whole / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(parted / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last = torch.load(whole / "checkpoints" / "last.pt", weights_only=True)
    average = last["extra"]["weight_average"]["average"]
    assert all(torch.equal(a[k], average[k]) for k in a)  # the saved model is the average ...
    moved = {k for k in a if not torch.equal(a[k], last["model"][k])}
    assert {k for k in a if k.endswith(".weight")} <= moved  # ... not the last weights

    stripped = dict(last, extra={})
    torch.save(stripped, parted / "checkpoints" / "last.pt")
    with pytest.raises(DataFormatError, match="holds no weight average"):
        runs.train_run(load_config(config_path, overrides), parted, resume=True, progress=False)


def test_posterior_code_rule_trains_stores_the_loss_centers_and_encodes(tiny, tmp_path):
    _, config_path, data = tiny
    overrides = ["train.epochs=1", 'model.code_rule="posterior"', "model.code_temperature=2.0"]
    out = tmp_path / "posterior"
    assert main(["train", str(config_path), "--out", str(out), "--quiet", *[a for o in overrides for a in ("--set", o)]]) == 0
    config = load_config(out / "config.toml")
    saved = torch.load(out / "model.pt", weights_only=True)
    centers = build_loss(config, config.model.aux_classes).loss.centers  # the 10 class names
    assert torch.equal(saved["state_dict"]["code_centers"], centers)
    assert main(["encode", str(out), "--split", "test", "--out", str(tmp_path / "q.npz")]) == 0
    with np.load(tmp_path / "q.npz", allow_pickle=False) as q:
        codes, bits = q["codes"], int(q["bits"])
    assert bits == 12 and len(codes) == len(data["test"][1])
    model, _ = runs.load_run(out)
    with torch.no_grad():
        x = torch.from_numpy(data["test"][0][:64]).float().div(255)[:, None]
        logits = model.aux(model.features(x))
    from deephash.models.posterior_codes import posterior_path_codes
    from deephash.retrieval.codes import pack_codes
    assert np.array_equal(codes[:64], pack_codes(posterior_path_codes(logits, centers, 2.0)))


@pytest.mark.parametrize("overrides", [['model.code_rule="posterior"', 'loss.name="dsh"'],
                                       ['model.code_rule="posterior"', "train.aux_weight=0.0"],
                                       ['model.code_rule="nearest"']])
def test_posterior_code_rule_needs_csq_and_a_trained_classifier(tiny, overrides):
    _, config_path, _ = tiny
    with pytest.raises(ConfigError, match="code_rule"):
        load_config(config_path, overrides)


@pytest.mark.parametrize("key", ["train.ema_decay=1.0", "train.aux_label_smoothing=-0.1"])
def test_out_of_range_averaging_and_smoothing_are_config_errors(tiny, key):
    _, config_path, _ = tiny
    with pytest.raises(ConfigError, match=key.split("=")[0]):
        load_config(config_path, [key])


def test_split_codes_are_cached_per_model_and_rebuilt_when_the_model_changes(run, monkeypatch):
    import deephash.runs.encoding as encoding

    model, config = runs.load_run(run)
    split = config.data.query_split
    cache = Path(run) / "codes" / f"{split}.npz"
    cache.unlink(missing_ok=True)
    calls = []
    real_pass = encoding.encode_with_rerank
    monkeypatch.setattr(encoding, "encode_with_rerank", lambda *a, **k: calls.append(1) or real_pass(*a, **k))

    first = runs.encode_split(run, model, config, split)
    again = runs.encode_split(run, model, config, split)
    assert len(calls) == 1 and cache.is_file()
    direct = real_pass(model, runs.load_split(config, split, run))
    for got in (first, again):
        assert np.array_equal(got[0], direct[0]) and np.array_equal(got[1], direct[1])

    with np.load(cache, allow_pickle=False) as stored:  # a cache of another model is not trusted
        arrays = {k: stored[k] for k in stored.files}
    arrays["model_sha256"] = np.str_("0" * 64)
    arrays["codes"] = np.zeros_like(arrays["codes"])
    np.savez(cache, **arrays)
    rebuilt = runs.encode_split(run, model, config, split)
    assert len(calls) == 2 and np.array_equal(rebuilt[0], direct[0])
