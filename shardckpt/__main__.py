"""``python -m shardckpt``: the same command line as the ``shardckpt`` console script."""

import sys

from .cli import main

sys.exit(main())
