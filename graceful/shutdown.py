"""Signal handling for any server: SIGTERM drains, SIGINT stops quickly, a second SIGINT or a
SIGQUIT stops at once.

The handlers only record the signal (``SimpleQueue.put`` is safe in a signal handler); a daemon
thread does the work: it moves the lifecycle, waits for the drain, and calls ``on_stop`` once.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from .lifecycle import Lifecycle, LifecycleError, Phase

__all__ = ["SignalHandlers", "install_signal_handlers", "log_stuck"]

logger = logging.getLogger("graceful")

_TERM, _INT, _FORCE = "term", "int", "force"


def log_stuck(lifecycle: Lifecycle, why: str) -> None:
    """Log every request still in flight (method, path, age): called when a wait gives up."""
    stuck = lifecycle.stuck()
    if not stuck:
        return
    listed = ", ".join(f"{method} {path} ({age:.1f}s)" for method, path, age in stuck)
    logger.warning("%s with %d in flight, stopping anyway: %s", why, len(stuck), listed)


class SignalHandlers:
    """Installed by :func:`install_signal_handlers`; :meth:`uninstall` puts the old ones back."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        on_stop: Callable[[], object],
        on_force: Callable[[], object] | None = None,
    ) -> None:
        self.lifecycle = lifecycle
        self.on_stop = on_stop
        self.on_force = on_force
        self._signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._mode: str | None = None
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._previous: dict[int, Any] = {}
        self._dispatcher = threading.Thread(
            target=self._dispatch, name="graceful-signals", daemon=True
        )
        self._worker: threading.Thread | None = None

    # -- installation (main thread) --------------------------------------------------------

    def install(self) -> SignalHandlers:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "install_signal_handlers() must be called from the main thread "
                "(Python delivers signals only there)"
            )
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            self._previous[signum] = signal.signal(signum, self._record)
        self._dispatcher.start()
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self._signals.put(signum)

    # -- work (threads) --------------------------------------------------------------------

    def _dispatch(self) -> None:
        while True:
            signum = self._signals.get()
            name = signal.Signals(signum).name
            if signum == signal.SIGTERM and self._mode is None:
                self._start(_TERM, name)
            elif signum == signal.SIGINT and self._mode in (None, _TERM):
                self._start(_INT, name)
            elif signum in (signal.SIGINT, signal.SIGQUIT) and self._mode != _FORCE:
                self._mode = _FORCE
                logger.warning("%s: stopping at once", name)
                self._move(self.lifecycle.stop, f"{name}: immediate stop")
                self._call_stop(force=True)
            else:
                logger.info("%s ignored: already stopping (%s)", name, self._mode)

    def _start(self, mode: str, name: str) -> None:
        previous, self._mode = self._mode, mode
        if mode == _INT:
            logger.info("%s: quick stop (no delay)", name)
            self._move(self.lifecycle.stop, f"{name}: quick stop")
        if previous is None:
            self._worker = threading.Thread(
                target=self._run, args=(name,), name="graceful-drain", daemon=True
            )
            self._worker.start()

    def _run(self, name: str) -> None:
        lifecycle, config = self.lifecycle, self.lifecycle.config
        if self._mode == _TERM:
            if lifecycle.phase is Phase.STARTING:
                self._move(lifecycle.stop, f"{name} while starting")
                idle = lifecycle.wait_idle(config.drain_timeout)
            else:
                self._move(lifecycle.drain, name)
                deadline = lifecycle.drain_deadline()
                budget = config.delay + config.drain_timeout
                timeout = budget if deadline is None else deadline - lifecycle.clock()
                idle = lifecycle.wait_drained(max(0.0, timeout))
                if not idle and self._mode == _TERM:
                    log_stuck(lifecycle, f"drain timeout ({config.drain_timeout:g}s) passed")
        if self._mode == _INT:
            idle = lifecycle.wait_idle(config.interrupt_timeout)
            if not idle:
                log_stuck(lifecycle, f"quick stop ({config.interrupt_timeout:g}s) timed out")
        if self._mode == _FORCE:
            return
        self._move(lifecycle.stop, f"{name}: drained")
        self._call_stop(force=False)

    def _move(self, action: Callable[[str], None], reason: str) -> None:
        try:
            action(reason)
        except LifecycleError as exc:
            logger.debug("%s", exc)

    def _call_stop(self, *, force: bool) -> None:
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
        callback = self.on_force if force and self.on_force is not None else self.on_stop
        try:
            callback()
        except Exception:
            logger.exception("stop callback %r raised", callback)

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Block until the stop callback has been called (True) or the timeout passes."""
        return self._stopped.wait(timeout)


def install_signal_handlers(
    lifecycle: Lifecycle,
    on_stop: Callable[[], object],
    *,
    on_force: Callable[[], object] | None = None,
) -> SignalHandlers:
    """Drain on SIGTERM, stop quickly on SIGINT, at once on a second SIGINT or SIGQUIT.

    SIGTERM: readiness fails at once, requests keep being served through ``delay``, in-flight
    work is awaited (bounded by ``drain_timeout``; what is still in flight then is logged), then
    ``on_stop()`` is called. SIGINT: no delay, in-flight work awaited for at most
    ``interrupt_timeout``, then ``on_stop()``. Second SIGINT or SIGQUIT: ``on_force()`` (or
    ``on_stop()``) at once. Call from the main thread.
    """
    return SignalHandlers(lifecycle, on_stop, on_force).install()
