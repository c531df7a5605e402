"""A wsgiref server behind ``graceful.WSGIMiddleware`` with ``install_signal_handlers``.

Run as a script (settings from GRACEFUL_*). It binds 127.0.0.1 on a free port and writes one JSON
object per line to stdout: ``listening`` (with the port), ``phase`` (every phase change),
``begin``/``end`` around each ``/slow?seconds=N`` request, and ``stopped`` once serve_forever
has returned. The graceful logger writes to stderr.
"""

from __future__ import annotations

import json
import logging
import socketserver
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import graceful
from graceful import signals
from graceful._core.types import Environ, StartResponse

_print_lock = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    with _print_lock:
        print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if path == "/slow":
        seconds = float(parse_qs(environ.get("QUERY_STRING", "")).get("seconds", ["1"])[0])
        emit("begin", path=path, seconds=seconds)
        time.sleep(min(seconds, 60.0))  # the slow request IS the behaviour under test
        emit("end", path=path)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"done {path}\n".encode()]


class Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a request stuck past the drain timeout must not keep the process
    block_on_close = False


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def on_phase(sender: object, **kwargs: Any) -> None:
    emit("phase", old=str(kwargs["old"]), new=str(kwargs["new"]), reason=kwargs["reason"])


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    lifecycle = graceful.Lifecycle(graceful.Config.from_env())
    signals.phase_changed.connect(on_phase, sender=lifecycle)
    server = Server(("127.0.0.1", 0), QuietHandler)
    server.set_app(graceful.WSGIMiddleware(app, lifecycle))
    graceful.install_signal_handlers(lifecycle, on_stop=server.shutdown)
    emit("listening", port=server.server_address[1])
    server.serve_forever(poll_interval=0.05)
    emit("stopped", phase=str(lifecycle.phase))
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
