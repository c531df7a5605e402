"""The node's lifecycle: one reversible state machine, the in-flight count, and waiting on both.

The machine is a table (:data:`TRANSITIONS`) of ``(phase, event) -> phase``; an event the table
does not allow raises :class:`LifecycleError` naming the current phase. The core never sleeps and
never reads the wall clock on its own: every method takes ``now`` (seconds on a monotonic scale),
and where it is omitted the injectable ``clock`` given to the constructor is read. Waiting
(:meth:`Lifecycle.wait_drained` and friends) is event-driven: the thread that releases the last
in-flight entry wakes the waiters.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import os
import threading
import time
import types
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from .. import signals
from .._core.config import Config
from .._core.inflight import InflightTracker
from .._core.stream import EventHub, Refusal, Subscriber

__all__ = [
    "ANNOUNCING",
    "TRANSITIONS",
    "Event",
    "Hold",
    "Lifecycle",
    "LifecycleError",
    "Node",
    "Phase",
    "get_lifecycle",
    "hold",
    "is_draining",
    "set_lifecycle",
]


class Phase(str, enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    DRAINED = "drained"
    STOPPING = "stopping"
    STOPPED = "stopped"

    def __str__(self) -> str:
        return self.value


class Event(str, enum.Enum):
    MARK_READY = "mark_ready"
    DRAIN = "drain"
    DRAIN_COMPLETE = "drain_complete"
    RESUME = "resume"
    STOP = "stop"
    STOPPED = "stopped"

    def __str__(self) -> str:
        return self.value


logger = logging.getLogger("graceful")

_P, _E = Phase, Event

#: Every allowed transition. Pairs that map a phase to itself are accepted and change nothing
#: (repeating a drain, a resume of a serving node, a second stop), so scripts can retry.
TRANSITIONS: Mapping[tuple[Phase, Event], Phase] = types.MappingProxyType(
    {
        (_P.STARTING, _E.MARK_READY): _P.SERVING,
        (_P.STARTING, _E.STOP): _P.STOPPING,
        (_P.SERVING, _E.MARK_READY): _P.SERVING,
        (_P.SERVING, _E.DRAIN): _P.DRAINING,
        (_P.SERVING, _E.RESUME): _P.SERVING,
        (_P.SERVING, _E.STOP): _P.STOPPING,
        (_P.DRAINING, _E.MARK_READY): _P.DRAINING,
        (_P.DRAINING, _E.DRAIN): _P.DRAINING,
        (_P.DRAINING, _E.DRAIN_COMPLETE): _P.DRAINED,
        (_P.DRAINING, _E.RESUME): _P.SERVING,
        (_P.DRAINING, _E.STOP): _P.STOPPING,
        (_P.DRAINED, _E.MARK_READY): _P.DRAINED,
        (_P.DRAINED, _E.DRAIN): _P.DRAINED,
        (_P.DRAINED, _E.RESUME): _P.SERVING,
        (_P.DRAINED, _E.STOP): _P.STOPPING,
        (_P.STOPPING, _E.MARK_READY): _P.STOPPING,
        (_P.STOPPING, _E.STOP): _P.STOPPING,
        (_P.STOPPING, _E.STOPPED): _P.STOPPED,
        (_P.STOPPED, _E.STOP): _P.STOPPED,
        (_P.STOPPED, _E.STOPPED): _P.STOPPED,
    }
)

_HINTS = {
    Event.DRAIN: "drain a node once it is serving",
    Event.RESUME: "resume applies to a draining or drained node",
    Event.DRAIN_COMPLETE: "a drain completes only while draining",
    Event.MARK_READY: "a stopped node cannot become ready",
    Event.STOPPED: "call stop() first",
}

#: A drain that started longer ago than this when this process took it on joined the node's.
_JOINED = 0.05

#: Phases in which responses tell keep-alive callers to go elsewhere.
ANNOUNCING = frozenset({Phase.DRAINING, Phase.DRAINED, Phase.STOPPING})


#: Why a resume is refused once a stop has begun (see :attr:`Lifecycle.final`).
_STOP_UNDER_WAY = "a stop is under way and cannot be undone; in-flight work finishes, then it exits"


class LifecycleError(RuntimeError):
    """An event that the current phase does not allow."""

    def __init__(self, phase: Phase, event: Event, hint: str | None = None) -> None:
        self.phase = phase
        self.event = event
        hint = _HINTS.get(event, "") if hint is None else hint
        super().__init__(f"cannot {event} while {phase.value}: {hint}".rstrip(": "))


#: Events a process shares with the other processes of its node (see :class:`Node`).
_SHARED_EVENTS = {
    Event.DRAIN: Phase.DRAINING,
    Event.RESUME: Phase.SERVING,
    Event.STOP: Phase.STOPPING,
}


class Node(Protocol):
    """The other processes of this node (gunicorn's workers and master), when there are any.

    Implemented over shared memory by :mod:`graceful._servers.node_shm`; the lifecycle asks
    how much is in flight elsewhere and how the node drains, and tells of the drains, resumes
    and stops that start here.
    """

    #: How often the others' counts are looked at while waiting (they cannot wake us).
    poll_interval: float

    def others_inflight(self) -> int: ...

    def by_worker(self, own: int) -> dict[str, int]: ...

    def announce(self, phase: Phase, reason: str, *, final: bool, since: float | None) -> None:
        """``phase`` started here; ``since``: when the node's drain started (draining or
        stopping); ``final``: a stop is under way (never cleared once told)."""

    def drain_state(self) -> tuple[float | None, bool]:
        """When the node's current drain started (None when serving), and whether a stop is
        under way anywhere on the node."""

    def stuck(self, now: float) -> list[tuple[str, str, float]]: ...


class Lifecycle:
    """One node's phase, its in-flight work, and the waits on them. Thread-safe."""

    def __init__(
        self, config: Config | None = None, *, clock: Callable[[], float] = time.monotonic
    ):
        self.config = config if config is not None else Config.from_env()
        self.clock = clock
        self._cond = threading.Condition(threading.RLock())
        self._phase = Phase.STARTING
        self._reason = "starting"
        self._since = clock()
        self._drain_started: float | None = None
        self._delay_end: float | None = None
        self._drain_by_file = False
        self._drain_reason: str | None = None
        self._final = False
        # The current drain (or stop) was started by another process of the node.
        self._followed = False
        self._waiters = 0
        self._async_waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._notice_id = 0
        self.requests = InflightTracker()
        self.websockets = InflightTracker()
        self.events = EventHub(self.config.events_max_subscribers)
        #: True while responses should carry ``Graceful-State: draining`` (read on the hot path).
        self.announcing = False
        #: The other processes of this node, linked by a server shim (None: this process alone).
        self.node: Node | None = None
        #: Drains started, and requests that arrived while announcing (for metrics).
        self.drains = 0
        self.served_while_draining = 0
        self._count_lock = threading.Lock()

    # -- reading ---------------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        if self._phase is Phase.DRAINING:
            self.tick()
        return self._phase

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def draining_since(self) -> float | None:
        """When the current drain started (on the clock's scale); None while not draining."""
        return self._drain_started

    @property
    def drain_reason(self) -> str | None:
        """Why the current drain started; None while not draining."""
        return self._drain_reason

    @property
    def final(self) -> bool:
        """True once a stop has begun (a final drain, or :meth:`stop`); never cleared.

        From then on a resume is refused, the drain file is not looked at, and a node of
        several processes never follows a resume.
        """
        return self._final

    @property
    def inflight(self) -> int:
        """Requests and held work in flight in this process (websockets are counted apart)."""
        return len(self.requests)

    def count_served_while_draining(self) -> None:
        """Called by the middlewares for a request that arrives while announcing (only then)."""
        with self._count_lock:
            self.served_while_draining += 1

    def node_inflight(self) -> int:
        """In flight on the whole node: this process and, when linked, the others."""
        node = self.node
        return len(self.requests) + (0 if node is None else node.others_inflight())

    def _busy(self) -> bool:
        node = self.node
        return bool(self.requests) or (node is not None and node.others_inflight() > 0)

    def configure(self, config: Config) -> None:
        """Replace the settings (at start-up: the routes of existing middleware keep theirs)."""
        with self._cond:
            self.config = config
            self.events.max_subscribers = config.events_max_subscribers

    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else now

    def delay_ends_at(self) -> float | None:
        """When the current drain's delay ends, as far as is known now (None when not draining)."""
        if self._delay_end is not None or self._drain_started is None:
            return self._delay_end
        start, cfg = self._drain_started, self.config
        end = start + cfg.delay
        if cfg.quiet_period is not None:
            last = max(self.requests.last_arrival or start, start)
            end = min(end, max(start + cfg.min_delay, last + cfg.quiet_period))
        return end

    def drain_deadline(self) -> float | None:
        """When waiting for in-flight work gives up (delay end + drain timeout)."""
        end = self.delay_ends_at()
        return None if end is None else end + self.config.drain_timeout

    def next_deadline(self) -> float | None:
        """The next time at which :meth:`tick` may change something, if any."""
        if self._phase is not Phase.DRAINING:
            return None
        if self._delay_end is None:
            return self.delay_ends_at()
        return self.drain_deadline()

    def stuck(self, now: float | None = None) -> list[tuple[str, str, float]]:
        """``(method, path, age)`` of everything in flight here, oldest first, then the oldest
        request of each other process of the node."""
        at = self._now(now)
        mine = [(e.method, e.path, at - e.started) for e in self.requests.entries()]
        return mine if self.node is None else mine + self.node.stuck(at)

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """Everything the status route reports."""
        from .._version import __version__

        at = self._now(now)
        self.tick(at)
        oldest = self.requests.oldest()
        delay_end, deadline = self.delay_ends_at(), self.drain_deadline()
        own, node = self.inflight, self.node
        by_worker = {str(os.getpid()): own} if node is None else node.by_worker(own)
        return {
            "phase": self._phase.value,
            "reason": self._reason,
            "in_phase_for": round(at - self._since, 3),
            "inflight": sum(by_worker.values()),
            "inflight_by_worker": by_worker,
            "websockets": len(self.websockets),
            "oldest_request_age": None if oldest is None else round(at - oldest, 3),
            "delay_remaining": None if delay_end is None else round(max(0.0, delay_end - at), 3),
            "drain_deadline_in": None if deadline is None else round(deadline - at, 3),
            "events_subscribers": self.events.node_count(),  # every worker's
            "final": self._final,
            "pid": os.getpid(),
            "version": __version__,
        }

    def notice(self) -> dict[str, Any]:
        """The current phase as an events-stream notice."""
        retry = math.ceil(max(self.config.delay, 1.0))
        return {
            "id": self._notice_id,
            "phase": self._phase.value,
            "reason": self._reason,
            "retry_after": 0 if self._phase is Phase.SERVING else retry,
        }

    # -- events ----------------------------------------------------------------------------

    def mark_ready(self, *, now: float | None = None) -> None:
        self._apply(Event.MARK_READY, "ready", self._now(now))

    def drain(
        self, reason: str = "drain requested", *, now: float | None = None, final: bool = False
    ) -> None:
        """Start draining (a no-op when already draining, drained or stopping).

        ``final``: this drain is the start of a stop (SIGTERM); it cannot be undone. A node
        whose other processes already drain joins their drain: its delay counts from then.
        """
        at = self._now(now)
        node = self.node
        if node is not None and self._phase is Phase.SERVING:
            since, _final = node.drain_state()
            if since is not None:
                at = min(at, since)
        self._apply(Event.DRAIN, reason, at, final=final)

    def resume(self, reason: str = "resumed", *, now: float | None = None) -> None:
        self._apply(Event.RESUME, reason, self._now(now))

    def stop(self, reason: str = "stop requested", *, now: float | None = None) -> None:
        self._apply(Event.STOP, reason, self._now(now))

    def mark_stopped(self, *, now: float | None = None) -> None:
        self._apply(Event.STOPPED, "stopped", self._now(now))

    def tick(self, now: float | None = None) -> Phase:
        """Move DRAINING to DRAINED once the delay is over and nothing is in flight."""
        if self._phase is not Phase.DRAINING:
            return self._phase
        at = self._now(now)
        with self._cond:
            if self._phase is not Phase.DRAINING:
                return self._phase
            delay_over = self._delay_end is None
            if delay_over:
                end = self.delay_ends_at()
                if end is None or at < end:
                    return self._phase
                self._delay_end = end
            busy = self._busy()
        if delay_over:
            self._log_delay_over()
        if busy:
            return self._phase
        self._apply(Event.DRAIN_COMPLETE, "drained", at, strict=False)
        return self._phase

    def _log_delay_over(self) -> None:
        start, end = self._drain_started, self._delay_end
        delay = 0.0 if start is None or end is None else max(0.0, end - start)
        inflight = self.node_inflight()
        if inflight:
            waiting = f"{inflight} in flight, waiting up to {self.config.drain_timeout:g}s for "
            waiting += "them" if inflight > 1 else "it"
        else:
            waiting = "nothing in flight"
        self._log("delay over (%gs): %s", delay, waiting)

    def _log(self, message: str, *args: object) -> None:
        """Log a step of this process's drain: at INFO, or at DEBUG where the drain is only
        followed (a gunicorn worker: the master logs the node's drain)."""
        logger.log(logging.DEBUG if self._followed else logging.INFO, message, *args)

    def sync_drain_file(self, exists: bool, *, now: float | None = None) -> None:
        """Drain while the drain file exists; resume when it goes, if it started the drain.

        Once a stop has begun the file no longer matters."""
        phase = self._phase
        if self._final:
            return
        if exists and phase is Phase.SERVING:
            self._apply(Event.DRAIN, "drain file present", self._now(now), by_file=True)
        elif not exists and self._drain_by_file and phase in (Phase.DRAINING, Phase.DRAINED):
            self._apply(Event.RESUME, "drain file removed", self._now(now), strict=False)

    def follow(
        self,
        phase: Phase,
        reason: str,
        *,
        now: float | None = None,
        final: bool = False,
        since: float | None = None,
    ) -> None:
        """Take on a drain, resume or stop announced by another process of this node.

        ``since``: when the node's drain started (this process's delay counts from then);
        ``final``: a stop is under way, so a resume is never followed (a late one, written
        by a process that had not seen the stop yet, is followed as the drain it cannot undo).
        """
        at = self._now(now)
        if final and phase is Phase.SERVING:
            phase = Phase.DRAINING
        for event, shared in _SHARED_EVENTS.items():
            if shared is phase:
                start = at if since is None or event is not Event.DRAIN else min(at, since)
                self._apply(event, reason, start, strict=False, shared=False, final=final)

    def _apply(
        self,
        event: Event,
        reason: str,
        now: float,
        *,
        strict: bool = True,
        by_file: bool = False,
        shared: bool = True,
        final: bool = False,
    ) -> None:
        node = self.node
        if event is Event.RESUME and not self._final and node is not None:
            self._final = node.drain_state()[1]  # a stop another process began
        with self._cond:
            old = self._phase
            new = TRANSITIONS.get((old, event))
            if event is Event.RESUME and self._final:
                new = None
            if new is None:
                if strict:
                    hint = _STOP_UNDER_WAY if self._final else None
                    raise LifecycleError(old, event, hint)
                return
            if final or event is Event.STOP:
                self._final = True
            if new is old:
                if final and node is not None and shared:  # a drain the node already knew
                    node.announce(Phase.DRAINING, reason, final=True, since=self._drain_started)
                return
            self._phase, self._reason, self._since = new, reason, now
            self.announcing = new in ANNOUNCING
            if new is Phase.DRAINING:
                self._drain_started, self._delay_end = now, None
                self._drain_reason, self._drain_by_file = reason, by_file
                self._followed = not shared
                self.drains += 1
            elif new is Phase.SERVING:
                self._drain_started = self._delay_end = self._drain_reason = None
                self._drain_by_file = False
                self._followed = not shared
            elif new is Phase.STOPPING:  # its own exit, in a process that followed the drain
                self._followed = not shared or self._followed
            watching = self._waiters > 0 or new is Phase.DRAINING
            self.requests.on_idle = self._on_idle if watching else None
            self._notice_id += 1
            notice = self.notice()
            self._cond.notify_all()
        self._wake_async()
        if node is not None and shared and event in _SHARED_EVENTS:
            node.announce(new, reason, final=self._final, since=self._drain_started)
        self.events.publish(notice)
        self._announce(old, new, reason, now)

    def _announce(self, old: Phase, new: Phase, reason: str, now: float) -> None:
        self._log(
            "phase %s -> %s (%s), %d in flight%s",
            old,
            new,
            reason,
            self.node_inflight(),
            self._what_it_means(old, new, now),
        )
        signals.send(signals.phase_changed, self, old=old, new=new, reason=reason)
        if new is Phase.DRAINING:
            signals.send(signals.drain_started, self, reason=reason)
        elif new is Phase.DRAINED:
            signals.send(signals.drained, self)
        elif new is Phase.SERVING and old in (Phase.DRAINING, Phase.DRAINED):
            signals.send(signals.resumed, self, reason=reason)
        elif new is Phase.STOPPING:
            signals.send(signals.stopping, self, reason=reason)

    def _what_it_means(self, old: Phase, new: Phase, now: float) -> str:
        """The end of a phase change's log line: what the change means for the drain."""
        start = self._drain_started
        if new is Phase.DRAINING and start is not None:
            age = self.clock() - start
            if age > _JOINED:
                return f"; the node has been draining for {age:.1f}s"
            return (
                "; drain started: readiness fails, requests are served through the "
                f"{self.config.delay:g}s delay"
            )
        if new in (Phase.DRAINED, Phase.STOPPING) and start is not None:
            return f"; {now - start:.1f}s after the drain started"
        if new is Phase.SERVING and old in (Phase.DRAINING, Phase.DRAINED):
            return "; readiness passes again"
        return ""

    # -- waiting ---------------------------------------------------------------------------

    def _on_idle(self) -> None:
        self.tick()
        with self._cond:
            self._cond.notify_all()
        self._wake_async()

    def _wake_async(self) -> None:
        for loop, event in list(self._async_waiters):
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed; its waiter is gone
                self._async_waiters.discard((loop, event))

    def _watch(self, delta: int) -> None:
        with self._cond:
            self._waiters += delta
            watching = self._waiters > 0 or self._phase is Phase.DRAINING
            self.requests.on_idle = self._on_idle if watching else None

    def _drained(self) -> bool | None:
        """True when drained, False when the drain can no longer complete, None to keep waiting."""
        phase = self._phase
        if phase is Phase.DRAINED:  # requests may still arrive (and be served) while drained
            return True if not self._busy() else None
        if phase in (Phase.STOPPING, Phase.STOPPED):
            return not self._busy()
        if phase is Phase.DRAINING:
            return None
        return False

    def _idle(self) -> bool | None:
        return True if not self._busy() else None

    def _wait(self, done: Callable[[], bool | None], timeout: float | None) -> bool:
        deadline = None if timeout is None else self.clock() + timeout
        self._watch(+1)
        try:
            while True:
                now = self.clock()
                self.tick(now)
                with self._cond:
                    result = done()
                    if result is not None:
                        return result
                    if deadline is not None and now >= deadline:
                        return False
                    self._cond.wait(self._wait_for(now, deadline))
        finally:
            self._watch(-1)

    async def _wait_async(self, done: Callable[[], bool | None], timeout: float | None) -> bool:
        deadline = None if timeout is None else self.clock() + timeout
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        self._async_waiters.add(waiter)
        self._watch(+1)
        try:
            while True:
                now = self.clock()
                self.tick(now)
                result = done()
                if result is not None:
                    return result
                if deadline is not None and now >= deadline:
                    return False
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(waiter[1].wait(), self._wait_for(now, deadline))
                waiter[1].clear()
        finally:
            self._watch(-1)
            self._async_waiters.discard(waiter)

    def _wait_for(self, now: float, deadline: float | None) -> float | None:
        """How long a waiter may sleep: until its own deadline, the next deadline of the drain
        still ahead (one already past was handled by the tick before), or the next look at the
        other processes' counts. Only the waiter's own deadline ends a wait."""
        ahead = [t for t in (self.next_deadline(), self._next_poll(now)) if t is not None]
        return _until(now, deadline, *(t for t in ahead if t > now))

    def _next_poll(self, now: float) -> float | None:
        """Other processes cannot wake a waiter: look at their counts this often."""
        node = self.node
        return None if node is None else now + node.poll_interval

    def wait_drained(self, timeout: float | None = None) -> bool:
        """Block until DRAINED (True), or until the timeout or a resume (False).

        Once stopping it answers at once: True when nothing is in flight, else False (a stop
        has its own bound; wait for it with :meth:`wait_idle`).
        """
        return self._wait(self._drained, timeout)

    async def wait_drained_async(self, timeout: float | None = None) -> bool:
        """:meth:`wait_drained` for asyncio code."""
        return await self._wait_async(self._drained, timeout)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is in flight, whatever the phase (False on timeout)."""
        return self._wait(self._idle, timeout)

    async def wait_idle_async(self, timeout: float | None = None) -> bool:
        return await self._wait_async(self._idle, timeout)

    # -- held work -------------------------------------------------------------------------

    def hold(self, name: str) -> Hold:
        """Count background work as in flight: ``with lifecycle.hold("job"):`` or ``async with``."""
        return Hold(self, name)

    def subscribe(self, share: int | None = None) -> Subscriber | Refusal:
        """An events-stream subscriber that starts with the current phase, or why there is
        none: this process holds no streams (``share`` 0), or its ``share`` or the node's
        ``events_max_subscribers`` is taken (see :class:`graceful._core.stream.Refusal`)."""
        with self._cond:
            return self.events.subscribe(self.notice(), share)

    def __repr__(self) -> str:
        return f"<Lifecycle {self._phase.value} inflight={self.inflight}>"

    async def draining(self) -> None:
        """Return once the node is draining, drained or stopping (at once if it already is).

        For streams, server-sent events and websockets that end themselves when a drain starts::

            draining = asyncio.ensure_future(lifecycle.draining())

        Event-driven: every phase change wakes it. A stopped node counts too, so nothing waits
        forever on a node that is gone.
        """
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        self._async_waiters.add(waiter)
        try:  # looked at after joining the waiters: a phase change in between still wakes us
            while not (self.announcing or self._phase is Phase.STOPPED):
                await waiter[1].wait()
                waiter[1].clear()
        finally:
            self._async_waiters.discard(waiter)


def _until(now: float, *deadlines: float | None) -> float | None:
    times = [d - now for d in deadlines if d is not None]
    return min(times) if times else None


class Hold:
    """A context manager (sync and async) that counts one piece of work as in flight."""

    __slots__ = ("_lifecycle", "_name", "_token")

    def __init__(self, lifecycle: Lifecycle, name: str) -> None:
        self._lifecycle = lifecycle
        self._name = name
        self._token: int | None = None

    def __enter__(self) -> Hold:
        lc = self._lifecycle
        self._token = lc.requests.begin("HOLD", self._name, lc.clock())
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            self._lifecycle.requests.end(self._token)
            self._token = None

    async def __aenter__(self) -> Hold:
        return self.__enter__()

    async def __aexit__(self, *exc_info: object) -> None:
        self.__exit__()


_default: Lifecycle | None = None
_default_lock = threading.Lock()


def get_lifecycle(config: Config | None = None) -> Lifecycle:
    """The process-wide lifecycle shared by the middleware and the server shims.

    Created on first use from ``GRACEFUL_*`` variables; a ``config`` given here replaces its
    settings.
    """
    global _default
    with _default_lock:
        if _default is None:
            _default = Lifecycle(config)
        elif config is not None:
            _default.configure(config)
        return _default


def hold(name: str) -> Hold:
    """``with graceful.hold("export"):`` counts work as in flight on the process-wide lifecycle."""
    return get_lifecycle().hold(name)


def is_draining() -> bool:
    """Whether the process-wide lifecycle is draining, drained or stopping."""
    return get_lifecycle().announcing


def set_lifecycle(lifecycle: Lifecycle | None) -> None:
    """Replace (or with None, forget) the process-wide lifecycle."""
    global _default
    with _default_lock:
        _default = lifecycle
