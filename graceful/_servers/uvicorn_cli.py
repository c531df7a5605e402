"""``python -m graceful.uvicorn``: uvicorn's own command line, started by
:func:`graceful._servers.uvicorn.run` instead of ``uvicorn.run``.

Every option is uvicorn's (``--help`` lists them), so ``uvicorn app:app --workers 4`` becomes
``python -m graceful.uvicorn app:app --workers 4``. What changes is the stop: one process
serves with :class:`graceful._servers.uvicorn.Server` (SIGTERM drains, without depending on
the middleware finding uvicorn's handler), and ``--workers N`` runs uvicorn's supervisor with
every SIGTERM, SIGINT and SIGQUIT passed on to the workers at once and as it is. uvicorn's own
supervisor looks at signals twice a second and turns SIGINT into SIGTERM, and in a container
only PID 1, the supervisor, is signalled. ``--reload`` runs uvicorn's reloader as it is.

Under systemd socket activation (``LISTEN_FDS``, ``LISTEN_PID`` this process) the inherited
socket is served as if ``--fd 3`` had been given, ``--workers N`` included; ``--host`` and
``--port`` are then ignored (:func:`graceful._servers.socket_activation.uvicorn_fd`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from . import compat, uvicorn_reload
from .socket_activation import SocketActivationError, take_listener, uvicorn_fd
from .uvicorn import run

__all__ = ["PROG", "main"]

PROG = "python -m graceful.uvicorn"


def main(argv: Sequence[str] | None = None) -> None:
    """Parse uvicorn's options from ``argv`` (the command line when None) and serve; exits as
    uvicorn's command does (status 2 for a bad option, 3 when the server did not start)."""
    uvicorn_reload.command_line = list(sys.argv[1:] if argv is None else argv)
    with compat.uvicorn_command_running(_run_inherited) as command:
        command.main(args=None if argv is None else list(argv), prog_name=PROG)


def _run_inherited(app: Any, **options: Any) -> None:
    """:func:`run`, on the socket systemd passed (``LISTEN_FDS``) when there is one: uvicorn
    does not read ``LISTEN_FDS`` itself. The variables are removed first, so that the workers
    of ``--workers N`` do not take the socket again."""
    given = options.get("fd")
    try:
        fd = uvicorn_fd(os.environ, os.getpid(), fd=given, uds=options.get("uds"))
    except SocketActivationError as exc:
        raise click.UsageError(str(exc)) from None  # uvicorn's exit status for a bad option: 2
    # systemd's socket (served as with --fd 3), or the one an in-place restart's new runner
    # inherits; a --fd of the user's own is left as it is.
    if fd is not None and (fd != given or uvicorn_reload.SUCCESSOR_OF in os.environ):
        take_listener(fd)  # close-on-exec, and TCP_NODELAY that uvicorn's --fd misses
        options = {**options, "fd": fd}
    run(app, **options)
