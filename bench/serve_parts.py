"""The search service's parts measured apart (issue 27): the run's model eager against traced,
alone and beside a busy Python thread (the event loop's stand-in), and FAISS's Hamming k-NN over
48-bit codes held as 6 bytes against the same codes padded to 8 (``HashIndex``'s layout).

    OMP_NUM_THREADS=1 python bench/serve_parts.py RUN [--batch 10] [--seconds 2]

Prints one line per measurement; BENCHMARKS.md ("Search service, third pass") quotes them.
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
import torch


def rate(call, seconds: float) -> float:
    """Calls per second of ``call`` over ``seconds``."""
    call()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        call()
        n += 1
    return n / (time.perf_counter() - start)


def beside_busy_thread(call, seconds: float) -> float:
    """Calls per second of ``call`` while another thread runs Python bytecode without pause."""
    stop = threading.Event()

    def spin() -> None:
        count = 0
        while not stop.is_set():
            count += 1

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        return rate(call, seconds)
    finally:
        stop.set()
        thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a trained run folder")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()

    from deephash import runs
    from deephash.runs.data import model_input_shape
    from deephash.serve.encoder import TorchEncoder

    model, config = runs.load_run(args.run, device="cpu")
    shape = model_input_shape(config, args.run)
    images = np.random.default_rng(0).integers(0, 256, (args.batch, *shape), dtype=np.uint8)
    for name, trace in (("eager", False), ("traced", True)):
        encoder = TorchEncoder(model.eval(), shape, trace=trace)
        alone = rate(lambda: encoder.encode(images), args.seconds) * args.batch
        busy = beside_busy_thread(lambda: encoder.encode(images), args.seconds) * args.batch
        print(f"model {name}: {alone:,.0f} images/s alone, {busy:,.0f} beside a busy Python thread "
              f"(batches of {args.batch}, torch threads {torch.get_num_threads()})")

    import faiss

    codes = np.random.default_rng(1).integers(0, 256, (60_000, 6), dtype=np.uint8)
    queries = np.random.default_rng(2).integers(0, 256, (8, 6), dtype=np.uint8)
    for width in (6, 8):
        index = faiss.IndexBinaryFlat(8 * width)
        padded = np.zeros((len(codes), width), np.uint8)
        padded[:, :6] = codes
        index.add(padded)
        asked = np.zeros((len(queries), width), np.uint8)
        asked[:, :6] = queries
        per_query = 1000 / (rate(lambda: index.search(asked, 10), args.seconds) * len(queries))
        print(f"FAISS k=10 over 60,000 48-bit codes held as {width} bytes: {per_query:.3f} ms per query (batches of 8)")


if __name__ == "__main__":
    main()
