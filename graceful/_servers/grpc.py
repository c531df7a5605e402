"""gRPC servers (``grpc.server`` and ``grpc.aio.server``): SIGTERM drains instead of killing.

Three pieces, each gRPC's own mechanism where it has one:

- :class:`Interceptor` / :class:`AsyncInterceptor` count every RPC in flight in the lifecycle,
  from the moment its handler is called until gRPC ends the RPC (a streaming RPC until its
  response stream ends: ``context.add_callback`` / ``add_done_callback``). The health service
  is not counted: its ``Watch`` streams last as long as the client's connection.
- the standard health service (``grpc_health.v1``), linked to the lifecycle
  (:class:`HealthLink`): NOT_SERVING the moment a drain starts (every client ``Watch``-ing hears
  it at once on its own connection: gRPC's client-side health checking takes the node out of
  its round robin) and SERVING once ready or resumed.
- :func:`serve` / :func:`serve_async` start the server and wait for it, like
  ``server.start(); server.wait_for_termination()``. SIGTERM: NOT_SERVING, the delay (RPCs are
  served throughout), in-flight RPCs awaited (bounded by the drain timeout), then the server's
  own graceful stop, ``server.stop(grace)``: GOAWAY on every connection (gRPC's transparent
  retry re-sends what the server never took), the listener closed, what still runs finishes
  within what is left of the drain timeout. SIGINT stops without the delay; a second SIGINT or
  SIGQUIT stops at once. grpcio installs no signal handler of its own (a plain server dies on
  SIGTERM), so nothing of gRPC's is replaced.

The probes and control routes (``/readyz``, ``/livez``, ``/-/graceful/drain`` ...) are served on
an optional side HTTP port (:class:`ControlServer`): ``graceful.WSGIMiddleware`` over a 404 app,
on the standard library's threading WSGI server in a daemon thread, sharing the lifecycle. A
gRPC port cannot answer plain HTTP, and the standard library keeps the extra free of another
server; the control routes are few and small.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

try:
    import grpc
    import grpc.aio
    import grpc_health.v1.health  # noqa: F401 - the health service, used by .grpc_health
except ImportError as exc:  # pragma: no cover - the extra is installed in the test runs
    raise ImportError(
        f"graceful.grpc needs grpcio and grpcio-health-checking ({exc}): "
        "pip install 'graceful-drain[grpc]'"
    ) from exc

from .._runtime.lifecycle import Lifecycle, LifecycleError, Phase, get_lifecycle
from .._runtime.shutdown import install_signal_handlers
from .grpc_control import ALL_INTERFACES, ControlServer
from .grpc_health import (
    HEALTH_SERVICE,
    HEALTH_WATCH,
    HealthLink,
    Watches,
    health_for,
    watched,
    watches_of,
)
from .loop_link import LoopLink

__all__ = [
    "HEALTH_SERVICE",
    "AsyncInterceptor",
    "ControlServer",
    "HealthLink",
    "Interceptor",
    "Watches",
    "serve",
    "serve_async",
    "watches_of",
]

logger = logging.getLogger("graceful")

#: The in-flight entries' "method" (the path is the RPC's full name, ``/pkg.Service/Method``).
RPC = "GRPC"

Behavior = Callable[..., Any]


# -- in-flight RPCs ----------------------------------------------------------------------------


def _begin(lifecycle: Lifecycle, method: str) -> Callable[[], None]:
    """Count one RPC in flight; the callable ends it (more than once is harmless)."""
    if lifecycle.announcing:
        lifecycle.count_served_while_draining()
    token = lifecycle.requests.begin(RPC, method, lifecycle.clock())
    end = lifecycle.requests.end
    return lambda: end(token)


def _on_done(context: Any, end: Callable[[], None]) -> None:
    """Call ``end`` once gRPC ends the RPC (completed, failed or cancelled)."""
    add_done = getattr(context, "add_done_callback", None)  # grpc.aio's context
    if add_done is not None:
        add_done(lambda _context: end())
    elif not context.add_callback(end):  # grpc's: False when the RPC has ended already
        end()


def _counted(behavior: Behavior, method: str, lifecycle: Lifecycle) -> Behavior:
    """``behavior`` counted in flight, of the same kind (gRPC asyncio calls a coroutine
    function, an async generator function and a plain function differently)."""
    if inspect.isasyncgenfunction(behavior):

        async def counted_stream(request: Any, context: Any) -> Any:
            _on_done(context, _begin(lifecycle, method))
            async for response in behavior(request, context):
                yield response

        return counted_stream
    if inspect.iscoroutinefunction(behavior):

        async def counted_coroutine(request: Any, context: Any) -> Any:
            _on_done(context, _begin(lifecycle, method))
            return await behavior(request, context)

        return counted_coroutine

    def counted(request: Any, context: Any) -> Any:
        _on_done(context, _begin(lifecycle, method))
        return behavior(request, context)

    return counted


def _count(handler: Any, method: str, lifecycle: Lifecycle) -> Any:
    """A method handler like ``handler`` whose behavior is counted in flight."""
    streams = (handler.request_streaming, handler.response_streaming)
    make, behavior = {
        (False, False): (grpc.unary_unary_rpc_method_handler, handler.unary_unary),
        (False, True): (grpc.unary_stream_rpc_method_handler, handler.unary_stream),
        (True, False): (grpc.stream_unary_rpc_method_handler, handler.stream_unary),
        (True, True): (grpc.stream_stream_rpc_method_handler, handler.stream_stream),
    }[streams]
    return make(
        _counted(behavior, method, lifecycle),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _intercepted(
    handler: Any, method: str, lifecycle: Lifecycle, uncounted: tuple[str, ...]
) -> Any:
    if handler is None:
        return None
    if method == HEALTH_WATCH:
        return watched(handler, watches_of(lifecycle))
    if method.startswith(uncounted):
        return handler
    return _count(handler, method, lifecycle)


class Interceptor(grpc.ServerInterceptor):  # type: ignore[misc,unused-ignore]
    """Counts every RPC of a ``grpc.server`` in flight: pass it at creation,
    ``grpc.server(pool, interceptors=[graceful.grpc.Interceptor()])``.

    ``lifecycle``: the process-wide one by default (the one :func:`serve` drains).
    ``uncounted``: method-name prefixes never counted (the health service's by default). The
    health service's ``Watch`` streams are ended when the server stops (see :class:`Watches`).
    """

    def __init__(
        self, lifecycle: Lifecycle | None = None, *, uncounted: Sequence[str] = (HEALTH_SERVICE,)
    ) -> None:
        self.lifecycle = get_lifecycle() if lifecycle is None else lifecycle
        self.uncounted = tuple(uncounted)

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        method: str = details.method
        return _intercepted(continuation(details), method, self.lifecycle, self.uncounted)


class AsyncInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc,unused-ignore]
    """:class:`Interceptor` for ``grpc.aio.server(interceptors=[...])``."""

    def __init__(
        self, lifecycle: Lifecycle | None = None, *, uncounted: Sequence[str] = (HEALTH_SERVICE,)
    ) -> None:
        self.lifecycle = get_lifecycle() if lifecycle is None else lifecycle
        self.uncounted = tuple(uncounted)

    async def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        method: str = details.method
        return _intercepted(await continuation(details), method, self.lifecycle, self.uncounted)


# -- serving -----------------------------------------------------------------------------------


class _Stop:
    """The end of a stop: the server's own graceful stop, within what is left of the drain
    timeout, then the health ``Watch`` streams ended (the server no longer takes new ones)."""

    def __init__(self, server: Any, lifecycle: Lifecycle) -> None:
        self.server = server
        self.lifecycle = lifecycle
        self.gave_up: Callable[[], bool] = lambda: False

    def grace(self) -> float:
        """0 when the wait for in-flight RPCs gave up (they were logged), else what is left of
        the drain timeout (all of it for a stop without a drain)."""
        if self.gave_up():
            return 0.0
        lifecycle = self.lifecycle
        deadline = lifecycle.drain_deadline()
        if deadline is None:
            return lifecycle.config.drain_timeout
        return max(0.0, min(deadline - lifecycle.clock(), lifecycle.config.drain_timeout))

    def stop(self) -> None:
        """A ``grpc.server``'s: ``stop(grace)`` sends the GOAWAYs and returns."""
        self.server.stop(self.grace())
        watches_of(self.lifecycle).end_all()

    def force(self) -> None:
        self.server.stop(0)
        watches_of(self.lifecycle).end_all()

    async def stop_async(self, grace: float | None = None) -> None:
        """A ``grpc.aio.server``'s: ``stop(grace)`` runs until the server has stopped."""
        stopping = asyncio.ensure_future(self.server.stop(self.grace() if grace is None else grace))
        await asyncio.sleep(0)  # the stop's first step: GOAWAY, no new RPC taken
        watches_of(self.lifecycle).end_all()
        await stopping


def _ready(lifecycle: Lifecycle) -> None:
    if lifecycle.phase is Phase.STARTING:
        lifecycle.mark_ready()


def _stopped(lifecycle: Lifecycle) -> None:
    if lifecycle.phase is Phase.STOPPING:
        try:
            lifecycle.mark_stopped()
        except LifecycleError as exc:  # pragma: no cover - a race with another stop
            logger.debug("%s", exc)


def serve(
    server: Any,
    *,
    health: Any = None,
    services: Iterable[str] = ("",),
    control_port: int | None = None,
    control_host: str = ALL_INTERFACES,
    lifecycle: Lifecycle | None = None,
) -> None:
    """Start a ``grpc.server`` and block until it has stopped; SIGTERM drains it first.

    ``health``: your ``grpc_health.v1.health.HealthServicer`` if you added one to the server;
    without it one is added (call before ``server.start()``: :func:`serve` starts it).
    ``services``: the health service names kept in step with the lifecycle (``""``: the whole
    server, what clients ask by default). ``control_port``: serve the probes and control routes
    there too (see :class:`ControlServer`). Call from the main thread (signals go there).
    """
    lifecycle = get_lifecycle() if lifecycle is None else lifecycle
    with contextlib.ExitStack() as undo:
        undo.callback(HealthLink(health_for(server, health, aio=False), lifecycle, services).close)
        if control_port is not None:
            undo.callback(ControlServer(lifecycle, control_port, control_host).close)
        stop = _Stop(server, lifecycle)
        handlers = install_signal_handlers(lifecycle, stop.stop, on_force=stop.force)
        undo.callback(handlers.uninstall)
        stop.gave_up = lambda: handlers.sequence.gave_up
        server.start()
        _ready(lifecycle)
        server.wait_for_termination()
        _stopped(lifecycle)


async def serve_async(
    server: Any,
    *,
    health: Any = None,
    services: Iterable[str] = ("",),
    control_port: int | None = None,
    control_host: str = ALL_INTERFACES,
    lifecycle: Lifecycle | None = None,
) -> None:
    """:func:`serve` for a ``grpc.aio.server``: ``asyncio.run(serve_async(server))``.

    ``health``: a ``grpc_health.v1.health.aio.HealthServicer`` (one is added without it). The
    signals are handled on the running loop (from the main thread)."""
    lifecycle = get_lifecycle() if lifecycle is None else lifecycle
    loop = asyncio.get_running_loop()
    with contextlib.ExitStack() as undo:
        link = HealthLink(health_for(server, health, aio=True), lifecycle, services, loop=loop)
        undo.callback(link.close)
        if control_port is not None:
            undo.callback(ControlServer(lifecycle, control_port, control_host).close)
        stop = _Stop(server, lifecycle)
        signal_link = LoopLink(
            lifecycle,
            loop,
            lambda: signal_link.spawn(stop.stop_async()),
            lambda: signal_link.spawn(stop.stop_async(0)),
        ).install()
        undo.callback(signal_link.uninstall)
        stop.gave_up = lambda: signal_link.sequence.gave_up
        await server.start()
        _ready(lifecycle)
        await server.wait_for_termination()
        _stopped(lifecycle)
