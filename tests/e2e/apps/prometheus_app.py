"""``load_app``'s WSGI routes behind graceful's middleware, plus graceful's metrics at /metrics.

``/metrics`` is served in front of the middleware (a scrape is not counted as in flight) and
names the worker that answered in an ``X-Worker-Pid`` header::

    gunicorn -c python:graceful.gunicorn -k gthread --chdir tests/e2e/apps prometheus_app:app
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from load_app import wsgi_routes
from prometheus_client import CollectorRegistry, make_wsgi_app

import graceful
import graceful.prometheus
from graceful._core.types import Environ, ExcInfo, StartResponse

registry = CollectorRegistry()
graceful.prometheus.register(registry)
metrics = make_wsgi_app(registry)
served = graceful.WSGIMiddleware(wsgi_routes)


def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    if environ.get("PATH_INFO") != "/metrics":
        return served(environ, start_response)

    def named(
        status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        return start_response(status, [*headers, ("X-Worker-Pid", str(os.getpid()))], exc_info)

    result: Iterable[bytes] = metrics(environ, named)
    return result
