"""The open-set class split and the near-duplicate protocol, end to end through the command line,
checked against the data and a brute-force Hamming search of the run's own codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_fashion_mnist

from deephash.cli import main
from deephash.config import load_config
from deephash.data.perturb import perturb_images
from deephash.errors import ConfigError
from deephash.runs import load_run, load_split

CONFIG = """
name = "open"
seed = 1
device = "cpu"
[data]
dataset = "fashion-mnist"
root = "{root}"
seen_classes = [0, 1]
unseen_classes = [2, 3]
[model]
backbone = "fmnist-cnn"
backbone_params = {{ width = 4, depth = [1, 1] }}
bits = 16
[loss]
name = "csq"
[sampler]
n_classes = 2
n_samples = 8
[train]
epochs = 1
log_interval = 1
num_threads = 1
[eval]
ks = [5]
recall_ks = [1, 3]
near_duplicates = {{ n = 10, seed = 4, shift = 1, noise = 0.01 }}
"""


@pytest.fixture(scope="module")
def open_run(tmp_path_factory):
    """A run trained on classes 0 and 1 of a 4-class tiny Fashion-MNIST and evaluated on 2 and 3.
    Its codes are the pca rule's, so that they differ between images (after one epoch the hash
    head gives every unseen image the same code, and a metric then cannot tell one order from another)."""
    base = tmp_path_factory.mktemp("open")
    data = tiny_fashion_mnist(base / "data", n_classes=4)
    config = base / "open.toml"
    config.write_text(CONFIG.format(root=base / "data").replace("bits = 16", 'bits = 8\ncode_rule = "pca"'), encoding="utf-8")
    run = base / "run"
    assert main(["train", str(config), "--out", str(run), "--quiet"]) == 0
    assert main(["evaluate", str(run)]) == 0
    return run, data


def test_training_sees_only_the_seen_classes_and_evaluation_only_the_unseen(open_run):
    run, data = open_run
    _, config = load_run(run)
    assert set(load_split(config, "train", run, training=True).targets.tolist()) == {0, 1}
    for split in ("train", "test"):
        assert set(load_split(config, split, run).targets.tolist()) == {2, 3}
    result = json.loads((run / "metrics.json").read_text())
    protocol = result["protocol"]
    unseen = {split: np.isin(data[split][1], [2, 3]) for split in ("train", "test")}
    assert protocol["n_query"] == int(unseen["test"].sum()) and protocol["n_database"] == int(unseen["train"].sum())
    assert protocol["class_split"]["seen"] == [0, 1] and protocol["class_split"]["unseen"] == [2, 3]
    # Oracle: the model's codes of the unseen classes' images, taken from the IDX arrays by the test
    # itself, and mAP@all by a loop over queries (two unseen classes: a wrong database or query set
    # changes it; with one class every metric would be 1 for any model).
    model, _ = load_run(run)
    with torch.no_grad():
        codes = {split: model.encode(torch.from_numpy(data[split][0][unseen[split]]).float().div(255)[:, None]).numpy() > 0
                 for split in ("train", "test")}
    labels = {split: data[split][1][unseen[split]] for split in ("train", "test")}
    assert len({code.tobytes() for code in codes["test"]}) > len(codes["test"]) // 4  # codes that differ
    with np.load(run / "codes" / "train.npz") as cached:  # the database: the unseen classes' training images
        assert np.array_equal(cached["labels"], labels["train"])
        assert np.array_equal(cached["codes"], np.packbits(codes["train"], axis=1))
    aps = []
    for q, label in zip(codes["test"], labels["test"]):
        distance = (q != codes["train"]).sum(1)
        relevant = labels["train"][np.argsort(distance, kind="stable")] == label
        aps.append(np.mean(np.cumsum(relevant)[relevant] / (np.flatnonzero(relevant) + 1)))
    assert result["metrics"]["mAP@all/stable"] == pytest.approx(np.mean(aps), abs=1e-9)
    assert set(labels["test"].tolist()) == {2, 3}  # both unseen classes are queried


def test_near_duplicates_match_a_brute_force_search_of_the_perturbed_copies(open_run):
    run, _ = open_run
    model, config = load_run(run)
    database = load_split(config, "train", run)
    result = json.loads((run / "metrics.json").read_text())["near_duplicates"]
    assert result["protocol"]["n"] == 10 and result["protocol"]["seed"] == 4
    generator = torch.Generator().manual_seed(4)
    targets = torch.randperm(len(database), generator=generator)[:10].sort().values
    settings = config.eval.near_duplicates
    copies = perturb_images(database.data[targets], generator, shift=settings.shift, crop=settings.crop,
                            brightness=settings.brightness, contrast=settings.contrast, noise=settings.noise)
    with torch.no_grad():
        q = model(copies.float() / 255).numpy()
        db = model(database.data.float() / 255).numpy()
    q_bits, db_bits = q > 0, db > 0  # ±1 codes
    stable = []
    for i, t in enumerate(targets.tolist()):
        dist = (q_bits[i] != db_bits).sum(1)
        order = sorted(range(len(db)), key=lambda j: (dist[j], j))
        stable.append([order.index(t) < k for k in (1, 10)])
    assert [result["recall@1/stable"], result["recall@10/stable"]] == pytest.approx(np.mean(stable, 0).tolist())
    assert 0 <= result["recall@1/tie-aware"] <= result["recall@10/tie-aware"] <= 1


#: The model lines and the other lines that keep re-rank vectors: the hash head's output, or a
#: head of their own (8 values) trained with the instance term over two augmented views.
RERANK = {
    "head": ('bits = 16\nrerank = "head"', ""),
    "instance": ('bits = 16\nrerank = "instance"\nrerank_dim = 8',
                 "[data]\nviews = 2\naugment = {{ perturb = {{ shift = 1, noise = 0.02 }} }}\n[train]\nrerank_weight = 0.5\n"),
}


def _rerank_config(root: Path, kind: str) -> str:
    model_lines, extra = RERANK[kind]
    assert "seen_classes = [0, 1]\nunseen_classes = [2, 3]\n" in CONFIG
    text = CONFIG.replace("bits = 16", model_lines).replace("seen_classes = [0, 1]\nunseen_classes = [2, 3]\n", "")
    for table in ("[data]", "[train]"):  # merge the extra keys into their tables
        if table in extra:
            body = extra.split(table + "\n", 1)[1].split("[", 1)[0]
            text = text.replace(table + "\n", table + "\n" + body, 1)
    return text.format(root=root)


@pytest.mark.parametrize("kind, width", [("head", 16), ("instance", 8)])
def test_a_model_with_rerank_vectors_reports_the_two_stage_recall(tmp_path, tiny_fmnist, kind, width):
    config = tmp_path / "rerank.toml"
    config.write_text(_rerank_config(tiny_fmnist[0], kind), encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--quiet"]) == 0
    assert main(["evaluate", str(run)]) == 0
    near = json.loads((run / "metrics.json").read_text())["near_duplicates"]
    assert f"{kind} vectors, {width} float16 values = {2 * width} bytes per item" in near["protocol"]["rerank"]
    # a loop: the 1000 nearest codes with every tie at the cut, ordered by the vectors (then Hamming, id)
    model, cfg = load_run(run)
    database = load_split(cfg, "train", run)
    generator = torch.Generator().manual_seed(4)
    targets = torch.randperm(len(database), generator=generator)[:10].sort().values
    s = cfg.eval.near_duplicates
    copies = perturb_images(database.data[targets], generator, shift=s.shift, crop=s.crop, brightness=s.brightness,
                            contrast=s.contrast, noise=s.noise)
    with torch.no_grad():
        q_codes, q_vec = model.encode_with_rerank(copies.float() / 255)
        db_codes, db_vec = model.encode_with_rerank(database.data.float() / 255)
    db_vec = db_vec.half().float()  # the index keeps float16
    hits = []
    for i, t in enumerate(targets.tolist()):
        dist = (q_codes[i] != db_codes).sum(1)
        cut = dist.sort().values[min(cfg.eval.rerank_shortlist, len(dist)) - 1]
        listed = [j for j in range(len(dist)) if dist[j] <= cut]
        score = {j: float(torch.linalg.norm(db_vec[j] - q_vec[i])) for j in listed}
        order = sorted(listed, key=lambda j: (score[j], int(dist[j]), j))
        hits.append([t in order[:k] for k in (1, 10)])
    assert [near["recall@1/rerank"], near["recall@10/rerank"]] == pytest.approx(np.mean(hits, 0).tolist())
    with np.load(run / "codes" / "train.npz") as cached:
        assert cached["rerank"].shape == (len(cached["labels"]), width) and cached["rerank"].dtype == np.float16
    # the main protocol's two-stage rows (three classes, no class split here): the same loop for every query
    queries = load_split(cfg, "test", run)
    with torch.no_grad():
        t_codes, t_vec = model.encode_with_rerank(queries.data.float() / 255)
    t_vec = t_vec.half().float()  # evaluate reads the queries' vectors from the float16 cache too
    result = json.loads((run / "metrics.json").read_text())
    metrics = result["metrics"]
    assert f"shortlist of {cfg.eval.rerank_shortlist} nearest codes" in result["protocol"]["ranking"]  # says which it used
    p5, r1, knn = [], [], []
    for i in range(len(t_codes)):
        dist = (t_codes[i] != db_codes).sum(1)
        cut = dist.sort().values[min(cfg.eval.rerank_shortlist, len(dist)) - 1]
        listed = [j for j in range(len(dist)) if dist[j] <= cut]
        order = sorted(listed, key=lambda j: (float(torch.linalg.norm(db_vec[j] - t_vec[i])), int(dist[j]), j))
        labels = [int(database.targets[j]) for j in order]
        same = [label == int(queries.targets[i]) for label in labels]
        p5.append(sum(same[:5]) / 5)
        r1.append(same[0])
        votes = labels[:10]  # majority, a tie to the label ranked first
        knn.append(max(set(votes), key=lambda c: (votes.count(c), -votes.index(c))) == int(queries.targets[i]))
    assert metrics["P@5/rerank"] == pytest.approx(np.mean(p5)) and metrics["Recall@1/rerank"] == pytest.approx(np.mean(r1))
    assert metrics["kNN-acc@10/rerank"] == pytest.approx(np.mean(knn))


def test_evaluate_flag_overrides_the_config_and_prints_the_rows(open_run, capsys):
    run, _ = open_run
    assert main(["evaluate", str(run), "--near-duplicates", "5"]) == 0
    out = capsys.readouterr().out
    assert "near-dup recall@1" in out and "unseen classes [2, 3]" in out
    assert json.loads((run / "metrics.json").read_text())["near_duplicates"]["protocol"]["n"] == 5


@pytest.mark.parametrize("sets, message", [
    (["data.seen_classes=[0]"], "go together"),
    (["data.seen_classes=[0, 1]", "data.unseen_classes=[1, 2]"], "share \\[1\\]"),
    (["eval.near_duplicates={crop = 0.0}"], "0 < crop"),
    (["eval.near_duplicates={jpeg_quality = [90]}"], "jpeg_quality"),
    (["model.rerank='instance'"], "set train.rerank_weight > 0"),
    (["model.rerank='instance'", "train.rerank_weight=1.0"], "data.views >= 2"),
    (["train.rerank_weight=1.0"], "which is not set"),
    (["model.rerank='instance'", "model.rerank_source='pixels'", "rerank_head.epochs=1",
      "rerank_head.augment={perturb = {shift = 1}}"], "rerank_source must be"),
])
def test_bad_protocol_settings_are_one_line_config_errors(tmp_path, sets, message):
    path = tmp_path / "c.toml"
    path.write_text("[data]\ndataset = 'digits'\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_config(path, sets)


def test_a_split_with_no_image_of_the_unseen_classes_says_so(open_run, tmp_path):
    run, _ = open_run
    _, config = load_run(run)
    config.data.unseen_classes = [7]
    with pytest.raises(Exception, match="no images of the unseen classes"):
        load_split(config, "test", Path(tmp_path))


def test_a_run_with_rerank_vectors_indexes_them_and_searches_in_two_stages(tmp_path, tiny_fmnist, capsys):
    config = tmp_path / "rerank.toml"
    config.write_text(CONFIG.format(root=tiny_fmnist[0]).replace('bits = 16', 'bits = 16\nrerank = "head"'),
                      encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--quiet"]) == 0
    assert main(["index", "build", str(run), "--split", "train", "--out", str(run / "index")]) == 0
    from deephash.retrieval import HashIndex

    index = HashIndex.load(run / "index")
    assert index.rerank_vectors.shape == (index.ntotal, 16) and index.rerank_bytes_per_item == 32
    capsys.readouterr()
    assert main(["search", str(run / "index"), "--run", str(run), "test:0", "-k", "4", "--shortlist", "5", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["hits"]
    model, cfg = load_run(run)
    query = load_split(cfg, "test", run).data[:1].float() / 255
    with torch.no_grad():
        _, vector = model.encode_with_rerank(query)
    db = index.rerank_vectors.astype(np.float32)
    scores = np.linalg.norm(db - vector.numpy(), axis=1)
    positions = [int(np.flatnonzero(index.ids == h["id"])[0]) for h in hits]
    assert [h["score"] for h in hits] == pytest.approx(scores[positions].tolist(), abs=1e-3)
    assert [h["score"] for h in hits] == sorted(h["score"] for h in hits) and len(hits) == 4
