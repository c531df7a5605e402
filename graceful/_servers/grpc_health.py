"""The standard gRPC health service (``grpc_health.v1``) kept in step with a lifecycle, and
its ``Watch`` streams ended when the server stops (:mod:`graceful._servers.grpc`)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .. import signals
from .._runtime.lifecycle import Lifecycle, Phase

__all__ = [
    "HEALTH_SERVICE",
    "HEALTH_WATCH",
    "HealthLink",
    "Watches",
    "health_for",
    "watched",
    "watches_of",
]

logger = logging.getLogger("graceful")

#: The health service's method prefix: its ``Watch`` streams are never counted as in flight.
HEALTH_SERVICE = "/grpc.health.v1.Health/"
#: Its ``Watch`` method: those streams are ended when the server stops.
HEALTH_WATCH = HEALTH_SERVICE + "Watch"
SERVING: int = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: int = health_pb2.HealthCheckResponse.NOT_SERVING

Behavior = Callable[..., Any]


# -- the health service's Watch streams --------------------------------------------------------


class Watches:
    """The health ``Watch`` streams open on a lifecycle's servers, ended (status OK) when the
    server stops: gRPC's client-side health checking lets go of its stream on the GOAWAY, but
    any other watcher would hold the server's stop up to the end of its grace."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._enders: dict[int, Callable[[], None]] = {}
        self._ids = itertools.count()
        self.ended = False

    def add(self, ender: Callable[[], None]) -> Callable[[], None]:
        """Keep ``ender`` (called at most once, from any thread) until the callable returned is
        called; at once once the watches were ended."""
        with self._lock:
            key = next(self._ids)
            if not self.ended:
                self._enders[key] = ender
                return lambda: self._enders.pop(key, None) and None
        ender()
        return lambda: None

    def __len__(self) -> int:
        return len(self._enders)

    def end_all(self) -> None:
        with self._lock:
            self.ended = True
            enders, self._enders = list(self._enders.values()), {}
        for ender in enders:
            ender()


_watches: weakref.WeakKeyDictionary[Lifecycle, Watches] = weakref.WeakKeyDictionary()
_watches_lock = threading.Lock()


def watches_of(lifecycle: Lifecycle) -> Watches:
    with _watches_lock:
        found = _watches.get(lifecycle)
        if found is None:
            found = _watches[lifecycle] = Watches()
        return found


def watched(handler: Any, watches: Watches) -> Any:
    """The health service's ``Watch`` handler, its streams kept in ``watches``."""
    behavior = handler.unary_stream
    if behavior is None:
        return handler
    watch = (
        _watched_async(behavior, watches)
        if inspect.iscoroutinefunction(behavior)
        else _watched_sync(behavior, watches)
    )
    return grpc.unary_stream_rpc_method_handler(
        watch,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _watched_sync(behavior: Behavior, watches: Watches) -> Behavior:
    """A ``grpc_health.v1.health.HealthServicer.Watch``: non-blocking, it answers through
    gRPC's ``send_response_callback`` (None sends the status: the stream ends)."""

    def watch(request: Any, context: Any, send_response_callback: Any = None) -> Any:
        if send_response_callback is None:  # a blocking servicer: it returns an iterator
            return behavior(request, context)
        lock, ended = threading.Lock(), [False]

        def send(response: Any) -> None:
            with lock:
                if ended[0]:
                    return  # the status is sent once only
                ended[0] = response is None
            send_response_callback(response)

        context.add_callback(watches.add(lambda: send(None)))
        return behavior(request, context, send_response_callback=send)

    for name in ("experimental_non_blocking", "experimental_thread_pool"):
        if hasattr(behavior, name):
            setattr(watch, name, getattr(behavior, name))
    return watch


def _watched_async(behavior: Behavior, watches: Watches) -> Behavior:
    """A ``grpc_health.v1.health.aio.HealthServicer.Watch``: run as a task, cancelled at a
    stop (the RPC then ends with status OK)."""

    async def watch(request: Any, context: Any) -> Any:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(behavior(request, context))
        stopped: list[bool] = []

        def end() -> None:
            stopped.append(True)
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(task.cancel)

        remove = watches.add(end)
        try:
            return await task
        except asyncio.CancelledError:
            if not stopped:
                raise
            return None
        finally:
            remove()

    return watch


# -- the health service ------------------------------------------------------------------------


class HealthLink:
    """Keeps a health servicer's ``services`` SERVING while the lifecycle is SERVING, and
    NOT_SERVING otherwise (starting, draining, drained, stopping). ``close()`` unlinks it.

    A status is set only when it changes, never in the thread that changed the phase: that
    may be gRPC's own (the end of the last RPC in flight completes a drain), and a health
    servicer sending to its watchers waits for that thread. A ``grpc_health.v1.health``
    servicer is set by a thread of the link's, at once; its asyncio twin on ``loop`` (the
    server's event loop)."""

    def __init__(
        self,
        health: Any,
        lifecycle: Lifecycle,
        services: Iterable[str] = ("",),
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.health = health
        self.lifecycle = lifecycle
        self.services = tuple(services)
        if inspect.iscoroutinefunction(health.set) and loop is None:
            raise TypeError(
                "an asyncio HealthServicer is set on the server's event loop: pass loop=, or "
                "use graceful.grpc.serve_async"
            )
        self.loop = loop
        self._last: int | None = None
        self._wanted = threading.Condition()
        self._due = self._closed = False
        self._async_lock: asyncio.Lock | None = None
        self._thread: threading.Thread | None = None
        if loop is None:
            self._set(self.status())  # nobody watches yet: at once
            self._thread = threading.Thread(target=self._run, name="graceful-health", daemon=True)
            self._thread.start()
        else:
            self.publish()
        signals.phase_changed.connect(self._changed, sender=lifecycle, weak=False)

    def status(self) -> int:
        return SERVING if self.lifecycle.phase is Phase.SERVING else NOT_SERVING

    def _changed(self, sender: object, **kwargs: object) -> None:
        self.publish()

    def publish(self) -> None:
        """Have every service set to what the lifecycle's phase is now (from any thread)."""
        if self.loop is None:
            with self._wanted:
                self._due = True
                self._wanted.notify()
            return
        try:
            asyncio.run_coroutine_threadsafe(self._publish_async(), self.loop)
        except RuntimeError:  # the loop is closed: the server is gone
            logger.debug("graceful: the gRPC server's loop is closed; health left as it is")

    def _run(self) -> None:
        while True:
            with self._wanted:
                while not (self._due or self._closed):
                    self._wanted.wait()
                if self._closed:
                    return
                self._due = False
            self._set(self.status())

    def _set(self, status: int) -> None:
        if status != self._last:
            self._last = status
            for service in self.services:
                self.health.set(service, status)

    async def _publish_async(self) -> None:
        if self._async_lock is None:
            self._async_lock = asyncio.Lock()
        async with self._async_lock:  # the status read and set as one: the last change wins
            status = self.status()
            if status != self._last:
                self._last = status
                for service in self.services:
                    await self.health.set(service, status)

    def close(self) -> None:
        signals.phase_changed.disconnect(self._changed, sender=self.lifecycle)
        with self._wanted:
            self._closed = True
            self._wanted.notify()


def health_for(server: Any, health: Any, *, aio: bool) -> Any:
    """The health servicer given, or a new one added to ``server``."""
    if health is not None:
        if inspect.iscoroutinefunction(health.set) is not aio:
            kind = "grpc_health.v1.health.aio" if aio else "grpc_health.v1.health"
            raise TypeError(f"this server needs a {kind}.HealthServicer, not {health!r}")
        return health
    health = grpc_health.aio.HealthServicer() if aio else grpc_health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    return health
