"""uvicorn: SIGTERM drains instead of stopping at once.

Three ways in, all with ``graceful.ASGIMiddleware`` in the app (it counts what is in flight):

- plain ``uvicorn module:app`` (also ``--workers N``): the middleware finds uvicorn's signal
  handler at lifespan start-up (or at the first request when lifespan is off) and puts
  :meth:`ServerLink.handle` in its place;
- ``graceful.uvicorn.run(app, **uvicorn_options)``, like ``uvicorn.run``;
- ``graceful.uvicorn.Server(config)``, a ``uvicorn.Server`` for your own loop.

Either way a signal is only recorded; the stop runs on the server's event loop through
:class:`graceful._runtime.shutdown.StopSequence` and ends by setting ``server.should_exit``,
so uvicorn then shuts down as usual: SIGTERM drains (readiness fails, requests are served
through the delay, in-flight work is awaited up to the drain timeout, then uvicorn stops); SIGINT
stops without the delay; a second SIGINT, or SIGQUIT, stops at once (``force_exit``). The signal is
not handed back to uvicorn, which would re-raise it after shutting down: the exit status is 0.

Before ``should_exit`` the link serves what the kernel queued on the listening sockets the
server bound itself: new connection attempts are dropped (the client's retry finds the port
closed: a refusal, on which nothing was sent) while uvicorn accepts the queued ones, which
closing the listener would reset after a proxy had written its request on them; then the
listeners close and the requests in flight finish (:mod:`graceful._servers.backlog`, Linux; at
most two seconds).

Under gunicorn's uvicorn workers linked by ``graceful.gunicorn`` (``lifecycle.node`` set) the
master drives the drain, so uvicorn's handler is left in place: no second delay.

At the end of the delay the middleware itself ends open-ended HTTP responses (server-sent
events and other chunked streams) through ASGI, as under any server (see
:mod:`graceful._adapters.goodbye`). What this module still needs of uvicorn beyond its public
API (``Server.handle_exit`` as the SIGTERM handler, ``should_exit``, ``force_exit``,
``capture_signals``, ``servers``, the supervisor's workers and signal queue) is reached only
through the uvicorn section of :mod:`graceful._servers.compat`, with the versions it was checked on.
Needs uvicorn 0.30 or later.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

try:
    import uvicorn
except ImportError as exc:  # pragma: no cover - exercised by hiding uvicorn in a test
    raise ImportError(
        "graceful.uvicorn needs uvicorn; install it with: pip install 'graceful-drain[uvicorn]'"
    ) from exc

from .._runtime.lifecycle import Lifecycle, get_lifecycle
from .._runtime.shutdown import StopSequence, log_through, terminal_signals_group
from . import backlog as _backlog
from . import compat, uvicorn_reload
from .uvicorn_reload import Reloader, usr2_installable

compat.check_uvicorn_version(uvicorn.__version__)

__all__ = ["Server", "ServerLink", "attach", "run"]

logger = logging.getLogger("graceful")

#: Where graceful's lines go under uvicorn (unless the ``graceful`` logger is handled already).
SERVER_LOGGER = "uvicorn.error"

#: The signals a link handles; uvicorn itself handles SIGINT and SIGTERM only.
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)

#: How long uvicorn may still wait for connections once a drain hands over to it (unless the
#: server's ``timeout_graceful_shutdown`` was set): by then nothing is in flight. When the
#: drain gave up, what is left was logged as stuck and uvicorn does not wait at all.
HANDOVER_GRACE = 0.5

#: uvicorn's exit status when the server did not start (in ``uvicorn.config`` only from 0.50).
STARTUP_FAILURE = 3


class ServerLink:
    """A uvicorn server whose stop signals are run by a stop sequence.

    (A :class:`~graceful._runtime.shutdown.StopSequence`.)

    :meth:`handle` is the signal handler: it only schedules the signal on the server's event
    loop, where the sequence runs (a drain on SIGTERM). The stop ends with ``should_exit``.
    """

    def __init__(
        self,
        server: uvicorn.Server,
        lifecycle: Lifecycle,
        loop: asyncio.AbstractEventLoop,
        *,
        grace: float | None = None,
    ) -> None:
        self.server = server
        self.lifecycle = lifecycle
        self.loop = loop
        self.sequence = StopSequence(lifecycle, self._stop, self._force)
        #: uvicorn's wait after the hand-over (None: keep the server's own setting).
        self.grace = grace
        self._previous: dict[int, Any] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._worker_stopping = False
        #: A SIGTERM found a successor on the same socket (graceful reload): see dispatch.
        self.handed_over = False

    # -- signals ---------------------------------------------------------------------------

    def install(self, signums: tuple[int, ...] = SIGNALS) -> ServerLink:
        """Handle ``signums`` from now on (main thread only)."""
        for signum in signums:
            self._previous.setdefault(signum, signal.signal(signum, self.handle))
        return self

    def uninstall(self) -> None:
        """Put back the handlers :meth:`install` replaced, where ours are still in place."""
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self.handle:
                signal.signal(signum, previous)
        self._previous.clear()

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler: record the signal, the loop does the work."""
        try:
            self.loop.call_soon_threadsafe(self.dispatch, signum)
        except RuntimeError:  # the loop is closed: the server is gone, act as if we were not
            self._pass_on(signum, frame)

    def dispatch(self, signum: int) -> None:
        """Act on one signal (on the loop): start, speed up or force the stop."""
        if (
            signum == signal.SIGTERM
            and not self.handed_over
            and self.lifecycle.draining_since is None
            and (successor := self._successor()) is not None
        ):
            self.handed_over = True
            self.lifecycle.hand_over()
            logger.info(
                "in-place restart: the new %s (pid %d) accepts on the same socket; "
                "this one serves %gs more (handover_delay), then stops",
                successor[0],
                successor[1],
                self.lifecycle.config.delay,
            )
        name = self.sequence.signal(signum)
        if name is not None:
            task = self.loop.create_task(self.sequence.run_async(name))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _successor(self) -> tuple[str, int] | None:
        """What takes over this server's socket in an in-place restart, while it lives: the
        runner this one started, or (a worker of ``--workers N``) its supervisor's."""
        reloader = getattr(self.server, "reloader", None)
        if reloader is not None and reloader.successor_alive():
            return "runner", reloader.pid()
        pid = uvicorn_reload.supervisor_successor(self.lifecycle.config.pid_file)
        return None if pid is None else ("supervisor", pid)

    def _pass_on(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
            return
        signal.signal(signum, previous)
        if previous == signal.SIG_DFL:
            signal.raise_signal(signum)

    # -- the hand-over to uvicorn ----------------------------------------------------------

    def _stop(self) -> None:
        if self.grace is not None:
            # Past the bound, what is still in flight was logged and is stopped at once.
            compat.set_shutdown_timeout(
                self.server.config, 0 if self.sequence.gave_up else self.grace
            )
        if self.lifecycle.node is not None:  # gunicorn's master serves the listen queue
            compat.request_exit(self.server)
            return
        task = self.loop.create_task(self._serve_queue_then_exit())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_queue_then_exit(self) -> None:
        """Before uvicorn's own stop: what the kernel queued on the listeners this server bound
        itself is served (closing them would reset it: a proxy that wrote a POST there answers
        502); listeners other processes share (``--workers``, ``--fd``) stop accepting here
        first. Either way what the server accepted last is served, not closed unread. At most
        :data:`backlog.WAIT_LIMIT` seconds."""
        gave_up = self.sequence.gave_up  # what is stuck in flight is not waited for again
        inflight = (lambda: 0) if gave_up else (lambda: self.lifecycle.inflight)
        if self.handed_over and not gave_up:  # kept-alive connections get their answer first
            inflight = functools.partial(compat.open_connections, self.server)
        close = functools.partial(compat.close_listeners, self.server)
        abort = functools.partial(compat.forcing_exit, self.server)
        try:
            listeners = compat.own_listeners(self.server)
            if listeners and await _backlog.serve_queued_async(
                listeners, close, inflight, _backlog.WAIT_LIMIT, abort=abort
            ):
                return
            await _backlog.close_then_settle_async(
                close, inflight, _backlog.WAIT_LIMIT, abort=abort
            )
        finally:
            compat.request_exit(self.server)

    def _force(self) -> None:
        compat.set_shutdown_timeout(self.server.config, 0)
        compat.force_exit(self.server)

    # -- a gunicorn worker's SIGTERM -------------------------------------------------------

    def take_worker_term(self) -> ServerLink:
        """Under gunicorn (main thread only): the master's SIGTERM to this worker (its
        hand-over once the node drained, a recycled worker) first stops this worker accepting
        and lets what it accepted last send its request and be served; then uvicorn's own
        handler runs. The listening socket is shared with the other workers (and, after a
        USR2, with the new master's): its queue is theirs, and uvicorn would close a
        connection it accepted but has not read yet."""
        self._previous.setdefault(signal.SIGTERM, signal.signal(signal.SIGTERM, self._worker_term))
        return self

    def _worker_term(self, signum: int, frame: FrameType | None) -> None:
        if self._worker_stopping:
            return  # one is under way
        self._worker_stopping = True
        try:
            self.loop.call_soon_threadsafe(self._spawn_settle_then_pass_on, signum, frame)
        except RuntimeError:  # the loop is closed
            self._pass_on(signum, frame)

    def _spawn_settle_then_pass_on(self, signum: int, frame: FrameType | None) -> None:
        task = self.loop.create_task(self._settle_then_pass_on(signum, frame))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle_then_pass_on(self, signum: int, frame: FrameType | None) -> None:
        """Stop accepting, then wait until this worker has no connection left (each closes
        after its next answer, which says ``Connection: close`` since the drain), at most
        :data:`backlog.WAIT_LIMIT` seconds: a connection accepted last, or kept alive, gets its
        request answered rather than closed under it by uvicorn's stop."""
        close = functools.partial(compat.close_listeners, self.server)
        try:
            await _backlog.close_then_settle_async(
                close,
                lambda: compat.open_connections(self.server),
                _backlog.WAIT_LIMIT,
                abort=functools.partial(compat.forcing_exit, self.server),
            )
        finally:
            self._pass_on(signum, frame)


# -- the middleware's way in (plain ``uvicorn module:app``) -------------------------------------


def attach(lifecycle: Lifecycle) -> ServerLink | None:
    """The link to the uvicorn server running this process's event loop, made on first use.

    Called by the middleware from the loop (lifespan start-up or first request). When SIGTERM's
    handler is a ``uvicorn.Server``'s, the server is linked; the link takes over SIGTERM, SIGINT
    and SIGQUIT unless gunicorn drives the drain (``lifecycle.node`` set) or this is not the
    main thread. None when no uvicorn server is found (another server, or uvicorn run outside
    the main thread).
    """
    handler = signal.getsignal(signal.SIGTERM)
    link_owner = getattr(handler, "__self__", None)
    if isinstance(link_owner, ServerLink):
        return link_owner
    owner = compat.server_of_handler(handler, uvicorn.Server)
    if owner is None:
        return None
    compat.check_server(owner)
    if isinstance(owner, Server) and owner.link is not None:
        return owner.link
    log_through(SERVER_LOGGER)
    loop = asyncio.get_running_loop()
    grace = HANDOVER_GRACE if owner.config.timeout_graceful_shutdown is None else None
    link = ServerLink(owner, lifecycle, loop, grace=grace)
    if getattr(lifecycle, "node", None) is not None:
        logger.debug("gunicorn drives the drain: uvicorn's signal handlers stay in place")
        if threading.current_thread() is threading.main_thread():
            link.take_worker_term()
        return link
    if threading.current_thread() is not threading.main_thread():
        return link
    logger.info("graceful: SIGTERM drains this uvicorn server (pid %d)", os.getpid())
    if os.environ.get(uvicorn_reload.READY_SOCKET):  # a worker of graceful's supervisor
        task = loop.create_task(uvicorn_reload.tell_supervisor_when_started(owner))
        link._tasks.add(task)
        task.add_done_callback(link._tasks.discard)
    return link.install()


# -- explicit use -------------------------------------------------------------------------------


class Server(uvicorn.Server):
    """A ``uvicorn.Server`` that drains on SIGTERM (see the module's documentation).

    ``timeout_graceful_shutdown`` (uvicorn's own wait after ``should_exit``) is set from the
    drain budget when left unset: ``drain_timeout`` for stops uvicorn starts itself (such as
    ``limit_max_requests``); after a drain, nothing is in flight, so uvicorn waits at most
    :data:`HANDOVER_GRACE` more.
    """

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle | None = None) -> None:
        super().__init__(config)  # uvicorn's Config has set up its logging by now
        compat.check_server(self)
        log_through(SERVER_LOGGER)
        self.lifecycle = lifecycle if lifecycle is not None else get_lifecycle()
        self.link: ServerLink | None = None
        self._grace: float | None = None
        self.graceful_sockets_handed = False
        self.reloader = Reloader(
            self.lifecycle.config.pid_file,
            functools.partial(compat.listening_sockets, self),
            self._sockets_handed,
        )
        if config.timeout_graceful_shutdown is None:
            compat.set_shutdown_timeout(config, self.lifecycle.config.drain_timeout)
            self._grace = HANDOVER_GRACE

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # Python delivers signals only to the main thread
            return
        loop = asyncio.get_running_loop()
        self.link = ServerLink(self, self.lifecycle, loop, grace=self._grace).install()
        previous_usr2 = None
        if usr2_installable():

            def on_usr2(signum: int, frame: FrameType | None) -> None:
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    loop.call_soon_threadsafe(self.reloader.start_successor)

            previous_usr2 = signal.signal(signal.SIGUSR2, on_usr2)
        try:
            yield
        finally:
            self.link.uninstall()
            if previous_usr2 is not None:
                signal.signal(signal.SIGUSR2, previous_usr2)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:  # the app started (lifespan) and the socket accepts
            self.reloader.serving()

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        # Sockets handed in are someone else's too: their listen queue is left alone.
        self.graceful_sockets_handed = sockets is not None
        try:
            await super().serve(sockets)
        finally:
            self.reloader.finished()

    def _sockets_handed(self) -> None:
        self.graceful_sockets_handed = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.link is None:
            super().handle_exit(sig, frame)
        else:
            self.link.handle(sig, frame)


def run(app: Any, *, lifecycle: Lifecycle | None = None, **options: Any) -> None:
    """``uvicorn.run(app, **options)`` with :class:`Server`: SIGTERM drains.

    ``app`` should include ``graceful.ASGIMiddleware``. With ``workers`` > 1 (``app`` an import
    string) uvicorn's supervisor runs the workers, each one draining through the middleware;
    signals reach the workers at once and as they are (see :func:`_supervise`).
    """
    app_dir = options.pop("app_dir", None)
    if app_dir is not None:  # as uvicorn.run does: where the app's module is imported from
        sys.path.insert(0, app_dir)
    config = uvicorn.Config(app, **options)
    if config.reload or (config.workers > 1 and not isinstance(app, str)):
        uvicorn.run(app, **options)  # uvicorn's own: the reloader, or its refusal of the app
        return
    # What uvicorn.run does next, with graceful's server (or signals passed on to the workers).
    server = None if config.workers > 1 else Server(config, lifecycle)
    try:
        if server is None:
            _supervise(config)  # each worker's middleware links its own server
        else:
            server.run()
    finally:
        if config.uds and os.path.exists(config.uds):
            os.remove(config.uds)
    if server is not None and not server.started:
        sys.exit(STARTUP_FAILURE)


def _supervise(config: uvicorn.Config) -> None:
    """uvicorn's supervisor, passing SIGTERM, SIGINT and SIGQUIT on to the workers at once.

    On its own the supervisor looks at signals twice a second and sends every worker SIGTERM
    whatever it received: readiness would fail up to 0.5 s late and Ctrl-C would wait for the
    delay. Here each signal goes on to the workers as it is, the moment it arrives; the
    supervisor then stops as usual (its own SIGTERM to the workers is ignored by then).
    """
    sockets = [config.bind_socket()]
    supervisor = compat.new_supervisor(config, sockets)
    parts = compat.supervisor_parts(supervisor)
    if parts is None:
        supervisor.run()  # a uvicorn whose supervisor we do not know: as it is
        return
    processes, signal_queue = parts

    def forward(signum: int, frame: FrameType | None) -> None:
        # SIGQUIT is not one of the supervisor's own: it stops as on SIGINT.
        signal_queue.append(signal.SIGINT if signum == signal.SIGQUIT else signum)
        if signum == signal.SIGINT and terminal_signals_group():
            return  # a Ctrl-C: the terminal sent it to the workers as well
        for worker in list(processes):
            pid = compat.live_pid(worker)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)

    for signum in SIGNALS:
        signal.signal(signum, forward)
    reloader = _supervisor_reloader(config, sockets, processes)
    try:
        supervisor.run()
    finally:
        if reloader is not None:
            reloader.finished()


def _supervisor_reloader(config: uvicorn.Config, sockets: list[Any], processes: Any) -> Any:
    """The supervisor's part in the in-place restart (``pid_file`` set, SIGUSR2; see
    :mod:`graceful._servers.uvicorn_reload`): it says ready once every worker has started."""
    if not hasattr(signal, "SIGUSR2"):
        return None
    pid_file = get_lifecycle().config.pid_file
    if pid_file is None:
        signal.signal(signal.SIGUSR2, _usr2_without_pid_file)  # its default ends the supervisor
        return None
    reloader = Reloader(pid_file, lambda: list(sockets), lambda: None, what="supervisor")

    def on_usr2(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=reloader.start_successor, name="graceful-usr2").start()

    signal.signal(signal.SIGUSR2, on_usr2)
    ready = uvicorn_reload.WorkersReady()
    os.environ[uvicorn_reload.READY_SOCKET] = ready.name  # the workers inherit it

    def workers() -> set[int]:
        return {pid for each in list(processes) if (pid := compat.live_pid(each)) is not None}

    ready.listen(workers, config.workers, reloader.serving)
    return reloader


def _usr2_without_pid_file(signum: int, frame: FrameType | None) -> None:
    logger.warning(
        "SIGUSR2 ignored: an in-place restart needs a pid file (GRACEFUL_PID_FILE) for "
        "graceful reload to follow it"
    )
