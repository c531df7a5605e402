"""The server shims (gunicorn, uvicorn) and what they share.

Importing this package plugs them into the adapters (:data:`graceful._adapters.servers.HOOKS`),
which cannot import a server themselves: the package root does it.
"""

from __future__ import annotations

import sys

from .._adapters.servers import HOOKS, LoopServer
from .._runtime.lifecycle import Lifecycle
from . import node_shm as _node_shm


def _find_uvicorn(lifecycle: Lifecycle) -> LoopServer | None:
    if "uvicorn.server" not in sys.modules:  # only then can uvicorn be the server
        return None
    from . import uvicorn

    return uvicorn.attach(lifecycle)


HOOKS.link_node = _node_shm.link_if_worker
HOOKS.sync_node = _node_shm.sync_now
HOOKS.find_loop_server = _find_uvicorn
