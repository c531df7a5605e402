"""gunicorn server hooks: the master drains on SIGTERM, every worker answers readiness alike.

Use it as the config file::

    gunicorn -c python:graceful.gunicorn app:app

or from your own config file::

    from graceful.gunicorn import *          # the hooks below

If your config defines one of these hooks itself, call ours from it::

    from graceful import gunicorn as graceful_hooks

    def post_fork(server, worker):
        graceful_hooks.post_fork(server, worker)
        ...                                   # your own

SIGTERM to the master: the shared drain flag is set (every worker's ``/readyz`` answers 503
within ~20 ms), workers keep accepting and serving through the delay, the master waits until
the node's in-flight total is zero (bounded by the drain timeout; past it the oldest stuck
request of each worker is logged and the workers are stopped at once), then gunicorn's own
graceful stop runs. The master keeps supervising workers throughout. SIGINT: the same without
the delay, bounded by ``interrupt_timeout``. A second SIGINT, or SIGQUIT: at once.

Timings come from ``GRACEFUL_*`` environment variables (or, with ``--preload``, from the config
the app gave the middleware).
"""

from __future__ import annotations

import contextlib
import logging
import signal as _signal
import threading
from typing import Any

from . import _shared
from .lifecycle import Lifecycle, LifecycleError, Phase, get_lifecycle
from .shutdown import StopSequence

__all__ = ["child_exit", "on_starting", "post_fork", "pre_fork", "pre_request", "when_ready"]

_log = logging.getLogger("graceful")


class _Master:
    """The master's stop: its own lifecycle over the shared node, driven by a StopSequence.

    The sequence waits in a thread; when it is done (``on_stop``) or forced (``on_force``) the
    master's main loop is asked, through gunicorn's own signal queue, to hand over to gunicorn:
    gracefully once drained, at once when work is stuck or the stop was forced.
    """

    def __init__(self) -> None:
        self.shared = _shared.SharedNode()
        self.lifecycle = Lifecycle(get_lifecycle().config)
        self.lifecycle.node = _shared.SlotView(self.shared, None)
        self.sequence = StopSequence(self.lifecycle, self._on_stop, self._on_force)
        self.next_stop: str | None = None  # "graceful" or "quick": time to hand over
        self.original: dict[str, Any] = {}
        self.server: Any = None

    def _on_stop(self) -> None:  # from the sequence's thread
        self.next_stop = "quick" if self.sequence.gave_up else "graceful"
        self.server.signal(_signal.SIGTERM, None)  # back to the main loop: see _handle_term

    def _on_force(self) -> None:  # from the main loop, inside _handle_int
        self.next_stop = "quick"


_master: _Master | None = None


def on_starting(server: Any) -> None:
    """Create the shared state before any worker is forked."""
    _require_master()


def when_ready(server: Any) -> None:
    """Take over the master's SIGTERM and SIGINT (kept: SIGQUIT, HUP, USR2, TTIN, ...)."""
    master = _require_master()
    if not master.original:
        master.server = server
        master.original = {"term": server.handle_term, "quit": server.handle_quit}
        server.handle_term = lambda: _handle_term(server, master)
        server.handle_int = lambda: _handle_int(server, master)
    if master.lifecycle.phase is Phase.STARTING:
        master.lifecycle.mark_ready()


def pre_fork(server: Any, worker: Any) -> None:
    """Claim a shared slot for the worker about to be forked."""
    index = _require_master().shared.claim()
    if index is None:
        _log.error("no free graceful slot for a new worker: its readiness will be its own")
    worker.graceful_slot = index


def post_fork(server: Any, worker: Any) -> None:
    """In the new worker: link its lifecycles to the shared state."""
    master = _require_master()
    index = getattr(worker, "graceful_slot", None)
    if index is not None:
        _shared.become_worker(master.shared, index)
    if _is_uvicorn_worker(worker):
        # uvicorn-worker routes SIGQUIT to gunicorn's handle_exit, which only clears a flag
        # uvicorn never reads: the worker would wait out graceful_timeout. Stop it at once.
        worker.handle_exit = _uvicorn_quick_exit


def _is_uvicorn_worker(worker: Any) -> bool:
    return any(cls.__name__ == "UvicornWorker" for cls in type(worker).__mro__)


def _uvicorn_quick_exit(signum: int, frame: Any) -> None:
    server = getattr(_signal.getsignal(_signal.SIGTERM), "__self__", None)
    if server is not None and hasattr(server, "force_exit"):
        server.should_exit = server.force_exit = True


def child_exit(server: Any, worker: Any) -> None:
    """In the master, after a worker has exited (however): clear its slot (its count of
    requests served while draining stays in the node's total)."""
    index = getattr(worker, "graceful_slot", None)
    if _master is not None and index is not None:
        _master.shared.release(index)


def pre_request(worker: Any, req: Any) -> None:
    """While draining, close keep-alive connections after each response."""
    if _shared.worker_announcing():
        req.must_close = True


# -- the master's signal handling (runs in gunicorn's main loop, not in signal context) ----


def _handle_term(server: Any, master: _Master) -> None:
    if master.next_stop is not None:
        _hand_over(master)
    _start(master, master.sequence.signal(_signal.SIGTERM))


def _handle_int(server: Any, master: _Master) -> None:
    name = master.sequence.signal(_signal.SIGINT)
    if master.next_stop == "quick":  # a second SIGINT forced the stop
        _hand_over(master)
    _start(master, name)


def _start(master: _Master, name: str | None) -> None:
    if name is not None:
        thread = threading.Thread(
            target=master.sequence.run, args=(name,), name="graceful-master", daemon=True
        )
        thread.start()


def _hand_over(master: _Master) -> None:
    """Let gunicorn stop: gracefully when drained, at once when work is stuck or forced."""
    with contextlib.suppress(LifecycleError):
        master.lifecycle.stop("drained" if master.next_stop == "graceful" else "stopping at once")
    if master.next_stop == "graceful":
        master.original["term"]()  # raises StopIteration: gunicorn's graceful halt
    master.original["quit"]()  # stops workers at once; raises StopIteration


def _require_master() -> _Master:
    global _master
    if _master is None:
        _master = _Master()
    return _master
