"""``python -m deephash.serve INDEX_DIR (--run RUN_DIR | --model EXPORT_DIR) [--host] [--port]``: the search service."""

import argparse
import sys

from deephash.errors import failure_line
from deephash.serve.cli import add_arguments


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted; every error is one line (status 2: usage or data, 1: internal),
    its traceback only under ``--debug``."""
    parser = argparse.ArgumentParser(prog="python -m deephash.serve", description="serve an index over HTTP")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # noqa: BLE001 - one line, or the traceback under --debug
        if args.debug:
            raise
        status, line = failure_line(error, "deephash serve")
        print(line, file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
