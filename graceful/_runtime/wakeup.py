"""Signals seen from any thread, not only when the main thread runs Python.

Python runs a signal handler in the main thread, at its next bytecode. The kernel hands a
signal sent to the process to any of its threads that does not block it: the main thread
mostly, but another one when the main thread has a signal pending already. The C-level
handler then runs on that thread, and the Python handler waits until the main thread runs
Python again. A main thread asleep in a lock (Granian's WSGI worker waits on a
``threading.Event`` for good; ``threading.Event.wait`` is only cut short by a signal the main
thread itself received) never does: the drain never starts.

CPython writes each signal's number to the wakeup fd (:func:`signal.set_wakeup_fd`) from
whichever thread its C handler runs on. :class:`WakeupPipe` takes that fd when nobody has it
(an event loop's signal handling has it where one runs in the main thread, and is woken by it
already) and reads it in a thread of its own. The Python handler still runs too, when it
gets to: :class:`Occurrences` counts each signal from both sides and passes on the n-th one
once, from whichever side saw it first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable, Collection

__all__ = ["Occurrences", "WakeupPipe"]


class Occurrences:
    """Each signal passed on once, though seen by the wakeup pipe and by the Python handler.

    The handler runs at most as often as the pipe says (signals that come close together run
    it once), so passing on the n-th occurrence the first time either side counts n loses
    none and repeats none."""

    def __init__(self, deliver: Callable[[int], None]) -> None:
        self._deliver = deliver
        self._lock = threading.RLock()  # a handler can run inside another, on the main thread
        self._by_pipe: Counter[int] = Counter()
        self._by_handler: Counter[int] = Counter()
        self._passed: Counter[int] = Counter()

    def from_pipe(self, signum: int) -> None:
        self._seen(signum, self._by_pipe)

    def from_handler(self, signum: int) -> None:
        self._seen(signum, self._by_handler)

    def _seen(self, signum: int, counts: Counter[int]) -> None:
        with self._lock:
            counts[signum] += 1
            if counts[signum] > self._passed[signum]:
                self._passed[signum] += 1
                self._deliver(signum)


class WakeupPipe:
    """The process's wakeup fd, read by a daemon thread that reports ``signals`` to
    ``on_signal``. :meth:`take` from the main thread; None when the fd is someone else's."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._read_fd, self._write_fd = read_fd, write_fd
        self._released = False

    @classmethod
    def take(cls, signals: Collection[int], on_signal: Callable[[int], None]) -> WakeupPipe | None:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(write_fd, False)
        try:
            previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except ValueError:  # not the main thread
            previous = -2
        if previous != -1:  # an event loop's (put back), or not ours to take
            if previous >= 0:
                signal.set_wakeup_fd(previous)
            os.close(read_fd)
            os.close(write_fd)
            return None
        pipe = cls(read_fd, write_fd)
        # A child forked from here inherits the wakeup fd: its signals would be read as ours.
        os.register_at_fork(after_in_child=pipe._forget_in_child)
        wanted = frozenset(signals)

        def read() -> None:
            try:
                while data := os.read(read_fd, 64):
                    for signum in data:
                        if signum in wanted:
                            on_signal(signum)
            except OSError:
                pass
            finally:
                os.close(read_fd)

        threading.Thread(target=read, name="graceful-signal-pipe", daemon=True).start()
        return pipe

    def release(self) -> None:
        """Give the wakeup fd back (main thread), unless somebody has set another since; the
        reading thread ends."""
        if self._give_back():
            os.close(self._write_fd)  # the reader reads the end of the pipe

    def _give_back(self) -> bool:
        """Unset the wakeup fd where it is still ours; whether the pipe may be closed."""
        if self._released:
            return False
        try:
            current = signal.set_wakeup_fd(-1)
        except ValueError:  # not the main thread: left as it is (closing it would be unsafe)
            return False
        if current != self._write_fd:
            signal.set_wakeup_fd(current)  # not ours any more: left as it was
        self._released = True
        return True

    def _forget_in_child(self) -> None:
        """In a forked child (whose forking thread is its main thread): the pipe is the
        parent's, and no thread of the child reads it."""
        if self._give_back():
            for fd in (self._read_fd, self._write_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)
