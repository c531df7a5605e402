"""WSGI middleware: probes and control routes before the app, and in-flight counting (PEP 3333).

The public face of :mod:`graceful._adapters.wsgi`, where the code lives."""

from __future__ import annotations

from ._adapters.wsgi import (
    WSGIMiddleware as WSGIMiddleware,
)

__all__ = [
    "WSGIMiddleware",
]
