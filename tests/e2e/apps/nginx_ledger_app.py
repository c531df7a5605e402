"""An app that keeps a ledger of every POST it ran, for the exactly-once tests behind nginx
(``tests/e2e/test_nginx_exactly_once.py``)::

    gunicorn -c python:graceful.gunicorn --chdir tests/e2e/apps nginx_ledger_app:app

Routes (behind ``graceful.WSGIMiddleware``):

- ``POST /orders?then=WHAT`` with the form body ``id=<id>``: appends the id as one line to
  ``$LEDGER_DIR/<pid>.ran`` *before anything else* (the ledger is what the app ran), then, by
  ``then``: ``ok`` (default) answers 201; ``503`` answers the app's own 503 (a dependency down,
  say: the work was done, the answer is an error); ``crash`` ends the worker process without an
  answer; ``slow`` answers 201 after ``$LEDGER_SLOW`` seconds (default 3).
- ``GET /ping``: 200 ``pong``.
- ``GET /headers``: 200, JSON of the request headers a proxy sets (``Host``,
  ``X-Forwarded-For``, ``X-Real-IP``, ``X-Forwarded-Proto``, ``X-From-Server``), null when
  absent.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from urllib.parse import parse_qs

import graceful
from graceful._core.types import Environ, StartResponse
from graceful.testing import append_line

HEADERS = ("Host", "X-Forwarded-For", "X-Real-IP", "X-Forwarded-Proto", "X-From-Server")
TEXT = "text/plain; charset=utf-8"


def ledger(order: str) -> None:
    """Append one line to ``$LEDGER_DIR/<pid>.ran`` with a single ``write``."""
    append_line(os.path.join(os.environ["LEDGER_DIR"], f"{os.getpid()}.ran"), order)


def orders(environ: Environ) -> tuple[str, bytes]:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length).decode("utf-8", "replace")
    order = (parse_qs(body).get("id") or [""])[0]
    if not order:
        return "400 Bad Request", b"missing id\n"
    ledger(order)  # the app ran it: whatever happens next, it is in the ledger
    then = (parse_qs(environ.get("QUERY_STRING", "")).get("then") or ["ok"])[0]
    if then == "503":
        return "503 Service Unavailable", f"ran {order}, then failed\n".encode()
    if then == "crash":
        os._exit(1)  # the worker dies mid-request: no answer at all
    if then == "slow":
        time.sleep(float(os.environ.get("LEDGER_SLOW", "3")))  # the slow answer IS the case
    return "201 Created", f"created {order}\n".encode()


def routes(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    method, path = environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")
    status, body = "404 Not Found", b"not found\n"
    kind = TEXT
    if (method, path) == ("POST", "/orders"):
        status, body = orders(environ)
    elif (method, path) == ("GET", "/ping"):
        status, body = "200 OK", b"pong"
    elif (method, path) == ("GET", "/headers"):
        seen = {name: environ.get("HTTP_" + name.upper().replace("-", "_")) for name in HEADERS}
        status, body, kind = "200 OK", json.dumps(seen).encode(), "application/json"
    start_response(status, [("Content-Type", kind), ("Content-Length", str(len(body)))])
    return [body]


app = graceful.WSGIMiddleware(routes)
