"""The node state shared by a gunicorn master and its workers (graceful._servers.node_shm), in
process and across a real fork."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from graceful import Config, Lifecycle, Phase, signals
from graceful._runtime.lifecycle import get_lifecycle, set_lifecycle
from graceful._servers import gunicorn as shim
from graceful._servers import node_shm as _shared
from graceful._servers.node_bells import Bells, wait_readable
from graceful._servers.node_shm import SharedNode, SlotView, WorkerFollower
from graceful.pytest_plugin import FakeClock
from graceful.testing import poll_until


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
    assert phase_of(lifecycle) is Phase.DRAINING  # reading never transitions
    lifecycle.wake()  # what the ring of the other worker, passed on by the master, does
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


# -- wake-ups instead of polling -------------------------------------------------------------


def rang(fd: int) -> bool:
    """Whether ``fd`` was rung (the rings are taken out)."""
    return wait_readable(fd, 0) is True


@pytest.fixture
def bells() -> Iterator[Bells]:
    """The node's pipes; afterwards a master's thread waiting on them has ended (before the
    descriptors close: a later test's pipe could get the same numbers and lose its rings to
    it)."""
    made = Bells()
    yield made
    for index in list(made._workers):
        made.remove_worker(index)
    os.close(made._master[1])  # the master's thread sees the end of its pipe
    for thread in threading.enumerate():
        if thread.name == "graceful-master-bell":
            thread.join(5)
            assert not thread.is_alive(), "the master's thread did not end with its pipe"
    os.close(made._master[0])


def test_a_worker_publishes_each_change_of_its_counts_at_once(graceful_clock: FakeClock) -> None:
    """No follower thread: the trackers write the slot as they change."""
    shared = SharedNode(slots=2)
    index = shared.claim()
    assert index is not None
    lifecycle = lifecycle_on(SlotView(shared, index), graceful_clock)
    follower = WorkerFollower(lifecycle, SlotView(shared, index), lambda _: None).start()
    first = lifecycle.requests.begin("GET", "/a", graceful_clock.now)
    second = lifecycle.requests.begin("GET", "/b", graceful_clock.now)
    socket_token = lifecycle.websockets.begin("WS", "/ws", graceful_clock.now)
    assert (shared.slot(index).inflight, shared.slot(index).websockets) == (2, 1)
    assert shared.total() == 2
    lifecycle.requests.end(first)
    lifecycle.websockets.end(socket_token)
    assert (shared.slot(index).inflight, shared.slot(index).websockets) == (1, 0)
    lifecycle.requests.end(second)
    assert shared.total() == 0
    follower.stop()
    lifecycle.requests.begin("GET", "/c", graceful_clock.now)
    assert shared.total() == 0  # stopped: no longer published


def test_counts_published_by_many_threads_end_at_the_true_count() -> None:
    """Threads that begin and end requests at once never leave a stale count behind (a
    count written late would hold the master until the drain timeout)."""
    shared = SharedNode(slots=1)
    index = shared.claim()
    assert index is not None
    lifecycle = Lifecycle(Config(delay=0.0))
    WorkerFollower(lifecycle, SlotView(shared, index), lambda _: None).start()

    def serve() -> None:
        for _ in range(2000):
            lifecycle.requests.end(lifecycle.requests.begin("GET", "/", 0.0))

    threads = [threading.Thread(target=serve) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert shared.slot(index).inflight == 0


def test_a_count_a_sync_wrote_stale_is_put_right_and_the_master_rung(
    graceful_clock: FakeClock, bells: Bells, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bell thread publishes the slot while a request thread ends the last request: the
    count it read before that end must not stay in the slot (the master would wait for it
    until the drain timeout)."""
    shared = SharedNode(slots=1)
    index = shared.claim()
    assert index is not None
    view = SlotView(shared, index, bells)
    lifecycle = lifecycle_on(view, graceful_clock)
    follower = WorkerFollower(lifecycle, view, lambda _: None).start()
    token = lifecycle.requests.begin("GET", "/", graceful_clock.now)
    shared.write_header(Phase.DRAINING, "SIGTERM")
    publish = shared.publish
    raced: list[bool] = []

    def racing_publish(slot: int, of: Lifecycle, pid: int | None = None) -> None:
        publish(slot, of, pid)
        if not raced:  # the bell thread's publish, with the request thread's end inside it
            raced.append(True)
            lifecycle.requests.end(token)  # writes 0 and rings the master
            assert rang(bells.master_fd)
            shared.set_inflight(slot, 1)  # then the count it had read before that end

    monkeypatch.setattr(shared, "publish", racing_publish)
    follower.sync()
    assert shared.slot(index).inflight == 0
    assert rang(bells.master_fd), "the master was not told the count is zero after all"


def test_an_idle_worker_rings_the_master_once_when_the_node_starts_draining(
    graceful_clock: FakeClock, bells: Bells
) -> None:
    """A request that ended as the drain began may have been counted as served in a serving
    node (no ring) after the master had read the total: the worker's first look at the new
    drain state tells the master it is idle, once (not at every ring, which would make the
    master and the workers wake each other for ever)."""
    shared = SharedNode(slots=1)
    index = shared.claim()
    assert index is not None
    view = SlotView(shared, index, bells)
    lifecycle = lifecycle_on(view, graceful_clock)
    lifecycle.mark_ready()
    assert rang(bells.master_fd)  # ready: the master counts its ready workers (graceful reload)
    follower = WorkerFollower(lifecycle, view, lambda _: None).start()
    assert not rang(bells.master_fd)  # serving
    shared.write_header(Phase.DRAINING, "SIGTERM")
    follower.woken(graceful_clock.now)
    assert rang(bells.master_fd)
    follower.woken(graceful_clock.now)  # the master passing on another worker's ring
    assert not rang(bells.master_fd)


def test_a_worker_going_idle_rings_the_master_only_while_the_node_drains(
    graceful_clock: FakeClock, bells: Bells
) -> None:
    shared = SharedNode(slots=2)
    index = shared.claim()
    assert index is not None
    view = SlotView(shared, index, bells)
    lifecycle = lifecycle_on(view, graceful_clock)
    WorkerFollower(lifecycle, view, lambda _: None).start()
    lifecycle.requests.end(lifecycle.requests.begin("GET", "/", graceful_clock.now))
    assert not rang(bells.master_fd), "a serving node rang the master"
    token = lifecycle.requests.begin("GET", "/slow", graceful_clock.now)
    shared.write_header(Phase.DRAINING, "SIGTERM")
    lifecycle.requests.end(token)
    assert rang(bells.master_fd)
    # while draining, the oldest request is in the slot too (for the drain timeout's log)
    lifecycle.requests.begin("POST", "/stuck", graceful_clock.now)
    assert (shared.slot(index).method, shared.slot(index).path) == ("POST", "/stuck")


def test_a_drain_started_by_the_master_rings_every_worker_and_one_by_a_worker_the_master(
    graceful_clock: FakeClock, bells: Bells
) -> None:
    shared = SharedNode(slots=2)
    a, b = shared.claim(), shared.claim()
    assert a is not None and b is not None
    bells.add_worker(a)
    bells.add_worker(b)
    master = lifecycle_on(SlotView(shared, None, bells), graceful_clock)
    master.mark_ready()
    master.drain("SIGTERM")
    assert all(rang(bells._workers[i][0]) for i in (a, b))
    assert not rang(bells.master_fd)
    master.resume()  # a worker that turned ready mid-drain would drain with the node at once
    assert all(rang(bells._workers[i][0]) for i in (a, b))
    worker = lifecycle_on(SlotView(shared, a, bells), graceful_clock)
    worker.mark_ready()
    worker.drain("control route")  # a worker that drains by itself
    assert rang(bells.master_fd)
    assert not any(rang(bells._workers[i][0]) for i in (a, b))  # the master passes it on


def test_a_ring_never_blocks_nor_fails_when_a_worker_is_gone_or_its_pipe_is_full(
    bells: Bells,
) -> None:
    bells.add_worker(0)
    bells.add_worker(1)
    for _ in range(100_000):  # far more than a pipe holds
        bells.ring_workers()
    os.close(bells._workers[1][0])  # worker 1 killed: its read end is gone
    bells._workers[1] = (os.open(os.devnull, os.O_RDONLY), bells._workers[1][1])
    bells.ring_workers()
    bells.remove_worker(0)
    bells.ring_workers()
    assert rang(bells._workers[1][0]) is False  # /dev/null: never readable with rings


def _switches(pid: int) -> int:
    """Voluntary context switches of every thread of ``pid``: a thread that goes back to sleep
    adds one (being preempted on a busy machine is an involuntary one, not counted)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches"):
                total += int(line.split()[1])
    return total


def _all_asleep(pid: int) -> bool:
    """Every thread of ``pid`` waits in the kernel (state S)."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return all((task / "stat").read_text().rpartition(")")[2].split()[0] == "S" for task in tasks)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc")
def test_a_forked_worker_sleeps_while_idle_and_follows_a_drain_at_once(bells: Bells) -> None:
    shared = SharedNode(slots=2)
    index = shared.claim()
    assert index is not None
    bells.add_worker(index)
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: follow the node, report when its drain started
        try:
            set_lifecycle(Lifecycle(Config(delay=5.0)))
            get_lifecycle().mark_ready()
            _shared.become_worker(shared, index, bells)

            def started(sender: object, **kwargs: object) -> None:
                os.write(report_w, f"{time.monotonic()!r}\n".encode())

            signals.drain_started.connect(started, weak=False)
            os.write(report_w, b"ready\n")
            os.read(go_r, 1)  # blocks: the main thread makes no wake-ups either
        finally:
            os._exit(0)
    try:
        with os.fdopen(report_r, "rb", buffering=0) as report:
            assert report.readline() == b"ready\n"
            poll_until(lambda: _all_asleep(pid), 10, message="the worker's threads asleep")
            before = _switches(pid)
            time.sleep(0.5)  # a window to measure, not to synchronise
            idle_switches = _switches(pid) - before
            master = Lifecycle(Config(delay=5.0))
            master.node = SlotView(shared, None, bells)
            master.mark_ready()
            sent = time.monotonic()
            master.drain("SIGTERM")
            lag = float(report.readline()) - sent
    finally:
        os.write(go_w, b"x")
        os.waitpid(pid, 0)
        for fd in (report_w, go_r, go_w):
            os.close(fd)
    assert idle_switches <= 1, f"the idle worker woke up {idle_switches} times in 0.5 s"
    # Nothing polls: without the bell the worker would not follow at all. Well under 0.1 s
    # on an idle machine; the bound leaves room for a busy one.
    assert 0 <= lag < 1.0, f"the worker followed the drain {lag * 1000:.1f} ms late"


def test_the_master_s_wait_for_the_node_ends_when_the_last_worker_goes_idle(
    bells: Bells, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The master's lifecycle is woken by the ring of the worker whose count dropped to zero:
    no polling interval between the end of the last request and the end of its wait."""
    master = shim._Master()
    monkeypatch.setattr(master, "bells", bells)
    master.lifecycle.configure(Config(delay=0.0, drain_timeout=30.0))
    master.lifecycle.node = SlotView(master.shared, None, bells)
    index = master.shared.claim()
    assert index is not None
    worker = Lifecycle(Config(delay=0.0))
    view = SlotView(master.shared, index, bells)
    worker.node = view
    WorkerFollower(worker, view, lambda _: None).start()
    token = worker.requests.begin("GET", "/slow", 0.0)
    master.listen()
    master.lifecycle.mark_ready()
    master.lifecycle.drain("SIGTERM", final=True)
    waited: list[float] = []
    waiter = threading.Thread(
        target=lambda: waited.append((master.lifecycle.wait_drained(20.0), time.monotonic())[1]),
        daemon=True,
    )
    waiter.start()
    waiter.join(0.3)  # a window to see it wait, not to synchronise
    assert waiter.is_alive() and not waited, "the master did not wait for the request"
    ended = time.monotonic()
    worker.requests.end(token)
    waiter.join(10)
    assert waited, "the master's wait did not end"
    # Nothing polls: without the ring the wait would last the 30 s drain timeout. Well under
    # 0.1 s on an idle machine; the bound leaves room for a busy one.
    late = waited[0] - ended
    assert late < 1.0, f"the master noticed {late * 1000:.0f} ms late"


def test_a_drain_a_worker_starts_reaches_the_other_workers_through_the_master(
    bells: Bells, monkeypatch: pytest.MonkeyPatch
) -> None:
    master = shim._Master()
    monkeypatch.setattr(master, "bells", bells)
    a, b = master.shared.claim(), master.shared.claim()
    assert a is not None and b is not None
    bells.add_worker(a)
    bells.add_worker(b)
    master.listen()
    worker = Lifecycle(Config(delay=5.0))
    worker.node = SlotView(master.shared, a, bells)
    worker.mark_ready()
    worker.drain("control route")
    other_bell = bells._workers[b][0]
    assert wait_readable(other_bell, 5.0) is True, "the other worker was not woken"
