"""The drain file: while it exists the node drains. Looked at no more than once per interval,
and no more once a stop has begun (removing it then resumes nothing)."""

from __future__ import annotations

import os
import threading

from .lifecycle import Lifecycle

__all__ = ["DrainFileWatcher"]


class DrainFileWatcher:
    __slots__ = ("_interval", "_last", "_lifecycle", "_lock", "_path")

    def __init__(self, lifecycle: Lifecycle, path: str, interval: float) -> None:
        self._lifecycle = lifecycle
        self._path = path
        self._interval = interval
        self._last = -float("inf")
        # Looking and acting on what was seen, one thread at a time: a thread descheduled in
        # between must not act on a stale look after another thread acted on a newer one.
        self._lock = threading.Lock()

    def check(self, now: float, *, force: bool = False) -> None:
        if self._lifecycle.final:  # a stop has begun: the file no longer matters
            return
        if not force and now - self._last < self._interval:
            return
        self._last = now
        with self._lock:
            self._lifecycle.sync_drain_file(os.path.exists(self._path), now=now)
