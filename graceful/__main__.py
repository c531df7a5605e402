"""``python -m graceful``: the ``graceful`` command."""

import sys

from .cli import main

sys.exit(main())
