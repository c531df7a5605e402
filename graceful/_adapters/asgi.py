"""ASGI middleware (pure ASGI, never ``BaseHTTPMiddleware``).

HTTP requests count from scope entry until the app returns, whatever the way out (response,
error, cancellation, client disconnect). Websockets are counted apart: they are long-lived and
must not hold a drain open. Lifespan passes through; the node turns ready when the app's start-up
completes, or at the first request when the server runs no lifespan.

At the end of a drain's delay (or at once on a stop) the middleware says goodbye to long-lived
connections, under any ASGI server: open websockets get close code 1012 (service restart)
unless the app closed them first, and open-ended HTTP responses are finished, so their
``receive()`` answers ``http.disconnect`` (see :mod:`graceful._adapters.goodbye`). Under
uvicorn it also takes over the server's signal handler at lifespan start-up or the first
request, so that SIGTERM drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from .._core import protocol as wire
from .._core.config import Config
from .._core.stream import Subscriber
from .._core.surface import OpenEvents, Response, Route, RunChecks, WaitDrained
from .._core.types import ASGIApp, Message, Receive, Scope, Send
from .._runtime.lifecycle import Lifecycle, LifecycleError
from .base import AdapterBase
from .goodbye import Exchange, Goodbye
from .headers import asgi_headers

__all__ = ["ASGIMiddleware"]

logger = logging.getLogger("graceful")

_HTTP1 = ("1.0", "1.1")


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
        self._exchanges = self._goodbye.exchanges

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
        method = scope["method"]
        if self._steady and not self.lifecycle.announcing:
            now = self._clock()
            exchange = Exchange(send, receive, False, True, scope)  # (http1: only to announce)
        else:
            http1 = scope.get("http_version", "1.1") in _HTTP1
            now, announce, rejection = self._arrive(method)
            if rejection is not None:
                await _respond(rejection, send, close=http1)
                return
            late = announce and self._goodbye.said
            exchange = Exchange(send, receive, announce, http1, scope, late)
        exchanges = self._exchanges
        exchanges.add(exchange)
        token = tracker.begin(method, path, now)
        try:
            await self.app(scope, exchange.receive, exchange.send)
        finally:
            exchanges.discard(exchange)
            tracker.end(token)

    def _first_request(self) -> None:
        super()._first_request()
        if self._ready_on_request:
            self._mark_ready()
        self._goodbye.on_loop()

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        now = self._arrival()
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
        # The server is linked now, also when the app does not speak lifespan (it returns at
        # once, and the server serves anyway): its start and its stop are followed from here.
        self._goodbye.on_loop()

        async def watched_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                with contextlib.suppress(LifecycleError):
                    lifecycle.stop("server shutting down")
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            kind = message["type"]
            if kind in ("lifespan.startup.complete", "lifespan.startup.failed"):
                started = True
                if kind == "lifespan.startup.complete" and self.auto_ready:
                    self._mark_ready()
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
                self._mark_ready()
            raise

    # -- probes and control routes ---------------------------------------------------------

    async def _serve(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        lifecycle = self.lifecycle
        self._goodbye.on_loop()
        if self._ready_on_request:
            self._mark_ready()
        outcome = self._route(
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
        loop = self._events_loop(subscriber)
        headers = [(k.lower().encode(), v.encode()) for k, v in wire.EVENTS_RESPONSE_HEADERS]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await _chunk(send, wire.EVENT_RETRY)
        while not gone.is_set():
            woken.clear()
            chunks, over = loop.pending()
            for chunk in chunks:
                await _chunk(send, chunk)
            if over:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(woken.wait(), loop.wait)
            extra = loop.after_wait()
            if extra is not None and not gone.is_set():
                await _chunk(send, extra)


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
    headers = asgi_headers(response, close=close)
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})
