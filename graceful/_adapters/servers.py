"""What the adapters need of the server they run under, without importing any server (the
servers sit above the adapters): the server layer plugs its functions in here when the
package is imported (see :mod:`graceful._servers`). Until then, and outside those servers,
each is a no-op.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .._core.types import Send
from .._runtime.lifecycle import Lifecycle

__all__ = ["HOOKS", "LoopServer", "ServerHooks"]


class LoopServer(Protocol):
    """The server running an event loop, as the ASGI middleware sees it (a uvicorn link)."""

    def uninstall(self) -> None:
        """Give the server its own signal handlers back."""


def _ignore(lifecycle: Lifecycle) -> None:
    return None


def _no_server(lifecycle: Lifecycle) -> LoopServer | None:
    return None


def _cannot_close(send: Send, code: int, reason: str) -> bool:
    return False


@dataclass
class ServerHooks:
    #: Link a middleware's lifecycle to its node (gunicorn's workers), now or at the fork.
    link_node: Callable[[Lifecycle], None] = _ignore
    #: Take on the node's drain state at once (before answering a probe).
    sync_node: Callable[[Lifecycle], None] = _ignore
    #: On a new event loop: link the server running it (so that SIGTERM drains), or None.
    find_loop_server: Callable[[Lifecycle], LoopServer | None] = _no_server
    #: Close a websocket whose server refused ``websocket.close`` with ``code`` (Daphne's
    #: autobahn allows only 1000 and 3000-4999) the server's own way; whether it could.
    close_websocket: Callable[[Send, int, str], bool] = _cannot_close


HOOKS = ServerHooks()
