"""The ``graceful`` command: talk to a node's probe and control routes.

The public face of :mod:`graceful._tools.cli`:
every name in its ``__all__``.
"""

from __future__ import annotations

from ._tools.cli import *  # noqa: F403
from ._tools.cli import __all__ as __all__

if __name__ == "__main__":  # python -m graceful.cli
    import sys

    sys.exit(main())  # noqa: F405
