"""Your own images end to end through the command line, with the shipped config image-folder-48:
a folder of class sub-folders of PNGs → ``deephash train`` → ``deephash index build --images`` →
``deephash search`` and ``deephash serve``.

Oracles: a brute-force popcount over the index's stored codes, the query's own file found at
distance 0, and the served image compared pixel by pixel with the file.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
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
    paths = index.metadata["paths"]
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
