"""``python -m graceful``: the ``graceful`` command."""

import sys

from ._tools.cli import main

sys.exit(main())
