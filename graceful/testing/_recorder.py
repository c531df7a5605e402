"""The POST recorder of ``graceful demo --app`` and of :class:`graceful.testing.Cluster`: a thin
WSGI or ASGI wrapper in front of an app that writes down which POSTs reached it, so a test can
count the ones that ran twice (or never) without asking anything of the app.

A POST that carries the id header (:data:`ID_HEADER`) has its id appended, one line, to
``<ledger dir>/<pid>.ran`` before the app is called; the ledger dir is ``$DEMO_APP_LEDGER_DIR``
(set by whoever starts the nodes; unset: nothing is written). Every other request goes to the
app untouched. Behind graceful's middleware, a request the middleware answers itself (a probe,
a draining node's 503) never reaches the recorder; in front of it, such a POST is recorded
although the app never ran it.

Imported by the nodes: the standard library only.
"""

from __future__ import annotations

import inspect
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .._core.types import ASGIApp, Environ, Receive, Scope, Send, StartResponse, WSGIApp

__all__ = [
    "ID_HEADER",
    "LEDGER_ENV",
    "ASGIRecorder",
    "WSGIRecorder",
    "ledger",
    "ran_twice",
    "record",
    "record_posts",
]

#: The header carrying each POST's id (the same id is in its JSON body).
ID_HEADER = "X-Graceful-Demo-Id"
#: The variable naming the round's ledger dir (not ``GRACEFUL_*``: those are graceful's settings).
LEDGER_ENV = "DEMO_APP_LEDGER_DIR"
_WSGI_KEY = "HTTP_" + ID_HEADER.upper().replace("-", "_")
_ASGI_KEY = ID_HEADER.lower().encode()


def record(folder: str, item: str) -> None:
    """Append ``item`` to ``<folder>/<pid>.ran``: one ``write`` of one line (whole, beside
    other threads' lines)."""
    line = (item.replace("\n", " ").replace("\r", " ") + "\n").encode("utf-8", "replace")
    fd = os.open(
        os.path.join(folder, f"{os.getpid()}.ran"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600
    )
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def ledger(folder: Path) -> Counter[str]:
    """How often each id in the ledger in ``folder`` reached the app (over all its processes)."""
    counted: Counter[str] = Counter()
    for path in folder.glob("*.ran"):
        counted.update(line for line in path.read_text(errors="replace").splitlines() if line)
    return counted


def ran_twice(folder: Path) -> int:
    """How many ids the ledger in ``folder`` holds more than once (over all its processes)."""
    return sum(1 for times in ledger(folder).values() if times > 1)


def _ledger() -> str | None:
    return os.environ.get(LEDGER_ENV) or None


class WSGIRecorder:
    """``app`` with every POST's demo id written down before the app runs."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app
        self.ledger = _ledger()

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if self.ledger is not None and environ.get("REQUEST_METHOD") == "POST":
            item = environ.get(_WSGI_KEY)
            if item:
                record(self.ledger, str(item))
        return self.app(environ, start_response)


class ASGIRecorder:
    """``app`` with every HTTP POST's demo id written down before the app runs; other scopes
    (lifespan, websockets) pass through as they are."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.ledger = _ledger()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.ledger is not None and scope["type"] == "http" and scope.get("method") == "POST":
            for name, value in scope.get("headers", ()):
                if name.lower() == _ASGI_KEY:
                    record(self.ledger, value.decode("latin-1"))
                    break
        await self.app(scope, receive, send)


def record_posts(app: Any) -> WSGIRecorder | ASGIRecorder:
    """``app`` behind the recorder of its kind: ASGI when the app or its ``__call__`` is a
    coroutine function (as servers tell), WSGI otherwise."""
    call = getattr(app, "__call__", None)  # noqa: B004 - an instance's async __call__
    if inspect.iscoroutinefunction(app) or inspect.iscoroutinefunction(call):
        return ASGIRecorder(app)
    return WSGIRecorder(app)
