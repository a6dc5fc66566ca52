"""``python -m deephash``: the command line."""

import sys

from deephash.cli import main

sys.exit(main())
