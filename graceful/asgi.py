"""ASGI middleware (pure ASGI, never ``BaseHTTPMiddleware``).

The public face of :mod:`graceful._adapters.asgi`, where the code lives."""

from __future__ import annotations

from ._adapters.asgi import (
    ASGIMiddleware as ASGIMiddleware,
)

__all__ = [
    "ASGIMiddleware",
]
