"""Per-request cost the WSGI and ASGI middlewares add to a trivial app, in one run.

Each round times N requests through: the bare app, a do-nothing pass-through middleware, a
"floor" (the least an in-flight counter that records each request can do), and the graceful
middleware; for ASGI also an in-flight counter written with Starlette's ``BaseHTTPMiddleware``
(N/50 requests: it is that much slower). All interleaved, so that machine noise hits them alike.
Figures, medians over rounds: the ratio of added costs, (graceful - bare) / (pass-through - bare),
goal <= 2.5; (BaseHTTPMiddleware counter - bare) / (graceful - bare), goal >= 10; and, printed
last, (graceful - bare) / (floor - bare), goal <= 1.2 (issue 11).

    python benchmarks/middleware_overhead.py [--requests N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp as StarletteApp

import graceful
from graceful._core.inflight import InflightTracker
from graceful._core.types import (
    ASGIApp,
    Environ,
    Message,
    Receive,
    Scope,
    Send,
    StartResponse,
    WSGIApp,
)

GOAL = 2.5
GOAL_BASEHTTP = 10.0
GOAL_FLOOR = 1.2


def wsgi_app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


class WSGIPassThrough:
    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        return self.app(environ, start_response)


class _ClosingList(list[bytes]):
    __slots__ = ("token", "tracker")
    tracker: InflightTracker
    token: int

    def close(self) -> None:
        self.tracker.end(self.token)


class WSGIFloor:
    """The least a WSGI in-flight counter can do: read the clock, record the request, and hand
    back the (list) response with a ``close()`` that releases it (a request is in flight until
    the server has sent the body). No probes, no drain checks."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app
        self.tracker = InflightTracker()
        self.clock = time.monotonic

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        tracker = self.tracker
        token = tracker.begin(environ["REQUEST_METHOD"], environ["PATH_INFO"], self.clock())
        result = _ClosingList(self.app(environ, start_response))  # the app returns a list
        result.tracker, result.token = tracker, token
        return result


async def asgi_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


class ASGIPassThrough:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class ASGIFloor:
    """The least an ASGI in-flight counter can do: read the clock, record the request, release
    it when the app returns. No probes, no drain checks."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.tracker = InflightTracker()
        self.clock = time.monotonic

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracker = self.tracker
        token = tracker.begin(scope["method"], scope["path"], self.clock())
        try:
            await self.app(scope, receive, send)
        finally:
            tracker.end(token)


class BaseHTTPCounter(BaseHTTPMiddleware):
    """A minimal in-flight counter the way many apps write one, with Starlette's helper."""

    def __init__(self, app: StarletteApp) -> None:
        super().__init__(app)
        self.inflight = 0

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        self.inflight += 1
        try:
            return await call_next(request)
        finally:
            self.inflight -= 1


ENVIRON: Environ = {
    "REQUEST_METHOD": "GET",
    "PATH_INFO": "/items/1",
    "QUERY_STRING": "",
    "SERVER_NAME": "127.0.0.1",
    "SERVER_PORT": "8000",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "wsgi.url_scheme": "http",
}


def time_wsgi(app: WSGIApp, n: int) -> float:
    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        return None

    started = time.perf_counter()
    for _ in range(n):
        result = app(dict(ENVIRON), start_response)  # a server builds a fresh environ
        for _chunk in result:
            pass
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return (time.perf_counter() - started) / n


SCOPE: Scope = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "path": "/items/1",
    "query_string": b"",
    "headers": [(b"host", b"127.0.0.1")],
}


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Message) -> None:
    return None


def time_asgi(app: ASGIApp, n: int) -> float:
    async def run() -> float:
        started = time.perf_counter()
        for _ in range(n):
            await app(dict(SCOPE), _receive, _send)
        return (time.perf_counter() - started) / n

    return asyncio.run(run())


def measure(
    name: str,
    timer: Callable[[Any, int], float],
    variants: dict[str, tuple[Any, int]],
    rounds: int,
) -> dict[str, float]:
    """Time each variant (app, requests per round) in turn, ``rounds`` times; print the medians
    and return the median per-round ratios of added costs (each variant against the
    pass-through, and the BaseHTTPMiddleware counter, if any, against graceful)."""
    samples: dict[str, list[float]] = {key: [] for key in variants}
    ratios: dict[str, list[float]] = {}
    bare_app, n = variants["bare"]
    timer(bare_app, n // 10)  # warm-up
    for _ in range(rounds):
        for key, (app, requests) in variants.items():
            samples[key].append(timer(app, requests))
        added = {key: max(samples[key][-1] - samples["bare"][-1], 1e-12) for key in variants}
        for key in variants:
            if key not in ("bare", "pass-through"):
                ratios.setdefault(key, []).append(added[key] / added["pass-through"])
        ratios.setdefault("graceful/floor", []).append(added["graceful"] / added["floor"])
        if "BaseHTTPMiddleware" in variants:
            ratios.setdefault("BaseHTTPMiddleware/graceful", []).append(
                added["BaseHTTPMiddleware"] / added["graceful"]
            )
    medians = {key: statistics.median(values) * 1e9 for key, values in samples.items()}
    timings = ", ".join(f"{key} {ns:.0f} ns" for key, ns in medians.items())
    added_ns = ", ".join(
        f"{key} {ns - medians['bare']:.0f} ns" for key, ns in medians.items() if key != "bare"
    )
    print(f"{name} per request: {timings}; added: {added_ns}")
    return {key: statistics.median(values) for key, values in ratios.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    n = args.requests

    config = graceful.Config(delay=0.0)
    wsgi = {
        "bare": (wsgi_app, n),
        "pass-through": (WSGIPassThrough(wsgi_app), n),
        "floor": (WSGIFloor(wsgi_app), n),
        "graceful": (graceful.WSGIMiddleware(wsgi_app, graceful.Lifecycle(config)), n),
    }
    asgi_lifecycle = graceful.Lifecycle(config)
    asgi_lifecycle.mark_ready()
    asgi = {
        "bare": (asgi_app, n),
        "pass-through": (ASGIPassThrough(asgi_app), n),
        "floor": (ASGIFloor(asgi_app), n),
        "graceful": (graceful.ASGIMiddleware(asgi_app, asgi_lifecycle), n),
        "BaseHTTPMiddleware": (BaseHTTPCounter(asgi_app), max(n // 50, 20)),
    }
    w = measure("WSGI", time_wsgi, wsgi, args.rounds)
    a = measure("ASGI", time_asgi, asgi, args.rounds)
    print(
        f"floor (record and release only) vs pass-through: WSGI {w['floor']:.2f}x, "
        f"ASGI {a['floor']:.2f}x"
    )
    verdict = "met" if max(w["graceful"], a["graceful"]) <= GOAL else "NOT met"
    cheaper = a["BaseHTTPMiddleware/graceful"]
    verdict_basehttp = "met" if cheaper >= GOAL_BASEHTTP else "NOT met"
    print(
        f"added cost vs pass-through: WSGI {w['graceful']:.2f}x, ASGI {a['graceful']:.2f}x "
        f"(goal <= {GOAL}x: {verdict}); BaseHTTPMiddleware counter vs graceful (ASGI): "
        f"{cheaper:.0f}x the added cost (goal >= {GOAL_BASEHTTP:.0f}x: {verdict_basehttp})"
    )
    over_floor = max(w["graceful/floor"], a["graceful/floor"])
    print(
        f"added cost vs the floor: WSGI {w['graceful/floor']:.2f}x, ASGI "
        f"{a['graceful/floor']:.2f}x (goal <= {GOAL_FLOOR}x: "
        f"{'met' if over_floor <= GOAL_FLOOR else 'NOT met'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
