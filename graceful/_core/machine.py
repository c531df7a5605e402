"""The lifecycle as a sans-io machine: events and ``now`` in, what happened out.

:class:`Machine` holds a node's phase and the state of its drain, and nothing else: it never
reads a clock, sleeps, locks, logs or signals. Every event comes with ``now`` (seconds on the
caller's monotonic scale) and with whatever the machine cannot know on its own (whether work is
in flight on the node, when the last request arrived); it answers the :class:`Transition` it
made, if any, so the caller does the side effects (waking waiters, logging, telling the other
processes). Like aioquic's ``handle_timer(now)`` / ``get_timer()``, :meth:`Machine.tick` is the
timer input and :meth:`Machine.next_deadline` says when to call it next. Reading never
transitions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

from .config import Config
from .phases import ANNOUNCING, SHARED_EVENTS, TRANSITIONS, Event, LifecycleError, Phase

__all__ = ["STOP_UNDER_WAY", "Machine", "Tick", "Transition"]

#: Why a resume is refused once a stop has begun (see :attr:`Machine.final`).
STOP_UNDER_WAY = "a stop is under way and cannot be undone; in-flight work finishes, then it exits"


@dataclasses.dataclass(frozen=True)
class Transition:
    """A change of phase the machine made: the caller's cue for side effects."""

    event: Event
    old: Phase
    new: Phase
    reason: str
    at: float


class Tick(NamedTuple):
    """What a :meth:`Machine.tick` found: the delay just ended, and the phase change it made."""

    delay_over: bool
    transition: Transition | None


_NOTHING = Tick(False, None)


class Machine:
    """One node's phase and drain. Not thread-safe: the runtime serialises calls."""

    def __init__(self, config: Config, now: float) -> None:
        self.config = config
        self.phase = Phase.STARTING
        self.reason = "starting"
        #: When the current phase began.
        self.since = now
        #: When the current drain started (None while not draining).
        self.drain_started: float | None = None
        #: When the delay ended, fixed by the tick that found it over (None until then).
        self.delay_end: float | None = None
        self.drain_reason: str | None = None
        #: The current drain was started by the drain file (its removal resumes).
        self.by_file = False
        #: A stop has begun (a final drain, or a stop): never cleared.
        self.final = False
        #: The current drain (or stop) was started by another process of the node.
        self.followed = False
        #: Bumped on every change of phase (the events stream's ``id``).
        self.notice_id = 0
        #: Drains started (for metrics).
        self.drains = 0

    def hand_over(self) -> None:
        """An in-place restart: the next drain's delay is ``handover_delay`` (when shorter),
        with no quiet period. Only before a drain has started."""
        if self.drain_started is None and self.config.handover_delay < self.config.delay:
            self.config = dataclasses.replace(
                self.config, delay=self.config.handover_delay, quiet_period=None
            )

    @property
    def announcing(self) -> bool:
        return self.phase in ANNOUNCING

    # -- reading (never transitions) --------------------------------------------------------

    def delay_ends_at(self, last_arrival: float | None) -> float | None:
        """When the current drain's delay ends, as far as is known now (None when not draining).

        ``last_arrival``: when the last request arrived (a quiet period counts from it)."""
        if self.delay_end is not None or self.drain_started is None:
            return self.delay_end
        start, cfg = self.drain_started, self.config
        end = start + cfg.delay
        if cfg.quiet_period is not None:
            last = max(last_arrival or start, start)
            end = min(end, max(start + cfg.min_delay, last + cfg.quiet_period))
        return end

    def drain_deadline(self, last_arrival: float | None) -> float | None:
        """When waiting for in-flight work gives up (delay end + drain timeout)."""
        end = self.delay_ends_at(last_arrival)
        return None if end is None else end + self.config.drain_timeout

    def next_deadline(self, last_arrival: float | None) -> float | None:
        """The next time at which :meth:`tick` may change something, if any."""
        if self.phase is not Phase.DRAINING:
            return None
        if self.delay_end is None:
            return self.delay_ends_at(last_arrival)
        return self.drain_deadline(last_arrival)

    def notice(self) -> dict[str, Any]:
        """The current phase as an events-stream notice."""
        retry = math.ceil(max(self.config.delay, 1.0))
        return {
            "id": self.notice_id,
            "phase": self.phase.value,
            "reason": self.reason,
            "retry_after": 0 if self.phase is Phase.SERVING else retry,
        }

    # -- events ------------------------------------------------------------------------------

    def handle(
        self,
        event: Event,
        reason: str,
        now: float,
        *,
        strict: bool = True,
        final: bool = False,
        by_file: bool = False,
        shared: bool = True,
    ) -> Transition | None:
        """Apply ``event``; the transition made, or None when the phase stays as it is.

        ``strict``: an event the phase does not allow raises :class:`LifecycleError` (else it
        is ignored). ``final``: this event starts a stop, which nothing undoes. ``by_file``: a
        drain started by the drain file. ``shared``: the event started in this process (False:
        it was followed from another process of the node).
        """
        old = self.phase
        new = TRANSITIONS.get((old, event))
        if event is Event.RESUME and self.final:
            new = None
        if new is None:
            if strict:
                raise LifecycleError(old, event, STOP_UNDER_WAY if self.final else None)
            return None
        if final or event is Event.STOP:
            self.final = True
        if new is old:
            return None
        self.phase, self.reason, self.since = new, reason, now
        if new is Phase.DRAINING:
            self.drain_started, self.delay_end = now, None
            self.drain_reason, self.by_file = reason, by_file
            self.followed = not shared
            self.drains += 1
        elif new is Phase.SERVING:
            self.drain_started = self.delay_end = self.drain_reason = None
            self.by_file = False
            self.followed = not shared
        elif new is Phase.STOPPING:  # its own exit, in a process that followed the drain
            self.followed = not shared or self.followed
        self.notice_id += 1
        return Transition(event, old, new, reason, now)

    def tick(self, now: float, *, busy: bool, last_arrival: float | None) -> Tick:
        """The timer input: DRAINING moves to DRAINED once the delay is over and nothing is in
        flight on the node (``busy`` False)."""
        if self.phase is not Phase.DRAINING:
            return _NOTHING
        delay_over = False
        if self.delay_end is None:
            end = self.delay_ends_at(last_arrival)
            if end is None or now < end:
                return _NOTHING
            self.delay_end, delay_over = end, True
        if busy:
            return Tick(delay_over, None)
        return Tick(delay_over, self.handle(Event.DRAIN_COMPLETE, "drained", now, strict=False))

    def mark_final(self) -> None:
        """A stop has begun elsewhere on the node: from now on a resume is refused."""
        self.final = True

    def sync_drain_file(self, exists: bool, now: float) -> Transition | None:
        """Drain while the drain file exists; resume when it goes, if it started the drain.
        Once a stop has begun the file no longer matters."""
        if self.final:
            return None
        if exists and self.phase is Phase.SERVING:
            return self.handle(Event.DRAIN, "drain file present", now, by_file=True)
        if not exists and self.by_file and self.phase in (Phase.DRAINING, Phase.DRAINED):
            return self.handle(Event.RESUME, "drain file removed", now, strict=False)
        return None

    def follow(
        self, phase: Phase, reason: str, now: float, *, final: bool, since: float | None
    ) -> Transition | None:
        """Take on a drain, resume or stop announced by another process of this node.

        ``since``: when the node's drain started (this process's delay counts from then);
        ``final``: a stop is under way, so a resume is never followed (a late one, written by a
        process that had not seen the stop yet, is followed as the drain it cannot undo).
        """
        if final and phase is Phase.SERVING:
            phase = Phase.DRAINING
        for event, announced in SHARED_EVENTS.items():
            if announced is phase:
                start = now if since is None or event is not Event.DRAIN else min(now, since)
                return self.handle(event, reason, start, strict=False, shared=False, final=final)
        return None
