"""The app the client-pool end-to-end test (``tests/e2e/test_client_pool_e2e.py``) serves.

``wsgi_app`` and ``asgi_app`` are the same routes behind ``graceful.WSGIMiddleware`` and
``graceful.ASGIMiddleware`` on the process-wide lifecycle, each built on first access::

    gunicorn -c python:graceful.gunicorn -k gthread --chdir tests/e2e/apps pool_app:wsgi_app
    python -m uvicorn pool_app:asgi_app --app-dir tests/e2e/apps

Routes:

- ``GET /orders/<id>``: 200 ``order <id>``.
- ``POST /orders`` with body ``id=<id>`` (form-encoded): appends the id as one line to
  ``$POOL_RECORD_DIR/<pid>.ids`` (before answering: an acknowledged id is on disk), then 201.

Every request the app sees (probes and control routes never reach it) appends one line to
``$POOL_RECORD_DIR/<pid>.served``: ``<X-Sent-At> <1 if the node was draining when the request
arrived, else 0> <METHOD> <path>``. ``X-Sent-At`` is the ``time.monotonic()`` at which the
caller's pool handed the request to its connection to this node (``-`` when absent; the test's
adapter stamps it): CLOCK_MONOTONIC is system-wide on Linux, so the test compares it with the
moment its pool took the node out of rotation.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from urllib.parse import parse_qs

import graceful
from graceful._adapters.lazy import lazy_middleware
from graceful._core.types import Environ, Receive, Scope, Send, StartResponse
from graceful.testing import append_line, read_body, serve_lifespan

TEXT = "text/plain; charset=utf-8"


def record(kind: str, line: str) -> None:
    """Append one line to ``$POOL_RECORD_DIR/<pid>.<kind>`` with a single ``write``."""
    append_line(os.path.join(os.environ["POOL_RECORD_DIR"], f"{os.getpid()}.{kind}"), line)


def served(sent_at: str | None, method: str, path: str) -> None:
    """Record a request as it arrives, with whether the node was draining at that moment."""
    draining = 1 if graceful.is_draining() else 0
    record("served", f"{sent_at or '-'} {draining} {method} {path}")


def answer(method: str, path: str, body: bytes) -> tuple[int, bytes]:
    if method == "GET" and path.startswith("/orders/"):
        return 200, f"order {path[len('/orders/') :]}\n".encode()
    if (method, path) == ("POST", "/orders"):
        values = parse_qs(body.decode("utf-8", "replace")).get("id")
        if not values:
            return 400, b"missing id\n"
        record("ids", values[0])  # recorded before the answer: an acknowledged id is on disk
        return 201, f"created {values[0]}\n".encode()
    return 404, b"not found\n"


REASONS = {200: "200 OK", 201: "201 Created", 400: "400 Bad Request", 404: "404 Not Found"}


def wsgi_routes(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    method, path = environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")
    served(environ.get("HTTP_X_SENT_AT"), method, path)
    length = int(environ.get("CONTENT_LENGTH") or 0)
    status, body = answer(method, path, environ["wsgi.input"].read(length) if length else b"")
    start_response(REASONS[status], [("Content-Type", TEXT), ("Content-Length", str(len(body)))])
    return [body]


async def asgi_routes(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        return await serve_lifespan(receive, send)
    if scope["type"] != "http":
        return
    method, path = scope["method"], scope["path"]
    headers = dict(scope["headers"])
    sent_at = headers.get(b"x-sent-at")
    served(None if sent_at is None else sent_at.decode("latin-1"), method, path)
    status, body = answer(method, path, await read_body(receive))
    response_headers = [
        (b"content-type", TEXT.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": response_headers})
    await send({"type": "http.response.body", "body": body})


# -- the apps, built on first access (PEP 562) ---------------------------------------------

__getattr__ = lazy_middleware(
    __name__, wsgi={"wsgi_app": wsgi_routes}, asgi={"asgi_app": asgi_routes}
)
