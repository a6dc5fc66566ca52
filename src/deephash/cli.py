"""The ``deephash`` command line: a thin shell over :mod:`deephash.runs`.

Each subcommand is one ``_add_<name>(subparsers)`` function that registers its arguments and sets
``handler``; adding a command is adding one such function to ``_COMMANDS``. A user mistake
(:class:`~deephash.errors.DeephashError`, a missing or unreadable file, bad TOML) prints one line
``deephash: error: <message>`` to stderr and exits with status 2; any other exception prints one
``deephash: internal error: ...`` line asking for a report and exits with status 1; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from deephash.errors import failure_line

_NO_LABELS_HELP = "--images: every image under the folder at any depth, unlabelled (sub-folders are not classes)"
_NPROC_HELP = "processes on this machine (DDP: gloo on CPU, nccl on GPUs); under torchrun leave it at 1"


def _cmd_train(args: argparse.Namespace) -> int:
    from deephash.config import load_config

    source = Path(args.config)
    if source.is_dir() and (source / "config.toml").is_file():  # `deephash train RUN_DIR --resume`
        out = Path(args.out) if args.out else source
        source = source / "config.toml"
    else:
        out = None
    config = load_config(source, args.set)
    if out is None:
        out = Path(args.out) if args.out else Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    from deephash.runs import train_run
    from deephash.train.distributed import backend_for, launch

    run_dir = launch(train_run, args.nproc, (config, out), {"resume": args.resume, "progress": not args.quiet},
                     backend=backend_for(config.device), result=out)
    if run_dir is not None:  # None on the other ranks under torchrun
        print(f"run written to {run_dir}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model as a config says; writes a run directory")
    p.add_argument("config", help="CONFIG.toml, a shipped config name (e.g. fashion-mnist-48; `deephash configs` lists them), or a run directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, the value read as a TOML literal (repeatable)")
    p.add_argument("--out", help="run directory (default: runs/<name>-<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=int, default=1, help=_NPROC_HELP)
    p.set_defaults(handler=_cmd_train)


def _cmd_encode(args: argparse.Namespace) -> int:
    from deephash.runs import encode_run
    from deephash.train.distributed import launch

    out = launch(encode_run, args.nproc, (args.run,),
                 {"split": args.split, "images": args.images, "out": args.out,
                  "labelled": False if args.no_labels else None}, result=Path(args.out))
    if out is not None:  # None on the other ranks under torchrun
        print(f"codes written to {out}")
    return 0


def _add_encode(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encode", help="encode a split or an image folder into a code file (.npz)")
    p.add_argument("run", help="run directory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--split", help="a split of the run's data set (test, train; query/database under a protocol)")
    source.add_argument("--images", help="a folder of images: one sub-folder per class, or unlabelled (a flat folder)")
    p.add_argument("--out", required=True, help="the .npz file to write")
    p.add_argument("--no-labels", action="store_true", help=_NO_LABELS_HELP)
    p.add_argument("--nproc", type=int, default=1, help=_NPROC_HELP)
    p.set_defaults(handler=_cmd_encode)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from deephash.runs import evaluate_run, format_metrics

    metrics = evaluate_run(args.run, query=args.query, database=args.database, ks=args.k,
                           near_duplicates=args.near_duplicates)
    print(format_metrics(metrics))
    print(f"metrics written to {Path(args.run) / 'metrics.json'}")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="retrieval metrics of a run; writes RUN_DIR/metrics.json")
    p.add_argument("run", help="run directory")
    p.add_argument("--query", help="query split (default: the config's data.query_split)")
    p.add_argument("--database", help="database split (default: the config's data.database_split)")
    p.add_argument("--k", type=int, nargs="+", help="cut-offs for mAP@k and P@k (default: the config's eval.ks)")
    p.add_argument("--near-duplicates", type=int, metavar="N",
                   help="also search N perturbed database images for their originals (default: the config's "
                        "eval.near_duplicates.n; its other keys set the perturbations)")
    p.set_defaults(handler=_cmd_evaluate)


def _cmd_index_build(args: argparse.Namespace) -> int:
    from deephash.runs import build_index
    from deephash.train.distributed import launch

    out = launch(build_index, args.nproc, (args.run,),
                 {"split": args.split, "images": args.images, "out": args.out, "factory": args.factory,
                  "labelled": False if args.no_labels else None, "progress": not args.quiet},
                 result=Path(args.out))
    if out is not None:  # None on the other ranks under torchrun
        print(f"index written to {out}")
    return 0


def _cmd_index_info(args: argparse.Namespace) -> int:
    from deephash.runs.index_updates import index_status

    info = index_status(args.index)
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _cmd_index_add(args: argparse.Namespace) -> int:
    from deephash.runs.index_updates import add_items, parse_ids

    ids = parse_ids(args.ids) if args.ids else None
    added = add_items(args.index, args.run, images=args.images, split=args.split, codes=args.codes, ids=ids,
                      new_ids=args.new_ids)
    print(f"added {len(added)} items to {args.index} (ids {int(added.min())} .. {int(added.max())})")
    return 0


def _cmd_index_remove(args: argparse.Namespace) -> int:
    from deephash.runs.index_updates import parse_ids, remove_items

    removed = remove_items(args.index, parse_ids(args.ids, args.ids_file))
    print(f"removed {len(removed)} items from {args.index}")
    return 0


def _add_index(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="build, change or inspect a Hamming index")
    isub = p.add_subparsers(dest="index_command", metavar="{build,add,remove,info}", required=True)
    b = isub.add_parser("build", help="encode a split or an image folder and index the codes")
    b.add_argument("run", help="run directory")
    source = b.add_mutually_exclusive_group(required=True)
    source.add_argument("--split", help="a split of the run's data set")
    source.add_argument("--images", help="a folder of images: one sub-folder per class, or unlabelled (a flat folder)")
    b.add_argument("--out", required=True, help="index directory to write")
    b.add_argument("--factory", default="BFlat", help="FAISS binary index factory string (default: BFlat, exact)")
    b.add_argument("--no-labels", action="store_true", help=_NO_LABELS_HELP)
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument("--nproc", type=int, default=1, help=_NPROC_HELP)
    b.set_defaults(handler=_cmd_index_build)
    a = isub.add_parser("add", help="add images, a split or a code file to an index (all or nothing)")
    a.add_argument("index", help="index directory")
    a.add_argument("--run", help="run directory of the model that built the index (needed for --images and --split)")
    source = a.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="a folder of images: one sub-folder per class, or unlabelled (a flat folder)")
    source.add_argument("--split", help="a split of the run's data set")
    source.add_argument("--codes", help="a code file (.npz, from `deephash encode`); its ids are used")
    a.add_argument("--ids", nargs="+", metavar="ID", help="ids for the new items (default: from the index's next_id: ids never handed out before)")
    a.add_argument("--new-ids", action="store_true", help="ignore the code file's ids; number them from the index's next_id")
    a.set_defaults(handler=_cmd_index_add)
    r = isub.add_parser("remove", help="remove items by id (all or nothing)")
    r.add_argument("index", help="index directory")
    r.add_argument("ids", nargs="*", metavar="ID", help="ids to remove")
    r.add_argument("--ids-file", help="a file of ids (whitespace- or comma-separated)")
    r.set_defaults(handler=_cmd_index_remove)
    i = isub.add_parser("info", help="describe an index directory: count, id range, last change, source")
    i.add_argument("index", help="index directory")
    i.set_defaults(handler=_cmd_index_info)


def _cmd_search(args: argparse.Namespace) -> int:
    from deephash.retrieval.search import DEFAULT_SHORTLIST
    from deephash.runs import search_run

    k = args.k if args.k is not None else (None if args.radius is not None else 10)
    shortlist = DEFAULT_SHORTLIST if args.shortlist is None else args.shortlist
    results = search_run(args.index, args.run, args.images, k=k, radius=args.radius, shortlist=shortlist)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for result in results:
        known = result.get("class") or result.get("label")
        print(f"query {result['query']}" + (f" ({known})" if known is not None else ""))
        scored = any(hit.get("score") is not None for hit in result["hits"])
        print(f"  {'rank':>4}  {'id':>8}  {'dist':>4}" + (f"  {'score':>8}" if scored else "") + "  label")
        for hit in result["hits"]:
            label = hit["class"] if hit.get("class") is not None else hit.get("label", "")
            path = f"  {hit['path']}" if hit.get("path") else ""
            score = f"  {hit['score']:>8.4f}" if scored else ""
            print(f"  {hit['rank']:>4}  {hit['id']:>8}  {hit['distance']:>4}{score}  {label}{path}")
    return 0


def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="the nearest indexed items to query images")
    p.add_argument("index", help="index directory")
    p.add_argument("--run", required=True, help="run directory of the model that built the index")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, or SPLIT:N for item N of a split of the run's data set (e.g. test:0)")
    p.add_argument("-k", type=int, help="at most this many results per query (default 10; no limit with --radius)")
    p.add_argument("--radius", type=int, help="only items within this Hamming distance (inclusive)")
    p.add_argument("--shortlist", type=int,
                   help="first stage of a two-stage search, when the run keeps re-rank vectors (model.rerank): this "
                        "many nearest codes, ties included, ranked by the vectors (default: the one evaluate "
                        "measures with, deephash.retrieval.search.DEFAULT_SHORTLIST = 1000)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_cmd_search)


def _cmd_report(args: argparse.Namespace) -> int:
    from deephash.report import write_report

    run = Path(args.run)
    if not (run / "config.toml").is_file():
        raise FileNotFoundError(f"{run} is not a run directory (no config.toml)")
    path = write_report(run)
    print(f"report written to {path}")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write RUN_DIR/report.html with its pictures")
    p.add_argument("run", help="run directory")
    p.set_defaults(handler=_cmd_report)


def _cmd_export(args: argparse.Namespace) -> int:
    from deephash.runs.export import export_run

    print(f"exported model written to {export_run(args.run, args.out, args.format)}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a run's encoder as ONNX + JSON, for `deephash serve --model` without torch")
    p.add_argument("run", help="run directory (a hash model)")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format (default: onnx)")
    p.add_argument("--out", required=True, help="folder to write (encoder.onnx, encoder.json)")
    p.set_defaults(handler=_cmd_export)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from deephash.serve.cli import add_serve_parser  # argparse only; FastAPI loads when serving

    add_serve_parser(sub)


def _cmd_configs(args: argparse.Namespace) -> int:
    from deephash.config import shipped_config, shipped_configs

    if args.configs_command == "show":
        sys.stdout.write(shipped_config(args.name).read_text(encoding="utf-8"))
        return 0
    described = shipped_configs()
    width = max(map(len, described))
    for name, description in described.items():
        print(f"{name:<{width}}  {description}")
    return 0


def _add_configs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("configs", help="list the shipped configs (names `deephash train` takes), or print one")
    csub = p.add_subparsers(dest="configs_command", metavar="{show}")
    s = csub.add_parser("show", help="print a shipped config's TOML, to copy and edit (deephash configs show NAME > my.toml)")
    s.add_argument("name", help="a shipped config name, as `deephash configs` lists them")
    p.set_defaults(handler=_cmd_configs)


_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_train, _add_encode, _add_evaluate, _add_index, _add_search, _add_report, _add_export, _add_serve, _add_configs,
]


def _version() -> str:
    from deephash._version import __version__  # the package metadata, without importing torch

    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand of ``_COMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="deephash", description="Learn embeddings and binary hash codes for image retrieval."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("--version", action="version", version=f"deephash {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 usage or data error, 1 internal error,
    130 interrupted). Every error prints one line (``errors.failure_line``); ``--debug`` raises it
    instead, with its traceback."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its one-line usage error
        return int(exc.code or 0)
    try:
        return int(args.handler(args) or 0)
    except BrokenPipeError:  # `deephash search ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("deephash: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every error becomes one line; --debug shows the traceback
        if args.debug:
            raise
        status, line = failure_line(exc)
        print(line, file=sys.stderr)
        return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
