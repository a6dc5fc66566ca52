"""scripts/make_photo_collection.py: Fashion-MNIST rendered as a folder of colour photos, seeded.

Oracles: the rendered picture itself (each stored kind decodes back to it through deephash's one
decoder, upright and in RGB), a second run with the same seed, and the listing of the folder.
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deephash.data import ImageFolder
from deephash.data.images import open_image

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_photo_collection.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_photo_collection", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["plain", "exif", "cmyk", "palette", "rgba"])
def test_every_stored_kind_decodes_back_to_the_rendered_photo(script, kind, tmp_path):
    rng = np.random.default_rng(3)
    item = np.zeros((28, 28), np.uint8)
    item[6:22, 9:19] = 220
    picture = script.render(item, rng)
    assert picture.dtype == np.uint8 and 128 <= min(picture.shape[:2]) and max(picture.shape[:2]) <= 640
    data, ext = script.encode_file(picture, kind, "png", rng)
    (tmp_path / f"x.{ext}").write_bytes(data)
    decoded = np.asarray(open_image(tmp_path / f"x.{ext}", "RGB")).astype(np.int64)
    assert decoded.shape == picture.shape  # the EXIF one is stored on its side and turned upright
    diff = np.abs(decoded - picture)
    if kind == "rgba":  # the transparent top band shows white, the rest is the photo
        edge = max(2, picture.shape[0] // 20)
        assert (decoded[:edge] == 255).all()
        diff = diff[edge:-edge]
    limit = {"plain": 0, "exif": 12, "cmyk": 12, "palette": 24, "rgba": 0}[kind]
    assert diff.mean() <= limit


def test_the_collection_is_seeded_and_listed_by_class(script, tiny_fmnist, tmp_path):
    root, _ = tiny_fmnist
    for out in ("a", "b"):
        assert script.main(["--out", str(tmp_path / out), "--n", "14", "--root", str(root)]) == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert len(files) == 14 and sum(f.parts[0] == "train" for f in files) == 12
    train = ImageFolder(tmp_path / "a" / "train", image_size=16)
    assert len(train) + len(train.bad_files) == 12 and set(train.classes) <= {"T-shirt_top", "Trouser", "Pullover"}
    image = Image.open(io.BytesIO((tmp_path / "a" / files[0]).read_bytes()))
    assert image.format in ("JPEG", "PNG", "WEBP")


def test_an_interrupted_collection_resumes_to_the_same_files(script, tiny_fmnist, tmp_path):
    root, _ = tiny_fmnist
    args = ["--n", "14", "--root", str(root)]
    assert script.main(["--out", str(tmp_path / "whole"), *args]) == 0
    files = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*") if p.is_file())
    assert script.main(["--out", str(tmp_path / "cut"), *args]) == 0
    for name in files[::3]:  # as if the run had been killed before these were written
        (tmp_path / "cut" / name).unlink()
    kept = {name: (tmp_path / "cut" / name).stat().st_mtime_ns for name in files if (tmp_path / "cut" / name).exists()}
    assert script.main(["--out", str(tmp_path / "cut"), *args]) == 0
    resumed = sorted(p.relative_to(tmp_path / "cut") for p in (tmp_path / "cut").rglob("*") if p.is_file())
    assert resumed == files  # no ".partial" file left behind
    assert all((tmp_path / "cut" / f).read_bytes() == (tmp_path / "whole" / f).read_bytes() for f in files)
    assert all((tmp_path / "cut" / name).stat().st_mtime_ns == stamp for name, stamp in kept.items())  # not rewritten


@pytest.mark.parametrize("kind", sorted(["cmyk", "palette", "rgba", "exif"]))
def test_the_extension_table_matches_what_each_kind_is_stored_as(script, kind):
    picture = np.full((130, 140, 3), 90, np.uint8)
    _, ext = script.encode_file(picture, kind, "webp", np.random.default_rng(0))
    assert script.EXTENSIONS[kind] == ext
