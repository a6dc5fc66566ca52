"""Photo folders streamed from disk: the one decoder (modes, EXIF, draft), the evaluation and
training transforms, skipped files, flat folders and worker-count independence.

Oracles: Pillow conversions and numpy arithmetic written out by hand, hand-computed crop
geometry, and the same data set read with 0 and 2 worker processes.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from deephash.data import BadFiles, DecodeFailure, ImageFolder, StreamLoader
from deephash.data.images import check_image_header, list_image_folder, open_image, read_image
from deephash.data.transforms import eval_resize_side, eval_transform, random_resized_box, train_transform
from deephash.errors import DataFormatError, NotFoundError


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


# ------------------------------------------------------------------------------------ decoder


def test_alpha_is_composited_over_white(tmp_path):
    rgb = np.array([[[200, 40, 0], [10, 250, 90], [77, 77, 77]]], dtype=np.uint8)
    alpha = np.array([[0, 255, 128]], dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "a.png")
    got = open_image(tmp_path / "a.png", "RGB")
    a = alpha[..., None].astype(np.float64) / 255
    expected = rgb * a + 255 * (1 - a)  # the "over" operator on a white background
    assert got.mode == "RGB"
    assert np.abs(pixels(got).astype(np.float64) - expected).max() <= 1
    assert pixels(got)[0, 0].tolist() == [255, 255, 255] and pixels(got)[0, 1].tolist() == [10, 250, 90]


def test_grey_with_alpha_and_transparent_palette_go_over_white(tmp_path):
    Image.fromarray(np.dstack([np.array([[30, 60]], np.uint8), np.array([[0, 255]], np.uint8)]), "LA").save(tmp_path / "la.png")
    assert pixels(open_image(tmp_path / "la.png", "L")).tolist() == [[255, 60]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    palette.putdata([0, 1])
    palette.save(tmp_path / "p.png", transparency=0)
    assert pixels(open_image(tmp_path / "p.png", "RGB")).tolist() == [[[255, 255, 255], [200, 100, 0]]]


def test_cmyk_and_sixteen_bit_grey_and_mode_changes(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255], [0, 255, 255, 0]]], dtype=np.uint8)
    Image.frombytes("CMYK", (4, 1), cmyk.tobytes()).save(tmp_path / "c.tif")
    # channel = 255 - ink where the ink and black are 0 or 255 (exact under any CMYK formula)
    assert pixels(open_image(tmp_path / "c.tif", "RGB")).tolist() == [[[255, 255, 255], [0, 255, 255], [0, 0, 0], [255, 0, 0]]]
    deep = np.array([[0, 255, 256, 40000, 65535]], dtype=np.uint16)
    sixteen = Image.frombytes("I;16", (5, 1), deep.astype("<u2").tobytes())
    sixteen.save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    assert pixels(open_image(tmp_path / "d.png")).tolist() == [(deep >> 8).astype(np.uint8).tolist()[0]]
    grey = np.array([[0, 100, 255]], dtype=np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "g.png")
    assert pixels(open_image(tmp_path / "g.png", "RGB")).tolist() == [[[v] * 3 for v in grey[0].tolist()]]
    colour = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [90, 120, 30]]], dtype=np.uint8)
    Image.fromarray(colour, "RGB").save(tmp_path / "rgb.png")
    luma = colour.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, Pillow's L
    assert np.abs(pixels(open_image(tmp_path / "rgb.png", "L")).astype(np.float64) - luma).max() <= 1


@pytest.mark.parametrize("orientation, turn", [(1, lambda a: a), (2, lambda a: a[:, ::-1]), (3, lambda a: a[::-1, ::-1]),
                                               (6, lambda a: np.rot90(a, k=-1)), (8, lambda a: np.rot90(a, k=1))])
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
    stored = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 12
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored, "RGB").save(tmp_path / "e.png", exif=exif)
    got = pixels(open_image(tmp_path / "e.png", "RGB"))
    assert np.array_equal(got, turn(stored))
    assert np.array_equal(read_image(tmp_path / "e.png", "RGB"), turn(stored).transpose(2, 0, 1))


def test_jpeg_draft_decodes_at_the_smallest_scale_that_keeps_the_needed_side(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1200, 1600, 3), dtype=np.uint8)).save(tmp_path / "big.jpg")
    assert open_image(tmp_path / "big.jpg", "RGB").size == (1600, 1200)
    assert open_image(tmp_path / "big.jpg", "RGB", min_side=200).size == (400, 300)  # 1/8 would give 150 < 200
    assert open_image(tmp_path / "big.jpg", "RGB", min_side=700).size == (1600, 1200)  # 1/2 would give 600 < 700
    Image.fromarray(np.zeros((1200, 1600, 3), np.uint8)).save(tmp_path / "big.png")
    assert open_image(tmp_path / "big.png", "RGB", min_side=200).size == (1600, 1200)  # only JPEG has a draft mode


# --------------------------------------------------------------------------------- transforms


def test_eval_transform_resizes_the_shorter_side_and_crops_the_centre():
    source = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    assert eval_resize_side(16) == 18  # floor(16 / 0.875)
    # by hand: 40x30 -> shorter side 30 to 18, longer 40 * 18 / 30 = 24; centre 16x16 from (4, 1)
    resized = np.asarray(source.resize((24, 18), Image.Resampling.BILINEAR))
    expected = resized[1:17, 4:20].transpose(2, 0, 1)
    assert np.array_equal(eval_transform(source, 16), expected)
    tall = Image.fromarray(np.random.default_rng(2).integers(0, 256, (50, 20), dtype=np.uint8))
    # 20x50 with crop_fraction 1: shorter 20 -> 10, longer 25; centre 10x10 from (0, 7)
    expected = np.asarray(tall.resize((10, 25), Image.Resampling.BILINEAR))[7:17, 0:10][None]
    assert np.array_equal(eval_transform(tall, 10, crop_fraction=1.0), expected)


def test_random_resized_box_stays_inside_with_its_area_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(300):
        width, height = int(rng.integers(5, 300)), int(rng.integers(5, 300))
        left, top, right, bottom = random_resized_box(width, height, rng, (0.2, 1.0))
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        w, h = right - left, bottom - top
        assert w * h <= width * height
    left, top, right, bottom = random_resized_box(100, 10, np.random.default_rng(0), (0.9, 1.0))  # no try fits
    assert (right - left, bottom - top) == (13, 10) and left == (100 - 13) // 2  # centre crop at ratio 4/3


def test_train_transform_is_a_function_of_its_seed():
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    a = train_transform(image, 24, np.random.default_rng([5, 1]))
    b = train_transform(image, 24, np.random.default_rng([5, 1]))
    c = train_transform(image, 24, np.random.default_rng([6, 1]))
    assert a.shape == (3, 24, 24) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# ----------------------------------------------------------------------------- folders, files


def write_photos(root, per_class=3, size=(30, 20), seed=0):
    rng = np.random.default_rng(seed)
    for name in ("cat", "dog"):
        (root / name / "deeper").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            folder = root / name / ("deeper" if i % 2 else "")
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_class_folders_at_any_depth_and_flat_folders(tmp_path):
    write_photos(tmp_path / "labelled")
    paths, labels, classes = list_image_folder(tmp_path / "labelled")
    assert classes == ["cat", "dog"] and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert {p.relative_to(tmp_path / "labelled").parts[0] for p in paths[:3]} == {"cat"}
    flat = tmp_path / "flat"
    write_photos(flat / "nested")
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(flat / "top.png")
    dataset = ImageFolder(flat, image_size=8)  # an image in the root: unlabelled, every file at any depth
    assert not dataset.labelled and dataset.classes is None and dataset.targets.tolist() == [-1] * 7
    assert sorted(dataset.relative_paths) == sorted(p.relative_to(flat).as_posix() for p in flat.rglob("*.png"))
    tree = ImageFolder(tmp_path / "labelled", image_size=8, labelled=False)
    assert not tree.labelled and len(tree) == 6


def test_an_unlabelled_sub_folder_is_no_class_and_lists_its_images_unlabelled_or_not_at_all(tmp_path):
    write_photos(tmp_path)
    write_photos(tmp_path / "new-stock" / "deep")  # 6 images two levels down
    paths, labels, classes = list_image_folder(tmp_path, unlabelled_dir="new-stock")
    assert classes == ["cat", "dog"] and labels.tolist() == [0, 0, 0, 1, 1, 1] + [-1] * 6
    assert all(p.relative_to(tmp_path).parts[0] == "new-stock" for p in paths[6:])
    paths, labels, classes = list_image_folder(tmp_path, unlabelled_dir="new-stock", with_unlabelled=False)
    assert classes == ["cat", "dog"] and labels.tolist() == [0, 0, 0, 1, 1, 1] and len(paths) == 6
    assert list_image_folder(tmp_path)[2] == ["cat", "dog", "new-stock"]  # without the name it is a class
    left_out = list_image_folder(tmp_path, unlabelled_dir="absent", with_unlabelled=False)  # only training needs it
    assert left_out[1].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    folder = ImageFolder(tmp_path, image_size=8, unlabelled_dir="new-stock")
    assert folder.classes == ["cat", "dog"] and (folder.targets == -1).sum() == 6
    with pytest.raises(NotFoundError, match="absent: no such folder .the unlabelled images' sub-folder"):
        list_image_folder(tmp_path, unlabelled_dir="absent")


def test_bad_files_are_skipped_with_one_warning_each_and_counted(tmp_path, caplog):
    write_photos(tmp_path)
    (tmp_path / "cat" / "notes.jpg").write_bytes(b"this is not an image at all")
    good = tmp_path / "dog" / "0.png"
    (tmp_path / "dog" / "cut.png").write_bytes(good.read_bytes()[:120])  # a header, then cut short
    with caplog.at_level(logging.WARNING, logger="deephash.data"):
        dataset = ImageFolder(tmp_path, image_size=8)
        assert [r.getMessage().startswith(f"deephash: skipped {tmp_path / 'cat' / 'notes.jpg'}: not a readable image")
                for r in caplog.records] == [True]
        assert len(dataset) == 7 and str(tmp_path / "cat" / "notes.jpg") not in dataset.paths  # header check
        cut = dataset.paths.index(str(tmp_path / "dog" / "cut.png"))
        assert isinstance(dataset[cut], DecodeFailure)
        loader = StreamLoader.sequential(dataset, 3)
        batches = list(loader.decoded())
    positions = torch.cat([b.positions for b in batches]).tolist()
    assert positions == [i for i in range(7) if i != cut]  # the collate dropped the failure
    assert sum(len(b.failures) for b in batches) == 1 and sum(len(b.images) for b in batches) == 6
    assert len(caplog.records) == 2 and "cut.png" in caplog.records[1].getMessage()
    assert list(dataset.bad_files.found) == [str(tmp_path / "cat" / "notes.jpg"), str(tmp_path / "dog" / "cut.png")]
    report = tmp_path / "skipped.txt"
    dataset.bad_files.write(report)
    assert [line.split("\t")[0] for line in report.read_text().splitlines()] == list(dataset.bad_files.found)


def test_too_many_bad_files_raise_past_the_allowed_share_naming_them():
    bad = BadFiles(total=4, max_fraction=0.5)
    bad.add("a.jpg", "truncated")
    bad.add("b.jpg", "truncated")  # 2 of 4 = exactly the allowed share: still fine
    bad.add("b.jpg", "again")  # counted once
    assert len(bad) == 2
    with pytest.raises(DataFormatError, match=r"3 of 4 .*max_bad_fraction = 0.5: a.jpg \(truncated\); b.jpg"):
        bad.add("c.jpg", "not an image")


def test_header_check_names_what_is_wrong(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG garbage")
    assert "not a readable image" in check_image_header(tmp_path / "x.png")
    Image.new("RGB", (3, 3)).save(tmp_path / "ok.png")
    assert check_image_header(tmp_path / "ok.png") is None


@pytest.mark.parametrize("random_crops", [False, True])
def test_zero_and_two_workers_give_identical_batches(tmp_path, random_crops):
    write_photos(tmp_path, per_class=5, size=(37, 23))
    dataset = ImageFolder(tmp_path, image_size=12)
    batches = [[0, 3, 5], [9, 1], [2, 4, 6, 7, 8]]

    def run(workers: int) -> list[torch.Tensor]:
        loader = StreamLoader(dataset, batches, num_workers=workers, random_crops=random_crops,
                              generator=torch.Generator().manual_seed(4))
        return [x for x, _ in loader] + [x for x, _ in loader]  # two epochs: persistent workers, new crops

    alone, pooled = run(0), run(2)
    assert all(torch.equal(a, b) for a, b in zip(alone, pooled)) and len(alone) == len(pooled) == 6
    assert alone[0].shape == (3, 3, 12, 12) and alone[0].dtype == torch.float32
    assert torch.equal(alone[0], alone[3]) != random_crops  # eval batches repeat; training crops change per epoch
    if not random_crops:
        assert torch.equal(alone[0][1] * 255, dataset.data[3].float())


def test_lazy_data_view_decodes_what_is_indexed(tmp_path):
    write_photos(tmp_path)
    dataset = ImageFolder(tmp_path, image_size=10)
    assert dataset.data.shape == (6, 3, 10, 10)
    some = dataset.data[torch.tensor([4, 1])]
    assert some.shape == (2, 3, 10, 10) and torch.equal(some[0], dataset[4][0])
    grid = dataset.data[torch.tensor([[4, 1, 0], [2, 2, 5]])]  # indices of any shape, as a tensor's
    assert grid.shape == (2, 3, 3, 10, 10) and torch.equal(grid[1, 2], dataset[5][0]) and torch.equal(grid[0, 0], some[0])
    subset = dataset.subset([5, 0])
    assert subset.paths == [dataset.paths[5], dataset.paths[0]] and subset.targets.tolist() == [1, 0]
    assert math.isclose(dataset.crop_fraction, 0.875)


def test_iterating_never_touches_the_global_random_state(tmp_path):
    write_photos(tmp_path)
    dataset = ImageFolder(tmp_path, image_size=8)
    before = torch.get_rng_state()
    for workers in (0, 1):
        loader = StreamLoader(dataset, [[0, 1], [2, 5]], num_workers=workers, random_crops=True,
                              generator=torch.Generator().manual_seed(1))
        assert sum(len(x) for x, _ in loader) == 4
    assert torch.equal(before, torch.get_rng_state())  # a resumed run's other draws are unaffected
