"""``deephash serve INDEX_DIR --run RUN_DIR`` (or ``--model EXPORT_DIR``, without torch): run the
search service with uvicorn.

The main CLI registers the command with :func:`add_serve_parser`; ``python -m deephash.serve``
uses the same arguments.
"""

from __future__ import annotations

import argparse
import gc
import json
import os

from deephash.errors import DeephashError

#: the environment variable through which ``--workers`` hands the settings to each process
SETTINGS_ENV = "DEEPHASH_SERVE_SETTINGS"

#: uvicorn's backstop: past this many connections and requests at once it answers 503 itself
#: (the service sheds earlier, past ``--max-queue`` searches at once, with Retry-After).
CONNECTION_LIMIT = 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the serve arguments to ``parser`` and set ``handler=run_serve``."""
    parser.add_argument("index", help="index directory (from `deephash index build`)")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--run", help="run directory of the model that built the index")
    model.add_argument("--model", help="that model exported with `deephash export RUN --format onnx --out DIR`: "
                       "queries are encoded by ONNX Runtime and the server never imports torch")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body in MB (default: 10)")
    parser.add_argument("--max-pixels", type=int, default=16_000_000, help="largest uploaded image in pixels (default: 16M)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a request may take (default: 30); a write that has begun runs to its end")
    token = parser.add_mutually_exclusive_group()
    token.add_argument("--token-file", help="enable adds and removes: a file holding the secret token clients send "
                       "as 'Authorization: Bearer <token>' (the index is locked for other writers while serving)")
    token.add_argument("--token-env", metavar="NAME", help="enable adds and removes with the token in environment variable NAME")
    parser.add_argument("--fold-every", type=int, default=1000,
                        help="with writes: fold the journal into a new snapshot after this many changes (default: 1000)")
    parser.add_argument("--max-batch", type=int, default=32,
                        help="most searches encoded and searched together (default: 32; 1: one at a time, no batching)")
    parser.add_argument("--batch-wait-ms", type=float, default=0.0,
                        help="how long a batch waits for more searches after its first one (default: 0: a batch "
                             "takes the searches already waiting when a batch thread is free, as Triton's default)")
    parser.add_argument("--max-queue", type=int, default=128,
                        help="most searches admitted at once (being read, waiting for a batch or in one); beyond "
                             "it a search is answered 503 with Retry-After (default: 128)")
    parser.add_argument("--batch-threads", type=int, default=2,
                        help="threads running batches, one batch each at a time (default: 2: one batch's "
                             "forward pass overlaps another's search)")
    parser.add_argument("--encode-processes", type=int, default=0,
                        help="decode and encode uploads in this many child processes, one thread each, beside the "
                             "HTTP process (default: 0: in its batch threads; see README, 'Under load')")
    parser.add_argument("--workers", type=int, default=1,
                        help="read-only server processes sharing the port (default: 1); each loads the index and the "
                             "model; not with a write token: run one writable server apart")
    parser.add_argument("--reload-s", type=float, default=2.0,
                        help="read-only: seconds between checks for a snapshot folded by a writer (default: 2; 0: never)")
    parser.set_defaults(handler=run_serve)


def read_token(token_file: str | None, token_env: str | None) -> str | None:
    """The write token from a file or an environment variable (never from the command line, which
    other users see in ``ps``); None when neither is given."""
    if token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as handle:
                token = handle.read().strip()
        except OSError as error:
            raise DeephashError(f"cannot read the token file {token_file}: {error.strerror}") from None
        where = f"token file {token_file}"
    elif token_env is not None:
        token = os.environ.get(token_env, "").strip()
        where = f"environment variable {token_env}"
    else:
        return None
    if not token:
        raise DeephashError(f"the {where} is empty or unset")
    return token


def _freeze_loaded_objects() -> None:
    """Move every object alive once the app is built (the model, the index, the imported modules)
    out of the garbage collector's sight (``gc.freeze``): a full collection no longer walks them,
    which stopped the service for tens of milliseconds at a time (the p99 of 16 searches in flight
    fell from 144-166 ms to 33-48 ms, BENCHMARKS "Search service"). Objects made later, per
    request, are collected as before."""
    gc.collect()
    gc.freeze()


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``serve`` subcommand on the main CLI's subparsers."""
    parser = subparsers.add_parser("serve", help="serve an index over HTTP with a search page")
    add_arguments(parser)
    return parser


def run_serve(args: argparse.Namespace) -> int:
    """Load the index and the run, then serve until interrupted; returns the exit status."""
    try:
        import uvicorn

        from deephash.serve.app import create_app
    except ImportError as error:
        extra = "serve-onnx" if args.model else "serve"
        raise DeephashError(f"serving needs FastAPI and uvicorn: pip install 'deephash[{extra}]' ({error})") from None
    token = read_token(args.token_file, args.token_env)
    if args.workers < 1:
        raise DeephashError(f"--workers must be >= 1, got {args.workers}")
    if args.workers > 1 and token:
        raise DeephashError("--workers > 1 serves read-only: writes need one process (run a writable server apart, "
                            "the read-only ones reload its folds)")
    settings = {"index_dir": str(args.index), "run_dir": args.run, "model_dir": args.model, "max_upload_bytes": int(args.max_upload_mb * 1_000_000),
                "max_pixels": args.max_pixels, "request_timeout_s": args.timeout, "fold_every": args.fold_every,
                "max_batch": args.max_batch, "batch_wait_ms": args.batch_wait_ms, "max_queue": args.max_queue,
                "batch_threads": args.batch_threads, "encode_processes": args.encode_processes,
                "reload_s": args.reload_s}
    mode = "adds and removes with the token" if token else "read-only"
    common = {"host": args.host, "port": args.port, "timeout_keep_alive": 5, "timeout_graceful_shutdown": 5,
              "limit_concurrency": CONNECTION_LIMIT, "log_level": "warning"}
    if args.workers > 1:  # uvicorn's supervisor: the children share its socket and build the app themselves
        os.environ[SETTINGS_ENV] = json.dumps(settings)
        print(f"serving {args.index} on http://{args.host}:{args.port}/ ({mode}, {args.workers} processes)", flush=True)
        uvicorn.run("deephash.serve.cli:app_from_environment", factory=True, workers=args.workers, **common)
        return 0
    app = create_app(**settings, write_token=token)
    _freeze_loaded_objects()
    print(f"serving {args.index} on http://{args.host}:{args.port}/ ({mode})", flush=True)
    uvicorn.run(app, **common)
    return 0


def app_from_environment() -> object:
    """A read-only app from the settings in ``$DEEPHASH_SERVE_SETTINGS`` (each ``--workers`` process)."""
    from deephash.serve.app import create_app

    app = create_app(**json.loads(os.environ[SETTINGS_ENV]))
    _freeze_loaded_objects()
    return app
