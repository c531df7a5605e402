"""The lifecycle state machine, its timing and its snapshot, driven with a fake clock.

Every test here is deterministic: the lifecycle reads time only through the injected clock, and
methods are given ``now`` explicitly.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from collections.abc import Callable

import pytest
from conftest import wait_until

import graceful
from graceful import Config, Lifecycle, LifecycleError, Phase
from graceful._core import config as config_module
from graceful._core.machine import Machine, Tick, Transition
from graceful._runtime import lifecycle as lifecycle_module
from graceful._runtime.lifecycle import TRANSITIONS, Event
from graceful.testing import FakeClock

DELAY = 1.0


def make(
    clock: FakeClock | None = None,
    *,
    delay: float = DELAY,
    drain_timeout: float = 25.0,
    quiet_period: float | None = None,
    min_delay: float = 0.0,
) -> tuple[Lifecycle, FakeClock]:
    clock = clock if clock is not None else FakeClock(0.0)
    config = Config(
        delay=delay, drain_timeout=drain_timeout, quiet_period=quiet_period, min_delay=min_delay
    )
    return Lifecycle(config, clock=clock), clock


def reach(phase: Phase) -> tuple[Lifecycle, FakeClock]:
    """A fresh lifecycle brought to ``phase`` through the public methods only."""
    lc, clock = make()
    steps: dict[Phase, list[Callable[[], object]]] = {
        Phase.STARTING: [],
        Phase.SERVING: [lc.mark_ready],
        Phase.DRAINING: [lc.mark_ready, lc.drain],
        Phase.DRAINED: [lc.mark_ready, lc.drain, lambda: lc.tick(clock.advance(DELAY))],
        Phase.STOPPING: [lc.stop],
        Phase.STOPPED: [lc.stop, lc.mark_stopped],
    }
    for step in steps[phase]:
        step()
    assert lc.phase is phase
    return lc, clock


def fire(lc: Lifecycle, clock: FakeClock, event: Event) -> None:
    """Deliver ``event`` through the public method that carries it."""
    if event is Event.MARK_READY:
        lc.mark_ready(now=clock())
    elif event is Event.DRAIN:
        lc.drain(now=clock())
    elif event is Event.RESUME:
        lc.resume(now=clock())
    elif event is Event.STOP:
        lc.stop(now=clock())
    elif event is Event.STOPPED:
        lc.mark_stopped(now=clock())
    else:  # DRAIN_COMPLETE: the delay is over and nothing is in flight
        lc.tick(clock.advance(DELAY + 1.0))


def current(lc: Lifecycle) -> Phase:
    """``lc.phase`` after a tick at the clock's time (what a waiter or the timer does),
    unnarrowed by the type checker."""
    return lc.tick()


def read(lc: Lifecycle) -> Phase:
    """``lc.phase`` without a tick, unnarrowed by the type checker."""
    return lc.phase


ALL_PAIRS = list(itertools.product(Phase, Event))


# -- the transition table ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "event"),
    [pair for pair in ALL_PAIRS if pair in TRANSITIONS],
    ids=[f"{p.value}-{e.value}" for p, e in ALL_PAIRS if (p, e) in TRANSITIONS],
)
def test_allowed_event_moves_to_the_table_target(phase: Phase, event: Event) -> None:
    lc, clock = reach(phase)
    fire(lc, clock, event)
    assert lc.phase is TRANSITIONS[phase, event]


@pytest.mark.parametrize(
    ("phase", "event"),
    [pair for pair in ALL_PAIRS if pair not in TRANSITIONS and pair[1] is not Event.DRAIN_COMPLETE],
    ids=[
        f"{p.value}-{e.value}"
        for p, e in ALL_PAIRS
        if (p, e) not in TRANSITIONS and e is not Event.DRAIN_COMPLETE
    ],
)
def test_disallowed_event_raises_naming_phase_and_event_and_changes_nothing(
    phase: Phase, event: Event
) -> None:
    lc, clock = reach(phase)
    reason = lc.reason
    with pytest.raises(LifecycleError) as info:
        fire(lc, clock, event)
    assert info.value.phase is phase
    assert info.value.event is event
    message = str(info.value)
    assert phase.value in message
    assert event.value in message
    assert lc.phase is phase
    assert lc.reason == reason


@pytest.mark.parametrize(
    "phase",
    [p for p in Phase if (p, Event.DRAIN_COMPLETE) not in TRANSITIONS],
    ids=[p.value for p in Phase if (p, Event.DRAIN_COMPLETE) not in TRANSITIONS],
)
def test_drain_complete_outside_draining_is_ignored_by_tick(phase: Phase) -> None:
    # DRAIN_COMPLETE has no public method of its own: tick() delivers it, and a tick in any
    # other phase must leave the phase alone (it never raises: ticks come from timers).
    lc, clock = reach(phase)
    fire(lc, clock, Event.DRAIN_COMPLETE)
    assert lc.phase is phase
    error = LifecycleError(phase, Event.DRAIN_COMPLETE)
    assert phase.value in str(error)
    assert Event.DRAIN_COMPLETE.value in str(error)


def test_table_follows_the_design_diagram() -> None:
    expected_changes = {
        (Phase.STARTING, Event.MARK_READY): Phase.SERVING,
        (Phase.SERVING, Event.DRAIN): Phase.DRAINING,
        (Phase.DRAINING, Event.DRAIN_COMPLETE): Phase.DRAINED,
        (Phase.DRAINING, Event.RESUME): Phase.SERVING,
        (Phase.DRAINED, Event.RESUME): Phase.SERVING,
        (Phase.STOPPING, Event.STOPPED): Phase.STOPPED,
    }
    expected_changes |= {
        (phase, Event.STOP): Phase.STOPPING
        for phase in (Phase.STARTING, Phase.SERVING, Phase.DRAINING, Phase.DRAINED)
    }
    changes = {pair: new for pair, new in TRANSITIONS.items() if new is not pair[0]}
    assert changes == expected_changes
    for illegal in [
        (Phase.STARTING, Event.DRAIN),
        (Phase.STARTING, Event.RESUME),
        (Phase.STOPPED, Event.MARK_READY),
        (Phase.SERVING, Event.STOPPED),
    ]:
        assert illegal not in TRANSITIONS


def test_lifecycle_error_is_a_runtime_error() -> None:
    lc, _ = make()
    with pytest.raises(RuntimeError, match="starting"):
        lc.drain()


def test_repeated_events_change_nothing_and_keep_the_reason() -> None:
    lc, clock = reach(Phase.DRAINING)
    reason = lc.reason
    lc.drain("again", now=clock())
    lc.mark_ready(now=clock())
    assert lc.phase is Phase.DRAINING
    assert lc.reason == reason


# -- timing of a drain ---------------------------------------------------------------------


def test_drain_waits_out_the_delay_even_when_idle() -> None:
    lc, _ = make(delay=5.0)
    lc.mark_ready(now=0.0)
    lc.drain(now=0.0)
    assert lc.tick(4.999) is Phase.DRAINING
    assert lc.tick(5.0) is Phase.DRAINED
    assert lc.reason == "drained"


def test_drain_waits_for_inflight_work_after_the_delay() -> None:
    lc, clock = make(delay=5.0)
    lc.mark_ready(now=0.0)
    token = lc.requests.begin("GET", "/slow", 0.0)
    lc.drain(now=0.0)
    assert lc.tick(clock.advance(60.0)) is Phase.DRAINING
    assert lc.inflight == 1
    lc.requests.end(token)  # the last release completes the drain on its own
    assert lc.phase is Phase.DRAINED  # reading never ticks: the release did it
    assert lc.inflight == 0


def test_work_ending_before_the_delay_does_not_cut_it_short() -> None:
    lc, clock = make(delay=5.0)
    lc.mark_ready(now=0.0)
    token = lc.requests.begin("GET", "/", 0.0)
    lc.drain(now=0.0)
    clock.advance(1.0)
    lc.requests.end(token)
    assert current(lc) is Phase.DRAINING
    clock.advance(4.0)
    assert current(lc) is Phase.DRAINED


@pytest.mark.parametrize(
    ("min_delay", "arrivals_before", "drain_at", "arrivals_after", "ends_at"),
    [
        # No request since the drain: quiet from the start, but min_delay holds until 3.
        (3.0, [], 0.0, [], 3.0),
        # The last arrival at 4: quiet from then on, for 2 s.
        (3.0, [0.0], 0.0, [4.0], 6.0),
        # The last request came long before the drain: the quiet period starts at the drain.
        (0.0, [1.0], 5.0, [], 7.0),
    ],
    ids=[
        "ends-early-but-not-before-min-delay",
        "counts-from-the-last-arrival",
        "ignores-arrivals-before-the-drain",
    ],
)
def test_quiet_period_ends_the_delay(
    min_delay: float,
    arrivals_before: list[float],
    drain_at: float,
    arrivals_after: list[float],
    ends_at: float,
) -> None:
    lc, _ = make(delay=10.0, quiet_period=2.0, min_delay=min_delay)
    lc.mark_ready(now=0.0)
    for at in arrivals_before:
        lc.requests.end(lc.requests.begin("GET", "/", at))
    lc.drain(now=drain_at)
    for at in arrivals_after:
        lc.requests.end(lc.requests.begin("GET", "/", at))
    assert lc.delay_ends_at() == ends_at
    assert lc.tick(ends_at - 0.001) is Phase.DRAINING
    assert lc.tick(ends_at) is Phase.DRAINED


def test_quiet_period_never_extends_past_the_delay() -> None:
    lc, _ = make(delay=10.0, quiet_period=2.0, min_delay=3.0)
    lc.mark_ready(now=0.0)
    lc.drain(now=0.0)
    for at in (1.0, 2.5, 4.0, 5.5, 7.0, 8.5, 9.5):
        lc.requests.end(lc.requests.begin("GET", "/", at))
        assert lc.tick(at) is Phase.DRAINING
    assert lc.tick(9.999) is Phase.DRAINING
    assert lc.tick(10.0) is Phase.DRAINED


def test_without_quiet_period_the_full_delay_runs() -> None:
    lc, _ = make(delay=10.0, min_delay=3.0)
    lc.mark_ready(now=0.0)
    lc.drain(now=0.0)
    assert lc.tick(9.999) is Phase.DRAINING
    assert lc.tick(10.0) is Phase.DRAINED


@pytest.mark.parametrize("phase", [Phase.DRAINING, Phase.DRAINED])
def test_resume_from_draining_or_drained_goes_back_to_serving(phase: Phase) -> None:
    lc, clock = reach(phase)
    lc.resume("traffic back", now=clock())
    assert lc.phase is Phase.SERVING
    assert lc.reason == "traffic back"
    assert not lc.announcing
    assert lc.next_deadline() is None


def test_a_new_drain_after_resume_starts_a_fresh_delay() -> None:
    lc, _ = make(delay=5.0)
    lc.mark_ready(now=0.0)
    lc.drain(now=0.0)
    lc.resume(now=4.0)
    lc.drain(now=4.0)
    assert lc.tick(8.999) is Phase.DRAINING
    assert lc.tick(9.0) is Phase.DRAINED


def test_a_tick_without_now_completes_a_due_drain_from_the_clock() -> None:
    lc, clock = make(delay=5.0)
    lc.mark_ready(now=0.0)
    lc.drain(now=0.0)
    clock.advance(4.0)
    assert lc.tick() is Phase.DRAINING
    clock.advance(1.0)
    assert lc.tick() is Phase.DRAINED


def test_reading_never_transitions() -> None:
    lc, clock = make(delay=5.0)
    lc.mark_ready(now=0.0)
    lc.drain(now=0.0)
    clock.advance(60.0)  # the drain is long due, but nothing has looked at it
    for _ in range(3):
        assert lc.phase is Phase.DRAINING
        assert lc.reason == "drain requested"
        assert lc.notice()["phase"] == "draining"
        assert lc.delay_ends_at() == 5.0
        assert lc.next_deadline() == 5.0
        assert not lc.stuck()
        assert repr(lc) == "<Lifecycle draining inflight=0>"
    assert lc.tick() is Phase.DRAINED


def test_a_drain_whose_delay_is_already_over_completes_when_it_starts() -> None:
    lc, _ = make(delay=0.0)
    lc.mark_ready(now=0.0)
    lc.drain(now=0.0)
    assert lc.phase is Phase.DRAINED


def test_wake_completes_a_due_drain_and_wakes_the_waiters() -> None:
    lc, clock = make(delay=1.0)
    lc.mark_ready(now=0.0)
    lc.drain(now=0.0)
    clock.advance(2.0)
    lc.wake()
    assert lc.phase is Phase.DRAINED


def test_on_the_real_clock_a_timer_completes_the_drain_with_nobody_waiting() -> None:
    lc = Lifecycle(Config(delay=0.05))
    drained = threading.Event()
    lc.mark_ready()
    lc.drain("deploy")
    assert lc.phase is Phase.DRAINING
    with graceful.signals.drained.connected_to(lambda sender: drained.set(), sender=lc):
        # Reads never tick: only the timer can complete this drain.
        wait_until(lambda: lc.phase is Phase.DRAINED, timeout=10.0, message="drained")
    assert drained.is_set()
    assert lc.reason == "drained"


def test_an_injected_clock_arms_no_timer() -> None:
    lc, _ = make(delay=0.01)
    lc.mark_ready(now=0.0)
    lc.drain(now=0.0)
    assert lc._alarm is None


def test_announcing_while_draining_drained_and_stopping_only() -> None:
    lc, clock = make()
    assert not lc.announcing
    lc.mark_ready(now=0.0)
    assert not lc.announcing
    lc.drain(now=0.0)
    assert lc.announcing
    lc.tick(clock.advance(DELAY))
    assert lc.announcing
    lc.stop(now=clock())
    assert lc.announcing
    lc.mark_stopped(now=clock())
    assert not lc.announcing


# -- deadlines, stuck work, snapshot -------------------------------------------------------


def test_next_deadline_is_the_delay_end_then_the_drain_deadline() -> None:
    lc, clock = make(delay=5.0, drain_timeout=20.0)
    assert lc.next_deadline() is None
    lc.mark_ready(now=0.0)
    assert lc.next_deadline() is None
    token = lc.requests.begin("GET", "/", 1.0)
    lc.drain(now=2.0)
    assert lc.next_deadline() == 7.0
    assert lc.tick(7.5) is Phase.DRAINING
    assert lc.next_deadline() == 27.0
    assert lc.drain_deadline() == 27.0
    lc.requests.end(token)
    clock.advance(8.0)
    assert lc.phase is Phase.DRAINED
    assert lc.next_deadline() is None


def test_next_deadline_follows_the_quiet_period() -> None:
    lc, _ = make(delay=10.0, quiet_period=2.0, min_delay=1.0)
    lc.mark_ready(now=0.0)
    lc.drain(now=0.0)
    assert lc.next_deadline() == 2.0
    lc.requests.end(lc.requests.begin("GET", "/", 1.5))
    assert lc.next_deadline() == 3.5


def test_stuck_lists_method_path_and_age_oldest_first() -> None:
    lc, _ = make(FakeClock(start=5.0))
    lc.requests.begin("POST", "/upload", 3.0)
    lc.requests.begin("GET", "/report", 1.0)
    with lc.hold("consumer"):  # a hold starts at the clock's time, 5.0
        assert lc.stuck(now=10.0) == [
            ("GET", "/report", 9.0),
            ("POST", "/upload", 7.0),
            ("HOLD", "consumer", 5.0),
        ]
    assert [path for _, path, _ in lc.stuck(now=10.0)] == ["/report", "/upload"]


def test_snapshot_while_serving() -> None:
    lc, _ = make()
    lc.mark_ready(now=0.0)
    snap = lc.snapshot(now=4.0)
    assert snap["phase"] == "serving"
    assert snap["reason"] == "ready"
    assert snap["in_phase_for"] == 4.0
    assert snap["inflight"] == 0
    assert snap["inflight_by_worker"] == {str(os.getpid()): 0}
    assert snap["oldest_request_age"] is None
    assert snap["delay_remaining"] is None
    assert snap["drain_deadline_in"] is None
    assert snap["pid"] == os.getpid()
    assert snap["version"] == graceful.__version__


def test_snapshot_while_draining_reports_ages_and_deadlines() -> None:
    lc, _ = make(delay=5.0, drain_timeout=25.0)
    lc.mark_ready(now=0.0)
    lc.requests.begin("GET", "/a", 1.0)
    lc.requests.begin("GET", "/b", 2.5)
    lc.drain("deploy", now=2.0)
    snap = lc.snapshot(now=3.0)
    assert snap["phase"] == "draining"
    assert snap["reason"] == "deploy"
    assert snap["inflight"] == 2
    assert snap["inflight_by_worker"] == {str(os.getpid()): 2}
    assert snap["oldest_request_age"] == 2.0
    assert snap["delay_remaining"] == 4.0
    assert snap["drain_deadline_in"] == 29.0
    later = lc.snapshot(now=12.0)
    assert later["phase"] == "draining"
    assert later["delay_remaining"] == 0.0
    assert later["drain_deadline_in"] == 20.0


def test_snapshot_completes_a_due_drain() -> None:
    lc, _ = make(delay=5.0)
    lc.mark_ready(now=0.0)
    lc.drain(now=0.0)
    assert lc.snapshot(now=5.0)["phase"] == "drained"


# -- hold() --------------------------------------------------------------------------------


def test_hold_counts_as_inflight_and_delays_the_drain() -> None:
    lc, clock = make(delay=1.0)
    lc.mark_ready(now=0.0)
    with lc.hold("batch") as held:
        assert isinstance(held, graceful.Hold)
        assert lc.inflight == 1
        lc.drain(now=0.0)
        clock.advance(5.0)
        assert current(lc) is Phase.DRAINING  # the delay is over, the hold is not
    assert lc.inflight == 0
    assert read(lc) is Phase.DRAINED  # the release itself completed the drain


def test_hold_is_released_when_the_body_raises() -> None:
    lc, _ = make()
    seen: list[int] = []

    def job() -> None:
        with lc.hold("job"):
            seen.append(lc.inflight)
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        job()
    assert seen == [1]
    assert lc.inflight == 0


def test_async_hold_counts_and_is_released_on_exceptions_and_cancellation() -> None:
    lc, _ = make()

    async def main() -> None:
        async with lc.hold("stream") as held:
            assert isinstance(held, graceful.Hold)
            assert lc.inflight == 1
        assert lc.inflight == 0

        seen: list[int] = []

        async def job() -> None:
            async with lc.hold("job"):
                seen.append(lc.inflight)
                raise KeyError("boom")

        with pytest.raises(KeyError):
            await job()
        assert seen == [1]
        assert lc.inflight == 0

        entered = asyncio.Event()

        async def forever() -> None:
            async with lc.hold("consumer"):
                entered.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(forever())
        await entered.wait()
        assert lc.inflight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert lc.inflight == 0

    asyncio.run(main())


def test_a_hold_object_can_be_reused_and_exit_twice_harmlessly() -> None:
    lc, _ = make()
    held = lc.hold("job")
    with held:
        assert lc.inflight == 1
    held.__exit__(None, None, None)
    assert lc.inflight == 0
    with held:
        assert lc.inflight == 1
    assert lc.inflight == 0


def test_ending_a_request_twice_never_goes_negative() -> None:
    lc, _ = make()
    token = lc.requests.begin("GET", "/", 0.0)
    other = lc.requests.begin("GET", "/", 0.0)
    lc.requests.end(token)
    lc.requests.end(token)
    assert lc.inflight == 1
    lc.requests.end(other)
    lc.requests.end(other)
    assert lc.inflight == 0


# -- the drain file ------------------------------------------------------------------------


def test_drain_file_drains_and_its_removal_resumes() -> None:
    lc, _ = make()
    lc.mark_ready(now=0.0)
    lc.sync_drain_file(True, now=0.0)
    assert current(lc) is Phase.DRAINING
    assert lc.reason == "drain file present"
    lc.sync_drain_file(False, now=0.5)
    assert current(lc) is Phase.SERVING


def test_drain_file_removal_does_not_resume_a_drain_started_otherwise() -> None:
    lc, _ = make()
    lc.mark_ready(now=0.0)
    lc.drain("operator", now=0.0)
    lc.sync_drain_file(False, now=0.5)
    assert lc.phase is Phase.DRAINING
    lc.sync_drain_file(True, now=0.6)
    assert lc.reason == "operator"


# -- the process-wide lifecycle ------------------------------------------------------------


def test_get_lifecycle_returns_one_shared_instance_and_set_lifecycle_replaces_it() -> None:
    saved = lifecycle_module._default
    try:
        graceful.set_lifecycle(None)
        first = graceful.get_lifecycle(Config(delay=3.0))
        assert graceful.get_lifecycle() is first
        assert first.config.delay == 3.0
        assert graceful.get_lifecycle(Config(delay=4.0)) is first
        assert first.config.delay == 4.0
        mine, _ = make()
        graceful.set_lifecycle(mine)
        assert graceful.get_lifecycle() is mine
        graceful.set_lifecycle(None)
        assert graceful.get_lifecycle(Config()) is not mine
    finally:
        graceful.set_lifecycle(saved)


def test_repr_names_phase_and_inflight() -> None:
    lc, _ = make()
    lc.requests.begin("GET", "/", 0.0)
    assert repr(lc) == "<Lifecycle starting inflight=1>"


def test_module_level_hold_and_is_draining_use_the_process_wide_lifecycle() -> None:
    lifecycle = graceful.Lifecycle(graceful.Config(delay=0.0))
    graceful.set_lifecycle(lifecycle)
    try:
        lifecycle.mark_ready()
        with graceful.hold("export"):
            assert lifecycle.inflight == 1
            assert not graceful.is_draining()
            lifecycle.drain("test")
            assert graceful.is_draining()
        assert lifecycle.inflight == 0
    finally:
        graceful.set_lifecycle(None)


# -- the sans-io machine underneath --------------------------------------------------------


def machine(delay: float = 5.0, drain_timeout: float = 25.0) -> Machine:
    return Machine(Config(delay=delay, drain_timeout=drain_timeout), now=0.0)


def test_the_machine_answers_the_transition_it_made_and_none_for_a_repeat() -> None:
    m = machine()
    assert m.handle(Event.MARK_READY, "ready", 1.0) == Transition(
        Event.MARK_READY, Phase.STARTING, Phase.SERVING, "ready", 1.0
    )
    assert m.handle(Event.MARK_READY, "again", 2.0) is None
    assert (m.phase, m.reason, m.since) == (Phase.SERVING, "ready", 1.0)
    drained = m.handle(Event.DRAIN, "deploy", 3.0)
    assert drained is not None and (drained.old, drained.new) == (Phase.SERVING, Phase.DRAINING)
    assert (m.drain_started, m.drain_reason, m.drains, m.notice_id) == (3.0, "deploy", 1, 2)


def test_the_machine_refuses_what_the_table_refuses_naming_the_phase() -> None:
    m = machine()
    with pytest.raises(LifecycleError, match="starting") as info:
        m.handle(Event.DRAIN, "too soon", 0.0)
    assert isinstance(info.value, graceful.GracefulError)
    assert m.handle(Event.DRAIN, "too soon", 0.0, strict=False) is None
    assert m.phase is Phase.STARTING


def test_the_machine_ticks_with_now_and_whether_work_is_in_flight() -> None:
    m = machine(delay=5.0, drain_timeout=20.0)
    m.handle(Event.MARK_READY, "ready", 0.0)
    m.handle(Event.DRAIN, "deploy", 0.0)
    assert m.next_deadline(last_arrival=None) == 5.0
    assert m.tick(4.9, busy=False, last_arrival=None) == Tick(False, None)
    assert m.tick(5.0, busy=True, last_arrival=None) == Tick(True, None)
    assert m.delay_end == 5.0
    assert m.next_deadline(last_arrival=None) == 25.0
    done = m.tick(6.0, busy=False, last_arrival=None)
    assert done.delay_over is False  # told once, by the tick that found it over
    assert done.transition == Transition(
        Event.DRAIN_COMPLETE, Phase.DRAINING, Phase.DRAINED, "drained", 6.0
    )
    assert m.next_deadline(last_arrival=None) is None


def test_the_machine_never_transitions_on_a_read() -> None:
    m = machine(delay=1.0)
    m.handle(Event.MARK_READY, "ready", 0.0)
    m.handle(Event.DRAIN, "deploy", 0.0)
    for _ in range(2):
        assert m.delay_ends_at(last_arrival=None) == 1.0
        assert m.drain_deadline(last_arrival=None) == 26.0
        assert m.next_deadline(last_arrival=None) == 1.0
        assert m.notice()["phase"] == "draining"
        assert m.announcing
    assert m.phase is Phase.DRAINING and m.delay_end is None


def test_a_final_drain_makes_the_machine_refuse_every_resume() -> None:
    m = machine()
    m.handle(Event.MARK_READY, "ready", 0.0)
    m.handle(Event.DRAIN, "SIGTERM", 0.0, final=True)
    with pytest.raises(LifecycleError, match="cannot be undone"):
        m.handle(Event.RESUME, "operator", 1.0)
    assert m.sync_drain_file(False, 1.0) is None
    assert m.follow(Phase.SERVING, "late resume", 1.0, final=False, since=None) is None
    assert m.phase is Phase.DRAINING


def test_a_followed_drain_counts_its_delay_from_the_nodes_drain() -> None:
    m = machine(delay=5.0)
    m.handle(Event.MARK_READY, "ready", 0.0)
    moved = m.follow(Phase.DRAINING, "master", 10.0, final=False, since=8.0)
    assert moved is not None and moved.at == 8.0
    assert m.followed and m.delay_ends_at(last_arrival=None) == 13.0


def test_the_core_reads_no_environment_of_its_own() -> None:
    # The runtime plugged os.environ in when graceful was imported; a mapping given is the
    # only thing read.
    assert Config.from_env({"GRACEFUL_DELAY": "3"}).delay == 3.0
    assert config_module.default_delay({}) == 2.0
    assert config_module.default_delay({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) == 5.0
    assert config_module.unknown_variables({"GRACEFUL_NOPE": "1", "GRACEFUL_DELAY": "1"}) == [
        "GRACEFUL_NOPE"
    ]
