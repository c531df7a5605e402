"""An app that keeps a ledger of every POST it ran, for the pool's exactly-once test
(``tests/e2e/test_client_exactly_once_e2e.py``), as WSGI and as ASGI::

    gunicorn -c python:graceful.gunicorn --chdir tests/e2e/apps pool_ledger_app:wsgi_app
    uvicorn pool_ledger_app:asgi_app --app-dir tests/e2e/apps

``wsgi_app`` and ``asgi_app`` are the same routes behind ``graceful.WSGIMiddleware`` and
``graceful.ASGIMiddleware``, each built on first access (see ``load_app.py``).
``asgi_app_blocking_at_stop`` is ``asgi_app`` whose event loop is blocked for
``$BLOCK_AT_STOP`` seconds once the node is stopping (a burst of CPU-bound work in an async app,
made to come at that moment): meanwhile the server accepts no connection.

- ``POST /orders`` with the form body ``id=<id>`` (and ``fail=1``, ``forge=1``): appends the id
  as one line to ``$LEDGER_DIR/<pid>.ran`` first (the ledger is what the app ran), then answers
  ``201 created <id>``; with ``fail=1`` while the node drains, the app's own ``503 app: 503
  <id>`` (``Retry-After: 1``) instead, carrying a forged ``Graceful-Rejected: 1`` header with
  ``forge=1`` (the middleware must strip it).
- ``GET /orders/<id>``: ``200 order <id>``.
- ``POST /draining`` (a POST: reject mode serves it): ``200 <pid> yes`` or ``no``, whether
  this process sees the drain yet (a gunicorn worker follows its master's within a poll).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable
from urllib.parse import parse_qs

import graceful
from graceful._adapters.lazy import lazy_middleware
from graceful._core.types import Environ, Receive, Scope, Send, StartResponse
from graceful.testing import append_line, read_body, serve_lifespan

TEXT = "text/plain; charset=utf-8"


def ledger(order: str) -> None:
    """Append one line to ``$LEDGER_DIR/<pid>.ran`` with a single ``write``."""
    append_line(os.path.join(os.environ["LEDGER_DIR"], f"{os.getpid()}.ran"), order)


def answer(method: str, path: str, body: bytes) -> tuple[int, bytes, list[tuple[str, str]]]:
    """Status, body and extra headers for one request."""
    if method == "POST" and path == "/orders":
        form = parse_qs(body.decode("utf-8", "replace"))
        order = (form.get("id") or [""])[0]
        if not order:
            return 400, b"missing id\n", []
        ledger(order)  # the app ran it: whatever it answers, it is in the ledger
        if form.get("fail") == ["1"] and graceful.is_draining():
            extra = [("Retry-After", "1")]
            if form.get("forge") == ["1"]:
                extra.append(("Graceful-Rejected", "1"))
            return 503, f"app: 503 {order}\n".encode(), extra
        return 201, f"created {order}\n".encode(), []
    if method == "POST" and path == "/draining":
        return 200, f"{os.getpid()} {'yes' if graceful.is_draining() else 'no'}\n".encode(), []
    if method == "GET" and path.startswith("/orders/"):
        return 200, f"order {path.removeprefix('/orders/')}\n".encode(), []
    return 404, b"not found\n", []


REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 404: "Not Found", 503: "Unavailable"}


def wsgi_routes(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    status, text, extra = answer(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), body)
    headers = [("Content-Type", TEXT), ("Content-Length", str(len(text))), *extra]
    start_response(f"{status} {REASONS[status]}", headers)
    return [text]


async def asgi_routes(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        return await serve_lifespan(receive, send)
    if scope["type"] != "http":
        return
    status, text, extra = answer(scope["method"], scope["path"], await read_body(receive))
    headers = [(b"content-type", TEXT.encode()), (b"content-length", str(len(text)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": text})


async def asgi_routes_blocking_at_stop(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "lifespan":
        return await asgi_routes(scope, receive, send)
    blocker = asyncio.get_running_loop().create_task(block_at_stop())
    try:
        await serve_lifespan(receive, send)
    finally:
        blocker.cancel()


async def block_at_stop() -> None:
    lifecycle = graceful.get_lifecycle()
    while lifecycle.phase is not graceful.Phase.STOPPING:
        await asyncio.sleep(0.001)
    time.sleep(float(os.environ["BLOCK_AT_STOP"]))  # blocks the event loop: the point


__getattr__ = lazy_middleware(
    __name__,
    wsgi={"wsgi_app": wsgi_routes},
    asgi={"asgi_app": asgi_routes, "asgi_app_blocking_at_stop": asgi_routes_blocking_at_stop},
)
