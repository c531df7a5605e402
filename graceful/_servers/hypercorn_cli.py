"""``python -m graceful.hypercorn``: Hypercorn's own command line, served by
:func:`graceful._servers.hypercorn.run` instead of Hypercorn's ``run``.

Every option is Hypercorn's (``--help`` lists them): ``hypercorn app:app --workers 4``
becomes ``python -m graceful.hypercorn app:app --workers 4``, and SIGTERM drains.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from . import compat
from .hypercorn import RunnerError, run

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse Hypercorn's options from ``argv`` (the command line when None) and serve; the
    exit status (2 for a setting the runner cannot honour)."""
    args = list(sys.argv[1:] if argv is None else argv)
    sys.argv[0] = "python -m graceful.hypercorn"  # argparse's prog, in usage and errors
    with compat.hypercorn_command_running(run) as command:
        try:
            return command(args)
        except RunnerError as exc:
            print(f"graceful.hypercorn: {exc}", file=sys.stderr)
            return 2
