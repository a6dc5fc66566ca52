"""Your own images end to end through the command line, with the shipped config image-folder-48:
a folder of class sub-folders of PNGs → ``deephash train`` → ``deephash index build --images`` →
``deephash search`` and ``deephash serve``; then photo folders of any shape (flat, unlabelled),
bad files (skipped, listed, refused past ``data.max_bad_fraction``), an index build killed by
SIGKILL and resumed, and a training run resumed with decoding workers.

Oracles: a brute-force popcount over the index's stored codes, the query's own file found at
distance 0, the served image compared pixel by pixel with the file, codes of each file encoded
alone (the evaluation crop computed by hand), and uninterrupted runs.
"""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from helpers import start_server, stop
from PIL import Image

from deephash import HashIndex
from deephash.retrieval import pack_codes
from deephash.retrieval.codes import load_codes
from deephash.runs import load_run
from deephash.cli import main
from deephash.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "image-folder-48"  # a shipped config, by name
COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def write_folder(root: Path, per_class: dict[str, int], seed: int) -> list[Path]:
    """``root/<split>/<class>/<i>.png``: 20x20 RGB noise around each class's colour."""
    rng = np.random.default_rng(seed)
    paths = []
    for split, n in per_class.items():
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.integers(-30, 30, (20, 20, 3)), 0, 255).astype(np.uint8)
                path = root / split / name / f"{i}.png"
                Image.fromarray(pixels).save(path)
                paths.append(path)
    return paths


def popcount_rows(packed: np.ndarray, row: int) -> np.ndarray:
    return np.unpackbits(packed ^ packed[row], axis=1).sum(1)


def test_shipped_folder_config_trains_indexes_searches_and_serves(tmp_path, capsys):
    config = load_config(CONFIG)
    assert config.data.dataset == "folder" and config.model.bits == 48 and config.model.aux_classes == 0
    photos = tmp_path / "photos"
    write_folder(photos, {"train": 8, "test": 4}, seed=0)
    run = tmp_path / "run"
    overrides = [f"data.images={photos}", "data.image_size=20", "data.num_workers=0", "device=cpu", "train.epochs=2", "train.final_epochs_no_augment=1",
                 "sampler.batch_size=12", "model.backbone_params={ width = 4, depth = [1, 1], fc = 0 }",
                 "eval.ks=[5]", "eval.knn_k=3"]
    argv = ["train", str(CONFIG), "--out", str(run), "--quiet"]
    for item in overrides:
        argv += ["--set", item]
    assert main(argv) == 0
    saved = load_config(run / "config.toml")
    assert saved.data.images == str(photos) and len(saved.model.mean) == 3  # colour, stats from the images

    assert main(["evaluate", str(run)]) == 0  # queries: the test folder, database: the train folder
    protocol = json.loads((run / "metrics.json").read_text())["protocol"]
    assert (protocol["dataset"], protocol["n_query"], protocol["n_database"]) == ("folder", 12, 24)

    # deephash encode --images names every row: its id and its path relative to the folder
    assert main(["encode", str(run), "--images", str(photos / "test"), "--out", str(tmp_path / "q.npz")]) == 0
    code_set = load_codes(tmp_path / "q.npz")
    assert code_set.ids.tolist() == list(range(12))
    files = sorted(p.relative_to(photos / "test").as_posix() for p in (photos / "test").rglob("*.png"))
    assert sorted(code_set.paths.tolist()) == files
    model, _ = load_run(run)
    for row in (0, 5, 11):  # each row is the code of the file it names, encoded alone: shorter side
        # resized to floor(20 / 0.875) = 22 px, then the centre 20 x 20 crop
        resized = Image.open(photos / "test" / code_set.paths[row]).convert("RGB").resize((22, 22), Image.Resampling.BILINEAR)
        picture = np.asarray(resized.crop((1, 1, 21, 21)), dtype=np.float32)
        with torch.no_grad():
            alone = model(torch.from_numpy(picture.transpose(2, 0, 1).copy())[None] / 255)
        assert np.array_equal(pack_codes(alone), code_set.codes[row:row + 1])
        assert code_set.labels[row] == sorted(COLOURS).index(code_set.paths[row].split("/")[0])

    index_dir = tmp_path / "index"
    assert main(["index", "build", str(run), "--images", str(photos / "train"), "--out", str(index_dir)]) == 0
    index = HashIndex.load(index_dir)
    paths = index.paths.tolist()
    assert len(index) == 24 and sorted(Path(p) for p in paths) == sorted((photos / "train").rglob("*.png"))
    packed = index.codes
    ids = np.asarray(index.ids)

    query = photos / "train" / "green" / "3.png"
    row = paths.index(str(query))
    capsys.readouterr()
    assert main(["search", str(index_dir), "--run", str(run), str(query), "-k", "5", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["hits"]
    distances = popcount_rows(packed, row)
    assert [h["distance"] for h in hits] == sorted(distances.tolist())[:5]
    for hit in hits:
        position = int(np.flatnonzero(ids == hit["id"])[0])
        assert hit["distance"] == distances[position] and hit["path"] == paths[position]
    assert any(h["path"] == str(query) and h["distance"] == 0 for h in hits)
    assert main(["search", str(index_dir), "--run", str(run), str(query), "-k", "5"]) == 0
    assert str(query) in capsys.readouterr().out  # the plain listing names the files found


    server, base = start_server(index_dir, run, tmp_path / "serve.log")
    try:
        body = httpx.post(f"{base}/api/search", json={"id": int(ids[row]), "k": 5}, timeout=30).json()
        assert [r["distance"] for r in body["results"]] == [h["distance"] for h in hits]
        served = httpx.get(f"{base}/api/items/{int(ids[row])}/image", timeout=30)
        assert served.status_code == 200
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(served.content))), np.asarray(Image.open(query)))
    finally:
        stop(server)


# ------------------------------------------------------------------- photo folders of any shape

KILL_AFTER_CHUNKS = """
import os, signal, sys
import deephash.runs.encoding as encoding
from deephash.runs import build_index

real, written = encoding.atomic_savez, []

def save_then_die(path, **arrays):
    real(path, **arrays)
    if path.name.startswith("chunk-"):
        written.append(path)
        if len(written) == 3:
            os.kill(os.getpid(), signal.SIGKILL)

encoding.atomic_savez = save_then_die
build_index(sys.argv[1], images=sys.argv[2], out=sys.argv[3], batch_size=4)
"""


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory):
    """A tiny model trained on 20 px colour photos, with one bad file among them."""
    root = tmp_path_factory.mktemp("photos")
    write_folder(root / "photos", {"train": 6, "test": 3}, seed=1)
    (root / "photos" / "train" / "red" / "zz-notes.png").write_bytes(b"not an image")
    run = root / "run"
    argv = ["train", CONFIG, "--out", str(run), "--quiet"]
    for item in [f"data.images={root / 'photos'}", "data.image_size=16", "data.num_workers=0", "device=cpu",
                 "train.epochs=1", "train.final_epochs_no_augment=0", "sampler.batch_size=9",
                 "model.backbone_params={ width = 4, depth = [1], fc = 0 }", "data.max_bad_fraction=0.1"]:
        argv += ["--set", item]
    assert main(argv) == 0
    return run, root / "photos"


def test_training_skips_a_bad_file_and_lists_it_and_fails_past_the_allowed_share(photo_run, tmp_path, capsys):
    run, photos = photo_run
    skipped = (run / "skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in skipped] == [str(photos / "train" / "red" / "zz-notes.png")]
    argv = ["train", str(run / "config.toml"), "--out", str(tmp_path / "strict"), "--quiet",
            "--set", "data.max_bad_fraction=0.05"]  # 1 bad of 19 files is more than 5 %
    assert main(argv) == 2
    assert "zz-notes.png" in capsys.readouterr().err and not (tmp_path / "strict" / "model.pt").exists()


def test_flat_folder_encodes_and_indexes_unlabelled_with_relative_paths(photo_run, tmp_path):
    run, photos = photo_run
    flat = tmp_path / "flat"
    (flat / "deep" / "er").mkdir(parents=True)
    sources = sorted((photos / "test").rglob("*.png"))
    for i, source in enumerate(sources):
        target = flat / ("deep/er" if i % 3 == 0 else "deep" if i % 3 == 1 else ".") / f"{i:02d}.png"
        target.write_bytes(source.read_bytes())
    assert main(["encode", str(run), "--images", str(flat), "--out", str(tmp_path / "flat.npz")]) == 0
    code_set = load_codes(tmp_path / "flat.npz")
    assert sorted(code_set.paths.tolist()) == sorted(p.relative_to(flat).as_posix() for p in flat.rglob("*.png"))
    assert code_set.labels.tolist() == [-1] * len(sources) and code_set.ids.tolist() == list(range(len(sources)))
    assert main(["index", "build", str(run), "--images", str(flat), "--out", str(tmp_path / "ix"), "--quiet"]) == 0
    index = HashIndex.load(tmp_path / "ix")
    assert index.labels is None and len(index) == len(sources)
    by_path = dict(zip(code_set.paths.tolist(), code_set.codes))
    for path, code in zip(index.paths.tolist(), index.codes):  # the same codes as `encode`, file by file
        assert np.array_equal(code, by_path[Path(path).relative_to(flat).as_posix()])
    # --no-labels: a tree of class sub-folders read as unlabelled images at any depth
    assert main(["encode", str(run), "--images", str(photos / "test"), "--no-labels", "--out", str(tmp_path / "t.npz")]) == 0
    assert set(load_codes(tmp_path / "t.npz").labels.tolist()) == {-1}


def test_index_build_killed_midway_resumes_to_the_same_index(photo_run, tmp_path, monkeypatch):
    import deephash.runs.encoding as encoding
    from deephash.runs import build_index

    run, photos = photo_run
    folder = tmp_path / "train"  # 18 images, a file cut short (first: batch 0) and a non-image: 5 batches of 4
    shutil.copytree(photos / "train", folder)
    (folder / "blue" / "0-cut.png").write_bytes((folder / "blue" / "0.png").read_bytes()[:100])
    out = tmp_path / "index"
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_CHUNKS, str(run), str(folder), str(out)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    work = tmp_path / "index.partial"
    assert not out.exists() and len(list(work.glob("chunk-*.npz"))) == 3

    written = []
    real = encoding.atomic_savez
    monkeypatch.setattr(encoding, "atomic_savez", lambda path, **a: written.append(path.name) or real(path, **a))
    build_index(run, images=folder, out=out, batch_size=4)
    assert sorted(n for n in written if n.startswith("chunk-")) == ["chunk-000003.npz", "chunk-000004.npz"]
    assert not work.exists()
    monkeypatch.setattr(encoding, "atomic_savez", real)
    build_index(run, images=folder, out=tmp_path / "whole", batch_size=4)

    resumed, whole = HashIndex.load(out), HashIndex.load(tmp_path / "whole")
    assert len(resumed) == len(whole) == 18
    assert np.array_equal(resumed.codes, whole.codes) and np.array_equal(resumed.ids, whole.ids)
    assert np.array_equal(resumed.labels, whole.labels) and np.array_equal(resumed.paths, whole.paths)
    for built in (out, tmp_path / "whole"):  # the file cut short, found before the kill, is still reported
        listed = [line.split("\t")[0] for line in Path(f"{built}.skipped.txt").read_text().splitlines()]
        assert listed == [str(folder / "red" / "zz-notes.png"), str(folder / "blue" / "0-cut.png")]


def test_a_split_that_loses_a_file_while_encoding_stays_aligned_with_its_rows(photo_run, tmp_path):
    import dataclasses

    from deephash.runs import load_split
    from deephash.runs.encoding import encode_split_with_rerank

    run, photos = photo_run
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("model.pt", "config.toml"):
        shutil.copy(run / name, copy / name)
    shutil.copytree(photos / "test", tmp_path / "photos" / "test")
    cut = tmp_path / "photos" / "test" / "green" / "1-cut.png"
    cut.write_bytes((tmp_path / "photos" / "test" / "green" / "1.png").read_bytes()[:100])  # decodes in no worker
    model, config = load_run(copy)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, images=str(tmp_path / "photos")))
    for attempt in ("encoded", "from the cache"):
        dataset = load_split(config, "test", copy)
        assert len(dataset) == 10 and str(cut) in dataset.paths
        codes, labels, _ = encode_split_with_rerank(copy, model, config, "test", dataset)
        assert len(codes) == len(labels) == len(dataset) == 9 and str(cut) not in dataset.paths, attempt
        assert labels.tolist() == dataset.targets.tolist()
        with torch.no_grad():  # row i is the code of dataset item i
            alone = model(dataset.data[torch.arange(9)].float() / 255)
        assert np.array_equal(pack_codes(alone), codes), attempt


def test_photo_training_resumed_with_workers_equals_an_uninterrupted_run_without(photo_run, tmp_path):
    """Random resized crops are drawn per item from a per-epoch seed (from the checkpointed augment
    generator), so a run interrupted after its first epoch and resumed with 2 decoding workers ends
    with the weights of an uninterrupted run decoding in the main process."""
    from deephash import runs

    run, _ = photo_run
    base = load_config(run / "config.toml", ["train.epochs=2", "data.color_jitter=0.3"])
    whole = runs.train_run(base, tmp_path / "whole", progress=False)

    class Interrupt:
        def on_epoch_end(self, epoch, record):
            raise KeyboardInterrupt

    pooled = load_config(run / "config.toml", ["train.epochs=2", "data.color_jitter=0.3", "data.num_workers=2"])
    with pytest.raises(KeyboardInterrupt):
        runs.train_run(pooled, tmp_path / "parted", progress=False, callbacks=[Interrupt()])
    runs.train_run(pooled, tmp_path / "parted", resume=True, progress=False)
    a = torch.load(whole / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "parted" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    once = load_config(run / "config.toml", ["train.epochs=2", "data.color_jitter=0.0"])  # the draws matter
    c = torch.load(runs.train_run(once, tmp_path / "plain", progress=False) / "model.pt", weights_only=True)["state_dict"]
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_a_batch_whose_every_file_fails_leaves_no_row_and_no_gap(photo_run, tmp_path):
    from deephash.data import ImageFolder
    from deephash.runs import build_index
    from deephash.runs.encoding import encode_items

    run, photos = photo_run
    folder = tmp_path / "test"
    shutil.copytree(photos / "test", folder)
    (folder / "red" / "0-cut.png").write_bytes((folder / "red" / "0.png").read_bytes()[:100])
    model, _ = load_run(run)
    dataset = ImageFolder(folder, image_size=16)
    codes, labels, _, positions = encode_items(model, dataset, batch_size=1)  # the cut file is a batch alone
    cut = dataset.paths.index(str(folder / "red" / "0-cut.png"))
    assert positions.tolist() == [i for i in range(10) if i != cut] and codes.shape == (9, 6)
    index = HashIndex.load(build_index(run, images=folder, out=tmp_path / "ix", batch_size=1))
    assert np.array_equal(index.codes, codes) and str(folder / "red" / "0-cut.png") not in index.paths.tolist()


# ------------------------------------------------------------------- one model view, whatever path

def wide_photo(path: Path, seed: int) -> None:
    """A 600x200 RGB photo whose left quarter is white (a stretch keeps it, the centre crop does not)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 200, (200, 600, 3), dtype=np.uint8)
    pixels[:, :150] = 255
    Image.fromarray(pixels).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(pixels).save(path)


def test_a_non_square_photo_gives_the_same_pixels_and_code_through_every_path(photo_run, tmp_path, capsys):
    """`index build --images`, `deephash search FILE`, the service's upload and add and the exported
    encoder fit a 600x200 photo alike: the shorter side resized to floor(16 / 0.875) = 18 px, the
    centre 16 x 16 kept (computed by hand here); a JPEG goes through the same draft-mode decode."""
    from deephash.retrieval.item_images import item_image_path
    from deephash.runs import query_images
    from deephash.serve.onnx_encoder import OnnxEncoder
    from deephash.serve.service import SearchService
    from deephash.signs import is_plus

    run, photos = photo_run
    folder = tmp_path / "db"
    shutil.copytree(photos / "test", folder / "other")
    (folder / "wide").mkdir()
    wide_photo(folder / "wide" / "a.png", seed=0)
    wide_photo(folder / "wide" / "b.jpg", seed=1)
    index_dir = tmp_path / "index"
    assert main(["index", "build", str(run), "--images", str(folder), "--out", str(index_dir)]) == 0
    index = HashIndex.load(index_dir)
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    onnx = OnnxEncoder(tmp_path / "onnx")
    assert onnx.crop_fraction == 0.875
    described = json.loads((tmp_path / "onnx" / "encoder.json").read_text())["input"]["decode"]
    assert (described["resize"], described["crop_fraction"]) == ("bilinear", 0.875)
    model, config = load_run(run)

    class Recorder:  # the service's encoder, keeping the pixels it is given
        def __init__(self, inner):
            self.inner, self.seen = inner, []
            self.bits, self.input_shape, self.name = inner.bits, inner.input_shape, inner.name
            self.crop_fraction = inner.crop_fraction

        def encode(self, images):
            self.seen.append(np.array(images))
            return self.inner.encode(images)

    service = SearchService.load(index_dir, run, writable=True)
    try:
        service.encoder = recorder = Recorder(service.encoder)
        for name in ("a.png", "b.jpg"):
            path = folder / "wide" / name
            with Image.open(path) as image:  # by hand: 600x200 -> 54x18 (draft: a JPEG of 300x100 first)
                if image.format == "JPEG":
                    image.draft("RGB", (18, 18))
                assert min(image.size) >= 18
                by_hand = np.asarray(image.convert("RGB").resize((54, 18), Image.Resampling.BILINEAR)
                                     .crop((19, 1, 35, 17))).transpose(2, 0, 1)
            assert by_hand.min() < 255  # the white quarter is cut away (a stretch would keep it)
            row = index.paths.tolist().index(str(path))
            built = index.codes[row:row + 1]
            with torch.no_grad():
                assert np.array_equal(pack_codes(model(torch.from_numpy(by_hand.copy())[None].float() / 255)), built)
            cli_view, _ = query_images(config, run, [str(path)])  # deephash search FILE
            assert np.array_equal(cli_view[0].numpy(), by_hand), name
            data = path.read_bytes()
            packed, _ = service.encode_query(data)  # the service's upload
            assert np.array_equal(recorder.seen[-1][0], by_hand) and np.array_equal(packed, built), name
            found = {int(h.id): h.distance for h in service.search(packed, len(index))}  # it finds itself at 0
            assert found[int(index.ids[row])] == 0, name
            added = service.add_item(data)  # the service's add: its stored image is the model view
            stored = np.asarray(Image.open(item_image_path(index_dir, added)))
            assert np.array_equal(stored.transpose(2, 0, 1), by_hand) and np.array_equal(service.item(added)[0], built)
            seen = []
            onnx.encode = lambda images, real=onnx.encode: seen.append(np.array(images)) or real(images)
            onnx_packed, _ = onnx.encode_image(data)  # the exported encoder
            del onnx.encode
            assert np.array_equal(seen[0][0], by_hand), name
            values, _ = onnx.code_values(by_hand[None])
            clear = np.abs(values) > 1e-4
            bits = np.unpackbits(built, axis=1)[:, :onnx.bits].astype(bool)
            assert np.array_equal(np.unpackbits(onnx_packed, axis=1)[:, :onnx.bits].astype(bool)[clear], bits[clear])
            assert np.array_equal(is_plus(values)[clear], bits[clear])
    finally:
        service.close()
    capsys.readouterr()
    query = folder / "wide" / "b.jpg"
    assert main(["search", str(index_dir), "--run", str(run), str(query), "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["hits"]
    assert any(h["path"] == str(query) and h["distance"] == 0 for h in hits)


@pytest.mark.parametrize("change", ["add", "remove"])
def test_a_split_folder_changed_between_two_runs_is_encoded_again(photo_run, tmp_path, change):
    """The split code cache records the folder's listing: a file added or removed between two
    `index build --split` runs (and `evaluate`) gives codes and paths aligned with the files."""
    from deephash.runs import build_index

    run, photos = photo_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("codes", "*.npz"))
    shutil.copytree(photos, tmp_path / "photos", ignore=shutil.ignore_patterns("zz-notes.png"))
    saved = torch.load(copy / "model.pt", weights_only=True)  # the run's config, moved to the copied photos
    saved["config"]["data"]["images"] = str(tmp_path / "photos")
    torch.save(saved, copy / "model.pt")
    model, _ = load_run(copy)

    def check(index_dir: Path) -> None:
        index = HashIndex.load(index_dir)
        files = sorted(str(p) for p in (tmp_path / "photos" / "test").rglob("*.png"))
        assert sorted(index.paths.tolist()) == files
        for path, code in zip(index.paths.tolist(), index.codes):  # each row is its own file's code
            view = np.asarray(Image.open(path).convert("RGB").resize((18, 18), Image.Resampling.BILINEAR)
                              .crop((1, 1, 17, 17)), dtype=np.float32).transpose(2, 0, 1).copy()
            with torch.no_grad():
                assert np.array_equal(pack_codes(model(torch.from_numpy(view)[None] / 255))[0], code), path

    build_index(copy, split="test", out=tmp_path / "first")
    check(tmp_path / "first")
    assert main(["evaluate", str(copy)]) == 0
    green = tmp_path / "photos" / "test" / "green"
    if change == "add":
        noise = np.random.default_rng(3).integers(0, 256, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(noise).save(green / "0-new.png")  # sorts first: every later row would shift
    else:
        (green / "0.png").unlink()
    n_test = len(list((tmp_path / "photos" / "test").rglob("*.png")))
    assert main(["evaluate", str(copy)]) == 0
    assert json.loads((copy / "metrics.json").read_text())["protocol"]["n_query"] == n_test
    build_index(copy, split="test", out=tmp_path / "second")
    check(tmp_path / "second")


def test_steps_per_epoch_trains_that_many_batches_an_epoch_and_resumes_to_the_same_weights(photo_run, tmp_path):
    """``train.steps_per_epoch``: every epoch trains the first N batches of a fresh draw; a run
    interrupted after an epoch and resumed ends with the weights of an uninterrupted one."""
    from deephash import runs

    run, _ = photo_run
    sets = ["train.epochs=3", "train.steps_per_epoch=1"]  # 18 good training photos, batches of 9: 2 a whole epoch

    class Steps:
        def __init__(self):
            self.per_epoch: dict[int, list[int]] = {}

        def on_step_end(self, epoch, step, loss_value, n_images):
            self.per_epoch.setdefault(epoch, []).append(n_images)

    counted = Steps()
    whole = runs.train_run(load_config(run / "config.toml", sets), tmp_path / "whole", progress=False, callbacks=[counted])
    assert counted.per_epoch == {0: [9], 1: [9], 2: [9]}
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == [0, 1, 2]

    class Interrupt:
        def on_epoch_end(self, epoch, record):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runs.train_run(load_config(run / "config.toml", sets), tmp_path / "parted", progress=False, callbacks=[Interrupt()])
    runs.train_run(load_config(run / "config.toml", sets), tmp_path / "parted", resume=True, progress=False)
    a = torch.load(whole / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "parted" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    two = runs.train_run(load_config(run / "config.toml", ["train.epochs=3"]), tmp_path / "full", progress=False)
    c = torch.load(two / "model.pt", weights_only=True)["state_dict"]
    assert not all(torch.equal(a[k], c[k]) for k in a)  # whole epochs train other batches


def test_evaluate_lists_the_files_each_split_left_out(photo_run, tmp_path):
    run, photos = photo_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    truncated = photos / "test" / "blue" / "zz-cut.png"
    truncated.write_bytes((photos / "test" / "blue" / "0.png").read_bytes()[:60])  # its header reads, its pixels do not
    try:
        assert main(["evaluate", str(copy)]) == 0
    finally:
        truncated.unlink()
    listed = {split: [line.split("\t")[0] for line in (copy / "codes" / f"{split}.npz.skipped.txt").read_text().splitlines()]
              for split in ("train", "test")}
    assert listed == {"train": [str(photos / "train" / "red" / "zz-notes.png")], "test": [str(truncated)]}
    protocol = json.loads((copy / "metrics.json").read_text())["protocol"]
    assert (protocol["n_query"], protocol["n_database"]) == (9, 18)  # every other file has its row
    assert main(["evaluate", str(copy)]) == 0  # the truncated file is gone: the test split encodes again, whole
    assert not (copy / "codes" / "test.npz.skipped.txt").exists() and (copy / "codes" / "train.npz.skipped.txt").exists()
