"""gunicorn server hooks: the master drains on SIGTERM, every worker answers readiness alike.

Use it as the config file::

    gunicorn -c python:graceful.gunicorn app:app

or from your own config file::

    from graceful._servers.gunicorn import *          # the hooks below

If your config defines one of these hooks itself, call ours from it::

    from graceful import gunicorn as graceful_hooks

    def post_fork(server, worker):
        graceful_hooks.post_fork(server, worker)
        ...                                   # your own

SIGTERM to the master: the shared drain flag is set and every worker is woken through its pipe
(its ``/readyz`` answers 503 at once), workers keep accepting and serving through the delay, the
master waits (woken by the workers, not polling) until the node's in-flight total is zero
(bounded by the drain timeout; past it the oldest stuck request of each worker is logged and the
workers are stopped at once), then gunicorn's own graceful stop runs. Before that hand-over,
connections the kernel already queued on the listening sockets are served and new ones are no
longer let in (gunicorn #3397: they would be reset once the last worker closed the socket; see
:mod:`graceful._servers.backlog`). The master keeps supervising workers throughout; once the
delay is over and no request has arrived for a moment, it stops idle sync workers but one (they
would only wait to exit), so that the master exits right after the last answer. SIGINT: the same
without the delay, bounded by ``interrupt_timeout``. A second SIGINT, or SIGQUIT: at once. The
delay counts from the node's first drain: a node already drained over the control route stops at
once. Once the stop has begun it cannot be undone (a resume answers 409, the drain file no
longer matters).

Timings come from ``GRACEFUL_*`` environment variables (or, with ``--preload``, from the config
the app gave the middleware).

gunicorn's idle keep-alive is raised from its 2 s to :data:`keepalive` (5 s), longer than the
``keepalive_timeout`` of the nginx upstream shipped in ``integrations/nginx/`` (4 s): a server
that closes idle connections before its proxy does makes the proxy fail requests on them.
``--keep-alive N`` (or ``GUNICORN_CMD_ARGS``) wins, and so does ``keepalive = N`` written after
``from graceful.gunicorn import *`` in your own config file.

The drain's steps are logged through gunicorn's error log (``gunicorn.error``, at its level),
unless you configured a handler for the ``graceful`` logger (or the root logger) yourself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal as _signal
import threading
import time
from typing import Any

from .._core import stream as _events
from .._runtime.lifecycle import Lifecycle, LifecycleError, Phase, get_lifecycle
from .._runtime.shutdown import StopSequence, log_through
from . import backlog as _backlog
from . import compat as _compat
from . import gunicorn_gthread as _gthread
from . import node_shm as _shared
from . import pidfiles as _pidfiles
from .gunicorn_streams import gunicorn_share
from .node_bells import Bells, wait_readable

__all__ = [
    "child_exit",
    "keepalive",
    "on_starting",
    "post_fork",
    "post_worker_init",
    "pre_fork",
    "pre_request",
    "when_ready",
]

#: gunicorn's ``keepalive`` setting (seconds) for a config that loads this module: above the
#: shipped nginx upstream's ``keepalive_timeout 4s`` (gunicorn's own default is 2 s).
keepalive = 5

_log = logging.getLogger("graceful")


class _Master:
    """The master's stop: its own lifecycle over the shared node, driven by a StopSequence.

    The sequence waits in a thread; when it is done (``on_stop``) or forced (``on_force``) the
    master's main loop is asked, through gunicorn's own signal queue, to hand over to gunicorn:
    gracefully once drained, at once when work is stuck or the stop was forced.

    A thread of its own (:meth:`_listen`) sleeps on the master's pipe: a worker rings it when
    it started a drain, resume or stop (passed on to every worker) or when its in-flight count
    dropped to zero while the node drains (the master's lifecycle looks at the node's total
    again, and the workers too once it is zero). Nothing wakes it while the node serves.
    """

    def __init__(self) -> None:
        self.shared = _shared.SharedNode()
        self.bells = Bells()
        self.lifecycle = Lifecycle(get_lifecycle().config)
        self.lifecycle.node = _shared.SlotView(self.shared, None, self.bells)
        self.sequence = StopSequence(self.lifecycle, self._on_stop, self._on_force)
        self.next_stop: str | None = None  # "graceful" or "quick": time to hand over
        #: gunicorn's own SIGTERM and SIGQUIT handling (see _hand_over).
        self.original: tuple[Any, Any] | None = None
        self.server: Any = None
        #: Workers stopped once the delay was over, for being idle (see _retire).
        self.retired: set[int] = set()
        self._changes = threading.Condition()
        self._changed = 0  # rings the master's thread has handled, and the stop's end
        self._rung = -1  # the header generation the workers were last rung for
        self._listener: threading.Thread | None = None
        #: The ready file was written (see _note_ready).
        self.said_ready = False

    def listen(self) -> None:
        if self._listener is None:
            self._listener = threading.Thread(
                target=self._listen, name="graceful-master-bell", daemon=True
            )
            self._listener.start()

    def _listen(self) -> None:
        fd = self.bells.master_fd  # the pipe this thread was started for, to its end
        while wait_readable(fd, None) is not None:
            try:
                self._rang()
            except Exception:  # never let the thread die silently
                _log.exception("graceful: handling a worker's wake-up failed; carrying on")

    def _rang(self) -> None:
        shared = self.shared
        generation = shared.generation()
        if generation != self._rung or (shared.announcing() and shared.total() == 0):
            self._rung = generation
            self.bells.ring_workers()  # a new drain state, or the node's work is done
        self.lifecycle.wake()
        self._note_ready()
        self._note_change()

    def _note_ready(self) -> None:
        """Once every worker of this master has loaded the app: write ``PIDFILE.ready`` (the
        ``--pid`` file's name) holding this master's pid, which ``graceful reload`` waits for,
        asking this master rather than the listening port both generations answer on."""
        server = self.server
        if self.said_ready or server is None:
            return
        if self.shared.booted() < max(1, getattr(server, "num_workers", 1)):
            return
        self.said_ready = True
        name = _compat.pidfile_name(server)
        if name is not None:
            _pidfiles.write_pid(f"{name}.ready", os.getpid())

    def _note_change(self) -> None:
        with self._changes:
            self._changed += 1
            self._changes.notify_all()

    def wait_change(self, seen: int, timeout: float | None) -> int:
        """Block until something changed since ``seen`` (a ring, the stop's end) or ``timeout``
        passes; the new count of changes."""
        with self._changes:
            self._changes.wait_for(lambda: self._changed != seen, timeout)
            return self._changed

    def _on_stop(self) -> None:  # from the sequence's thread
        if not self.sequence.gave_up:  # first serve what the kernel queued (gunicorn #3397)
            config, quick = self.lifecycle.config, self.sequence.mode == "int"
            budget = config.interrupt_timeout if quick else config.drain_timeout
            _backlog.serve_gunicorn_backlog(
                self.server, self.shared.total, budget, abort=lambda: self.next_stop is not None
            )
        if self.next_stop is None:  # else a forced stop came meanwhile and was handed over
            self.next_stop = "quick" if self.sequence.gave_up else "graceful"
            _compat.queue_signal(self.server, _signal.SIGTERM)  # see _handle_term
        self._note_change()

    def _on_force(self) -> None:  # from the main loop, inside _handle_int
        self.next_stop = "quick"
        self._note_change()


_master: _Master | None = None


def on_starting(server: Any) -> None:
    """Create the shared state before any worker is forked; log through gunicorn's error log."""
    log_through("gunicorn.error")
    _require_master()


def when_ready(server: Any) -> None:
    """Take over the master's SIGTERM and SIGINT (kept: SIGQUIT, HUP, USR2, TTIN, ...)."""
    master = _require_master()
    if master.original is None:
        _compat.check_arbiter(server)
        master.server = server
        master.original = _compat.take_over_stop_handlers(
            server, lambda: _handle_term(server, master), lambda: _handle_int(server, master)
        )
        master.listen()
    if master.lifecycle.phase is Phase.STARTING:
        master.lifecycle.mark_ready()


def pre_fork(server: Any, worker: Any) -> None:
    """Claim a shared slot and a pipe for the worker about to be forked."""
    master = _require_master()
    index = master.shared.claim()
    if index is None:
        _log.error("no free graceful slot for a new worker: its readiness will be its own")
    else:
        master.bells.add_worker(index)
    worker.graceful_slot = index


def post_fork(server: Any, worker: Any) -> None:
    """In the new worker: link its lifecycles to the shared state."""
    master = _require_master()
    index = getattr(worker, "graceful_slot", None)
    if index is not None:
        _shared.become_worker(master.shared, index, master.bells)
    else:
        master.bells.become_worker(-1)  # keeps no other process's pipe open
    # How many events streams this worker may hold (none for a sync worker), and the node's
    # count of them, so that the node-wide cap holds across workers.
    decided, share = gunicorn_share(worker)
    streams = None if index is None else _shared.NodeStreams(master.shared, index)
    _events.PROCESS.join(share, streams, decided=decided)
    if _compat.is_uvicorn_worker(worker):
        # uvicorn-worker routes SIGQUIT to gunicorn's handle_exit, which only clears a flag
        # uvicorn never reads: the worker would wait out graceful_timeout. Stop it at once.
        _compat.replace_uvicorn_worker_quit(worker, _uvicorn_quick_exit)


def _uvicorn_quick_exit(signum: int, frame: Any) -> None:
    import uvicorn  # a uvicorn-worker runs it

    handler = _signal.getsignal(_signal.SIGTERM)
    server = _compat.server_of_handler(handler, uvicorn.Server)
    if server is None:  # graceful's worker SIGTERM (ServerLink.take_worker_term) holds it
        server = getattr(getattr(handler, "__self__", None), "server", None)
    if isinstance(server, uvicorn.Server):
        _compat.force_exit(server)


def post_worker_init(worker: Any) -> None:
    """In a worker that has loaded the app: mark it ready and ring the master, which says the
    node is ready (:meth:`_Master._note_ready`) once all its workers are. A uvicorn worker is
    ready later, when its app has started (the middleware marks its lifecycle ready at the
    lifespan's start-up, and the lifecycle tells the node), unless it serves already."""
    _gthread.install(worker)  # gunicorn before 24: serve what a gthread worker holds at its stop
    master = _require_master()
    index = getattr(worker, "graceful_slot", None)
    if index is None:
        return
    if not _compat.is_uvicorn_worker(worker) or _shared.serving_here():
        master.shared.set_booted(index)
        master.bells.ring_master()


def child_exit(server: Any, worker: Any) -> None:
    """In the master, after a worker has exited (however): clear its slot (its count of
    requests served while draining stays in the node's total) and close its pipe, then ring
    the master's thread: the node's total may be zero now."""
    index = getattr(worker, "graceful_slot", None)
    if _master is not None and index is not None:
        _master.shared.release(index)
        _master.bells.remove_worker(index)
        _master.bells.ring_master()
    if _master is not None and worker.pid in _master.retired:
        _master.retired.discard(worker.pid)
        _compat.forget_worker(server)  # retired once the delay was over: not to be replaced


def pre_request(worker: Any, req: Any) -> None:
    """While draining, close keep-alive connections after each response."""
    if _shared.worker_announcing():
        _compat.close_after_response(req)


# -- the master's signal handling (runs in gunicorn's main loop, not in signal context) ----


def _handle_term(server: Any, master: _Master) -> None:
    if master.next_stop is not None:
        _hand_over(master)
    successor = _compat.successor_pid(server)
    lifecycle = master.lifecycle
    if successor is not None and lifecycle.draining_since is None and not lifecycle.final:
        # An in-place restart (USR2, then this SIGTERM: graceful reload): the new master
        # accepts on the same sockets, so no balancer needs the delay.
        lifecycle.hand_over()
        _log.info(
            "in-place restart: the new master (pid %d) accepts on the same sockets; this one "
            "serves %gs more (handover_delay), closing kept-alive connections, then stops",
            successor,
            lifecycle.config.delay,
        )
    _start(master, master.sequence.signal(_signal.SIGTERM))


def _handle_int(server: Any, master: _Master) -> None:
    name = master.sequence.signal(_signal.SIGINT)
    if master.next_stop == "quick":  # a second SIGINT forced the stop
        _hand_over(master)
    _start(master, name)


def _start(master: _Master, name: str | None) -> None:
    if name is not None:
        for target, args, thread_name in (
            (master.sequence.run, (name,), "graceful-master"),
            (_retire, (master,), "graceful-retire"),
        ):
            threading.Thread(target=target, args=args, name=thread_name, daemon=True).start()


def _retire(master: _Master) -> None:
    """Once the delay is over and the node is quiet, stop every idle sync worker but one.

    After the delay the node only waits for its in-flight work; idle workers have nothing left
    to do but exit, and exiting takes a Python process tens of milliseconds of CPU (hundreds
    when several exit at once on a busy machine). Stopped now, they are gone by the time the
    last request ends, and the master exits right after it. One idle worker stays, to answer
    probes and a late request; a busy worker is left alone. gunicorn does not replace a retired
    worker (:func:`child_exit` lowers its worker count), only one that died.

    Only while no request has arrived for :data:`_QUIET` seconds: a node that still gets
    traffic (reject mode behind a proxy that keeps sending POSTs, callers without a balancer)
    keeps all its workers. And only sync workers, which take a connection only to serve it at
    once: a gthread or asynchronous worker holds connections it accepted but has not started
    (kept-alive ones among them) that nothing in the shared slots shows, and stopping it would
    drop them.

    It sleeps until the delay ends or the node has been quiet long enough, and otherwise until
    a worker rings the master (its count dropped to zero: it may be idle now) or the stop ends.
    """
    if "SyncWorker" not in _compat.worker_class_names(master.server):
        return
    lifecycle, shared, server = master.lifecycle, master.shared, master.server
    seen = master.wait_change(-1, 0)
    arrivals, quiet_since = shared.served_while_draining(), lifecycle.clock()
    while not master.sequence.wait_stopped(0):
        now, served = lifecycle.clock(), shared.served_while_draining()
        if served != arrivals:
            arrivals, quiet_since = served, now
        end = lifecycle.delay_ends_at()
        look_at = max(now if end is None else end, quiet_since + _QUIET)
        if now < look_at:
            seen = master.wait_change(seen, look_at - now)
            continue
        live = set(_compat.worker_pids(server)) - master.retired
        idle = [
            s.pid
            for s in shared.workers()
            if s.pid in live and s.inflight == 0 and s.websockets == 0
        ]
        for pid in idle[1:]:
            master.retired.add(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, _signal.SIGTERM)
        seen = master.wait_change(seen, None)


#: How long no request may have arrived on the node before idle workers are retired.
_QUIET = 0.25


def _hand_over(master: _Master) -> None:
    """Let gunicorn stop: gracefully when drained, at once when work is stuck or forced.

    The workers are stopped and reaped here first, each the moment it exits: gunicorn's own
    ``Arbiter.stop`` reaps them in a loop that sleeps 100 ms a turn, once more after the last
    one is gone, which held the master up to 0.2 s more after the last answer.
    Its stop then finds no worker left (and still closes the listeners, unlinking a UNIX
    socket, and stops the workers of a dirty arbiter, if any).
    """
    graceful = master.next_stop == "graceful"
    with contextlib.suppress(LifecycleError):
        master.lifecycle.stop("drained" if graceful else "stopping at once")
    server = master.server
    try:
        _stop_workers(server, _signal.SIGTERM if graceful else _signal.SIGQUIT)
    except Exception:  # gunicorn's own stop below does it all again, the slow way
        _log.exception("graceful: could not stop gunicorn's workers quickly; gunicorn will")
    if master.original is None:
        raise _compat.GunicornInternalsError("gunicorn's stop handlers were never taken over")
    term, quit_now = master.original
    if graceful:
        term()  # raises StopIteration: gunicorn's graceful halt
    quit_now()  # stops workers at once; raises StopIteration


def _stop_workers(server: Any, signum: int) -> None:
    """Signal every worker, then reap each as it exits (bounded by ``graceful_timeout``)."""
    _compat.signal_workers(server, signum)
    deadline = time.monotonic() + server.cfg.graceful_timeout
    while True:
        _compat.reap_workers(server)  # clears each exited worker's slot through child_exit
        left = deadline - time.monotonic()
        pids = _compat.worker_pids(server)
        if not pids or left <= 0:
            return
        _wait_for_exit(pids, min(left, _REAP_WAIT))


#: The longest the master sleeps between two looks at its workers while stopping them.
_REAP_WAIT = 0.1


def _wait_for_exit(pids: list[int], timeout: float) -> None:
    """Return when one of ``pids`` exits, or after ``timeout`` (a pidfd per process wakes us at
    once; without pidfds, look again after 5 ms)."""
    fds: list[int] = []
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                fds.append(os.pidfd_open(pid))
        if len(fds) < len(pids):
            return  # one is gone already (or about to be reaped): look again now
        select.select(fds, [], [], timeout)
    except (AttributeError, OSError):  # no pidfd_open (not Linux, or an old kernel)
        time.sleep(min(timeout, 0.005))  # the poll interval, bounded by the caller's deadline
    finally:
        for fd in fds:
            os.close(fd)


def _require_master() -> _Master:
    global _master
    if _master is None:
        _master = _Master()
    return _master
