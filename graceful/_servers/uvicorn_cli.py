"""``python -m graceful.uvicorn``: uvicorn's own command line, started by
:func:`graceful._servers.uvicorn.run` instead of ``uvicorn.run``.

Every option is uvicorn's (``--help`` lists them), so ``uvicorn app:app --workers 4`` becomes
``python -m graceful.uvicorn app:app --workers 4``. What changes is the stop: one process
serves with :class:`graceful._servers.uvicorn.Server` (SIGTERM drains, without depending on
the middleware finding uvicorn's handler), and ``--workers N`` runs uvicorn's supervisor with
every SIGTERM, SIGINT and SIGQUIT passed on to the workers at once and as it is. uvicorn's own
supervisor looks at signals twice a second and turns SIGINT into SIGTERM, and in a container
only PID 1, the supervisor, is signalled. ``--reload`` runs uvicorn's reloader as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import compat
from .uvicorn import run

__all__ = ["PROG", "main"]

PROG = "python -m graceful.uvicorn"


def main(argv: Sequence[str] | None = None) -> None:
    """Parse uvicorn's options from ``argv`` (the command line when None) and serve; exits as
    uvicorn's command does (status 2 for a bad option, 3 when the server did not start)."""
    with compat.uvicorn_command_running(run) as command:
        command.main(args=None if argv is None else list(argv), prog_name=PROG)
