"""Per-request cost the WSGI and ASGI middlewares add to a trivial app, in one run.

Each round times N requests through: the bare app, a do-nothing pass-through middleware, and the
graceful middleware, interleaved so that machine noise hits all three alike. The figure is the
ratio of added costs, (graceful - bare) / (pass-through - bare), median over rounds; goal <= 2.5.

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

import graceful
from graceful._types import ASGIApp, Environ, Message, Receive, Scope, Send, StartResponse, WSGIApp

GOAL = 2.5


def wsgi_app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


class WSGIPassThrough:
    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        return self.app(environ, start_response)


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
    name: str, timer: Callable[[Any, int], float], variants: dict[str, Any], n: int, rounds: int
) -> float:
    samples: dict[str, list[float]] = {key: [] for key in variants}
    ratios = []
    timer(variants["bare"], n // 10)  # warm-up
    for _ in range(rounds):
        for key, app in variants.items():
            samples[key].append(timer(app, n))
        bare, passthrough, ours = (samples[k][-1] for k in ("bare", "pass-through", "graceful"))
        ratios.append((ours - bare) / max(passthrough - bare, 1e-9))
    medians = {key: statistics.median(values) * 1e9 for key, values in samples.items()}
    ratio = statistics.median(ratios)
    print(
        f"{name}: bare {medians['bare']:.0f} ns, pass-through {medians['pass-through']:.0f} ns, "
        f"graceful {medians['graceful']:.0f} ns per request; "
        f"added cost {medians['graceful'] - medians['bare']:.0f} ns vs "
        f"{medians['pass-through'] - medians['bare']:.0f} ns"
    )
    return ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)

    config = graceful.Config(delay=0.0)
    wsgi = {
        "bare": wsgi_app,
        "pass-through": WSGIPassThrough(wsgi_app),
        "graceful": graceful.WSGIMiddleware(wsgi_app, graceful.Lifecycle(config)),
    }
    asgi_lifecycle = graceful.Lifecycle(config)
    asgi_lifecycle.mark_ready()
    asgi = {
        "bare": asgi_app,
        "pass-through": ASGIPassThrough(asgi_app),
        "graceful": graceful.ASGIMiddleware(asgi_app, asgi_lifecycle),
    }
    wsgi_ratio = measure("WSGI", time_wsgi, wsgi, args.requests, args.rounds)
    asgi_ratio = measure("ASGI", time_asgi, asgi, args.requests, args.rounds)
    verdict = "met" if max(wsgi_ratio, asgi_ratio) <= GOAL else "NOT met"
    print(
        f"added cost vs pass-through: WSGI {wsgi_ratio:.2f}x, ASGI {asgi_ratio:.2f}x "
        f"(goal <= {GOAL}x: {verdict})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
