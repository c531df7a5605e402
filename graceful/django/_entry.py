"""Drop-in replacements for Django's ``get_wsgi_application`` / ``get_asgi_application``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .._adapters.asgi import ASGIMiddleware
from .._adapters.wsgi import WSGIMiddleware
from .._core.types import Environ, Receive, Scope, Send, StartResponse
from ._settings import get_config

__all__ = ["COUNTED", "get_asgi_application", "get_wsgi_application", "is_wrapped"]

#: Set in the WSGI environ / ASGI scope by the wrapped entry points: the request is counted and
#: probes are answered outside Django, so the probe middleware steps aside.
COUNTED = "graceful.counted"


def get_wsgi_application() -> WSGIMiddleware:
    """Django's WSGI handler behind :class:`graceful.WSGIMiddleware` (the default lifecycle)."""
    from django.core.wsgi import get_wsgi_application as django_wsgi

    handler = django_wsgi()

    def counted(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        environ[COUNTED] = True
        return handler(environ, start_response)

    return WSGIMiddleware(counted, config=get_config())


def get_asgi_application() -> ASGIMiddleware:
    """Django's ASGI handler behind :class:`graceful.ASGIMiddleware` (the default lifecycle).

    Django rejects lifespan, so the node turns ready, and under uvicorn SIGTERM is linked to
    the drain, at the first request (a probe counts).
    """
    from django.core.asgi import get_asgi_application as django_asgi

    handler: Any = django_asgi()  # its stubs want a dict scope; any ASGI scope does

    async def counted(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, COUNTED: True}
        await handler(scope, receive, send)

    return ASGIMiddleware(counted, config=get_config())


def is_wrapped(app: Any) -> bool:
    """Whether graceful's middleware is ``app`` or wrapped by it (a few ``.app`` levels deep)."""
    for _ in range(8):
        if isinstance(app, (WSGIMiddleware, ASGIMiddleware)):
            return True
        inner = getattr(app, "app", None) or getattr(app, "application", None)
        if inner is None or inner is app:
            return False
        app = inner
    return False
