"""Counting in-flight work: a dict of active entries, written from many threads.

``dict`` item assignment, ``pop`` and ``len`` are atomic in CPython, and ``next()`` on an
``itertools.count`` is too, so the hot path takes no lock. Whoever needs to know when the count
reaches zero sets ``on_idle``; it is called by the thread that removed the last entry.
``on_change``, when set, is called after every begin and end (a gunicorn worker publishes its
count to the other processes of its node there).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NamedTuple

__all__ = ["Entry", "InflightTracker"]


class Entry(NamedTuple):
    started: float
    method: str
    path: str


class InflightTracker:
    __slots__ = ("_active", "_ids", "last_arrival", "on_change", "on_idle")

    def __init__(self) -> None:
        self._active: dict[int, tuple[float, str, str]] = {}
        self._ids = itertools.count()
        self.last_arrival: float | None = None
        self.on_idle: Callable[[], None] | None = None
        self.on_change: Callable[[], None] | None = None

    def begin(self, method: str, path: str, now: float) -> int:
        token = next(self._ids)
        self._active[token] = (now, method, path)  # a plain tuple: Entry() costs 5x more
        self.last_arrival = now
        on_change = self.on_change
        if on_change is not None:
            on_change()
        return token

    def end(self, token: int) -> None:
        """Release ``token``. Releasing twice is harmless: the count never goes below zero."""
        if self._active.pop(token, None) is None:
            return
        on_change = self.on_change
        if on_change is not None:
            on_change()
        if not self._active:
            on_idle = self.on_idle
            if on_idle is not None:
                on_idle()

    def __len__(self) -> int:
        return len(self._active)

    def entries(self) -> list[Entry]:
        """The active entries, oldest first."""
        return [Entry(*entry) for entry in sorted(self._active.copy().values())]

    def oldest(self) -> float | None:
        entries = self.entries()
        return entries[0].started if entries else None
