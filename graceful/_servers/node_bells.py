"""Wake-ups between a gunicorn master and its workers: pipes, not polling.

The shared map (:mod:`graceful._servers.node_shm`) holds the node's state; these pipes only say
"look at it again". The master creates them before it forks:

- one the workers ring to wake the master (every worker keeps its write end): a worker that
  started a drain, a resume or a stop, or whose in-flight count dropped to zero while the node
  drains;
- one per worker, which the master rings to wake that worker (only the master keeps its write
  end): the node's state changed, or its in-flight total may have reached zero.

A waiting process blocks in ``poll`` on its read end: nothing runs while nothing happens. A
ring is one byte written without blocking: a full pipe already holds a wake-up, and a pipe
whose reader is gone (a killed worker) is ignored, so a dead process can neither block nor
break the one ringing. No lock is shared between processes; the lock here only keeps the
master's own threads from ringing a descriptor another thread is closing (the number could be
reused by then).

Why pipes rather than signals: gunicorn owns every signal a worker could be sent (TERM, QUIT,
INT, USR1, USR2, HUP, WINCH, TTIN, TTOU, CHLD), a signal handler runs only in the main thread
(busy serving in a sync worker) and interrupts the app's system calls; a pipe wakes a thread
of ours and nothing else. Why not one eventfd: a read consumes it, so it wakes one reader, not
every worker.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading

__all__ = ["Bells", "wait_readable"]

_RING = b"\0"
#: What one read takes out of a pipe: rings that piled up count as one.
_DRAIN = 4096


def _pipe() -> tuple[int, int]:
    """A pipe whose write end never blocks (both ends close on exec: a USR2 re-exec does not
    inherit them)."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    return read, write


def _ring(fd: int) -> None:
    with contextlib.suppress(OSError):  # full: a ring is pending; EPIPE: its reader is gone
        os.write(fd, _RING)


def _close(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def wait_readable(fd: int, timeout: float | None) -> bool | None:
    """Block until ``fd`` has rings (True, and they are taken out), or ``timeout`` seconds pass
    (False). None when every write end is closed (the master is gone): stop waiting on it."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if not poller.poll(None if timeout is None else max(0, int(timeout * 1000) + 1)):
        return False
    try:
        return True if os.read(fd, _DRAIN) else None
    except BlockingIOError:
        return True
    except OSError:
        return None


class Bells:
    """The node's pipes. Create them in the master before forking."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # the master's threads only (see the module's doc)
        self._master = _pipe()
        self._workers: dict[int, tuple[int, int]] = {}
        #: In a worker: the read end of its own pipe.
        self.own: int | None = None

    @property
    def master_fd(self) -> int:
        """The end the master waits on."""
        return self._master[0]

    def add_worker(self, index: int) -> None:
        """A pipe for the worker about to be forked into slot ``index`` (the master only)."""
        with self._lock:
            self._drop(index)
            self._workers[index] = _pipe()

    def remove_worker(self, index: int) -> None:
        """Close the pipe of a worker that has exited (the master only)."""
        with self._lock:
            self._drop(index)

    def _drop(self, index: int) -> None:
        pair = self._workers.pop(index, None)
        if pair is not None:
            _close(*pair)

    def become_worker(self, index: int) -> int | None:
        """In a freshly forked worker: keep its own read end and the master's write end, close
        the rest. Its read end, or None when it has no pipe."""
        self._lock = threading.RLock()  # a fork copies a lock in whatever state it was
        own = self._workers.pop(index, None)
        for pair in self._workers.values():
            _close(*pair)
        self._workers.clear()
        _close(self._master[0])
        if own is None:
            return None
        _close(own[1])
        self.own = own[0]
        return own[0]

    def ring_master(self) -> None:
        _ring(self._master[1])

    def ring_workers(self) -> None:
        """Wake every worker (the master only)."""
        with self._lock:
            for _read, write in self._workers.values():
                _ring(write)
