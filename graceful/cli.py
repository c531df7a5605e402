"""The ``graceful`` command: talk to a node's probe and control routes.

The public face of :mod:`graceful._tools.cli`, where the code lives."""

from __future__ import annotations

from ._tools.cli import (
    EXIT_CODES as EXIT_CODES,
)
from ._tools.cli import (
    main as main,
)

__all__ = [
    "EXIT_CODES",
    "main",
]

if __name__ == "__main__":  # python -m graceful.cli
    import sys

    sys.exit(main())
