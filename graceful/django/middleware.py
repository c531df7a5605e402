"""``graceful.django.middleware.GracefulMiddleware``: probes and counting from ``MIDDLEWARE``.

Put it first in ``MIDDLEWARE``: it answers ``/livez``, ``/readyz`` and the control routes before
any other middleware runs, so ``SECURE_SSL_REDIRECT``, ``ALLOWED_HOSTS`` or ``APPEND_SLASH``
cannot turn a failing probe into a redirect or a 400 (which a kubelet reads as healthy). Other
requests are counted in flight until Django closes the response (the WSGI server's ``close()``).

Behind :func:`graceful.django.get_wsgi_application` or ``get_asgi_application`` (which answer
probes and count outside Django) it steps aside. Under ASGI use ``get_asgi_application``: only
it counts a request whose client went away, and links uvicorn's SIGTERM to the drain.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase

from .._adapters.wsgi import WSGIMiddleware
from .._core.errors import GracefulError
from .._core.protocol import REJECTED_HEADER
from .._core.types import Environ, ExcInfo, StartResponse
from ._entry import COUNTED
from ._settings import get_config

__all__ = ["GracefulMiddleware"]

_CALL = "graceful.django.call"


class _Call:
    """One request on its way through the WSGI middleware: what Django and graceful answered."""

    __slots__ = ("get_response", "headers", "request", "response", "status")

    def __init__(
        self, request: HttpRequest, get_response: Callable[[HttpRequest], HttpResponseBase]
    ) -> None:
        self.request = request
        self.get_response = get_response
        self.response: HttpResponseBase | None = None
        self.status = "200 OK"
        self.headers: list[tuple[str, str]] = []

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        self.status, self.headers = status, headers
        return _no_write


class WriteNotSupported(GracefulError, RuntimeError):
    """A WSGI ``write()`` call: Django's responses are returned, never written."""


def _no_write(data: bytes) -> object:
    raise WriteNotSupported(
        "graceful.django: write() is not supported; return the response instead"
    )


def _django(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """The app behind the WSGI middleware: the rest of Django's middleware chain and the view."""
    call: _Call = environ[_CALL]
    call.response = call.get_response(call.request)
    start_response("200 OK", [])  # only to collect the headers graceful adds (Graceful-State)
    return []


class GracefulMiddleware:
    """Answer probes first and count requests; see the module's documentation."""

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response
        self.graceful = WSGIMiddleware(_django, config=get_config())
        self.lifecycle = self.graceful.lifecycle

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        scope = getattr(request, "scope", None)
        if request.META.get(COUNTED) or (scope is not None and scope.get(COUNTED)):
            return self.get_response(request)  # the entry point did it all already
        call = _Call(request, self.get_response)
        environ = {**request.META, "PATH_INFO": request.path_info, _CALL: call}
        result = self.graceful(environ, call.start_response)
        close: Callable[[], None] = getattr(result, "close", _nothing)
        response = call.response
        if response is not None:  # Django answered: graceful counts it until Django closes it
            if response.status_code == 503 and REJECTED_HEADER in response:
                del response[REJECTED_HEADER]  # only graceful's own rejection carries the mark
            for name, value in call.headers:
                response[name] = value
            _closers(response).append(close)
            return response
        return _graceful_response(call, result, close)


def _nothing() -> None:
    pass


def _closers(response: HttpResponseBase) -> list[Callable[[], Any]]:
    # Called by HttpResponseBase.close(), which the server calls (PEP 3333); stable since 3.0.
    closers: list[Callable[[], Any]] = response._resource_closers  # type: ignore[attr-defined]
    return closers


def _graceful_response(
    call: _Call, result: Iterable[bytes], close: Callable[[], None]
) -> HttpResponseBase:
    """A probe or control route's answer as a Django response."""
    status = int(call.status.split(" ", 1)[0])
    headers = dict(call.headers)
    response: HttpResponseBase
    if headers.get("Content-Type", "").startswith("text/event-stream"):
        response = StreamingHttpResponse(result, status=status)  # closes ``result`` itself
    else:
        try:
            response = HttpResponse(b"".join(result), status=status)
        finally:
            close()
    for name, value in headers.items():
        response[name] = value
    return response
