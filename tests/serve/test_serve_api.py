"""The search service's HTTP API, through FastAPI's TestClient, against a brute-force Hamming search."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from helpers import png_of, tiny_digits_run

from deephash import runs
from deephash.retrieval.index import HashIndex
from deephash.serve.app import create_app
from deephash.serve.service import SearchService

BITS = 12
CLASSES = [str(d) for d in range(10)]
ZERO = "0000"  # the all-zero 12-bit code: 2 bytes


def make_tiny_run(root: Path, bits: int = BITS) -> tuple[Path, Path]:
    """A run (untrained tiny CNN on scikit-learn's 8x8 digits) and an index over its train split."""
    return tiny_digits_run(root, bits)[:2]


def brute_force(query: np.ndarray, codes: np.ndarray, bits: int) -> np.ndarray:
    """Hamming distance of one packed query to every packed code, by unpacked bit comparison."""
    q = np.unpackbits(query.reshape(1, -1), axis=1)[:, :bits]
    db = np.unpackbits(codes, axis=1)[:, :bits]
    return (q != db).sum(axis=1)



def png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb's header)."""
    data = bytearray(png_of(np.zeros((2, 2), np.uint8)))
    ihdr = bytearray(data[12:29])  # chunk type + 13 bytes of IHDR data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    run_dir, index_dir = make_tiny_run(tmp_path_factory.mktemp("serve"))
    index = HashIndex.load(index_dir)
    model, config = runs.load_run(run_dir, device="cpu")
    dataset = runs.load_split(config, "train", run_dir)
    app = create_app(index_dir, run_dir, max_upload_bytes=200_000, max_pixels=250_000, request_timeout_s=30)
    with TestClient(app) as client:
        yield {"client": client, "codes": index.codes, "ids": index.ids, "labels": index.labels,
               "dataset": dataset, "model": model, "run": run_dir, "index": index_dir}


def healthy(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def check_against_brute_force(body: dict, query: np.ndarray, env: dict, k: int, radius: int | None = None) -> None:
    dist = brute_force(query, env["codes"], BITS)
    expected = np.sort(dist if radius is None else dist[dist <= radius])[:k]
    got = body["results"]
    assert body["bits"] == BITS
    assert [r["distance"] for r in got] == expected.tolist()
    position = {int(i): p for p, i in enumerate(env["ids"])}
    for r in got:
        p = position[r["id"]]
        assert r["distance"] == dist[p]
        assert r["label"] == CLASSES[int(env["labels"][p])]
        assert r["image_url"] == f"/api/items/{r['id']}/image"
    assert len({r["id"] for r in got}) == len(got)


def test_info_health_page_and_schema(env):
    client = env["client"]
    healthy(client)
    info = client.get("/api/info").json()
    assert info["bits"] == BITS and info["size"] == len(env["ids"]) and info["factory"] == "BFlat"
    assert info["model"] == "fmnist-cnn" and info["classes"] == CLASSES and info["input_shape"] == [1, 8, 8]
    schema = client.get("/openapi.json").json()
    assert {"/api/search", "/api/info", "/healthz", "/api/items/{ident}/image"} <= set(schema["paths"])
    body = schema["paths"]["/api/search"]["post"]["requestBody"]["content"]
    assert "image" in body["multipart/form-data"]["schema"]["properties"]
    assert {"code", "id", "k", "radius"} <= set(body["application/json"]["schema"]["properties"])
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '/static/app.js' in page.text and 'id="results"' in page.text
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert "http" not in page.text.replace("http-equiv", "")  # no external URLs


@pytest.mark.parametrize("k", [1, 7, 10])
def test_upload_matches_brute_force(env, k):
    client, dataset = env["client"], env["dataset"]
    row = 17
    image = dataset.data[row, 0].numpy()
    response = client.post("/api/search", files={"image": ("q.png", png_of(image), "image/png")}, data={"k": str(k)})
    assert response.status_code == 200, response.text
    body = response.json()
    with torch.inference_mode():
        sign = env["model"].encode(dataset.data[row:row + 1].float() / 255)
    query = np.packbits(sign.numpy() > 0, axis=1)
    np.testing.assert_array_equal(query, env["codes"][row:row + 1])  # lossless PNG: same code as stored
    check_against_brute_force(body, query, env, k)
    assert body["results"][0]["distance"] == 0 and body["took_ms"] >= 0
    assert body["query"]["label"] is None  # an upload's label is unknown


def test_upload_is_resized_and_converted(env, tmp_path):
    """An RGB image of another shape is converted to grey and fitted by the run's model view (an
    in-memory data set's: the shorter side resized to 8, then the centre 8 x 8, no extra crop),
    the same pixels as ``deephash search FILE`` gives the model."""
    client = env["client"]
    rgb = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    response = client.post("/api/search", files={"image": ("q.jpg", png_of(rgb), "image/jpeg")})
    assert response.status_code == 200
    # by hand: 30 x 40 -> 8 x round(40 * 8 / 30) = 8 x 11, rows 1 .. 8 kept (a stretch would differ)
    grey = np.array(Image.fromarray(rgb).convert("L").resize((8, 11), Image.Resampling.BILINEAR))[1:9]
    stretched = np.array(Image.fromarray(rgb).convert("L").resize((8, 8), Image.Resampling.BILINEAR))
    assert not np.array_equal(grey, stretched)
    (tmp_path / "q.png").write_bytes(png_of(rgb))
    _, config = runs.load_run(env["run"], device="cpu")
    cli_view, _ = runs.query_images(config, env["run"], [str(tmp_path / "q.png")])  # deephash search FILE
    assert np.array_equal(cli_view.numpy(), grey[None, None])
    with torch.inference_mode():
        sign = env["model"].encode(torch.from_numpy(grey)[None, None].float() / 255)
    check_against_brute_force(response.json(), np.packbits(sign.numpy() > 0, axis=1), env, 10)


def test_search_by_code_and_radius(env):
    client = env["client"]
    rng = np.random.default_rng(1)
    for _ in range(3):
        bits = rng.integers(0, 2, (1, BITS)).astype(bool)
        packed = np.packbits(bits, axis=1)
        body = client.post("/api/search", json={"code": packed.tobytes().hex(), "k": 25}).json()
        check_against_brute_force(body, packed, env, 25)
        body = client.post("/api/search", json={"code": packed.tobytes().hex().upper(), "k": 1000, "radius": 3}).json()
        check_against_brute_force(body, packed, env, 1000, radius=3)
        assert all(r["distance"] <= 3 for r in body["results"])
    body = client.post("/api/search", json={"code": ZERO, "k": 50, "radius": 10**30}).json()
    check_against_brute_force(body, np.zeros((1, 2), np.uint8), env, 50)


def test_search_by_item_and_random_item(env):
    client = env["client"]
    body = client.post("/api/search", json={"id": 5, "k": 4}).json()
    check_against_brute_force(body, env["codes"][5:6], env, 4)
    assert body["query"] == {"id": 5, "label": CLASSES[int(env["labels"][5])], "image_url": "/api/items/5/image"}
    item = client.get("/api/items/random").json()
    assert 0 <= item["id"] < len(env["ids"]) and item["label"] == CLASSES[int(env["labels"][item["id"]])]
    assert len(client.post("/api/search", json={"k": 1000, "code": ZERO}).json()["results"]) == min(1000, len(env["ids"]))


def test_item_image_is_the_database_image(env):
    client = env["client"]
    response = client.get("/api/items/42/image")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    pixels = np.asarray(Image.open(io.BytesIO(response.content)))
    np.testing.assert_array_equal(pixels, env["dataset"].data[42, 0].numpy())


BAD_REQUESTS = {
    "k zero": (lambda c: c.post("/api/search", json={"code": ZERO, "k": 0}), 422),
    "k too big": (lambda c: c.post("/api/search", json={"code": ZERO, "k": 1001}), 422),
    "k not a number": (lambda c: c.post("/api/search", files={"image": ("a.png", png_of(np.zeros((8, 8), np.uint8)))}, data={"k": "x"}), 422),
    "negative radius": (lambda c: c.post("/api/search", json={"code": ZERO, "radius": -1}), 422),
    "bad hex": (lambda c: c.post("/api/search", json={"code": "xyzw"}), 422),
    "padding bits set": (lambda c: c.post("/api/search", json={"code": "000f"}), 422),
    "neither code nor id": (lambda c: c.post("/api/search", json={"k": 3}), 422),
    "not json": (lambda c: c.post("/api/search", content=b"{oops", headers={"content-type": "application/json"}), 422),
    "no image field": (lambda c: c.post("/api/search", files={"other": ("a.png", b"x")}), 422),
    "unknown item search": (lambda c: c.post("/api/search", json={"id": 99999}), 404),
    "huge item id": (lambda c: c.post("/api/search", json={"id": 10**30}), 404),
    "huge item image": (lambda c: c.get(f"/api/items/{10**30}/image"), 404),
    "unknown item image": (lambda c: c.get("/api/items/99999/image"), 404),
    "negative item image": (lambda c: c.get("/api/items/-1/image"), 404),
    "text upload": (lambda c: c.post("/api/search", files={"image": ("a.png", b"hello, not an image", "image/png")}), 415),
    "other content type": (lambda c: c.post("/api/search", content=b"abc", headers={"content-type": "text/plain"}), 415),
    "truncated png": (lambda c: c.post("/api/search", files={"image": ("a.png", png_of(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))[:120])}), 400),
    "too many pixels": (lambda c: c.post("/api/search", files={"image": ("a.png", png_of(np.zeros((600, 600), np.uint8)))}), 413),
    "decompression bomb": (lambda c: c.post("/api/search", files={"image": ("a.png", png_with_size(100_000, 100_000))}), 413),
    "declared body too big": (lambda c: c.post("/api/search", files={"image": ("a.png", b"\0" * 300_000)}), 413),
    "streamed body too big": (lambda c: c.post("/api/search", content=iter([b"\0" * 50_000] * 6),
                                               headers={"content-type": "multipart/form-data; boundary=x"}), 413),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_is_refused_and_server_stays_healthy(env, name):
    send, status = BAD_REQUESTS[name]
    response = send(env["client"])
    assert response.status_code == status, response.text
    assert response.json()["detail"]  # a JSON message
    healthy(env["client"])


def test_wrong_code_length_names_both_lengths(env):
    response = env["client"].post("/api/search", json={"code": "abcdef"})
    assert response.status_code == 422
    assert "6 hex digits" in response.json()["detail"] and "12-bit" in response.json()["detail"] and "4 hex digits" in response.json()["detail"]
    healthy(env["client"])


def test_streamed_body_is_counted_without_content_length(env):
    """The limit holds for a chunked body, where no Content-Length header is sent."""
    def chunks():
        yield b"--x\r\n"
        for _ in range(10):
            yield b"\0" * 30_000

    response = env["client"].post("/api/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413
    assert response.json()["detail"] == "request body over the limit of 200000 bytes"  # counted, not declared
    healthy(env["client"])


class SlowService(SearchService):
    def answer_batch(self, requests):
        time.sleep(1.0)
        return super().answer_batch(requests)


def test_slow_request_times_out_and_server_stays_up(env):
    service = SearchService.load(env["index"], env["run"])
    service.__class__ = SlowService
    app = create_app(env["index"], env["run"], request_timeout_s=0.2, service=service)
    with TestClient(app) as client:
        response = client.post("/api/search", json={"code": ZERO})
        assert response.status_code == 503 and "0.2 s" in response.json()["detail"]
        healthy(client)


def test_image_folder_index_serves_the_files(env, tmp_path):
    rng = np.random.default_rng(5)
    originals = {}
    for name in ("cat", "dog"):
        (tmp_path / "folder" / name).mkdir(parents=True)
        for i in range(2):
            path = tmp_path / "folder" / name / f"{i}.png"
            pixels = rng.integers(0, 256, (20, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
            originals[str(path)] = pixels
    index_dir = runs.build_index(env["run"], images=tmp_path / "folder", out=tmp_path / "folder-index")
    with TestClient(create_app(index_dir, env["run"])) as client:
        body = client.post("/api/search", json={"id": 3, "k": 4}).json()
        assert sorted(r["id"] for r in body["results"]) == [0, 1, 2, 3]
        built = HashIndex.load(index_dir)
        names, paths = built.metadata["classes"], built.paths.tolist()  # names: build_index's choice (the run's classes first)
        assert body["query"]["label"] == names[1] and {r["label"] for r in body["results"]} == {names[0], names[1]}
        for ident in range(4):
            png = client.get(f"/api/items/{ident}/image")
            assert png.status_code == 200
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png.content))), originals[paths[ident]])
        assert client.get("/api/items/4/image").status_code == 404


def test_index_and_run_of_different_code_lengths_are_refused(env, tmp_path):
    run16, _ = make_tiny_run(tmp_path, bits=16)
    with pytest.raises(Exception, match="16-bit codes but the index holds 12-bit"):
        create_app(env["index"], run16)
