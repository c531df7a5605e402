"""Daphne started from Python after graceful was imported (``python daphne_embedded.py PORT``):
the middleware links to the reactor at its first request rather than through graceful's import.
"""

from __future__ import annotations

import sys

import load_app  # the app, and graceful, first

from graceful import ASGIMiddleware


def main(port: int) -> None:
    from daphne.server import Server  # installs Twisted's asyncio reactor

    app = load_app.asgi_app
    if not isinstance(app, ASGIMiddleware):
        raise TypeError(f"load_app.asgi_app should be graceful's middleware, not {app!r}")
    Server(app, endpoints=[f"tcp:port={port}:interface=127.0.0.1"]).run()


if __name__ == "__main__":
    main(int(sys.argv[1]))
