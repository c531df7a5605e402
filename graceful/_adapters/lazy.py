"""Apps behind graceful's middleware, built only when a server first asks for them.

For modules that serve both a plain app and the same app behind the middleware (examples,
benchmarks, test apps): importing the module for the plain one must not create the
middleware, or its process-wide lifecycle::

    __getattr__ = lazy_middleware(__name__, wsgi={"wsgi_app": routes}, asgi={"asgi_app": app})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .._core.types import ASGIApp, WSGIApp

__all__ = ["lazy_middleware"]


def lazy_middleware(
    module: str,
    *,
    wsgi: Mapping[str, WSGIApp] | None = None,
    asgi: Mapping[str, ASGIApp] | None = None,
) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) that wraps each named app on first access, once."""
    built: dict[str, Any] = {}
    wsgi, asgi = dict(wsgi or {}), dict(asgi or {})

    def __getattr__(name: str) -> Any:
        if name not in built:
            from .asgi import ASGIMiddleware
            from .wsgi import WSGIMiddleware

            if name in wsgi:
                built[name] = WSGIMiddleware(wsgi[name])
            elif name in asgi:
                built[name] = ASGIMiddleware(asgi[name])
            else:
                raise AttributeError(f"module {module!r} has no attribute {name!r}")
        return built[name]

    return __getattr__
