"""The smallest node that drains: a stdlib WSGI server, the middleware and the signal handlers.

    export GRACEFUL_TOKEN=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
    python examples/plain/app.py --port 8000

SIGTERM: /readyz turns 503 at once, requests are still served through the delay, in-flight
requests finish, then the server stops. ``/slow?s=2`` takes two seconds, ``/`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import urllib.parse
from collections.abc import Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import graceful


def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    if environ["PATH_INFO"] == "/slow":
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        time.sleep(min(float(query.get("s", ["2"])[0]), 30.0))  # the slow work itself
    body = f"hello from pid {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


class ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    lifecycle = graceful.get_lifecycle()  # settings from GRACEFUL_* variables
    server = make_server(
        args.host,
        args.port,
        graceful.WSGIMiddleware(app, lifecycle),
        server_class=ThreadingServer,
        handler_class=QuietHandler,
    )
    if not os.environ.get("PLAIN_NAIVE"):  # the demo's "before" picture: default SIGTERM
        graceful.install_signal_handlers(lifecycle, on_stop=server.shutdown)
    logging.getLogger("graceful").info("serving on http://%s:%d", args.host, args.port)
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
