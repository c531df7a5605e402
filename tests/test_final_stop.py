"""A stop cannot be undone (issue 10, items 4 and 18), in process.

Once a stop has begun (the drain a SIGTERM starts, or ``stop()``), a resume is refused with an
error naming the phase, the drain file no longer matters, a shared node never follows a resume,
and work in flight is waited for. A node already draining (over the control route, by its drain
file, or in another process of the node) keeps its drain's start: the stop does not wait the
delay again.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _apps import AUTH, KINDS, TOKEN, FakeClock, Kind, make_client, new_lifecycle, phase_of

from graceful import Config, Lifecycle, LifecycleError, Phase
from graceful._core.phases import Event
from graceful._core.stop import GiveUp, Joined, Mode, Move, Reaction, Signal, Stop, StopPlan, Wait
from graceful._runtime.drainfile import DrainFileWatcher
from graceful._runtime.shutdown import StopSequence
from graceful._servers.node_shm import SharedNode, SlotView, WorkerFollower

DELAY = 1.0


def serving(clock: Callable[[], float] = time.monotonic, **settings: Any) -> Lifecycle:
    settings.setdefault("delay", DELAY)
    lc = Lifecycle(Config(**settings), clock=clock)
    lc.mark_ready()
    return lc


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> Kind:
    value: Kind = request.param
    return value


# -- the lifecycle ---------------------------------------------------------------------------


def test_a_lifecycle_is_not_final_until_a_stop_begins() -> None:
    lc = serving(FakeClock())
    assert lc.final is False
    lc.drain("drained by control route")
    assert lc.final is False
    lc.resume()
    assert phase_of(lc) is Phase.SERVING


@pytest.mark.parametrize("phase", [Phase.DRAINING, Phase.DRAINED])
def test_a_final_drain_cannot_be_resumed_and_the_error_names_the_phase_and_the_stop(
    phase: Phase,
) -> None:
    clock = FakeClock()
    lc = serving(clock)
    lc.drain("SIGTERM", final=True)
    if phase is Phase.DRAINED:
        clock.advance(DELAY)
    assert phase_of(lc) is phase
    assert lc.final is True
    with pytest.raises(LifecycleError) as error:
        lc.resume("resumed by control route")
    assert error.value.phase is phase
    message = str(error.value)
    assert phase.value in message and "stop is under way" in message, message
    assert phase_of(lc) is phase


def test_a_final_drain_of_a_node_already_draining_makes_it_final_and_keeps_its_delay() -> None:
    clock = FakeClock()
    lc = serving(clock)
    start = clock()
    lc.drain("drained by control route")
    clock.advance(0.4)
    lc.drain("SIGTERM", final=True)
    assert lc.final is True
    assert lc.delay_ends_at() == start + DELAY  # counted from the first drain, not from the SIGTERM
    with pytest.raises(LifecycleError):
        lc.resume()


def test_stop_is_final_and_a_resume_while_stopping_says_a_stop_is_under_way() -> None:
    lc = serving(FakeClock())
    with lc.hold("keeps the stop from finishing"):
        lc.stop("SIGINT: quick stop")
        assert lc.final is True
        with pytest.raises(LifecycleError, match=r"stopping.*stop is under way"):
            lc.resume()


def test_final_is_never_cleared() -> None:
    lc = serving(FakeClock())
    lc.stop("done")
    lc.mark_stopped()
    assert lc.final is True


def test_the_drain_file_is_no_longer_looked_at_once_final() -> None:
    clock = FakeClock()
    lc = serving(clock)
    lc.sync_drain_file(True)
    lc.drain("SIGTERM", final=True)
    lc.sync_drain_file(False)
    assert phase_of(lc) is Phase.DRAINING
    clock.advance(DELAY)
    lc.sync_drain_file(False)
    assert phase_of(lc) is Phase.DRAINED


def test_wait_drained_waits_for_work_that_arrived_after_the_node_was_drained() -> None:
    lc = serving(delay=0.0)
    lc.drain("drain file present")
    assert phase_of(lc) is Phase.DRAINED
    token = lc.requests.begin("GET", "/slow", lc.clock())
    assert lc.wait_drained(timeout=0.05) is False  # drained, but a request is in flight
    waiter = threading.Thread(target=lc.wait_drained, args=(10.0,))
    waiter.start()
    lc.requests.end(token)
    waiter.join(10.0)
    assert not waiter.is_alive()
    assert lc.wait_drained(timeout=0.05) is True


# -- the stop sequence -----------------------------------------------------------------------


class Stops:
    def __init__(self) -> None:
        self.stopped = threading.Event()

    def __call__(self) -> None:
        self.stopped.set()


def test_sigterm_drains_with_final() -> None:
    lc = serving(delay=0.0)
    sequence = StopSequence(lc, Stops())
    name = sequence.signal(signal.SIGTERM)
    assert name is not None
    steps = sequence.steps(name)
    next(steps)
    assert lc.final is True


def test_sigterm_on_a_node_drained_long_ago_still_waits_for_work_in_flight() -> None:
    """The drain file drained the node an hour ago; a request arrived since; SIGTERM must wait
    for it (bounded by the drain timeout counted from now), not give up at once."""
    offset = [0.0]
    lc = Lifecycle(
        Config(delay=1.0, drain_timeout=20.0), clock=lambda: time.monotonic() + offset[0]
    )
    lc.mark_ready()
    lc.drain("drain file present")
    offset[0] += 3600.0  # an hour later
    assert phase_of(lc) is Phase.DRAINED
    token = lc.requests.begin("GET", "/slow", lc.clock())
    stops = Stops()
    sequence = StopSequence(lc, stops)
    name = sequence.signal(signal.SIGTERM)
    assert name is not None
    runner = threading.Thread(target=sequence.run, args=(name,), daemon=True)
    runner.start()
    assert not stops.stopped.wait(0.3), "stopped with a request in flight"
    with pytest.raises(LifecycleError):
        lc.resume("drain file removed")
    lc.requests.end(token)
    assert stops.stopped.wait(10.0)
    runner.join(10.0)
    assert sequence.gave_up is False


def test_sigterm_on_a_node_drained_over_the_control_route_stops_without_a_second_delay() -> None:
    lc = serving(delay=30.0)
    lc.drain("drained by control route")
    lc.tick(lc.clock() + 30.0)  # as if the delay were over (a real one would take 30 s)
    assert phase_of(lc) is Phase.DRAINED
    stops = Stops()
    sequence = StopSequence(lc, stops)
    name = sequence.signal(signal.SIGTERM)
    assert name is not None
    sequence.run(name)
    assert stops.stopped.is_set() and sequence.gave_up is False


# -- the stop's steps, pure (graceful._core.stop) -------------------------------------------


def test_each_signal_means_what_the_readme_says_whatever_came_before() -> None:
    plan = StopPlan()
    assert plan.signal(Signal.TERM, stopped=False) == (Reaction.START, True)
    assert plan.signal(Signal.TERM, stopped=False) == (Reaction.IGNORED, False)
    assert plan.signal(Signal.INT, stopped=False) == (Reaction.QUICK, False)  # the stop runs
    assert plan.mode is Mode.INT
    assert str(plan.mode) == "int"  # a str enum: servers compare it with "int"
    assert plan.signal(Signal.INT, stopped=False) == (Reaction.FORCE, False)
    assert plan.signal(Signal.QUIT, stopped=False) == (Reaction.IGNORED, False)
    quick = StopPlan()
    assert quick.signal(Signal.INT, stopped=False) == (Reaction.QUICK, True)
    forced = StopPlan()
    assert forced.signal(Signal.QUIT, stopped=False) == (Reaction.FORCE, False)
    late = StopPlan()
    late.signal(Signal.TERM, stopped=False)
    assert late.signal(Signal.INT, stopped=True) == (Reaction.FORCE, False)  # Ctrl-C forces


def test_a_sigterm_stop_drains_waits_the_rest_of_the_delay_and_the_timeout_then_stops() -> None:
    config = Config(delay=5.0, drain_timeout=20.0)
    plan = StopPlan()
    plan.signal(Signal.TERM, stopped=False)
    steps = plan.steps("SIGTERM", config, Phase.DRAINING, lambda: 2.0)
    assert next(steps) == Move(Event.DRAIN, "SIGTERM")
    assert steps.send(True) == Joined("SIGTERM", Phase.DRAINING)
    assert steps.send(True) == Wait(drained=True, timeout=22.0)
    assert steps.send(False) == GiveUp("drain timeout (20s) passed")
    assert plan.gave_up
    assert steps.send(True) == Move(Event.STOP, "SIGTERM: drained")
    assert steps.send(True) == Stop()
    with pytest.raises(StopIteration):
        steps.send(True)


def test_a_sigint_during_a_sigterm_stop_turns_it_into_a_quick_stop() -> None:
    config = Config(delay=5.0, drain_timeout=20.0, interrupt_timeout=3.0)
    plan = StopPlan()
    plan.signal(Signal.TERM, stopped=False)
    steps = plan.steps("SIGTERM", config, Phase.SERVING, lambda: None)
    assert next(steps) == Move(Event.DRAIN, "SIGTERM")
    assert steps.send(True) == Wait(drained=True, timeout=25.0)  # the whole delay, no drain
    plan.signal(Signal.INT, stopped=False)
    assert steps.send(False) == Wait(drained=False, timeout=3.0)
    assert steps.send(True) == Move(Event.STOP, "SIGTERM: drained")


# -- the HTTP surface and the drain file -----------------------------------------------------


def test_resume_over_the_control_route_during_a_stop_answers_409_with_the_phase(
    kind: Kind,
) -> None:
    lc = new_lifecycle(FakeClock(), token=TOKEN, delay=DELAY)
    client = make_client(kind, lc)
    lc.drain("SIGTERM", final=True)
    reply = client.request("POST", "/-/graceful/resume", headers=AUTH)
    assert reply.status == 409, reply
    body = reply.json()
    assert body["phase"] == "draining"
    assert "stop is under way" in body["output"]
    assert client.request("GET", "/readyz").status == 503


def test_removing_the_drain_file_during_a_stop_changes_nothing(kind: Kind, tmp_path: Path) -> None:
    drain_file = tmp_path / "drain"
    drain_file.touch()
    lc = new_lifecycle(FakeClock(), drain_file=str(drain_file), delay=DELAY)
    client = make_client(kind, lc)
    assert client.request("GET", "/readyz").status == 503
    lc.drain("SIGTERM", final=True)
    drain_file.unlink()
    for _ in range(3):
        reply = client.request("GET", "/readyz")
        assert (reply.status, reply.json()["output"]) == (503, "draining")
    assert client.request("GET", "/app").header("Graceful-State") == "draining"


def test_the_status_route_says_when_a_stop_is_under_way(kind: Kind) -> None:
    lc = new_lifecycle(FakeClock(), token=TOKEN, delay=DELAY)
    client = make_client(kind, lc)
    assert client.request("GET", "/-/graceful/status", headers=AUTH).json()["final"] is False
    lc.drain("SIGTERM", final=True)
    assert client.request("GET", "/-/graceful/status", headers=AUTH).json()["final"] is True


# -- a node of several processes (gunicorn) --------------------------------------------------


def worker_on(shared: SharedNode, clock: FakeClock) -> tuple[Lifecycle, WorkerFollower]:
    index = shared.claim()
    assert index is not None
    lc = serving(clock)
    view = SlotView(shared, index)
    lc.node = view
    return lc, WorkerFollower(lc, view, lambda _lc: None)


def master_on(shared: SharedNode, clock: FakeClock) -> Lifecycle:
    lc = serving(clock)
    lc.node = SlotView(shared, None)
    return lc


def test_workers_follow_a_final_drain_as_final_and_never_follow_a_resume() -> None:
    clock = FakeClock()
    shared = SharedNode(slots=4)
    master = master_on(shared, clock)
    (one, one_follows), (two, two_follows) = worker_on(shared, clock), worker_on(shared, clock)
    master.drain("SIGTERM", final=True)
    one_follows.sync()
    two_follows.sync()
    assert (one.final, two.final) == (True, True)
    # A worker that had not yet seen the stop and resumed on its own (a race the header
    # cannot prevent) writes "serving": the others stay draining, and so does it.
    shared.write_header(Phase.SERVING, "resumed by control route")
    one_follows.sync()
    assert phase_of(one) is Phase.DRAINING
    with pytest.raises(LifecycleError, match="stop is under way"):
        two.resume("resumed by control route")


def test_a_worker_refuses_a_resume_once_the_node_is_final_before_it_synced() -> None:
    clock = FakeClock()
    shared = SharedNode(slots=4)
    master = master_on(shared, clock)
    worker, _follows = worker_on(shared, clock)
    worker.drain("drained by control route")
    master.drain("SIGTERM", final=True)
    with pytest.raises(LifecycleError, match="stop is under way"):
        worker.resume("resumed by control route")  # its follower has not looked yet


def test_the_master_counts_the_delay_from_the_nodes_first_drain() -> None:
    clock = FakeClock()
    shared = SharedNode(slots=4)
    master = master_on(shared, clock)
    worker, _follows = worker_on(shared, clock)
    start = clock()
    worker.drain("drained by control route")  # in one worker, over the control route
    clock.advance(5 * DELAY)
    master.drain("SIGTERM", final=True)
    assert master.delay_ends_at() == start + DELAY
    assert phase_of(master) is Phase.DRAINED  # nothing in flight: it can stop at once


def test_a_late_worker_counts_the_delay_from_the_nodes_drain() -> None:
    clock = FakeClock()
    shared = SharedNode(slots=4)
    master = master_on(shared, clock)
    start = clock()
    master.drain("SIGTERM", final=True)
    clock.advance(0.75 * DELAY)
    late, follows = worker_on(shared, clock)  # forked (or turned ready) mid-drain
    follows.sync()
    assert late.final is True
    assert late.delay_ends_at() == start + DELAY


def test_the_header_keeps_the_final_flag_and_the_drain_start() -> None:
    shared = SharedNode(slots=2)
    assert shared.drain_state() == (None, False)
    shared.write_header(Phase.DRAINING, "drained by control route", since=12.5)
    assert shared.drain_state() == (12.5, False)
    shared.write_header(Phase.DRAINING, "SIGTERM", final=True, since=12.5)
    assert shared.drain_state() == (12.5, True)
    shared.write_header(Phase.SERVING, "resumed")  # a late writer cannot clear it
    assert shared.drain_state() == (None, True)


def test_a_workers_own_stop_is_not_the_nodes() -> None:
    """A worker that exits on its own (``max_requests``: its lifespan shutdown stops its
    lifecycle) must not tell the node it stops: the other workers stay ready."""
    clock = FakeClock()
    shared = SharedNode(slots=4)
    recycled, _recycled_follows = worker_on(shared, clock)
    other, other_follows = worker_on(shared, clock)
    recycled.stop("server shutting down")
    other_follows.sync()
    assert phase_of(other) is Phase.SERVING
    assert other.final is False
    assert shared.header()[1] is Phase.SERVING


def test_the_drain_file_is_not_even_looked_at_once_final(tmp_path: Path) -> None:
    watched = tmp_path / "drain"
    lc = serving(FakeClock())
    watcher = DrainFileWatcher(lc, str(watched / "not-a-dir" / "drain"), interval=0.0)
    looked: list[str] = []
    original = os.path.exists

    def exists(path: str) -> bool:
        looked.append(path)
        return original(path)

    lc.drain("SIGTERM", final=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os.path, "exists", exists)
        watcher.check(0.0, force=True)
    assert looked == []
