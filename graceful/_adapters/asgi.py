"""ASGI middleware (pure ASGI, never ``BaseHTTPMiddleware``).

HTTP requests count from scope entry until the app returns, whatever the way out (response,
error, cancellation, client disconnect). Websockets are counted apart: they are long-lived and
must not hold a drain open. Lifespan passes through; the node turns ready when the app's start-up
completes, or at the first request when the server runs no lifespan.

At the end of a drain's delay (or at once on a stop) the middleware says goodbye to long-lived
connections: open websockets get close code 1012 (service restart) unless the app closed them
first, and under uvicorn open-ended HTTP streams are ended (see
:mod:`graceful._adapters.goodbye`), so
their ``receive()`` answers ``http.disconnect``. Under uvicorn it also takes over the server's
signal handler at lifespan start-up or the first request, so that SIGTERM drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Iterable

from .._core.config import Config
from .._core.stream import Subscriber, format_comment, format_event
from .._core.surface import (
    EVENTS_HEADERS,
    NEVER_REJECTED,
    REJECTED_HEADER,
    OpenEvents,
    Response,
    Route,
    RunChecks,
    WaitDrained,
)
from .._core.types import ASGIApp, Message, Receive, Scope, Send
from .._runtime.lifecycle import Lifecycle, LifecycleError, Phase
from .base import AdapterBase
from .goodbye import Goodbye

__all__ = ["ASGIMiddleware"]

logger = logging.getLogger("graceful")

_ANNOUNCE = (b"graceful-state", b"draining")
_CLOSE = (b"connection", b"close")
_MARK = REJECTED_HEADER.lower().encode()
_FINAL_PHASES = ("stopping", "stopped")


class ASGIMiddleware(AdapterBase):
    """Wrap an ASGI app (``app = ASGIMiddleware(app)``) or ``app.add_middleware(ASGIMiddleware)``.

    With ``auto_ready`` (the default) the node turns ready when lifespan start-up completes (or
    at the first request without lifespan); pass ``auto_ready=False`` to call
    ``lifecycle.mark_ready()`` yourself.
    """

    def __init__(
        self,
        app: ASGIApp,
        lifecycle: Lifecycle | None = None,
        config: Config | None = None,
        *,
        auto_ready: bool = True,
    ) -> None:
        super().__init__(lifecycle, config)
        self.app = app
        self.auto_ready = auto_ready
        # Servers run lifespan start-up before accepting requests: a request seen first means
        # the server runs no lifespan, so the node is ready.
        self._ready_on_request = auto_ready
        self._requests = self.lifecycle.requests
        self._websockets = self.lifecycle.websockets
        self._goodbye = Goodbye(self.lifecycle, self._clock)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path = scope["path"]
            if path.startswith(self._surface_starts):
                route = self._match(path)
                if route is not None:
                    await self._serve(route, scope, receive, send)
                    return
            tracker = self._requests
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
            return
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        else:
            await self.app(scope, receive, send)
            return
        if self._unchecked:
            self._first_request()
        now = self._clock()
        if self.drain_file is not None:
            self.drain_file.check(now)
        method = scope["method"]
        if self.lifecycle.announcing:
            # Decided at arrival, like the WSGI middleware.
            http1 = scope.get("http_version", "1.1") in ("1.0", "1.1")
            if self.surface.rejection is not None and method not in NEVER_REJECTED:
                # Reject mode: a retrying proxy sends it elsewhere; never the app, never counted.
                await _respond(self.surface.rejection, send, close=http1)
                return
            send = _announcing(send, http1)
            self.lifecycle.count_served_while_draining()
        else:
            send = _serving(send)
        token = tracker.begin(method, path, now)
        try:
            await self.app(scope, receive, send)
        finally:
            tracker.end(token)

    def _first_request(self) -> None:
        super()._first_request()
        if self._ready_on_request:
            _ready(self.lifecycle)
        self._goodbye.on_loop()

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._unchecked:
            self._first_request()
        now = self._clock()
        if self.drain_file is not None:
            self.drain_file.check(now)
        socket = self._goodbye.socket(receive, send)
        token = self._websockets.begin("WEBSOCKET", scope["path"], now)
        try:
            await self.app(scope, socket.receive, socket.send)
        finally:
            self._goodbye.forget(socket)
            self._websockets.end(token)

    # -- lifespan --------------------------------------------------------------------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._ready_on_request = False
        lifecycle = self.lifecycle
        started = False

        async def watched_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._goodbye.on_loop()
            elif message["type"] == "lifespan.shutdown":
                with contextlib.suppress(LifecycleError):
                    lifecycle.stop("server shutting down")
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            kind = message["type"]
            if kind in ("lifespan.startup.complete", "lifespan.startup.failed"):
                started = True
                if kind == "lifespan.startup.complete" and self.auto_ready:
                    _ready(lifecycle)
            await send(message)
            if kind == "lifespan.shutdown.complete":
                with contextlib.suppress(LifecycleError):
                    lifecycle.mark_stopped()
                self._goodbye.release_server()  # the server is done with its signals

        try:
            await self.app(scope, watched_receive, watched_send)
        except BaseException:
            # An app without lifespan support raises at once; the server then serves anyway
            # (uvicorn's "auto" mode), so the node is ready.
            if not started and self.auto_ready:
                _ready(lifecycle)
            raise

    # -- probes and control routes ---------------------------------------------------------

    async def _serve(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        lifecycle = self.lifecycle
        self._goodbye.on_loop()
        if self._ready_on_request and lifecycle._phase is Phase.STARTING:
            lifecycle.mark_ready()
        if route in (Route.READYZ, Route.STATUS, Route.EVENTS):
            self._look_at_drain_file(self._clock(), force=True)
        outcome = self.surface.handle(
            route,
            scope.get("method", ""),
            scope.get("query_string", b"").decode("latin-1"),
            _authorization(scope),
        )
        if isinstance(outcome, RunChecks):
            outcome = self.surface.readiness(await self.checker.run_async(), head=outcome.head)
        elif isinstance(outcome, WaitDrained):
            drained = await lifecycle.wait_drained_async(outcome.timeout)
            outcome = self.surface.drain_waited(drained)
        elif isinstance(outcome, OpenEvents):
            await self._events(receive, send)
            return
        await _respond(outcome, send)

    async def _events(self, receive: Receive, send: Send) -> None:
        subscriber = self._subscribe(multithread=True)  # streams are cheap on an event loop
        if isinstance(subscriber, Response):  # 503 full (204 off only under a sync server)
            await _respond(subscriber, send)
            return
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        def wake() -> None:
            loop.call_soon_threadsafe(woken.set)

        subscriber.wake = wake
        disconnected = asyncio.Event()

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()
            woken.set()

        watcher = asyncio.ensure_future(watch_disconnect())
        try:
            await self._stream(subscriber, send, woken, disconnected)
        finally:
            watcher.cancel()
            self.lifecycle.events.unsubscribe(subscriber)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher

    async def _stream(
        self, subscriber: Subscriber, send: Send, woken: asyncio.Event, gone: asyncio.Event
    ) -> None:
        heartbeat = self.lifecycle.config.events_heartbeat
        next_beat = self._clock() + heartbeat
        headers = [(k.lower().encode(), v.encode()) for k, v in EVENTS_HEADERS]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await _chunk(send, b"retry: 2000\n\n")
        while not gone.is_set():
            woken.clear()
            for notice in subscriber.pop_all():
                await _chunk(send, format_event(notice))
                if notice["phase"] in _FINAL_PHASES:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(woken.wait(), self._events_wait())
            now = self._clock()
            self._look_at_drain_file(now)
            if now >= next_beat and not gone.is_set():
                next_beat = now + heartbeat
                await _chunk(send, format_comment("heartbeat"))


def _ready(lifecycle: Lifecycle) -> None:
    if lifecycle.phase is Phase.STARTING:
        lifecycle.mark_ready()


def _serving(send: Send) -> Send:
    """``send`` removing the reject-mode mark from the app's 503s (other messages pass as they
    are: one dict lookup and one comparison). A plain function returning ``send``'s awaitable,
    not a coroutine of its own: that would cost each message a coroutine and a frame more."""

    def serving_send(message: Message) -> Awaitable[None]:
        if message.get("status") == 503:
            message = {**message, "headers": _unmarked(message.get("headers", ()))}
        return send(message)

    return serving_send


def _unmarked(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` without the reject-mode mark: only the middleware's own rejection has it."""
    return [(name, value) for name, value in headers if name.lower() != _MARK]


def _announcing(send: Send, http1: bool) -> Send:
    """``send`` adding ``graceful-state: draining`` (and on HTTP/1.x ``connection: close``),
    removing the reject-mode mark from the app's 503s."""

    async def announcing_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            drop = (b"connection", _MARK) if message.get("status") == 503 else (b"connection",)
            headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() not in drop]
            headers.append(_ANNOUNCE)
            if http1:
                headers.append(_CLOSE)
            message = {**message, "headers": headers}
        await send(message)

    return announcing_send


def _authorization(scope: Scope) -> bytes | None:
    """The Authorization header, or None when absent or given more than once."""
    found = None
    for name, value in scope.get("headers", ()):
        if name.lower() == b"authorization":
            if found is not None:
                return None
            found = value
    return bytes(found) if found is not None else None


async def _chunk(send: Send, body: bytes) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def _respond(response: Response, send: Send, *, close: bool = False) -> None:
    headers = [(k.lower().encode(), v.encode()) for k, v in response.headers]
    if close:
        headers.append(_CLOSE)
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})
