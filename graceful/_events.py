"""Phase-change notices for the events stream, with bounded memory per subscriber.

The hub only queues; adapters turn a :class:`Subscriber` into a server-sent-event stream and
decide how to wait (a thread event or an asyncio event, set through ``wake``).
"""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["MIN_WAIT", "EventHub", "Subscriber", "format_comment", "format_event"]

# A subscriber that never reads keeps at most this many notices; older ones are dropped.
# Phase notices supersede each other, so the newest is what matters.
MAX_QUEUED = 16

# A stream sleeps at least this long between its looks (heartbeat, drain file), however small
# events_heartbeat or drain_file_interval (0: every request looks) is: it must never spin.
MIN_WAIT = 0.05


class Subscriber:
    __slots__ = ("_queue", "closed", "wake")

    def __init__(self) -> None:
        self._queue: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_QUEUED)
        self.wake: Callable[[], None] | None = None
        self.closed = False

    def push(self, notice: dict[str, Any]) -> None:
        self._queue.append(notice)
        wake = self.wake
        if wake is not None:
            wake()

    def pop_all(self) -> list[dict[str, Any]]:
        notices = []
        while True:
            try:
                notices.append(self._queue.popleft())
            except IndexError:
                return notices


class EventHub:
    def __init__(self, max_subscribers: int) -> None:
        self.max_subscribers = max_subscribers
        self._lock = threading.Lock()
        self._subscribers: set[Subscriber] = set()

    def subscribe(self, first: dict[str, Any]) -> Subscriber | None:
        """A new subscriber holding ``first``, or None when the cap is reached."""
        with self._lock:
            if len(self._subscribers) >= self.max_subscribers:
                return None
            subscriber = Subscriber()
            subscriber.push(first)
            self._subscribers.add(subscriber)
            return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        subscriber.closed = True
        with self._lock:
            self._subscribers.discard(subscriber)

    def publish(self, notice: dict[str, Any]) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            subscriber.push(notice)

    def __len__(self) -> int:
        return len(self._subscribers)


def format_event(notice: dict[str, Any]) -> bytes:
    data = json.dumps(notice, separators=(",", ":"), sort_keys=True)
    return f"id: {notice['id']}\nevent: phase\ndata: {data}\n\n".encode()


def format_comment(text: str) -> bytes:
    return f": {text}\n\n".encode()
