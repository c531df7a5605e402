"""The phases of a node, the events that move it, and the table of allowed transitions.

The table (:data:`TRANSITIONS`) maps ``(phase, event)`` to the next phase; an event it does not
allow raises :class:`LifecycleError`, naming the current phase (h11's ``_state.py`` style).
"""

from __future__ import annotations

import enum
import types
from collections.abc import Mapping

from .errors import GracefulError

__all__ = ["ANNOUNCING", "SHARED_EVENTS", "TRANSITIONS", "Event", "LifecycleError", "Phase"]


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

#: Phases in which responses tell keep-alive callers to go elsewhere.
ANNOUNCING = frozenset({Phase.DRAINING, Phase.DRAINED, Phase.STOPPING})

#: Events a process shares with the other processes of its node, and the phase each announces.
SHARED_EVENTS: Mapping[Event, Phase] = types.MappingProxyType(
    {Event.DRAIN: Phase.DRAINING, Event.RESUME: Phase.SERVING, Event.STOP: Phase.STOPPING}
)

_HINTS = {
    Event.DRAIN: "drain a node once it is serving",
    Event.RESUME: "resume applies to a draining or drained node",
    Event.DRAIN_COMPLETE: "a drain completes only while draining",
    Event.MARK_READY: "a stopped node cannot become ready",
    Event.STOPPED: "call stop() first",
}


class LifecycleError(GracefulError, RuntimeError):
    """An event that the current phase does not allow; the message names the phase."""

    def __init__(self, phase: Phase, event: Event, hint: str | None = None) -> None:
        self.phase = phase
        self.event = event
        hint = _HINTS.get(event, "") if hint is None else hint
        super().__init__(f"cannot {event} while {phase.value}: {hint}".rstrip(": "))
