"""``python -m deephash.serve INDEX_DIR (--run RUN_DIR | --model EXPORT_DIR) [--host] [--port]``: the search service."""

import argparse
import sys

from deephash.errors import DeephashError
from deephash.serve.cli import add_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deephash.serve", description="serve an index over HTTP")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (DeephashError, OSError) as error:
        print(f"deephash serve: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
