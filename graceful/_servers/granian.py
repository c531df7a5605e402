"""Granian: SIGTERM drains under its plain command (``granian --interface asgi|wsgi app``).

A Granian worker stops on its own SIGINT and SIGTERM handlers, which set the worker's stop
signal (a ``WorkerSignal`` its Rust server watches): the listener closes at once. Its main
process passes SIGINT and SIGTERM on to the workers (as SIGTERM, at once) and waits for them.
Granian loads the app in the worker before it installs those handlers, so graceful, imported
by the app, wraps the installers first (:func:`wrap_signal_installers`, through
:mod:`graceful._servers.compat`): the worker's stop signal is kept, and graceful's handlers
take the signals, drain, and set it last.

- ASGI (``--interface asgi``): the handlers are the worker loop's (:class:`LoopLink`); the stop
  sequence runs on the loop, where the middleware's goodbye ends websockets and streams.
- WSGI (``--interface wsgi``): ``signal.signal`` handlers in the worker's main thread; the
  sequence runs in a thread (:func:`graceful._runtime.shutdown.install_signal_handlers`).

Once drained, and before the stop signal is set, a worker serves what the kernel queued on its
listener (:mod:`graceful._servers.backlog`): on Linux each worker builds a listening socket of
its own (``SO_REUSEPORT``) after it installed its signal handlers, and its Rust server closes
it as it stops, resetting every connection still queued there (a proxy that had written a POST
on one answers 502). New connection attempts are dropped meanwhile; a client's retry finds the
port closed, or another worker. A listener shared through the main process (``--uds``) is left
as it is.

``--workers-kill-timeout`` kills a worker that is still draining after that many seconds:
leave it unset, or above the delay plus the drain timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

from .._runtime.lifecycle import Lifecycle
from .._runtime.shutdown import install_signal_handlers, log_through
from . import backlog, compat, served
from .loop_link import LoopLink

__all__ = ["WorkerStop", "attach", "wrap_signal_installers"]

logger = logging.getLogger("graceful")

SERVER_LOGGER = "_granian"

_links: dict[asyncio.AbstractEventLoop, LoopLink] = {}


def wrap_signal_installers() -> None:
    """Put graceful's stop in front of Granian's in every worker started from now on (its
    installers are looked up when a worker starts). Once per process."""
    compat.wrap_granian_signal_installers(_on_loop_signals, _on_sync_signals)


def _on_loop_signals(loop: asyncio.AbstractEventLoop, stop_signal: Any) -> None:
    """An ASGI worker installed its handlers on ``loop``: graceful's replace them."""
    lifecycle = _served_lifecycle()
    if lifecycle is None:
        return
    log_through(SERVER_LOGGER)
    stop = WorkerStop(lifecycle, stop_signal)
    link = LoopLink(lifecycle, loop, lambda: link.spawn(stop.serve_queue_async()), stop.force)
    stop.gave_up = lambda: link.sequence.gave_up
    _links[loop] = link.install()
    logger.debug("graceful: SIGTERM drains this Granian ASGI worker")


def _on_sync_signals(stop_signal: Any) -> None:
    """A WSGI worker installed its handlers (in its main thread): graceful's replace them."""
    lifecycle = _served_lifecycle()
    if lifecycle is None:
        return
    log_through(SERVER_LOGGER)
    stop = WorkerStop(lifecycle, stop_signal)
    handlers = install_signal_handlers(lifecycle, stop.serve_queue, on_force=stop.force)
    stop.gave_up = lambda: handlers.sequence.gave_up
    logger.debug("graceful: SIGTERM drains this Granian WSGI worker")


def _served_lifecycle() -> Lifecycle | None:
    """The lifecycle of the app's middleware; None (Granian's stop left as is) without one."""
    lifecycle = served.first()
    if lifecycle is None:
        logger.debug("graceful: no middleware in this Granian worker; its stop is left as is")
    return lifecycle


def attach(lifecycle: Lifecycle) -> LoopLink | None:
    """The link of the Granian worker running this loop, if graceful took its signals."""
    with contextlib.suppress(RuntimeError):
        return _links.get(asyncio.get_running_loop())
    return None


class WorkerStop:
    """The end of a Granian worker's stop: serve what the kernel queued on the worker's own
    listener, then set its stop signal (its Rust server stops accepting, closes the listener
    and finishes its connections). Made as the worker installs its signal handlers, before
    it builds its listener: the listening sockets already there are not the worker's."""

    def __init__(self, lifecycle: Lifecycle, stop_signal: Any) -> None:
        self.lifecycle = lifecycle
        self.stop_signal = stop_signal
        self.forced = False
        #: Whether the stop's wait for in-flight work gave up (what is stuck was logged).
        self.gave_up: Callable[[], bool] = lambda: False
        self._before = set(backlog.tcp_listeners())

    def force(self) -> None:
        self.forced = True
        self.stop_signal.set()

    def serve_queue(self) -> None:
        """From a thread (WSGI): the queue served (at most :data:`backlog.WAIT_LIMIT`), then
        the stop signal set."""
        try:
            with self._own_listeners() as listeners:
                if listeners:
                    backlog.serve_queued(
                        listeners, self._inflight(), backlog.WAIT_LIMIT, abort=self._aborted
                    )
        finally:
            self.stop_signal.set()

    async def serve_queue_async(self) -> None:
        """:meth:`serve_queue` on the worker's event loop (ASGI)."""
        try:
            with self._own_listeners() as listeners:
                if listeners:
                    await backlog.serve_queued_open_async(
                        listeners, self._inflight(), backlog.WAIT_LIMIT, abort=self._aborted
                    )
        finally:
            self.stop_signal.set()

    def _aborted(self) -> bool:
        return self.forced

    def _inflight(self) -> Callable[[], int]:
        return (lambda: 0) if self.gave_up() else (lambda: self.lifecycle.inflight)

    @contextlib.contextmanager
    def _own_listeners(self) -> Iterator[list[socket.socket]]:
        """Copies of the listeners the worker built: TCP with ``SO_REUSEPORT``, not listening
        when the worker installed its signal handlers."""
        socks: list[socket.socket] = []
        try:
            for inode, fd in backlog.tcp_listeners().items():
                if inode in self._before:
                    continue
                with contextlib.suppress(OSError):  # closed meanwhile
                    sock = socket.socket(fileno=os.dup(fd))
                    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
                        socks.append(sock)
                    else:
                        sock.close()
            if not socks:
                logger.debug("graceful: no listener of this Granian worker's own to serve")
            yield socks
        finally:
            for sock in socks:
                sock.close()
