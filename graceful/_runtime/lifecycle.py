"""The node's lifecycle at run time: the sans-io machine, with the clock, the locks and the waits.

The phases, the transition table and the rules of a drain are the pure core's
(:mod:`graceful._core.phases`, :mod:`graceful._core.machine`). :class:`Lifecycle` is the shell
around them: it reads the injectable ``clock`` where a method is given no ``now``, serialises
the machine behind a lock, and does what a transition means (wake the sync and async waiters,
tell the other processes of the node, publish the events-stream notice, log, send the blinker
signals). Reading never transitions: a drain completes when a waiter, the release of the last
in-flight work, :meth:`Lifecycle.wake`, :meth:`Lifecycle.tick`, the status snapshot or (on the
real clock) a timer at the end of the delay looks at it. Waiting is event-driven: the thread
that releases the last in-flight entry wakes the waiters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from .. import signals
from .._core.config import Config
from .._core.inflight import InflightTracker
from .._core.machine import Machine, Transition
from .._core.phases import ANNOUNCING, SHARED_EVENTS, TRANSITIONS, Event, LifecycleError, Phase
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

logger = logging.getLogger("graceful")

#: A drain that started longer ago than this when this process took it on joined the node's.
_JOINED = 0.05


class Node(Protocol):
    """The other processes of this node (gunicorn's workers and master), when there are any.

    Implemented over shared memory by :mod:`graceful._servers.node_shm`; the lifecycle asks
    how much is in flight elsewhere and how the node drains, and tells of the drains, resumes
    and stops that start here.

    A node wakes the lifecycle itself (:meth:`Lifecycle.wake`) when another process's count or
    the node's drain changes. One that cannot may have a ``poll_interval`` attribute (seconds):
    waiters then look at the others' counts that often. Without it (or with None) nothing polls.
    """

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
    """One node's phase, its in-flight work, and the waits on them. Thread-safe.

    ``clock``: seconds on a monotonic scale, read where a method is given no ``now``.
    ``alarm``: whether a timer thread ticks at the end of a drain's delay, so the drain completes
    (and its signals fire) with nobody waiting; by default only on the real monotonic clock (an
    injected clock is driven by its caller through :meth:`tick`).
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        alarm: bool | None = None,
    ):
        self.config = config if config is not None else Config.from_env()
        self.clock = clock
        self._machine = Machine(self.config, clock())
        self._cond = threading.Condition(threading.RLock())
        self._alarm_on = clock is time.monotonic if alarm is None else alarm
        self._alarm: threading.Timer | None = None
        self._waiters = 0
        self._async_waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self.requests = InflightTracker()
        self.websockets = InflightTracker()
        self.events = EventHub(self.config.events_max_subscribers)
        #: True while responses should carry ``Graceful-State: draining`` (read on the hot path).
        self.announcing = False
        #: The other processes of this node, linked by a server shim (None: this process alone).
        self.node: Node | None = None
        #: Requests that arrived while announcing (for metrics).
        self.served_while_draining = 0
        self._count_lock = threading.Lock()

    # -- reading (never transitions) -------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._machine.phase

    @property
    def reason(self) -> str:
        return self._machine.reason

    @property
    def draining_since(self) -> float | None:
        """When the current drain started (on the clock's scale); None while not draining."""
        return self._machine.drain_started

    @property
    def drain_reason(self) -> str | None:
        """Why the current drain started; None while not draining."""
        return self._machine.drain_reason

    @property
    def final(self) -> bool:
        """True once a stop has begun (a final drain, or :meth:`stop`); never cleared.

        From then on a resume is refused, the drain file is not looked at, and a node of
        several processes never follows a resume.
        """
        return self._machine.final

    @property
    def drains(self) -> int:
        """Drains started (for metrics)."""
        return self._machine.drains

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
            self.config = self._machine.config = config
            self.events.max_subscribers = config.events_max_subscribers

    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else now

    def delay_ends_at(self) -> float | None:
        """When the current drain's delay ends, as far as is known now (None when not draining)."""
        return self._machine.delay_ends_at(self.requests.last_arrival)

    def drain_deadline(self) -> float | None:
        """When waiting for in-flight work gives up (delay end + drain timeout)."""
        return self._machine.drain_deadline(self.requests.last_arrival)

    def next_deadline(self) -> float | None:
        """The next time at which :meth:`tick` may change something, if any."""
        return self._machine.next_deadline(self.requests.last_arrival)

    def stuck(self, now: float | None = None) -> list[tuple[str, str, float]]:
        """``(method, path, age)`` of everything in flight here, oldest first, then the oldest
        request of each other process of the node."""
        at = self._now(now)
        mine = [(e.method, e.path, at - e.started) for e in self.requests.entries()]
        return mine if self.node is None else mine + self.node.stuck(at)

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """Everything the status route reports. Ticks first, so a due drain shows as drained."""
        from .._version import __version__

        at = self._now(now)
        self.tick(at)
        machine = self._machine
        oldest = self.requests.oldest()
        delay_end, deadline = self.delay_ends_at(), self.drain_deadline()
        own, node = self.inflight, self.node
        by_worker = {str(os.getpid()): own} if node is None else node.by_worker(own)
        return {
            "phase": machine.phase.value,
            "reason": machine.reason,
            "in_phase_for": round(at - machine.since, 3),
            "inflight": sum(by_worker.values()),
            "inflight_by_worker": by_worker,
            "websockets": len(self.websockets),
            "oldest_request_age": None if oldest is None else round(at - oldest, 3),
            "delay_remaining": None if delay_end is None else round(max(0.0, delay_end - at), 3),
            "drain_deadline_in": None if deadline is None else round(deadline - at, 3),
            "events_subscribers": self.events.node_count(),  # every worker's
            "final": machine.final,
            "pid": os.getpid(),
            "version": __version__,
        }

    def notice(self) -> dict[str, Any]:
        """The current phase as an events-stream notice."""
        return self._machine.notice()

    # -- events ----------------------------------------------------------------------------

    def mark_ready(self, *, now: float | None = None) -> None:
        """Turn ready; on a node that began a drain while this process was starting (a worker
        forked mid-drain), take that drain on at once: nothing else would tell it."""
        at = self._now(now)
        self._apply(Event.MARK_READY, "ready", at)
        node = self.node
        said_ready = getattr(node, "ready", None)  # a node that counts its processes ready
        if said_ready is not None and self._machine.phase is Phase.SERVING:
            said_ready()
        if node is not None and self._machine.phase is Phase.SERVING:
            since, final = node.drain_state()
            if since is not None:
                self.follow(
                    Phase.DRAINING, "the node is draining", now=at, final=final, since=since
                )

    def drain(
        self, reason: str = "drain requested", *, now: float | None = None, final: bool = False
    ) -> None:
        """Start draining (a no-op when already draining, drained or stopping).

        ``final``: this drain is the start of a stop (SIGTERM); it cannot be undone. A node
        whose other processes already drain joins their drain: its delay counts from then.
        """
        at = self._now(now)
        start, node = at, self.node
        if node is not None and self._machine.phase is Phase.SERVING:
            since, _final = node.drain_state()
            if since is not None:
                start = min(at, since)
        self._apply(Event.DRAIN, reason, at, start=start, final=final)

    def resume(self, reason: str = "resumed", *, now: float | None = None) -> None:
        self._apply(Event.RESUME, reason, self._now(now))

    def hand_over(self) -> None:
        """An in-place restart: the next drain's delay is ``config.handover_delay`` (when
        shorter), since a new process on the same listening sockets already accepts. Only
        before a drain has started."""
        with self._cond:
            self._machine.hand_over()
            self.config = self._machine.config

    def stop(self, reason: str = "stop requested", *, now: float | None = None) -> None:
        self._apply(Event.STOP, reason, self._now(now))

    def mark_stopped(self, *, now: float | None = None) -> None:
        self._apply(Event.STOPPED, "stopped", self._now(now))

    def tick(self, now: float | None = None) -> Phase:
        """Move DRAINING to DRAINED once the delay is over and nothing is in flight."""
        machine = self._machine
        if machine.phase is not Phase.DRAINING:
            return machine.phase
        at = self._now(now)
        busy = self._busy()  # outside the lock: a node may take its own lock to count
        with self._cond:
            result = machine.tick(at, busy=busy, last_arrival=self.requests.last_arrival)
            notice = None if result.transition is None else self._changed(result.transition)
        if result.delay_over:
            self._log_delay_over()
        if result.transition is not None and notice is not None:
            self._after(result.transition, notice, shared=True, now=at)
        return machine.phase

    def wake(self) -> None:
        """Look at the drain again and wake every waiter, sync and async. Thread-safe.

        For a node whose other processes' counts or drain changed: it calls this instead of
        being polled."""
        self.tick()
        with self._cond:
            self._cond.notify_all()
        self._wake_async()

    def sync_drain_file(self, exists: bool, *, now: float | None = None) -> None:
        """Drain while the drain file exists; resume when it goes, if it started the drain.

        Once a stop has begun the file no longer matters."""
        if self._machine.final:
            return
        at = self._now(now)
        self._run(lambda: self._machine.sync_drain_file(exists, at), now=at)

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
        if phase is Phase.SERVING:
            self._take_node_stop()
        machine = self._machine
        self._run(
            lambda: machine.follow(phase, reason, at, final=final, since=since),
            now=at,
            shared=False,
        )

    def _apply(
        self,
        event: Event,
        reason: str,
        now: float,
        *,
        start: float | None = None,
        final: bool = False,
    ) -> None:
        """An event of this process's own (strict: one the phase refuses raises)."""
        machine, node = self._machine, self.node
        if event is Event.RESUME:
            self._take_node_stop()
        at = now if start is None else start
        transition = self._run(lambda: machine.handle(event, reason, at, final=final), now=now)
        if transition is None and final and node is not None:
            # A drain the node already knew, now the final one: tell the others.
            node.announce(Phase.DRAINING, reason, final=True, since=machine.drain_started)

    def _run(
        self, change: Callable[[], Transition | None], *, now: float, shared: bool = True
    ) -> Transition | None:
        """Make ``change`` to the machine under the lock, then do what its transition means.
        ``shared``: the change started in this process (the node is told of it)."""
        with self._cond:
            transition = change()
            if transition is None:
                return None
            notice = self._changed(transition)
        self._after(transition, notice, shared=shared, now=now)
        return transition

    def _take_node_stop(self) -> None:
        """Before a resume: a stop another process of the node began makes it final here too
        (a resume is refused once a stop has begun anywhere on the node)."""
        node = self.node
        if node is not None and not self._machine.final and node.drain_state()[1]:
            with self._cond:
                self._machine.mark_final()

    def _changed(self, transition: Transition) -> dict[str, Any]:
        """Under the lock: the runtime's state follows the machine's new phase."""
        new = transition.new
        self.announcing = new in ANNOUNCING
        watching = self._waiters > 0 or new is Phase.DRAINING
        self.requests.on_idle = self.wake if watching else None
        if transition.old is Phase.DRAINING and self._alarm is not None:
            self._alarm.cancel()
            self._alarm = None
        self._cond.notify_all()
        return self._machine.notice()

    def _after(
        self, transition: Transition, notice: dict[str, Any], *, shared: bool, now: float
    ) -> None:
        """Outside the lock: what a transition means to everything around the machine."""
        self._wake_async()
        node = self.node
        if node is not None and shared and transition.event in SHARED_EVENTS:
            machine = self._machine
            node.announce(
                transition.new, transition.reason, final=machine.final, since=machine.drain_started
            )
        self.events.publish(notice)
        self._announce(transition)
        if transition.new is Phase.DRAINING:
            # A delay already over (none, or a joined drain's) completes an idle drain now.
            self.tick(now)
            self._arm()

    def _arm(self) -> None:
        """On the real clock, tick at the end of the delay (again, if arrivals moved it)."""
        if not self._alarm_on:
            return
        with self._cond:
            machine = self._machine
            end = machine.delay_ends_at(self.requests.last_arrival)
            if machine.phase is not Phase.DRAINING or machine.delay_end is not None or end is None:
                return
            if self._alarm is not None:
                self._alarm.cancel()
            self._alarm = threading.Timer(max(0.0, end - self.clock()), self._ring)
            self._alarm.daemon = True
            self._alarm.name = "graceful-delay"
            self._alarm.start()

    def _ring(self) -> None:
        self.tick()
        self._arm()

    def _log_delay_over(self) -> None:
        start, end = self._machine.drain_started, self._machine.delay_end
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
        logger.log(logging.DEBUG if self._machine.followed else logging.INFO, message, *args)

    def _announce(self, transition: Transition) -> None:
        old, new, reason = transition.old, transition.new, transition.reason
        self._log(
            "phase %s -> %s (%s), %d in flight%s",
            old,
            new,
            reason,
            self.node_inflight(),
            self._what_it_means(old, new, transition.at),
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
        start = self._machine.drain_started
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

    def _wake_async(self) -> None:
        for loop, event in list(self._async_waiters):
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed; its waiter is gone
                self._async_waiters.discard((loop, event))

    def _watch(self, delta: int) -> None:
        with self._cond:
            self._waiters += delta
            watching = self._waiters > 0 or self._machine.phase is Phase.DRAINING
            self.requests.on_idle = self.wake if watching else None

    def _drained(self) -> bool | None:
        """True when drained, False when the drain can no longer complete, None to keep waiting."""
        phase = self._machine.phase
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
        """A node that cannot wake the lifecycle is looked at every ``poll_interval``."""
        interval: float | None = getattr(self.node, "poll_interval", None)
        return None if interval is None else now + interval

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
        return f"<Lifecycle {self._machine.phase.value} inflight={self.inflight}>"

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
            while not (self.announcing or self._machine.phase is Phase.STOPPED):
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
