"""A tiny WSGI app behind ``graceful.WSGIMiddleware`` for the end-to-end tests.

Run with ``gunicorn --chdir tests/e2e/apps e2e_wsgi_app:app``; settings come from GRACEFUL_*.
``/slow?seconds=N`` answers after N seconds (at most 30); every other path answers at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from urllib.parse import parse_qs

import graceful
from graceful._core.types import Environ, StartResponse


def inner(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if path == "/slow":
        query = parse_qs(environ.get("QUERY_STRING", ""))
        time.sleep(min(float(query.get("seconds", ["1"])[0]), 30.0))  # slow IS the point
    body = f"hello from {path}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


app = graceful.WSGIMiddleware(inner)
