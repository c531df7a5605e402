"""Hypercorn: SIGTERM drains instead of stopping at once.

The public face of :mod:`graceful._servers.hypercorn`, where the code lives.
``python -m graceful.hypercorn app:app [Hypercorn's options]`` is Hypercorn's command line with
graceful's stop (:mod:`graceful._servers.hypercorn_cli`)."""

from __future__ import annotations

from ._servers.hypercorn import RunnerError as RunnerError
from ._servers.hypercorn import WorkerLink as WorkerLink
from ._servers.hypercorn import run as run
from ._servers.hypercorn import serve_worker as serve_worker

__all__ = ["RunnerError", "WorkerLink", "run", "serve_worker"]

if __name__ == "__main__":
    import sys

    from ._servers.hypercorn_cli import main

    sys.exit(main())
