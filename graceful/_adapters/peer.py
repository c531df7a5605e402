"""Whether a WSGI stream's client has gone, from its socket, without reading what it sent."""

from __future__ import annotations

import select
import socket
from typing import Any

__all__ = ["peer_closed"]


def peer_closed(sock: Any) -> bool:
    """Whether the client on ``sock`` has gone (closed or reset), without blocking and without
    consuming anything it sent (a peek). An unusable socket counts as gone."""
    try:
        fd = sock.fileno()
    except (OSError, ValueError):
        return True
    if fd < 0:
        return True
    try:
        readable, broken = _poll_now(fd)
    except (OSError, ValueError):
        return True
    if broken:
        return True
    if not readable:
        return False
    # Readable: either bytes the client sent (left for the server) or the end of the stream.
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | _DONTWAIT) == b"")
    except (BlockingIOError, InterruptedError):
        return False
    except ValueError:
        return False  # a TLS socket cannot peek: the next write (heartbeat) will tell
    except OSError:
        return True  # reset


_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_BROKEN = (
    getattr(select, "POLLERR", 0)
    | getattr(select, "POLLHUP", 0)
    | getattr(select, "POLLNVAL", 0)
    | getattr(select, "POLLRDHUP", 0)  # Linux: the client closed its end
)


def _poll_now(fd: int) -> tuple[bool, bool]:
    """``(readable, broken)`` for ``fd``, at once (``select.select`` would refuse fd > 1023)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN | _BROKEN)
        events = poller.poll(0)
        mask = events[0][1] if events else 0
        return bool(mask & select.POLLIN), bool(mask & _BROKEN)
    readable, _, broken = select.select([fd], [], [fd], 0)
    return bool(readable), bool(broken)
