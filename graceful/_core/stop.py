"""The stop sequence, pure: what each signal means and the steps of the stop it starts.

SIGTERM drains (the delay, then in-flight work, bounded by ``drain_timeout``), SIGINT stops
quickly (no delay, in-flight work bounded by ``interrupt_timeout``), a second SIGINT or a
SIGQUIT stops at once. :class:`StopPlan` holds which stop is under way; its
:meth:`StopPlan.steps` yields what to do (:class:`Move` the lifecycle, :class:`Wait`, ...) and is
sent each step's result, so the runtime runs the same steps in a thread or on an event loop
and does the moving, the waiting and the logging (:mod:`graceful._runtime.shutdown`).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Generator
from typing import NamedTuple

from .config import Config
from .phases import Event, Phase

__all__ = [
    "GiveUp",
    "Joined",
    "Mode",
    "Move",
    "Reaction",
    "Signal",
    "Step",
    "Stop",
    "StopPlan",
    "Wait",
    "drain_wait",
]


class Signal(enum.Enum):
    """The signals a stop understands (the runtime maps signal numbers to these)."""

    TERM = "SIGTERM"
    INT = "SIGINT"
    QUIT = "SIGQUIT"


class Mode(str, enum.Enum):
    """The stop under way."""

    TERM = "term"  # drain, then stop
    INT = "int"  # quick stop: no delay
    FORCE = "force"  # at once

    def __str__(self) -> str:
        return self.value


class Reaction(enum.Enum):
    """What a signal means, given the stop under way."""

    START = "start"  # a SIGTERM: start the drain and stop
    QUICK = "quick"  # a SIGINT: move to stopping, no delay
    FORCE = "force"  # stop at once
    IGNORED = "ignored"  # already stopping


class Wait(NamedTuple):
    """One wait of a stop: until drained (else until idle), for at most ``timeout`` seconds."""

    drained: bool
    timeout: float


@dataclasses.dataclass(frozen=True)
class Move:
    """Move the lifecycle: ``event`` (DRAIN or STOP) with ``reason``; a DRAIN is final."""

    event: Event
    reason: str


@dataclasses.dataclass(frozen=True)
class Joined:
    """The stop joined a drain already under way (in ``phase``): say so."""

    name: str
    phase: Phase


@dataclasses.dataclass(frozen=True)
class GiveUp:
    """A wait ended with work still in flight: log it (``why``) and stop anyway."""

    why: str


@dataclasses.dataclass(frozen=True)
class Stop:
    """Call the server's stop callback (once)."""


#: A step of a stop. A :class:`Wait` is answered with whether it ended idle (or drained).
Step = Wait | Move | Joined | GiveUp | Stop


def drain_wait(config: Config, delay_left: float | None) -> float:
    """How long a SIGTERM's stop waits for the node to drain: the rest of the delay, then the
    drain timeout. The delay counts from the node's drain (it may have begun long before the
    signal); the drain timeout from the end of the delay or from now, whichever is later, so
    that work that arrived while the node was already drained is given its time too."""
    rest_of_delay = config.delay if delay_left is None else max(0.0, delay_left)
    return rest_of_delay + config.drain_timeout


class StopPlan:
    """Which stop is under way, and its steps. Not thread-safe: signals come in one by one."""

    def __init__(self) -> None:
        #: None, then the stop under way.
        self.mode: Mode | None = None
        #: A wait of the stop ended with work still in flight.
        self.gave_up = False

    def signal(self, signal: Signal, *, stopped: bool) -> tuple[Reaction, bool]:
        """Take one signal: what it means, and whether a stop must be started for it now.

        ``stopped``: the server's stop callback was called already (Ctrl-C then forces)."""
        if signal is Signal.TERM and self.mode is None:
            self.mode = Mode.TERM
            return Reaction.START, True
        if signal is Signal.INT and self.mode in (None, Mode.TERM) and not stopped:
            previous, self.mode = self.mode, Mode.INT
            return Reaction.QUICK, previous is None
        if signal in (Signal.INT, Signal.QUIT) and self.mode is not Mode.FORCE:
            self.mode = Mode.FORCE
            return Reaction.FORCE, False
        return Reaction.IGNORED, False

    def steps(
        self,
        name: str,
        config: Config,
        phase: Phase,
        delay_left: Callable[[], float | None],
    ) -> Generator[Step, bool, None]:
        """The stop started by signal ``name`` on a node in ``phase``: yields the steps and is
        sent each :class:`Wait`'s result (True for the other steps). ``delay_left()`` reads
        how much of the node's delay is left (None: no drain), once the drain has started."""
        if self.mode is Mode.TERM:
            if phase is Phase.STARTING:
                yield Move(Event.STOP, f"{name} while starting")
                idle = yield Wait(drained=False, timeout=config.drain_timeout)
            else:
                yield Move(Event.DRAIN, name)
                if phase in (Phase.DRAINING, Phase.DRAINED):
                    yield Joined(name, phase)
                idle = yield Wait(drained=True, timeout=drain_wait(config, delay_left()))
            if not idle and self.mode is Mode.TERM:
                self.gave_up = True
                yield GiveUp(f"drain timeout ({config.drain_timeout:g}s) passed")
        if self.mode is Mode.INT:
            idle = yield Wait(drained=False, timeout=config.interrupt_timeout)
            if not idle:
                self.gave_up = True
                yield GiveUp(f"quick stop ({config.interrupt_timeout:g}s) timed out")
        if self.mode is Mode.FORCE:
            return
        yield Move(Event.STOP, f"{name}: drained")
        yield Stop()
