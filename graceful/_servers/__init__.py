"""The server shims (gunicorn, uvicorn, Hypercorn, Granian, Daphne) and what they share.

Importing this package plugs them into the adapters (:data:`graceful._adapters.servers.HOOKS`),
which cannot import a server themselves: the package root does it.
"""

from __future__ import annotations

import sys

from .._adapters.servers import HOOKS, LoopServer
from .._core.types import Send
from .._runtime.lifecycle import Lifecycle
from . import node_shm as _node_shm
from . import served as _served


def _find_loop_server(lifecycle: Lifecycle) -> LoopServer | None:
    # A server's module is in sys.modules only when it may be the one running.
    if "uvicorn.server" in sys.modules:
        from . import uvicorn

        found: LoopServer | None = uvicorn.attach(lifecycle)
        if found is not None:
            return found
    if "granian" in sys.modules:
        from . import granian

        found = granian.attach(lifecycle)
        if found is not None:
            return found
    if "daphne.server" in sys.modules:
        from . import daphne

        found = daphne.attach(lifecycle)
        if found is not None:
            return found
    if "hypercorn.asyncio.run" in sys.modules:
        from . import hypercorn

        return hypercorn.attach(lifecycle)
    return None


def _close_websocket(send: Send, code: int, reason: str) -> bool:
    if "daphne.server" in sys.modules:
        from . import daphne

        return daphne.close_websocket(send, code, reason)
    return False


def _wrap_granian() -> None:
    """In a Granian worker (which loads the app, and graceful, before it installs its signal
    handlers), put graceful's stop in front of Granian's."""
    if "granian.server" in sys.modules:
        from . import granian

        granian.wrap_signal_installers()


def _link_daphne() -> None:
    """In a Daphne process (which imports the app, and graceful, before its reactor runs and
    installs its signal handlers), take the stop signals over once the reactor runs."""
    if "daphne.server" in sys.modules:
        from . import daphne

        daphne.link_when_running()


def _link_node(lifecycle: Lifecycle) -> None:
    """Every middleware, as it is built: noted (see :mod:`.served`), linked to its node."""
    _served.note(lifecycle)
    _node_shm.link_if_worker(lifecycle)


HOOKS.link_node = _link_node
HOOKS.sync_node = _node_shm.sync_now
HOOKS.find_loop_server = _find_loop_server
HOOKS.close_websocket = _close_websocket
_wrap_granian()
_link_daphne()
