"""Phase-change notices for the events stream, with bounded memory per subscriber, and how many
streams a process (and its node) may hold.

The hub only queues; adapters turn a :class:`Subscriber` into a server-sent-event stream and
decide how to wait (a thread event or an asyncio event, set through ``wake``).

A stream holds what serves it for as long as it is open: a thread under a threaded WSGI
server, the whole worker under a single-threaded one. So the process admits a stream only
within its *share* (:data:`PROCESS`): none where a stream would hold the only thread (the
adapter answers 204 ``Graceful-Events: off``), a quarter of a gunicorn gthread worker's
threads, no limit of its own where streams are cheap (asyncio, gevent). The node-wide cap
(``events_max_subscribers``) is checked over every worker of the node through the shared
memory of :mod:`graceful._servers.node_shm` (:class:`NodeStreams`).
"""

from __future__ import annotations

import collections
import contextlib
import enum
from collections.abc import Callable
from typing import Any, Protocol, TypeAlias

from .protocol import format_comment, format_event

__all__ = [
    "CLIENT_CHECK",
    "MIN_WAIT",
    "PROCESS",
    "EventHub",
    "NodeStreams",
    "ProcessStreams",
    "Refusal",
    "Subscriber",
    "format_comment",
    "format_event",
]

# A subscriber that never reads keeps at most this many notices; older ones are dropped.
# Phase notices supersede each other, so the newest is what matters.
MAX_QUEUED = 16

# A stream sleeps at least this long between its looks (heartbeat, drain file), however small
# events_heartbeat or drain_file_interval (0: every request looks) is: it must never spin.
MIN_WAIT = 0.05

#: A WSGI stream looks whether its client has gone at least this often (seconds), so that a
#: closed client releases its slot (and its thread) within a second or two.
CLIENT_CHECK = 1.0


class Refusal(enum.Enum):
    """Why a process does not open an events stream."""

    OFF = "off"
    """This process holds no streams at all (a stream would hold its only thread): 204."""
    FULL = "full"
    """This process's share, or the node's cap, is taken for now: 503 with Retry-After."""


class NodeStreams(Protocol):
    """The other processes of the node, as far as events streams go (see :mod:`._shared`)."""

    def publish(self, count: int) -> None:
        """Make this process's count of open streams visible to the others."""

    def others(self) -> int:
        """Streams open in the node's other processes."""


#: A lock (``threading.Lock``): the core takes one from its caller, never makes one.
Lock: TypeAlias = contextlib.AbstractContextManager[Any]


class _Unlocked(contextlib.AbstractContextManager[None]):
    """Where nothing runs concurrently (the default until the runtime gives a real lock)."""

    def __exit__(self, *exc: object) -> None:
        return None


class ProcessStreams:
    """The events streams this process holds, within its share and the node's cap.

    One per process (:data:`PROCESS`), whatever the number of lifecycles: threads and workers
    belong to the process. A server shim that knows its worker (``graceful.gunicorn``) calls
    :meth:`join`; otherwise the adapter decides the share from what it sees (``wsgi.multithread``).

    ``new_lock`` makes the lock that serialises this process's admissions (``threading.Lock``
    where threads run; the adapters give :data:`PROCESS` one with :meth:`use_locks`).
    """

    def __init__(self, new_lock: Callable[[], Lock] = _Unlocked) -> None:
        self._new_lock = new_lock
        self._lock: Lock = new_lock()
        self.count = 0
        #: Set by :meth:`join`: the share the server shim decided (None: no limit of its own).
        self.decided = False
        self.share: int | None = None
        self.node: NodeStreams | None = None

    def use_locks(self, new_lock: Callable[[], Lock]) -> None:
        """Serialise admissions with locks made by ``new_lock`` from now on (idempotent)."""
        if self._new_lock is not new_lock:
            self._new_lock, self._lock = new_lock, new_lock()

    def join(self, share: int | None, node: NodeStreams | None, *, decided: bool = True) -> None:
        """In a freshly forked worker: its share (None: no limit of its own) and its node."""
        self._lock = self._new_lock()  # a fork may have copied it held
        self.count = 0
        self.decided, self.share, self.node = decided, share, node
        if node is not None:
            node.publish(0)

    def admit(self, cap: int, share: int | None) -> Refusal | None:
        """Take a slot for a new stream (None), or say why not.

        ``cap`` is the node-wide ``events_max_subscribers``; ``share`` this process's own
        limit (None: none). A worker publishes its new count *before* it reads the others',
        so of two workers admitting at the same instant at least one sees both counts and
        refuses (both may: the callers retry after Retry-After), and the node stays within
        ``cap``. That relies on each worker's store reaching the other before the other's
        load; Python promises no memory ordering, so the bound we can state is weaker: each
        worker admits at most one stream too many per such race, so the node holds at most
        ``cap + workers - 1`` streams (a worker's own admissions are serialised by its lock).
        """
        if share == 0:
            return Refusal.OFF
        with self._lock:
            if share is not None and self.count >= share:
                return Refusal.FULL
            self.count += 1
            node = self.node
            if node is not None:
                node.publish(self.count)
            if self.count + (0 if node is None else node.others()) > cap:
                self.count -= 1
                if node is not None:
                    node.publish(self.count)
                return Refusal.FULL
            return None

    def release(self) -> None:
        with self._lock:
            self.count = max(0, self.count - 1)
            if self.node is not None:
                self.node.publish(self.count)

    def node_total(self) -> int:
        """Streams open on the whole node: here and, when linked, in the other workers."""
        node = self.node
        return self.count + (0 if node is None else node.others())


#: This process's streams.
PROCESS = ProcessStreams()


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
            with contextlib.suppress(RuntimeError):  # a closed event loop: nobody to wake
                wake()

    def pop_all(self) -> list[dict[str, Any]]:
        notices = []
        while True:
            try:
                notices.append(self._queue.popleft())
            except IndexError:
                return notices


class EventHub:
    """One lifecycle's subscribers; their slots are taken from ``process`` (this process's)."""

    def __init__(self, max_subscribers: int, process: ProcessStreams | None = None) -> None:
        self.max_subscribers = max_subscribers
        self.process = PROCESS if process is None else process
        # No lock: a set's add, remove and copy are each atomic (with or without the GIL).
        self._subscribers: set[Subscriber] = set()

    def subscribe(self, first: dict[str, Any], share: int | None = None) -> Subscriber | Refusal:
        """A new subscriber holding ``first``, or why there is none (see :class:`Refusal`).

        ``share``: how many streams this process may hold (None: only the node-wide cap).
        """
        refusal = self.process.admit(self.max_subscribers, share)
        if refusal is not None:
            return refusal
        subscriber = Subscriber()
        subscriber.push(first)
        self._subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Release ``subscriber``'s slot (once, however often it is called)."""
        subscriber.closed = True
        try:
            self._subscribers.remove(subscriber)  # only one caller succeeds
        except KeyError:
            return
        self.process.release()

    def node_count(self) -> int:
        """Streams open on the whole node (every hub of every process of it)."""
        return self.process.node_total()

    def publish(self, notice: dict[str, Any]) -> None:
        for subscriber in self._subscribers.copy():
            subscriber.push(notice)

    def __len__(self) -> int:
        return len(self._subscribers)
