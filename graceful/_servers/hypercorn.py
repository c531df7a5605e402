"""Hypercorn: SIGTERM drains, through the runner ``python -m graceful.hypercorn``.

Hypercorn gives an app no way to hold its stop. A worker run in the foreground
(``--workers 0``) stops on its own SIGTERM and SIGINT handlers; under its supervisor (the
default, ``--workers 1`` and up) the supervisor sets an event the workers look at every 0.1 s,
and a SIGTERM sent to a worker itself kills it. Either way the listeners close at once and
readiness never fails. Its public hook is ``shutdown_trigger``: a worker stops when that
awaitable returns. So the runner (:mod:`graceful._servers.hypercorn_cli`: Hypercorn's own
command line) runs every worker with a trigger that returns when graceful's stop sequence ends
(:class:`WorkerLink`): SIGTERM drains (readiness fails at once, requests are served through the
delay, in-flight work is awaited up to the drain timeout), SIGINT stops without the delay, a
second SIGINT or a SIGQUIT stops at once. With workers, its supervisor (:func:`run`) passes
every signal on to them at once and as it is, and reports the first failed exit status.

HTTP/2: while the node drains, every HTTP/2 connection with no open stream gets a GOAWAY (at
the drain's start, or when its last open stream closes), with the last stream id it processed,
as Hypercorn sends it at its stop: the client opens no new stream on it and goes elsewhere (a
stream it opened meanwhile is refused unprocessed, which RFC 9113 lets it send again). Not on a
connection with streams open: clients built on the ``h2`` library (httpx, httpcore) fail every
open stream when a GOAWAY arrives, even the graceful form with the last stream id 2^31-1. And
only once the client has answered a PING sent when the connection went idle: httpcore also
fails a stream whose whole answer came in the same read as the GOAWAY, when its task was
waiting to read.

Under plain ``hypercorn`` the middleware says at start-up that SIGTERM will not drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import multiprocessing
import os
import signal
import socket
import ssl
import weakref
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

try:
    import hypercorn.config
except ImportError as exc:  # pragma: no cover - exercised by hiding hypercorn in a test
    raise ImportError(
        "graceful.hypercorn needs Hypercorn; install it with: "
        "pip install 'graceful-drain[hypercorn]'"
    ) from exc

from .. import signals
from .._core.errors import GracefulError
from .._runtime.lifecycle import Lifecycle, get_lifecycle
from .._runtime.shutdown import log_through, terminal_signals_group
from . import backlog, compat
from .loop_link import SIGNALS, LoopLink

__all__ = ["RunnerError", "WorkerLink", "attach", "run", "serve_worker"]

logger = logging.getLogger("graceful")

#: Where graceful's lines go under Hypercorn (unless the ``graceful`` logger is handled).
SERVER_LOGGER = "hypercorn.error"
#: The worker classes the runner can run (Hypercorn's trio workers need trio's own loop).
WORKER_CLASSES = ("asyncio", "uvloop")

_links: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, WorkerLink] = (
    weakref.WeakKeyDictionary()
)
_h2_connections: weakref.WeakSet[Any] = weakref.WeakSet()
_warned = False


class RunnerError(GracefulError, ValueError):
    """A Hypercorn setting the runner cannot honour; the message says what to do."""


class WorkerLink(LoopLink):
    """One worker's stop: its signals run a stop sequence on its loop, whose end sets
    :attr:`stopped`, the worker's ``shutdown_trigger``."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        loop: asyncio.AbstractEventLoop,
        config: Any,
        listeners: list[socket.socket],
        *,
        alone: bool,
        accepting: Any = None,
    ) -> None:
        super().__init__(lifecycle, loop, self._stop, self._force)
        self.config = config
        #: The worker's listening sockets; whether this process alone holds them; the
        #: supervisor's count of the workers still accepting once the whole node stops (-1
        #: before): the last one to stop serves the shared queue, new connections dropped.
        self.listeners, self.alone, self.accepting = listeners, alone, accepting
        self.stopped = asyncio.Event()
        self.forced = False
        #: An HTTP/2 connection gets its GOAWAY when its last open stream closes (a drain).
        self.goaway_when_idle = False

    def install(self) -> WorkerLink:
        super().install()
        signals.drain_started.connect(self._on_drain, sender=self.lifecycle)
        signals.resumed.connect(self._on_resumed, sender=self.lifecycle)
        return self

    def uninstall(self) -> None:
        super().uninstall()
        signals.drain_started.disconnect(self._on_drain, sender=self.lifecycle)
        signals.resumed.disconnect(self._on_resumed, sender=self.lifecycle)

    def _stop(self) -> None:
        if self.sequence.gave_up:
            self.config.graceful_timeout = 0  # what is stuck was logged: not waited for again
        self.spawn(self._serve_queue_then_stop())

    def _force(self) -> None:
        self.forced = True
        self.config.graceful_timeout = 0
        self.stopped.set()

    async def _serve_queue_then_stop(self) -> None:
        """Before Hypercorn's stop: the worker stops accepting, and what it accepted last
        is served rather than closed unread; with listeners of its own, what the kernel queued
        on them is served first (:mod:`graceful._servers.backlog`). At most
        :data:`backlog.WAIT_LIMIT` seconds."""
        gave_up = self.sequence.gave_up
        inflight = (lambda: 0) if gave_up else (lambda: self.lifecycle.inflight)
        abort = functools.partial(getattr, self, "forced")
        try:
            if (self.alone or self._last_to_accept()) and await backlog.serve_queued_async(
                self.listeners, self._stop_accepting, inflight, backlog.WAIT_LIMIT, abort=abort
            ):
                return
            await backlog.close_then_settle_async(
                self._stop_accepting, inflight, backlog.WAIT_LIMIT, abort=abort
            )
        finally:
            self.stopped.set()

    def _last_to_accept(self) -> bool:
        """Whether the node stops as a whole and this is its last worker still accepting."""
        if self.accepting is None:
            return False
        with self.accepting.get_lock():
            if self.accepting.value <= 0:
                return False
            self.accepting.value -= 1
            return bool(self.accepting.value == 0)

    def _stop_accepting(self) -> None:
        # Hypercorn's asyncio servers accept through the loop's reader on each listener; the
        # descriptors close with Hypercorn's stop. A listener this process alone holds stops
        # listening now (Linux: shutdown() on a listening socket), so that new clients are
        # refused at once rather than dropped until it closes.
        for sock in self.listeners:
            with contextlib.suppress(OSError, ValueError):
                self.loop.remove_reader(sock.fileno())
                if self.alone:
                    sock.shutdown(socket.SHUT_RDWR)

    # -- HTTP/2 --------------------------------------------------------------------------------

    def _on_drain(self, sender: object, **kwargs: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self.loop.call_soon_threadsafe(self.spawn, self._say_goaway())

    def _on_resumed(self, sender: object, **kwargs: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self.loop.call_soon_threadsafe(setattr, self, "goaway_when_idle", False)

    async def _say_goaway(self) -> None:
        self.goaway_when_idle = True
        connections = [c for c in list(_h2_connections) if compat.hypercorn_h2_open(c)]
        said = [await compat.hypercorn_h2_goaway_if_idle(c) for c in connections]
        if connections:
            logger.info(
                "GOAWAY going to %d idle HTTP/2 connections (once the client answers a PING, so"
                " that it has read every answer first); %d busy ones get it once idle",
                sum(said),
                len(said) - sum(said),
            )


async def _after_stream_closed(connection: Any) -> None:
    link = _links.get(asyncio.get_running_loop())
    if link is not None and link.goaway_when_idle:
        await compat.hypercorn_h2_goaway_if_idle(connection)


async def _after_ping_ack(connection: Any, payload: bytes) -> None:
    link = _links.get(asyncio.get_running_loop())
    if link is not None and link.goaway_when_idle:
        await compat.hypercorn_h2_goaway_after_ping(connection, payload)


# -- a worker ----------------------------------------------------------------------------------


def serve_worker(config: Any, sockets: Any = None, accepting: Any = None) -> None:
    """A Hypercorn worker whose stop is graceful's (the target of the supervisor's processes,
    with its count of ``accepting`` workers, or the server itself with ``--workers 0``)."""
    loop: asyncio.AbstractEventLoop
    if config.worker_class == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    loop.set_exception_handler(_ignore_failed_handshakes)
    asyncio.set_event_loop(loop)
    try:
        app = compat.hypercorn_load_app(config)
        loop.run_until_complete(_serve(app, config, sockets, accepting))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        asyncio.set_event_loop(None)
        loop.close()


async def _serve(app: Any, config: Any, sockets: Any, accepting: Any) -> None:
    config.log  # noqa: B018 - Hypercorn sets up its loggers (and their level) on first use
    log_through(SERVER_LOGGER)
    compat.track_hypercorn_h2(_h2_connections, _after_stream_closed, _after_ping_ack)
    loop = asyncio.get_running_loop()
    listeners = [] if sockets is None else [*sockets.secure_sockets, *sockets.insecure_sockets]
    alone = config.workers == 0  # else the supervisor and the other workers hold them too
    link = WorkerLink(
        get_lifecycle(), loop, config, listeners, alone=alone, accepting=accepting
    ).install()
    _links[loop] = link
    try:
        await compat.hypercorn_worker_serve(app, config, sockets, link.stopped.wait)
    finally:
        link.uninstall()
        _links.pop(loop, None)


def _ignore_failed_handshakes(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    if isinstance(context.get("exception"), ssl.SSLError):
        return  # a client's failed TLS handshake, as Hypercorn's own workers ignore it
    loop.default_exception_handler(context)


# -- the supervisor -----------------------------------------------------------------------------


def run(config: hypercorn.config.Config) -> int:
    """Hypercorn's ``run(config)`` with graceful's stop: the exit status.

    ``--workers 0`` serves in this process; N workers run under a supervisor that passes
    SIGTERM, SIGINT and SIGQUIT on to them at once, restarts a worker that exits with status 0
    while serving (``--max-requests``), stops the others when one fails, and exits with the
    first failed status. ``--reload`` runs Hypercorn's own reloader, without graceful's stop.
    """
    if config.worker_class not in WORKER_CLASSES:
        raise RunnerError(
            f"--worker-class {config.worker_class}: graceful.hypercorn runs asyncio and uvloop "
            "workers; use one of those, or Hypercorn's own command"
        )
    if config.use_reloader:
        logger.warning("graceful.hypercorn: --reload runs Hypercorn's reloader; no drain")
        return compat.hypercorn_run(config)
    if config.pid_path is not None:
        with open(config.pid_path, "w") as pid_file:
            pid_file.write(str(os.getpid()))
    sockets = config.create_sockets()
    try:
        if config.workers == 0:
            serve_worker(config, sockets)
            return 0
        return _Supervisor(config, sockets).run()
    finally:
        for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
            sock.close()


class _Supervisor:
    def __init__(self, config: Any, sockets: Any) -> None:
        self.config = config
        self.sockets = sockets
        self.context = multiprocessing.get_context("spawn")
        self.workers: list[BaseProcess] = []
        self.stopping = False
        #: The workers still accepting once the whole node stops (set before they get the
        #: signal; each decrements it as it stops accepting); -1 until then.
        self.accepting = self.context.Value("i", -1)

    def run(self) -> int:
        for signum in SIGNALS:
            signal.signal(signum, self._forward)
        status = 0
        while True:
            if not self.stopping:
                self._populate()
            if not self.workers:
                return status
            wait([worker.sentinel for worker in self.workers])
            for worker in [w for w in self.workers if w.exitcode is not None]:
                worker.join()
                self.workers.remove(worker)
                code = worker.exitcode or 0
                if code != 0 and status == 0:
                    # A worker killed by a signal: the shell's 128 + its number.
                    status = 128 - code if code < 0 else code
                    logger.error(
                        "worker %s exited with %s: the others drain and stop", worker.pid, code
                    )
                    self._stop_all(signal.SIGTERM)

    def _populate(self) -> None:
        while len(self.workers) < self.config.workers:
            worker = self.context.Process(
                target=serve_worker,
                kwargs={
                    "config": self.config,
                    "sockets": self.sockets,
                    "accepting": self.accepting,
                },
            )
            worker.daemon = getattr(self.config, "daemon", False)  # (Hypercorn 0.18 on)
            worker.start()
            self.workers.append(worker)

    def _forward(self, signum: int, frame: object) -> None:
        # A Ctrl-C reached the workers from the terminal already: a second SIGINT would force.
        ctrl_c = signum == signal.SIGINT and terminal_signals_group()
        self._stop_all(signum, send=not ctrl_c)

    def _stop_all(self, signum: int, *, send: bool = True) -> None:
        if not self.stopping:
            with self.accepting.get_lock():
                self.accepting.value = sum(w.exitcode is None for w in self.workers)
        self.stopping = True
        if not send:
            return
        for worker in self.workers:
            if worker.exitcode is None and worker.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signum)


# -- the middleware's way in ----------------------------------------------------------------------


def attach(lifecycle: Lifecycle) -> WorkerLink | None:
    """The runner's link for the running loop; None under plain Hypercorn (said once, with
    what to do: SIGTERM stops it at once)."""
    global _warned
    with contextlib.suppress(RuntimeError):
        link = _links.get(asyncio.get_running_loop())
        if link is not None:
            return link
    if not _warned:
        _warned = True
        log_through(SERVER_LOGGER)
        logger.warning(
            "graceful: plain hypercorn stops at once on SIGTERM (readiness never fails, "
            "in-flight requests are cut): start it with `python -m graceful.hypercorn` and "
            "the same arguments to drain"
        )
    return None
