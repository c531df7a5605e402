"""The node state shared by a gunicorn master and its workers (graceful._servers.node_shm), in
process and across a real fork."""

from __future__ import annotations

import os
import threading

import pytest

from graceful import Config, Lifecycle, Phase
from graceful._servers import node_shm as _shared
from graceful._servers.node_shm import SharedNode, SlotView, WorkerFollower
from graceful.pytest_plugin import FakeClock


def lifecycle_on(view: SlotView, clock: FakeClock) -> Lifecycle:
    lifecycle = Lifecycle(Config(delay=1.0, drain_timeout=10.0), clock=clock)
    lifecycle.node = view
    return lifecycle


def phase_of(lifecycle: Lifecycle) -> Phase:
    """The phase, read afresh (keeps the type checker from narrowing across calls)."""
    return lifecycle.phase


def test_slots_are_claimed_once_and_reused_after_release() -> None:
    shared = SharedNode(slots=3)
    claimed = [shared.claim() for _ in range(3)]
    assert sorted(c for c in claimed if c is not None) == [0, 1, 2]
    assert shared.claim() is None
    shared.release(1)
    assert shared.claim() == 1


def test_counts_of_live_workers_add_up_and_a_released_slot_counts_nothing(
    graceful_clock: FakeClock,
) -> None:
    shared = SharedNode(slots=4)
    clock = graceful_clock
    a, b = shared.claim(), shared.claim()
    assert a is not None and b is not None
    worker_a = lifecycle_on(SlotView(shared, a), clock)
    for n in range(3):
        worker_a.requests.begin("GET", f"/{n}", clock.now)
    shared.publish(a, worker_a)
    assert shared.total() == 3
    assert SlotView(shared, b).others_inflight() == 3
    assert SlotView(shared, a).others_inflight() == 0
    shared.release(a)  # the master, after the worker exited (even SIGKILLed)
    assert shared.total() == 0


def served(count: int) -> Lifecycle:
    """A worker's lifecycle that has served ``count`` requests while draining."""
    lifecycle = Lifecycle(Config(delay=1.0))
    lifecycle.served_while_draining = count
    return lifecycle


def test_requests_served_while_draining_still_count_once_their_worker_has_exited() -> None:
    shared = SharedNode(slots=3)
    a, b = shared.claim(), shared.claim()
    assert a is not None and b is not None
    shared.publish(a, served(5), pid=4241)
    shared.publish(b, served(2), pid=4242)
    assert shared.served_while_draining() == 7
    shared.release(a)  # the master, after worker a exited (even SIGKILLed)
    assert shared.served_while_draining() == 7
    assert SlotView(shared, b).others_served_while_draining() == 5  # a's, as b sees it
    assert shared.claim() == a  # its replacement starts from nothing of its own
    shared.publish(a, served(1), pid=4243)
    assert shared.served_while_draining() == 8
    shared.release(a)
    shared.release(b)
    assert shared.served_while_draining() == 8
    assert shared.total() == 0


def test_the_served_while_draining_total_never_goes_down_while_slots_are_released() -> None:
    """Workers come and go in another process (each serves one request while draining, then
    its slot is released): every reading in between is at least the one before it."""
    shared = SharedNode(slots=2)
    rounds = 20_000
    pid = os.fork()
    if pid == 0:  # worker and master at once: claim, publish, release, over and over
        try:
            one = served(1)
            for _ in range(rounds):
                index = shared.claim()
                if index is not None:
                    shared.publish(index, one)
                    shared.release(index)
        finally:
            os._exit(0)
    readings, decreases, last = 0, 0, 0
    running = True
    try:
        while running:
            readings += 1
            now = shared.served_while_draining()
            decreases += now < last
            last = now
            running = os.waitpid(pid, os.WNOHANG) == (0, 0)
    finally:
        if running:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    assert readings > 1000, "the workers were done before the reader got going"
    assert decreases == 0, f"{decreases} of {readings} readings were below the one before"
    assert shared.served_while_draining() == rounds


def test_a_release_that_never_ends_does_not_hang_a_reader() -> None:
    """A master killed half-way through a release leaves its release number odd."""
    shared = SharedNode(slots=1)
    index = shared.claim()
    assert index is not None
    shared.publish(index, served(3), pid=4241)
    shared._words[_shared._RELEASES] += 1  # what release() writes first
    found: list[int] = []
    reader = threading.Thread(target=lambda: found.append(shared.served_while_draining()))
    reader.daemon = True  # a reader that hangs must fail the test, not the run
    reader.start()
    reader.join(20 * _shared._RELEASE_WAIT)
    assert found == [3], "the reader still waits for the release to end"


def test_the_header_carries_phase_and_reason_with_a_rising_generation() -> None:
    shared = SharedNode()
    first, phase, reason = shared.header()
    assert phase is Phase.SERVING
    shared.write_header(Phase.DRAINING, "SIGTERM")
    generation, phase, reason = shared.header()
    assert (generation, phase, reason) == (first + 1, Phase.DRAINING, "SIGTERM")


def test_a_forked_worker_publishes_into_the_map_the_master_reads() -> None:
    shared = SharedNode(slots=2)
    index = shared.claim()
    assert index is not None
    published_r, published_w = os.pipe()
    looked_r, looked_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: publish, then stay alive until the master has looked
        try:
            lifecycle = Lifecycle(Config(delay=0.0))
            lifecycle.requests.begin("POST", "/orders", 1.0)
            lifecycle.requests.begin("GET", "/slow", 0.5)
            shared.publish(index, lifecycle)
            os.write(published_w, b"x")
            os.read(looked_r, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(published_r, 1) == b"x"
        slot = shared.slot(index)
        assert (slot.pid, slot.inflight, slot.method, slot.path) == (pid, 2, "GET", "/slow")
        assert shared.total() == 2
    finally:
        os.write(looked_w, b"x")
        os.waitpid(pid, 0)
        for fd in (published_r, published_w, looked_r, looked_w):
            os.close(fd)
    shared.release(index)
    assert shared.total() == 0


def test_a_drain_completes_only_when_the_other_workers_are_idle_too(
    graceful_clock: FakeClock,
) -> None:
    shared = SharedNode(slots=2)
    clock = graceful_clock
    me, other = shared.claim(), shared.claim()
    assert me is not None and other is not None
    # Another worker (pid 4242) with one request in flight, as its follower publishes it.
    elsewhere = lifecycle_on(SlotView(shared, other), clock)
    request = elsewhere.requests.begin("GET", "/slow", clock.now)
    shared.publish(other, elsewhere, pid=4242)
    lifecycle = lifecycle_on(SlotView(shared, me), clock)
    lifecycle.mark_ready()
    lifecycle.drain("test")
    clock.advance(2.0)
    assert phase_of(lifecycle) is Phase.DRAINING
    snapshot = lifecycle.snapshot()
    assert snapshot["inflight"] == 1
    assert snapshot["inflight_by_worker"] == {"4242": 1, str(os.getpid()): 0}
    elsewhere.requests.end(request)
    shared.publish(other, elsewhere, pid=4242)
    assert phase_of(lifecycle) is Phase.DRAINED


def test_a_local_drain_is_announced_to_the_node_and_followed_by_the_others(
    graceful_clock: FakeClock,
) -> None:
    shared = SharedNode(slots=2)
    clock = graceful_clock
    a, b = shared.claim(), shared.claim()
    assert a is not None and b is not None
    first = lifecycle_on(SlotView(shared, a), clock)
    second = lifecycle_on(SlotView(shared, b), clock)
    follower = WorkerFollower(second, SlotView(shared, b), lambda _: None)
    first.mark_ready()
    second.mark_ready()
    first.drain("control route")
    assert shared.header()[1] is Phase.DRAINING
    follower.sync()
    assert phase_of(second) is Phase.DRAINING
    first.resume("control route")
    follower.sync()
    assert phase_of(second) is Phase.SERVING


def test_a_worker_closes_connections_the_moment_any_process_of_the_node_drains(
    graceful_clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gunicorn's pre_request asks for every request: no follower has to have looked yet."""
    shared = SharedNode(slots=2)
    a = shared.claim()
    assert a is not None
    assert not _shared.worker_announcing()  # not a worker: never
    monkeypatch.setattr(_shared, "_worker", (shared, a))
    other = lifecycle_on(SlotView(shared, None), graceful_clock)  # the master, say
    other.mark_ready()
    assert not _shared.worker_announcing()
    other.drain("SIGTERM")
    assert _shared.worker_announcing()
    other.resume("control route")
    assert not _shared.worker_announcing()
    other.stop("SIGINT")
    assert _shared.worker_announcing()


def test_a_worker_still_starting_when_the_drain_began_drains_once_ready(
    graceful_clock: FakeClock,
) -> None:
    shared = SharedNode(slots=1)
    index = shared.claim()
    assert index is not None
    shared.write_header(Phase.DRAINING, "SIGTERM")
    clock = graceful_clock
    lifecycle = lifecycle_on(SlotView(shared, index), clock)
    follower = WorkerFollower(lifecycle, SlotView(shared, index), lambda _: None)
    follower.sync()
    assert phase_of(lifecycle) is Phase.STARTING
    lifecycle.mark_ready()
    follower.sync()
    assert phase_of(lifecycle) is Phase.DRAINING


@pytest.mark.parametrize("phase", [Phase.DRAINING, Phase.STOPPING])
def test_following_is_idempotent(phase: Phase) -> None:
    shared = SharedNode(slots=1)
    index = shared.claim()
    assert index is not None
    lifecycle = lifecycle_on(SlotView(shared, index), FakeClock())
    lifecycle.mark_ready()
    shared.write_header(phase, "test")
    follower = WorkerFollower(lifecycle, SlotView(shared, index), lambda _: None)
    changes: list[Phase] = []
    for _ in range(3):
        follower.sync()
        changes.append(phase_of(lifecycle))
    assert changes == [phase] * 3


def test_a_reader_never_sees_a_half_written_slot_or_header() -> None:
    """A worker republishes the same count and the master rewrites the same phase, over and
    over, in another process: every read in between must see them (a write that zeroes the
    fields before filling them in let the master read 0 in flight and stop mid-request)."""
    shared = SharedNode(slots=2)
    index = shared.claim()
    assert index is not None
    shared.write_header(Phase.DRAINING, "SIGTERM")
    lifecycle = Lifecycle(Config(delay=0.0))
    lifecycle.requests.begin("GET", "/slow", 1.0)
    shared.publish(index, lifecycle)
    pid = os.fork()
    if pid == 0:  # the writer: a bounded number of rewrites
        try:
            for _ in range(100_000):
                shared.publish(index, lifecycle)
                shared.write_header(Phase.DRAINING, "SIGTERM")
        finally:
            os._exit(0)
    torn = reads = 0
    running = True
    try:
        while running:
            reads += 1
            if shared.total() != 1 or shared.header()[1] is not Phase.DRAINING:
                torn += 1
            running = os.waitpid(pid, os.WNOHANG) == (0, 0)
    finally:
        if running:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    assert reads > 1000, "the writer finished before the reader got going"
    assert torn == 0, f"{torn} of {reads} reads saw a half-written slot or header"
