"""``deephash serve INDEX --model EXPORT``: the search service on ONNX Runtime, in processes that
never import torch, answering as the service on the run's PyTorch model does."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from helpers import png_of, start_server, stop, tiny_digits_run

from deephash import runs
from deephash.errors import CodeLengthError
from deephash.models.heads import sign_codes
from deephash.signs import is_plus
from deephash.runs.export import export_run
from deephash.serve.app import create_app
from deephash.serve.onnx_encoder import OnnxEncoder

BITS = 12
TOKEN = "onnx-test-token"

#: Runs the app on the exported model in a fresh interpreter: searches with each PNG, then reports
#: the answers and whether torch was ever imported.
CLIENT_SCRIPT = """
import json, sys
from pathlib import Path
from fastapi.testclient import TestClient
from deephash.serve.app import create_app

index, model, *pngs = sys.argv[1:]
answers = []
with TestClient(create_app(index, model_dir=model)) as client:
    info = client.get("/api/info").json()
    for png in pngs:
        response = client.post("/api/search", files={"image": ("q.png", Path(png).read_bytes(), "image/png")},
                               data={"k": "5"})
        answers.append(response.json()["results"])
print(json.dumps({"info": info, "answers": answers, "torch": "torch" in sys.modules}))
"""



@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny digits run with its index and export, and PNG queries whose code values are all
    clear of 0 (so the two engines' bits cannot differ by float noise)."""
    root = tmp_path_factory.mktemp("serve-onnx")
    run_dir, index_dir, config = tiny_digits_run(root, BITS, centred=True)
    export_run(run_dir, root / "onnx")
    images = runs.load_split(config, "test", run_dir).data.numpy()
    values, _ = OnnxEncoder(root / "onnx").code_values(images)
    chosen = np.flatnonzero((np.abs(values) > 1e-4).all(axis=1))[:6]
    assert len(chosen) == 6
    pngs = []
    for i in chosen:
        path = root / f"query-{i}.png"
        path.write_bytes(png_of(images[i, 0]))
        pngs.append(path)
    return {"root": root, "run": run_dir, "index": index_dir, "onnx": root / "onnx", "pngs": pngs, "images": images[chosen]}


def torch_answers(served: dict) -> list[list[dict]]:
    """The same searches on the service over the run's PyTorch model."""
    with TestClient(create_app(served["index"], served["run"])) as client:
        return [client.post("/api/search", files={"image": ("q.png", png.read_bytes(), "image/png")},
                            data={"k": "5"}).json()["results"] for png in served["pngs"]]


def test_the_app_on_an_exported_model_answers_as_torch_without_importing_it(served):
    done = subprocess.run([sys.executable, "-c", CLIENT_SCRIPT, str(served["index"]), str(served["onnx"]),
                           *map(str, served["pngs"])], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["torch"] is False
    assert report["info"]["bits"] == BITS and report["info"]["model"] == "fmnist-cnn (onnxruntime)"
    assert report["info"]["input_shape"] == [1, 8, 8]
    want = torch_answers(served)
    strip = [[{k: r[k] for k in ("id", "distance", "label")} for r in answer] for answer in want]
    assert [[{k: r[k] for k in ("id", "distance", "label")} for r in answer] for answer in report["answers"]] == strip
    assert all(len(answer) == 5 for answer in report["answers"])


def start_model_server(index_dir: Path, model_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """``python -m deephash serve INDEX --model DIR`` with writes enabled, on a free port; waits for /healthz."""
    env = dict(os.environ, DEEPHASH_TEST_TOKEN=TOKEN)
    return start_server(index_dir, None, log, "--model", str(model_dir), "--token-env", "DEEPHASH_TEST_TOKEN", env=env)


def test_the_cli_server_searches_and_adds_with_no_torch_loaded(served, tmp_path):
    import shutil

    index_dir = tmp_path / "index"
    shutil.copytree(served["index"], index_dir)
    proc, base = start_model_server(index_dir, served["onnx"], tmp_path / "server.log")
    try:
        png = served["pngs"][0].read_bytes()
        found = httpx.post(f"{base}/api/search", files={"image": ("q.png", png, "image/png")}, data={"k": "3"}, timeout=30)
        assert found.status_code == 200 and len(found.json()["results"]) == 3
        added = httpx.post(f"{base}/api/items", files={"image": ("q.png", png, "image/png")}, data={"id": "900000"},
                           headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert added.status_code == 201, added.text
        again = httpx.post(f"{base}/api/search", files={"image": ("q.png", png, "image/png")}, data={"k": "50"},
                           timeout=30).json()["results"]
        assert {"id": 900000, "distance": 0} in [{k: r[k] for k in ("id", "distance")} for r in again]
        picture = httpx.get(f"{base}/api/items/900000/image", timeout=30)
        assert picture.status_code == 200
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(picture.content))), served["images"][0, 0])
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "onnxruntime" in maps  # the check sees the server's libraries...
        assert "libtorch" not in maps  # ...and PyTorch's are not among them
    finally:
        stop(proc)


@pytest.mark.parametrize("argv, message", [
    (["--run", "R", "--model", "M"], "not allowed with argument"),
    ([], "one of the arguments --run --model is required"),
])
def test_serve_takes_a_run_or_a_model(argv, message):
    done = subprocess.run([sys.executable, "-m", "deephash", "serve", "INDEX", *argv], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and message in done.stderr


def test_an_export_of_another_code_length_is_refused(served, tmp_path):
    run16, _, _ = tiny_digits_run(tmp_path, 16, index=False)
    export_run(run16, tmp_path / "onnx16")
    with pytest.raises(CodeLengthError, match="16-bit codes but the index holds 12-bit codes"):
        create_app(served["index"], model_dir=tmp_path / "onnx16")


def test_the_numpy_sign_is_the_tensor_sign():
    values = np.array([[0.0, -0.0, 1e-30, -1e-30, np.nan, np.inf, -np.inf, 3.0]], dtype=np.float32)
    want = sign_codes(torch.from_numpy(values)).numpy() > 0
    np.testing.assert_array_equal(is_plus(values), want)
    np.testing.assert_array_equal(is_plus(values), [[True, True, True, False, False, True, False, True]])
