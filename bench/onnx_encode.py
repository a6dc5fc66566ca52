"""Images per second encoded by the run's PyTorch model and by its ONNX export, side by side.

    PYTHONPATH=src OMP_NUM_THREADS=1 python bench/onnx_encode.py [--seconds 3]

The model is the shipped fashion-mnist-48 recipe's network (untrained: speed does not depend on the
weights) with random class centres, saved as a run in a temporary folder and exported with
``deephash.runs.export_run``; both encoders (``TorchEncoder`` and ``OnnxEncoder``, one thread each)
encode the same random uint8 28x28 images at batch sizes 1, 32 and 256, each for ``--seconds``,
the two engines alternating per batch size.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from deephash import runs
from deephash.config import load_config
from deephash.models import build_model
from deephash.runs.export import export_run
from deephash.serve.encoder import TorchEncoder
from deephash.serve.onnx_encoder import OnnxEncoder


def rate(encoder, images: np.ndarray, seconds: float) -> float:
    encoder.encode(images)  # warm-up
    count, tic = 0, time.perf_counter()
    while time.perf_counter() - tic < seconds:
        encoder.encode(images)
        count += len(images)
    return count / (time.perf_counter() - tic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = load_config("fashion-mnist-48", ["device='cpu'"])
        torch.manual_seed(0)
        model = build_model(config.model).eval()
        centres = torch.rand(10, 48, generator=torch.Generator().manual_seed(1)) > 0.5
        model.set_code_centers(torch.where(centres, 1.0, -1.0))
        runs.save_model(root / "model.pt", model, config, [str(i) for i in range(10)])
        export_run(root, root / "onnx")
        model, _ = runs.load_run(root, device="cpu")
        engines = {"PyTorch": TorchEncoder(model, (1, 28, 28), "torch"), "ONNX Runtime": OnnxEncoder(root / "onnx", threads=1)}
        images = np.random.default_rng(0).integers(0, 256, (256, 1, 28, 28), dtype=np.uint8)
        print("| batch | PyTorch (images/s) | ONNX Runtime (images/s) | ratio |")
        print("| ---: | ---: | ---: | ---: |")
        for batch in (1, 32, 256):
            found = {name: rate(engine, images[:batch], args.seconds) for name, engine in engines.items()}
            print(f"| {batch} | {found['PyTorch']:,.0f} | {found['ONNX Runtime']:,.0f} | "
                  f"{found['ONNX Runtime'] / found['PyTorch']:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
