"""A Hypothesis state machine: the Lifecycle against a small model written independently.

The model knows the phases as the design draws them, counts in-flight work, and computes when
a drain's delay ends (with or without a quiet period). After every step the real lifecycle must
agree with it; an event the model calls illegal must raise and change nothing.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from graceful import Config, Lifecycle, LifecycleError, Phase
from graceful.testing import FakeClock

S, SV, DG, DD, SG, SD = (
    Phase.STARTING,
    Phase.SERVING,
    Phase.DRAINING,
    Phase.DRAINED,
    Phase.STOPPING,
    Phase.STOPPED,
)

# The model's own view of which events each phase accepts, and where they lead.
MODEL: dict[str, dict[Phase, Phase]] = {
    "mark_ready": {S: SV, SV: SV, DG: DG, DD: DD, SG: SG},
    "drain": {SV: DG, DG: DG, DD: DD},
    "resume": {SV: SV, DG: SV, DD: SV},
    "stop": {S: SG, SV: SG, DG: SG, DD: SG, SG: SG, SD: SD},
    "mark_stopped": {SG: SD, SD: SD},
}
DEFAULT_REASONS = {"mark_ready": "ready", "mark_stopped": "stopped"}


class LifecycleModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(0.0)
        self.lc: Lifecycle | None = None
        # the model
        self.phase = S
        self.reason = "starting"
        self.calls = 0
        self.active: list[int] = []
        self.released: list[int] = []
        self.drain_start: float | None = None
        self.delay_end: float | None = None  # fixed once an observation finds the delay over
        self.last_arrival: float | None = None

    @initialize(
        delay=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
        quiet=st.sampled_from([None, 0.25, 1.0]),
        min_fraction=st.sampled_from([0.0, 0.5, 1.0]),
    )
    def setup(self, delay: float, quiet: float | None, min_fraction: float) -> None:
        self.delay, self.quiet, self.min_delay = delay, quiet, delay * min_fraction
        config = Config(
            delay=delay, quiet_period=quiet, min_delay=self.min_delay, drain_timeout=10.0
        )
        self.lc = Lifecycle(config, clock=self.clock)

    @property
    def real(self) -> Lifecycle:
        assert self.lc is not None
        return self.lc

    # -- the model's notion of time ----------------------------------------------------------

    def model_delay_end(self) -> float:
        assert self.drain_start is not None
        if self.delay_end is not None:
            return self.delay_end
        start = self.drain_start
        end = start + self.delay
        if self.quiet is not None:
            last = max(self.last_arrival if self.last_arrival is not None else start, start)
            end = min(end, max(start + self.min_delay, last + self.quiet))
        return end

    def observe(self) -> None:
        """What a tick of the lifecycle (a waiter, a timer, the snapshot) does: a due drain
        completes."""
        if self.phase is not DG:
            return
        now = self.clock.now
        if self.delay_end is None:
            end = self.model_delay_end()
            if now < end:
                return
            self.delay_end = end
        if not self.active:
            self.phase = DD
            self.reason = "drained"

    def event(self, name: str) -> None:
        old = self.phase
        new = MODEL[name].get(old)
        self.calls += 1
        args: dict[str, object] = {"now": self.clock.now}
        if name in ("drain", "resume", "stop"):
            args["reason"] = f"{name} #{self.calls}"
        method = getattr(self.real, name)
        if new is None:
            before = (self.real.phase, self.real.reason, self.real.inflight)
            with pytest.raises(LifecycleError) as info:
                method(**args)
            assert info.value.phase is old
            assert old.value in str(info.value)
            assert name.replace("mark_", "") in str(info.value)
            assert (self.real.phase, self.real.reason, self.real.inflight) == before
            return
        method(**args)
        if new is old:
            return  # a repeat: nothing changes, not even the reason
        self.phase = new
        self.reason = str(args["reason"]) if "reason" in args else DEFAULT_REASONS[name]
        if new is DG:
            self.drain_start, self.delay_end = self.clock.now, None
        elif new is SV:
            self.drain_start = self.delay_end = None

    # -- rules -------------------------------------------------------------------------------

    @rule()
    def mark_ready(self) -> None:
        self.event("mark_ready")

    @rule()
    def drain(self) -> None:
        self.event("drain")

    @rule()
    def resume(self) -> None:
        self.event("resume")

    # Stopping is for good: the gates make these rules rare so that most runs spend their steps
    # going back and forth between serving, draining and drained.
    @rule(gate=st.integers(0, 3))
    def stop(self, gate: int) -> None:
        if gate == 0:
            self.event("stop")

    @rule(gate=st.integers(0, 1))
    def mark_stopped(self, gate: int) -> None:
        if gate == 0:
            self.event("mark_stopped")

    @rule()
    def begin(self) -> None:
        token = self.real.requests.begin("GET", "/", self.clock.now)
        self.active.append(token)
        self.last_arrival = self.clock.now

    @precondition(lambda self: bool(self.active))
    @rule(data=st.data())
    def end(self, data: st.DataObject) -> None:
        token = data.draw(st.sampled_from(self.active))
        self.active.remove(token)
        self.released.append(token)
        self.real.requests.end(token)
        if not self.active:
            self.observe()  # the last release checks whether the drain is done

    @precondition(lambda self: bool(self.released))
    @rule(data=st.data())
    def end_again(self, data: st.DataObject) -> None:
        self.real.requests.end(data.draw(st.sampled_from(self.released)))

    @rule(seconds=st.sampled_from([0.0, 0.125, 0.25, 0.5, 1.0, 4.0]))
    def advance(self, seconds: float) -> None:
        before = self.real.phase
        self.clock.now += seconds
        # Reading never transitions: a drain now due completes only when something ticks.
        self.real.notice()
        self.real.next_deadline()
        self.real.delay_ends_at()
        assert self.real.phase is before

    @rule()
    def tick(self) -> None:
        assert self.real.tick(self.clock.now) is self.model_phase()

    # -- invariants --------------------------------------------------------------------------

    def model_phase(self) -> Phase:
        self.observe()
        return self.phase

    @invariant()
    def phase_matches_the_model(self) -> None:
        if self.lc is None:
            return
        assert self.real.tick() is self.model_phase()  # what the runtime's waiters do
        assert self.real.phase is self.model_phase()

    @invariant()
    def reason_matches_the_model(self) -> None:
        if self.lc is None:
            return
        self.observe()
        assert self.real.reason == self.reason

    @invariant()
    def inflight_matches_the_model_and_is_never_negative(self) -> None:
        if self.lc is None:
            return
        assert self.real.inflight == len(self.active)
        assert self.real.inflight >= 0
        assert self.real.snapshot()["inflight"] == len(self.active)

    @invariant()
    def announcing_matches_the_phase(self) -> None:
        if self.lc is None:
            return
        assert self.real.announcing == (self.phase in (DG, DD, SG))


LifecycleModel.TestCase.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)
TestLifecycleModel = LifecycleModel.TestCase
