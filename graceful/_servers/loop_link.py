"""A server's stop signals, run by graceful's stop sequence on the server's event loop.

For servers that stop on signal handlers of their event loop (Hypercorn's workers under
graceful's runner, Granian's ASGI workers): :class:`LoopLink` puts its own handlers on the loop
for SIGTERM, SIGINT and SIGQUIT (or ``signal.signal`` handlers, for a server whose handlers
are of that kind: Daphne's Twisted reactor); each only schedules the signal, and the stop
sequence (:class:`graceful._runtime.shutdown.StopSequence`) runs on the loop: SIGTERM drains,
SIGINT stops without the delay, a second SIGINT or a SIGQUIT stops at once. The server's own
stop runs last, through ``on_stop`` (or ``on_force``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any

from .._runtime.lifecycle import Lifecycle
from .._runtime.shutdown import StopSequence

__all__ = ["SIGNALS", "LoopLink"]

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


class LoopLink:
    """The stop signals of the server running ``loop``. ``on_stop()`` hands over to the
    server once the sequence is done; ``on_force()`` when it must stop at once."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        loop: asyncio.AbstractEventLoop,
        on_stop: Callable[[], object],
        on_force: Callable[[], object],
    ) -> None:
        self.lifecycle = lifecycle
        self.loop = loop
        self.sequence = StopSequence(lifecycle, on_stop, on_force)
        self._tasks: set[asyncio.Task[None]] = set()
        self._previous: dict[int, Any] = {}

    def install(self) -> LoopLink:
        """Handle the signals on the loop from now on (from the main thread)."""
        for signum in SIGNALS:
            self._previous.setdefault(signum, signal.getsignal(signum))
            self.loop.add_signal_handler(signum, self.dispatch, signum)
        return self

    def take_signals(self) -> LoopLink:
        """Handle the signals with ``signal.signal`` handlers that schedule them on the loop
        (main thread), leaving the loop's own signal machinery alone."""
        for signum in SIGNALS:
            signal.signal(signum, self.handle)
        return self

    def handle(self, signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone
            self.loop.call_soon_threadsafe(self.dispatch, signum)

    def uninstall(self) -> None:
        """The stop is the server's from now on (its lifespan shutdown has run); each signal's
        handler is again the one :meth:`install` found (asyncio's own removal would leave
        Python's defaults, losing an ignored SIGINT or the program's own handler)."""
        for signum in SIGNALS:
            with contextlib.suppress(RuntimeError, ValueError):  # the loop is closing
                self.loop.remove_signal_handler(signum)
            previous = self._previous.pop(signum, None)
            if previous is not None:
                with contextlib.suppress(ValueError):  # not the main thread: left as it is
                    signal.signal(signum, previous)

    def dispatch(self, signum: int) -> None:
        """Act on one signal (on the loop): start, speed up or force the stop."""
        name = self.sequence.signal(signum)
        if name is not None:
            self.spawn(self.sequence.run_async(name))

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
