"""The goodbye to long-lived connections at the end of a drain's delay (ASGI).

At the end of the delay, or at once on a stop, open websockets get close code 1012 (service
restart) unless the app closed them first, and under uvicorn open-ended HTTP streams are ended
through the server link (see :mod:`graceful.uvicorn`), so their ``receive()`` answers
``http.disconnect``. A resume before the end of the delay cancels it. Driven by the lifecycle's
signals, so it works whatever started the drain (a signal, the control route, gunicorn's master).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable
from typing import Any

from .. import signals
from .._core.types import Message, Receive, Send
from .._runtime.lifecycle import Lifecycle, Phase

__all__ = ["GOODBYE_CODE", "Goodbye", "Socket"]

logger = logging.getLogger("graceful")

#: The websocket close code sent at the end of the delay: "Service Restart" (RFC 6455, IANA).
GOODBYE_CODE = 1012
_GOODBYE_REASON = "service restart"
_GONE: Message = {"type": "websocket.disconnect", "code": GOODBYE_CODE}


class Goodbye:
    """The goodbye of one middleware, on the event loop it runs on."""

    def __init__(self, lifecycle: Lifecycle, clock: Callable[[], float]) -> None:
        self.lifecycle = lifecycle
        self._clock = clock
        # Set once the middleware runs on an event loop (lifespan start-up or first call).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None  # a graceful.uvicorn.ServerLink under uvicorn
        self.sockets: set[Socket] = set()  # accepted websockets the app has not closed
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
        if "uvicorn.server" in sys.modules:  # only then can uvicorn be the server
            from .._servers import uvicorn

            self._server = uvicorn.attach(lifecycle)
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
        link = self._server
        if link is not None:
            try:
                await link.end_streams()
            except Exception:
                logger.exception("ending the open HTTP streams failed")


class _ClosedByDrain(OSError):
    """A send on a websocket the drain has closed (ASGI asks for an ``OSError`` there)."""


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
        except Exception as exc:  # the client went away meanwhile
            logger.debug("websocket close failed: %r", exc)

    def _closed(self) -> None:
        self.open = False
        self._goodbye.sockets.discard(self)
