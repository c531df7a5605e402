"""Signal handling for any server: SIGTERM drains, SIGINT stops quickly, a second SIGINT or a
SIGQUIT stops at once.

What each signal means and the steps of the stop it starts are the pure core's
(:class:`graceful._core.stop.StopPlan`). :class:`StopSequence` runs them against a lifecycle:
it moves the lifecycle, logs, and calls ``on_stop`` once; the waits are yielded by
:meth:`StopSequence.steps`, so the same steps run in a thread (:meth:`StopSequence.run`, used by
:func:`install_signal_handlers`) or on an event loop (:meth:`StopSequence.run_async`, used by the
uvicorn shim). Signal handlers only record the signal (``SimpleQueue.put`` is safe in a signal
handler); a daemon thread, or the event loop, does the work. A signal that lands on another
thread while the main one sleeps is seen through the wakeup fd (:mod:`.wakeup`).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
from collections.abc import Callable, Generator
from types import FrameType
from typing import Any

from .._core.logsafe import escape
from .._core.phases import Event
from .._core.stop import GiveUp, Joined, Mode, Move, Reaction, Signal, Stop, StopPlan, Wait
from .lifecycle import Lifecycle, LifecycleError, Phase
from .wakeup import Occurrences, WakeupPipe

__all__ = [
    "SignalHandlers",
    "StopSequence",
    "Wait",
    "install_signal_handlers",
    "log_stuck",
    "log_through",
    "terminal_signals_group",
]

logger = logging.getLogger("graceful")

_SIGNALS: dict[int, Signal] = {
    signal.SIGTERM: Signal.TERM,
    signal.SIGINT: Signal.INT,
    signal.SIGQUIT: Signal.QUIT,
}


def log_stuck(lifecycle: Lifecycle, why: str) -> None:
    """Log every request still in flight (method, path, age): called when a wait gives up."""
    stuck = lifecycle.stuck()
    if not stuck:
        return
    listed = ", ".join(
        f"{escape(method, 20)} {escape(path)} ({age:.1f}s)" for method, path, age in stuck
    )
    logger.warning("%s with %d in flight, stopping anyway: %s", why, len(stuck), listed)


def _log_joined(lifecycle: Lifecycle, name: str, phase: Phase) -> None:
    """A stop begun on a node that already drains: say so (no phase changes, no other line)."""
    since = lifecycle.draining_since
    age = 0.0 if since is None else lifecycle.clock() - since
    if phase is Phase.DRAINED:
        logger.info(
            "%s: already drained (%s, %.1fs ago): stopping without a second delay",
            name,
            lifecycle.drain_reason,
            age,
        )
    else:
        logger.info(
            "%s: draining for %.1fs already (%s): stopping once drained, the delay counted "
            "from the drain's start",
            name,
            age,
            lifecycle.drain_reason,
        )


class StopSequence:
    """What SIGTERM, SIGINT and SIGQUIT mean, and the steps of the stop each one starts.

    :meth:`signal` is called for every signal, in order, from one thread or loop; it moves the
    lifecycle and answers the signal's name when a stop must be started (then run
    :meth:`run` or :meth:`run_async` with that name, once). ``on_stop`` is called once at the
    end of the stop; ``on_force`` (or ``on_stop``) at once on a second SIGINT or a SIGQUIT,
    or on a SIGINT once ``on_stop`` was called (the server is stopping: Ctrl-C forces it).
    """

    def __init__(
        self,
        lifecycle: Lifecycle,
        on_stop: Callable[[], object],
        on_force: Callable[[], object] | None = None,
    ) -> None:
        self.lifecycle = lifecycle
        self.on_stop = on_stop
        self.on_force = on_force
        self._plan = StopPlan()
        self._stopped = threading.Event()
        self._forced = False
        self._stop_lock = threading.Lock()

    @property
    def mode(self) -> Mode | None:
        """None, then the stop under way (a :class:`~graceful._core.stop.Mode`, a ``str``)."""
        return self._plan.mode

    @property
    def gave_up(self) -> bool:
        """A wait of the stop ended with work still in flight."""
        return self._plan.gave_up

    def signal(self, signum: int) -> str | None:
        """Take one signal; the signal's name when a stop must be started now, else None."""
        name = signal.Signals(signum).name
        reaction, start = self._plan.signal(_SIGNALS[signum], stopped=self._stopped.is_set())
        if reaction is Reaction.QUICK:
            logger.info("%s: quick stop (no delay)", name)
            self._move(self.lifecycle.stop, f"{name}: quick stop")
        elif reaction is Reaction.FORCE:
            logger.warning("%s: stopping at once", name)
            self._move(self.lifecycle.stop, f"{name}: immediate stop")
            self._call_stop(force=True)
        elif reaction is Reaction.IGNORED:
            logger.info("%s ignored: already stopping (%s)", name, self.mode)
        return name if start else None

    def steps(self, name: str) -> Generator[Wait, bool, None]:
        """The stop started by signal ``name``: yields the waits, is sent each wait's result."""
        lifecycle = self.lifecycle
        plan = self._plan.steps(name, lifecycle.config, lifecycle.phase, self._delay_left)
        try:
            step = next(plan)
            while True:
                result = True
                if isinstance(step, Wait):
                    result = yield step
                elif isinstance(step, Move):
                    self._do(step)
                elif isinstance(step, Joined):
                    _log_joined(lifecycle, step.name, step.phase)
                elif isinstance(step, GiveUp):
                    log_stuck(lifecycle, step.why)
                elif isinstance(step, Stop):
                    self._call_stop(force=False)
                step = plan.send(result)
        except StopIteration:
            return

    def _delay_left(self) -> float | None:
        end = self.lifecycle.delay_ends_at()
        return None if end is None else end - self.lifecycle.clock()

    def _do(self, move: Move) -> None:
        lifecycle = self.lifecycle
        if move.event is Event.DRAIN:
            self._move(lambda reason: lifecycle.drain(reason, final=True), move.reason)
        else:
            self._move(lifecycle.stop, move.reason)

    def run(self, name: str) -> None:
        """Run the steps of the stop started by ``name``, blocking (from a thread)."""
        lifecycle = self.lifecycle
        steps = self.steps(name)
        try:
            wait = next(steps)
            while True:
                waiter = lifecycle.wait_drained if wait.drained else lifecycle.wait_idle
                wait = steps.send(waiter(wait.timeout))
        except StopIteration:
            pass

    async def run_async(self, name: str) -> None:
        """Run the steps of the stop started by ``name`` on the running event loop."""
        lifecycle = self.lifecycle
        steps = self.steps(name)
        try:
            wait = next(steps)
            while True:
                waiter = lifecycle.wait_drained_async if wait.drained else lifecycle.wait_idle_async
                wait = steps.send(await waiter(wait.timeout))
        except StopIteration:
            pass

    def _move(self, action: Callable[[str], None], reason: str) -> None:
        try:
            action(reason)
        except LifecycleError as exc:
            logger.debug("%s", exc)

    def _call_stop(self, *, force: bool) -> None:
        """``on_stop`` once; ``on_force`` once, also after ``on_stop`` (it is faster)."""
        forcing = force and self.on_force is not None
        with self._stop_lock:
            if self._forced or (self._stopped.is_set() and not forcing):
                return
            self._forced = forcing
            self._stopped.set()
        callback = self.on_force if forcing and self.on_force is not None else self.on_stop
        try:
            callback()
        except Exception:
            logger.exception("stop callback %r raised", callback)

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Block until the stop callback has been called (True) or the timeout passes."""
        return self._stopped.wait(timeout)


class SignalHandlers:
    """Installed by :func:`install_signal_handlers`; :meth:`uninstall` puts the old ones back."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        on_stop: Callable[[], object],
        on_force: Callable[[], object] | None = None,
    ) -> None:
        self.lifecycle = lifecycle
        self.sequence = StopSequence(lifecycle, on_stop, on_force)
        self._signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._occurrences = Occurrences(self._signals.put)
        self._pipe: WakeupPipe | None = None
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
        for signum in _SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)
        # Also seen when the signal lands on another thread while the main one sleeps.
        self._pipe = WakeupPipe.take(_SIGNALS, self._occurrences.from_pipe)
        self._dispatcher.start()
        return self

    def uninstall(self) -> None:
        """Put the previous handlers back (from the main thread)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        if self._pipe is not None:
            self._pipe.release()
            self._pipe = None

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self._occurrences.from_handler(signum)

    # -- work (threads) --------------------------------------------------------------------

    def _dispatch(self) -> None:
        while True:
            name = self.sequence.signal(self._signals.get())
            if name is not None:
                self._worker = threading.Thread(
                    target=self.sequence.run, args=(name,), name="graceful-drain", daemon=True
                )
                self._worker.start()

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Block until the stop callback has been called (True) or the timeout passes."""
        return self.sequence.wait_stopped(timeout)


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


class _Forward(logging.Handler):
    """Hands graceful's records to a server's logger (its handlers, its format, its level)."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        if self.target.isEnabledFor(record.levelno):
            self.target.handle(record)


def log_through(server_logger: str) -> None:
    """Log graceful's lines through the server's logger (``gunicorn.error``, ``uvicorn.error``),
    at the server's level, unless graceful's logger is handled already (a handler of its own, or
    one above it such as a configured root logger). Called by the server shims; once only."""
    ours = logging.getLogger("graceful")
    if ours.hasHandlers():
        return
    target = logging.getLogger(server_logger)
    ours.addHandler(_Forward(target))
    if ours.level == logging.NOTSET:  # else the root's WARNING would hide the drain's lines
        ours.setLevel(target.getEffectiveLevel())


def terminal_signals_group() -> bool:
    """Whether this process's group is the foreground group of its controlling terminal.

    A Ctrl-C there sends SIGINT to every process of the group, workers included: a supervisor
    whose workers share its group must not pass that SIGINT on, or each worker sees it twice
    (and a second SIGINT stops at once, cutting what is in flight). Without a terminal
    (containers, systemd, CI), or in the background, the signal came from ``kill``: False.
    """
    try:
        tty = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:  # no controlling terminal
        return False
    try:
        return os.tcgetpgrp(tty) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(tty)
