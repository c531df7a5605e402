"""systemd socket activation: the listening sockets a process inherits (``LISTEN_FDS``).

Under a ``.socket`` unit systemd binds the socket and keeps it across restarts of the service:
it passes its copies to the service's process as descriptors 3, 4, ... and says how many in
``LISTEN_FDS``, for the process whose pid is ``LISTEN_PID`` (sd_listen_fds(3)). Connections
that arrive while no process serves the socket (during a restart) wait in its listen queue
and are served by the next process, instead of being refused.

gunicorn reads ``LISTEN_FDS`` itself (its ``--bind`` is then ignored). uvicorn only takes a
descriptor given with ``--fd N``; ``python -m graceful.uvicorn`` reads the environment with
:func:`uvicorn_fd`: one inherited socket is served as if ``--fd 3`` had been given (with
``--workers N`` as well). More than one is refused (:class:`SocketActivationError`): uvicorn
serves one socket, and a socket nobody serves would queue its connections for ever.

Like ``sd_listen_fds(unset_environment=1)``, the variables are removed once read (only when
they are this process's), so that processes started from this one (``--workers``) do not take
the socket again. A socket that systemd holds is never closed for good or filtered by this
process's stop: see :func:`graceful._servers.compat.own_listeners`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

from .._core.errors import GracefulError

__all__ = [
    "SD_LISTEN_FDS_START",
    "SocketActivationError",
    "listen_fds",
    "take_listener",
    "uvicorn_fd",
]

#: The first inherited descriptor (``SD_LISTEN_FDS_START`` of ``sd-daemon.h``).
SD_LISTEN_FDS_START = 3

#: The variables systemd sets for the activated process.
VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class SocketActivationError(GracefulError, ValueError):
    """Inherited sockets that cannot be served as given; the message says what to change."""


def _number(environ: MutableMapping[str, str], name: str) -> int:
    text = environ[name]
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise SocketActivationError(f"{name}={text!r}: not a count (systemd sets a number)")
    return value


def listen_fds(environ: MutableMapping[str, str], pid: int) -> list[int]:
    """The descriptors systemd passed to the process ``pid`` (3, 4, ...): none unless
    ``LISTEN_PID`` is ``pid`` and ``LISTEN_FDS`` is set. When they are ``pid``'s,
    ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` are removed from ``environ``
    (``sd_listen_fds(1)``); variables meant for another process are left as they are."""
    if "LISTEN_PID" not in environ or "LISTEN_FDS" not in environ:
        return []
    if _number(environ, "LISTEN_PID") != pid:
        return []  # set for another process (this one's parent, say): not ours to take
    count = _number(environ, "LISTEN_FDS")
    for name in VARIABLES:
        environ.pop(name, None)
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))


def uvicorn_fd(
    environ: MutableMapping[str, str], pid: int, *, fd: int | None, uds: str | None
) -> int | None:
    """The descriptor uvicorn should serve (its ``--fd``): the inherited socket under socket
    activation, else ``fd`` as given. ``--host``/``--port`` give way to the inherited socket
    (as gunicorn's ``--bind`` does); ``--fd 3`` names it and is fine; another ``--fd``,
    ``--uds`` or more than one inherited socket raise :class:`SocketActivationError`."""
    fds = listen_fds(environ, pid)
    if not fds:
        return fd
    if len(fds) > 1:
        raise SocketActivationError(
            f"LISTEN_FDS={len(fds)}: systemd passed {len(fds)} sockets, and uvicorn serves one;"
            " give the .socket unit a single ListenStream= line"
        )
    [inherited] = fds
    if uds is not None or (fd is not None and fd != inherited):
        given = f"--uds {uds}" if uds is not None else f"--fd {fd}"
        raise SocketActivationError(
            f"{given} and LISTEN_FDS=1 (systemd socket activation, the socket is fd"
            f" {inherited}): drop {given.split()[0]}, the inherited socket is served"
        )
    return inherited


def take_listener(fd: int) -> None:
    """Ready the inherited listening socket ``fd`` for uvicorn.

    - close-on-exec, as ``sd_listen_fds`` leaves it: programs the app runs do not hold it;
    - ``TCP_NODELAY`` on a TCP socket: uvicorn wraps ``--fd`` in a Python socket of family
      ``AF_UNIX`` whatever it is, so asyncio does not set ``TCP_NODELAY`` on the connections
      it accepts, and each response then waits for the client's delayed ACK (about 40 ms per
      request on a keep-alive connection). Set on the listener, Linux passes it on to every
      connection accepted from it. (Setting it changes systemd's socket for the processes
      after this one too: the same setting, which ``NoDelay=true`` in the unit also gives.)
    """
    os.set_inheritable(fd, False)
    with socket.socket(fileno=os.dup(fd)) as sock:  # the duplicate only is closed
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
