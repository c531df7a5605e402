"""The server shims (gunicorn, uvicorn, Hypercorn, Granian) and what they share.

Importing this package plugs them into the adapters (:data:`graceful._adapters.servers.HOOKS`),
which cannot import a server themselves: the package root does it.
"""

from __future__ import annotations

import sys

from .._adapters.servers import HOOKS, LoopServer
from .._runtime.lifecycle import Lifecycle
from . import node_shm as _node_shm


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
    if "hypercorn.asyncio.run" in sys.modules:
        from . import hypercorn

        return hypercorn.attach(lifecycle)
    return None


def _wrap_granian() -> None:
    """In a Granian worker (which loads the app, and graceful, before it installs its signal
    handlers), put graceful's stop in front of Granian's."""
    if "granian.server" in sys.modules:
        from . import granian

        granian.wrap_signal_installers()


HOOKS.link_node = _node_shm.link_if_worker
HOOKS.sync_node = _node_shm.sync_now
HOOKS.find_loop_server = _find_loop_server
_wrap_granian()
