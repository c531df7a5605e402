"""uvicorn: SIGTERM drains instead of stopping at once.

The public face of :mod:`graceful._servers.uvicorn`, where the code lives."""

from __future__ import annotations

from ._servers.uvicorn import (
    Server as Server,
)
from ._servers.uvicorn import (
    ServerLink as ServerLink,
)
from ._servers.uvicorn import (
    attach as attach,
)
from ._servers.uvicorn import (
    run as run,
)

__all__ = [
    "Server",
    "ServerLink",
    "attach",
    "run",
]
