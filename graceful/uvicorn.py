"""uvicorn: SIGTERM drains instead of stopping at once.

The public face of :mod:`graceful._servers.uvicorn`, where the code lives.
``python -m graceful.uvicorn app:app [uvicorn's options]`` is uvicorn's command line with
graceful's stop (:mod:`graceful._servers.uvicorn_cli`)."""

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


if __name__ == "__main__":
    from ._servers.uvicorn_cli import main

    main()
