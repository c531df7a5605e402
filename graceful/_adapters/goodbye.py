"""The goodbye to long-lived connections at the end of a drain's delay (ASGI).

At the end of the delay, or at once on a stop, open websockets get close code 1012 (service
restart) unless the app closed them first, and open-ended HTTP responses (server-sent events,
chunked streams: started, still streaming, no ``Content-Length``) are finished through ASGI
itself, whatever the server: the middleware sends the last ``http.response.body`` (the client
sees a complete body), answers the app's pending and next ``receive()`` with
``http.disconnect`` and drops what the app sends after that (on an ASGI 2.4 server such a
send raises ``OSError``, as after a client disconnect). A resume before the end of the delay
cancels it. Driven by the lifecycle's signals, so it works whatever started the drain (a
signal, the control route, gunicorn's master).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .. import signals
from .._core.errors import GracefulError
from .._core.types import Message, Receive, Scope, Send
from .._runtime.lifecycle import Lifecycle, Phase
from .headers import announced, unmarked
from .servers import HOOKS, LoopServer

__all__ = ["GOODBYE_CODE", "Exchange", "Goodbye", "Socket"]

logger = logging.getLogger("graceful")

#: The websocket close code sent at the end of the delay: "Service Restart" (RFC 6455, IANA).
GOODBYE_CODE = 1012
_GOODBYE_REASON = "service restart"
_GONE: Message = {"type": "websocket.disconnect", "code": GOODBYE_CODE}
_DISCONNECT: Message = {"type": "http.disconnect"}
_LAST_CHUNK: Message = {"type": "http.response.body", "body": b"", "more_body": False}
#: Bound on ending one HTTP stream (a client that reads nothing holds the server's send).
END_TIMEOUT = 1.0


class Goodbye:
    """The goodbye of one middleware, on the event loop it runs on."""

    def __init__(self, lifecycle: Lifecycle, clock: Callable[[], float]) -> None:
        self.lifecycle = lifecycle
        self._clock = clock
        # Set once the middleware runs on an event loop (lifespan start-up or first call).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: LoopServer | None = None  # a graceful.uvicorn.ServerLink under uvicorn
        self.sockets: set[Socket] = set()  # accepted websockets the app has not closed
        self.exchanges: set[Exchange] = set()  # HTTP requests the app is running
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self.said = False

    def socket(self, receive: Receive, send: Send) -> Socket:
        """The app's view of a new websocket, so that the goodbye can close it."""
        return Socket(self, receive, send)

    def forget(self, socket: Socket) -> None:
        self.sockets.discard(socket)

    def release_server(self) -> None:
        """Give the server its signal handlers back (at lifespan shutdown)."""
        if self._server is not None:
            self._server.uninstall()

    def on_loop(self) -> None:
        """On a new event loop: follow the lifecycle for the goodbye, link the server."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._loop is None:
            lifecycle = self.lifecycle
            signals.drain_started.connect(self._on_drain, sender=lifecycle)
            signals.stopping.connect(self._on_drain, sender=lifecycle)
            signals.resumed.connect(self._on_resumed, sender=lifecycle)
        self._loop, self._server = loop, None
        self._task = self._wake = None
        self.said = False
        lifecycle = self.lifecycle
        self._server = HOOKS.find_loop_server(lifecycle)
        if lifecycle.announcing:
            self._arm()

    def _on_drain(self, sender: object, **kwargs: Any) -> None:
        self._soon(self._arm)

    def _on_resumed(self, sender: object, **kwargs: Any) -> None:
        self._soon(self._disarm)

    def _soon(self, callback: Any) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nothing to close
                loop.call_soon_threadsafe(callback)

    def _arm(self) -> None:
        wake = self._wake
        if wake is None:
            wake = self._wake = asyncio.Event()
        wake.set()  # a running goodbye looks at the lifecycle again
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._after_delay(wake))

    def _disarm(self) -> None:
        self.said = False
        if self._wake is not None:
            self._wake.set()

    async def _after_delay(self, wake: asyncio.Event) -> None:
        lifecycle = self.lifecycle
        while True:
            wake.clear()
            phase = lifecycle.phase
            if phase in (Phase.STARTING, Phase.SERVING):
                return  # resumed before the delay was over
            if phase in (Phase.STOPPING, Phase.STOPPED):
                break
            end, now = lifecycle.delay_ends_at(), self._clock()
            if end is None or now >= end:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), end - now)  # the delay IS the wait
        if not self.said:
            self.said = True
            await self._say()

    async def _say(self) -> None:
        sockets = list(self.sockets)
        if sockets:
            logger.info("closing %d websocket(s) with code %d", len(sockets), GOODBYE_CODE)
            await asyncio.gather(*(socket.goodbye() for socket in sockets))
        streams = [exchange for exchange in self.exchanges if exchange.open_ended()]
        if streams:
            ended = await asyncio.gather(*(exchange.end() for exchange in streams))
            logger.info("ended %d open HTTP stream(s) at the end of the delay", sum(ended))


class Exchange:
    """One HTTP request's ``send`` and ``receive`` as the app sees them, so that the goodbye
    can finish its response if it is still streaming.

    The middleware keeps it in :attr:`Goodbye.exchanges` while the app runs. ``send`` is a
    plain function returning the server's awaitable (no coroutine of its own on the hot
    path). ``announce``: add ``graceful-state: draining`` (and with ``http1``
    ``connection: close``) to the response; either way the reject-mode mark is taken off the
    app's 503s.
    """

    __slots__ = (
        "_ended",
        "_receive",
        "_send",
        "_server_send",
        "announce",
        "complete",
        "headers",
        "http1",
        "late",
        "scope",
    )

    def __init__(
        self,
        send: Send,
        receive: Receive,
        announce: bool,
        http1: bool,
        scope: Scope,
        late: bool = False,
    ) -> None:
        self._send = self._server_send = send
        #: Arrived after the goodbye: a stream is ended after its first chunk.
        self.late = late
        self._receive = receive
        self.announce = announce
        self.http1 = http1
        self.scope = scope
        #: The response's headers once started (None before); whether its last body was sent.
        self.headers: Any = None
        self.complete = False
        self._ended: asyncio.Event | None = None

    def send(self, message: Message) -> Awaitable[None]:
        if message["type"] != "http.response.start":
            if not message.get("more_body"):  # the last body (or a pathsend): complete
                self.complete = True
            elif self.late:
                return self._send_then_end(message)
            return self._send(message)  # after the goodbye: _dropped
        if self.announce:
            message = {**message, "headers": announced(message, http1=self.http1)}
        elif message.get("status") == 503:
            message = {**message, "headers": unmarked(message.get("headers", ()))}
        self.headers = message.get("headers", ())
        return self._send(message)

    async def _send_then_end(self, message: Message) -> None:
        await self._send(message)
        if self.open_ended():  # go elsewhere at once, as a late websocket does
            await self.end()

    def _dropped(self, message: Message) -> Awaitable[None]:
        return _refuse() if _spec(self.scope) >= (2, 4) else _nothing()

    def receive(self) -> Awaitable[Message]:
        if self.headers is None:  # reading the request: straight to the server
            return self._receive()
        return self._receive_or_end()

    async def _receive_or_end(self) -> Message:
        if self._ended is None:
            self._ended = asyncio.Event()
        elif self._ended.is_set():
            return dict(_DISCONNECT)
        received = asyncio.ensure_future(self._receive())
        ended = asyncio.ensure_future(self._ended.wait())
        try:
            await asyncio.wait((received, ended), return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            if not received.done():
                received.cancel()
        if received.done() and not received.cancelled():
            return received.result()
        return dict(_DISCONNECT)

    def open_ended(self) -> bool:
        """Started, not complete, not ended, and with no ``Content-Length`` (so it can end
        anywhere)."""
        if self.complete or self.headers is None or self._send is not self._server_send:
            return False
        return not any(name.lower() == b"content-length" for name, _ in self.headers)

    async def end(self) -> bool:
        """Finish the response with its last (empty) body, then disconnect the app's
        ``receive()``; whether the last body went out in time. What the app sends from now on
        is dropped (on an ASGI 2.4 server: ``OSError``, as after a client disconnect), but
        only once the last body is out: an error raised while it is still being written would
        have the server close the connection under it (uvicorn 0.30, which says 2.4)."""
        self._send = _drop_quietly
        sent = True
        try:
            await asyncio.wait_for(self._server_send(dict(_LAST_CHUNK)), END_TIMEOUT)
        except Exception as exc:  # the client went away, or reads nothing
            logger.debug("could not end an HTTP stream: %r", exc)
            sent = False
        self._send = self._dropped
        if self._ended is None:
            self._ended = asyncio.Event()
        self._ended.set()
        return sent


async def _nothing() -> None:
    return None


def _drop_quietly(message: Message) -> Awaitable[None]:
    return _nothing()


async def _refuse() -> None:
    raise _ClosedByDrain("the response was ended by the drain")


class _ClosedByDrain(GracefulError, OSError):
    """A send on a websocket or response the drain has closed (ASGI asks for an ``OSError``)."""


class Socket:
    """One websocket: the app's view of it, so the drain can close it with 1012."""

    __slots__ = ("_goodbye", "_receive", "_send", "closed_by_drain", "open")

    def __init__(self, goodbye: Goodbye, receive: Receive, send: Send) -> None:
        self._goodbye = goodbye
        self._receive = receive
        self._send = send
        self.open = False
        self.closed_by_drain = False

    async def receive(self) -> Message:
        if self.closed_by_drain:
            return dict(_GONE)
        message = await self._receive()
        if message["type"] == "websocket.disconnect":
            self._closed()
        return message

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if self.closed_by_drain:
            if kind == "websocket.close":
                return  # closed already, with 1012
            raise _ClosedByDrain(f"websocket closed with {GOODBYE_CODE} by the drain")
        await self._send(message)
        if kind == "websocket.accept":
            self.open = True
            goodbye = self._goodbye
            goodbye.sockets.add(self)
            if goodbye.said and goodbye.lifecycle.announcing:
                await self.goodbye()  # accepted after the delay: go elsewhere at once
        elif kind == "websocket.close":
            self._closed()

    async def goodbye(self) -> None:
        """Close with 1012 unless closed already."""
        if not self.open or self.closed_by_drain:
            return
        self.closed_by_drain = True
        self._closed()
        message = {"type": "websocket.close", "code": GOODBYE_CODE, "reason": _GOODBYE_REASON}
        try:
            await self._send(message)
        except Exception as exc:  # the client went away meanwhile, or the server refused 1012
            if not HOOKS.close_websocket(self._send, GOODBYE_CODE, _GOODBYE_REASON):
                logger.debug("websocket close failed: %r", exc)

    def _closed(self) -> None:
        self.open = False
        self._goodbye.sockets.discard(self)


def _spec(scope: Scope) -> tuple[int, ...]:
    """The ASGI spec version the server speaks (2.0 when it does not say)."""
    spec = scope.get("asgi", {}).get("spec_version", "2.0")
    try:
        return tuple(int(part) for part in str(spec).split(".")[:2])
    except ValueError:
        return (2, 0)
