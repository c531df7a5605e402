"""The small app the nodes of ``graceful demo`` serve, as WSGI and as ASGI, with and without
the library.

- ``wsgi_plain`` / ``asgi_plain``: the routes alone (a node without the library);
- ``wsgi_app`` / ``asgi_app``: the same routes behind :class:`graceful.WSGIMiddleware` /
  :class:`graceful.ASGIMiddleware` (built on first access, so serving one never touches the
  other)::

    uvicorn graceful._tools.demo_app:asgi_app
    gunicorn -c python:graceful.gunicorn graceful._tools.demo_app:wsgi_app

Routes: ``GET /items/<id>`` answers 200 with a small JSON body; ``POST /items`` with a body
``id=<id>`` answers 201. Each takes a few milliseconds (:data:`WORK`), so that requests are in
flight when a node is stopped.

With ``DEMO_LEDGER_DIR`` set (the tests do), every POST's id is written to ``<pid>.ran`` there
before its 201, one line each: which POSTs ran, and how often.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterable
from urllib.parse import parse_qs

from .._adapters.lazy import lazy_middleware
from .._core.types import Environ, Receive, Scope, Send, StartResponse
from ..testing import serve_lifespan

#: Seconds of "work" per request (a sleep: the work IS the behaviour being drained).
WORK = 0.005
JSON = "application/json"


#: Where the POSTs' ids go (``DEMO_LEDGER_DIR``); None: nowhere.
LEDGER_DIR = os.environ.get("DEMO_LEDGER_DIR") or None


def _record(item: str) -> None:
    if LEDGER_DIR is None:
        return
    line = (item.replace("\n", " ") + "\n").encode()
    fd = os.open(
        os.path.join(LEDGER_DIR, f"{os.getpid()}.ran"), os.O_WRONLY | os.O_APPEND | os.O_CREAT
    )
    try:
        os.write(fd, line)  # one write of one line: whole, beside other threads' lines
    finally:
        os.close(fd)


def _answer(method: str, path: str, body: bytes) -> tuple[int, bytes]:
    if method == "GET" and path.startswith("/items/"):
        item = path[len("/items/") :]
        return 200, json.dumps({"id": item, "pid": os.getpid()}).encode()
    if method == "POST" and path == "/items":
        ids = parse_qs(body.decode("utf-8", "replace")).get("id")
        if not ids:
            return 400, b'{"error": "missing id"}'
        _record(ids[0])
        return 201, json.dumps({"created": ids[0], "pid": os.getpid()}).encode()
    return 404, b'{"error": "not found"}'


_REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 404: "Not Found"}


def wsgi_plain(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    time.sleep(WORK)  # the request's work
    status, payload = _answer(environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", ""), body)
    start_response(
        f"{status} {_REASONS[status]}",
        [("Content-Type", JSON), ("Content-Length", str(len(payload)))],
    )
    return [payload]


async def asgi_plain(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        return await serve_lifespan(receive, send)
    if scope["type"] != "http":
        return
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    await asyncio.sleep(WORK)  # the request's work
    status, payload = _answer(scope["method"], scope["path"], b"".join(chunks))
    headers = [(b"content-type", JSON.encode()), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


__getattr__ = lazy_middleware(
    __name__, wsgi={"wsgi_app": wsgi_plain}, asgi={"asgi_app": asgi_plain}
)
