"""The probes and control routes of a gRPC server on a side HTTP port: ``graceful.WSGIMiddleware``
over a 404 app, on the standard library's threading WSGI server in a daemon thread, sharing the
server's lifecycle. A gRPC port cannot answer plain HTTP, and the standard library keeps the extra
free of another server; the control routes are few and small."""

from __future__ import annotations

import logging
import socketserver
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .._adapters.wsgi import WSGIMiddleware
from .._core.types import Environ, StartResponse
from .._runtime.lifecycle import Lifecycle

__all__ = ["ALL_INTERFACES", "ControlServer"]

logger = logging.getLogger("graceful")

#: The control port's default host: every interface, so that the kubelet's probes reach it on
#: the pod's address. Its control routes answer only with ``GRACEFUL_TOKEN`` set and given.
ALL_INTERFACES = "0.0.0.0"  # noqa: S104


def _not_found(environ: Environ, start_response: StartResponse) -> list[bytes]:
    body = b"not found: this port serves graceful's probes and control routes only\n"
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    start_response("404 Not Found", headers)
    return [body]


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("graceful control port: " + format, *args)


class ControlServer:
    """``/readyz``, ``/livez`` and the control routes on ``host:port`` (port 0: any free one,
    see :attr:`port`), in a daemon thread, for ``lifecycle``. ``close()`` stops it."""

    def __init__(self, lifecycle: Lifecycle, port: int, host: str = ALL_INTERFACES) -> None:
        app = WSGIMiddleware(_not_found, lifecycle, auto_ready=False)
        self.httpd = make_server(
            host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler
        )
        self.port: int = self.httpd.server_port
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="graceful-control", daemon=True
        )
        self._thread.start()
        logger.info("graceful: probes and control routes on http://%s:%d", host, self.port)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
