"""An app whose code changes between restarts, for the in-place restart tests
(``tests/e2e/test_reload_e2e.py``)::

    RELOAD_VERSION_FILE=v LEDGER_DIR=d gunicorn -c python:graceful.gunicorn --pid p reload_app:app

Its version is read from ``$RELOAD_VERSION_FILE`` when it is imported (new code, as a deploy
brings); a version ``broken`` fails the import, as a bad deploy would.

- ``GET /version``: 200, the version.
- ``POST /orders`` with the form body ``id=<id>``: appends the id to ``$LEDGER_DIR/<pid>.ran``
  first (the ledger is what the app ran), then 201.
- ``GET /ping``: 200 ``pong``.

``app`` is WSGI (sync and gthread workers), ``asgi_app`` ASGI (uvicorn workers).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import parse_qs

import graceful
from graceful._core.types import Environ, Receive, Scope, Send, StartResponse
from graceful.testing import append_line

VERSION = Path(os.environ["RELOAD_VERSION_FILE"]).read_text().strip()
if VERSION == "broken":
    raise RuntimeError("this deploy is broken on purpose (reload_app: version 'broken')")


def _answer(method: str, path: str, body: bytes) -> tuple[int, bytes]:
    if (method, path) == ("GET", "/version"):
        return 200, VERSION.encode()
    if (method, path) == ("GET", "/ping"):
        return 200, b"pong"
    if (method, path) == ("POST", "/orders"):
        order = (parse_qs(body.decode("utf-8", "replace")).get("id") or [""])[0]
        if not order:
            return 400, b"missing id\n"
        append_line(os.path.join(os.environ["LEDGER_DIR"], f"{os.getpid()}.ran"), order)
        return 201, f"created {order}\n".encode()
    return 404, b"not found\n"


def routes(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    status, text = _answer(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), body)
    start_response(
        f"{status} {'OK' if status < 300 else 'Error'}",
        [("Content-Type", "text/plain"), ("Content-Length", str(len(text)))],
    )
    return [text]


async def asgi_routes(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    status, text = _answer(scope["method"], scope["path"], body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(text))],
        }
    )
    await send({"type": "http.response.body", "body": text})


app = graceful.WSGIMiddleware(routes)
asgi_app = graceful.ASGIMiddleware(asgi_routes)
