"""Faults in one process: drain and resume flapping under load, the drain file coming and going.

Real threads send requests through the middleware (WSGI, and ASGI with one event loop per
request) while another thread flips the node's state as fast as it can. What must hold after:
every request was answered, nothing is left counted in flight, and a last drain completes (so
the count really is zero, not merely read as zero once).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from _apps import (
    KINDS,
    Client,
    Kind,
    hello_wsgi,
    make_client,
    new_lifecycle,
    phase_of,
    wait_until,
    wsgi_call,
)

import graceful

Phase = graceful.Phase

#: Load threads, and a bound on the requests each sends (the flapping normally ends it first).
CALLERS = 8
MAX_REQUESTS_PER_CALLER = 50_000
MAX_SECONDS = 60.0


class Load:
    """``CALLERS`` threads calling ``GET /work`` through ``client`` until :meth:`stop`."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.answers: dict[int, int] = {}
        self.errors: list[BaseException] = []
        self.deadline = time.monotonic() + MAX_SECONDS
        self.threads = [threading.Thread(target=self._call, daemon=True) for _ in range(CALLERS)]

    def start(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def sent(self) -> int:
        with self.lock:
            return sum(self.answers.values())

    def _call(self) -> None:
        request = self.client.request
        for _ in range(MAX_REQUESTS_PER_CALLER):
            if self.stopping.is_set() or time.monotonic() > self.deadline:
                return
            try:
                status = request("GET", "/work").status
            except BaseException as exc:  # any error is a finding, reported by the test
                with self.lock:
                    self.errors.append(exc)
                return
            with self.lock:
                self.answers[status] = self.answers.get(status, 0) + 1

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in self.threads), "a caller is stuck"


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> Kind:
    value: Kind = request.param
    return value


def assert_nothing_left_in_flight(lc: graceful.Lifecycle) -> None:
    assert lc.inflight == 0
    assert lc.node_inflight() == 0
    assert lc.stuck() == []
    lc.drain("last drain")
    assert lc.wait_drained(5.0), f"the last drain did not complete: {lc!r}"
    assert phase_of(lc) is Phase.DRAINED


def test_drain_resume_flapping_1000_times_under_load_ends_with_nothing_in_flight(
    kind: Kind,
) -> None:
    # No delay: a drain with nothing in flight is DRAINED at once, so the flapping goes through
    # SERVING, DRAINING and DRAINED while requests start and end in between.
    lc = new_lifecycle(delay=0.0, drain_timeout=30.0)
    client = make_client(kind, lc)
    load = Load(client).start()
    try:
        wait_until(lambda: load.sent() >= 200, what="the load under way")
        phases: set[Phase] = set()
        for number in range(1_000):
            lc.drain(f"flap {number}")
            phases.add(phase_of(lc))
            lc.resume(f"flap {number}")
            if number % 100 == 0:  # let the callers in between some of the flips
                start = load.sent()
                wait_until(lambda: load.sent() > start, what="requests between two flips")  # noqa: B023
    finally:
        load.stop()

    assert not load.errors, load.errors[:3]
    assert set(load.answers) == {200}, load.answers  # served while draining too (not reject mode)
    assert load.sent() >= 210  # 200 before the flapping, more between flips
    assert phases and phases <= {Phase.DRAINING, Phase.DRAINED}, phases
    assert phase_of(lc) is Phase.SERVING
    assert_nothing_left_in_flight(lc)


def test_the_drain_file_created_and_removed_under_load_drains_and_resumes_each_time(
    kind: Kind, tmp_path: Path
) -> None:
    drain_file = tmp_path / "drain"
    lc = new_lifecycle(  # every request looks at the file
        delay=0.05, drain_timeout=30.0, drain_file=str(drain_file), drain_file_interval=0.0
    )
    client = make_client(kind, lc)
    load = Load(client).start()
    times = 100
    try:
        wait_until(lambda: load.sent() >= 200, what="the load under way")
        for _ in range(times):
            drain_file.touch()
            wait_until(
                lambda: phase_of(lc) in (Phase.DRAINING, Phase.DRAINED),
                what="the requests to notice the drain file",
            )
            assert lc.reason in ("drain file present", "drained")
            drain_file.unlink()
            wait_until(
                lambda: phase_of(lc) is Phase.SERVING, what="the requests to notice it is gone"
            )
    finally:
        load.stop()

    assert not load.errors, load.errors[:3]
    assert set(load.answers) == {200}, load.answers
    assert phase_of(lc) is Phase.SERVING
    assert_nothing_left_in_flight(lc)


def test_a_stale_look_at_the_drain_file_never_drains_a_node_after_a_newer_look_resumed_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Two worker threads look at the drain file: the first sees it, and is descheduled before
    acting on what it saw; the file is removed; the second sees it gone. Whatever the order the
    threads then run in, the node must end serving: the file is gone."""
    drain_file = tmp_path / "drain"
    drain_file.touch()
    lc = new_lifecycle(delay=0.0, drain_file=str(drain_file), drain_file_interval=0.0)
    middleware = graceful.WSGIMiddleware(hello_wsgi, lifecycle=lc)
    lc.mark_ready()  # serving: no request has looked at the file yet
    real_exists = os.path.exists
    first_looked, first_may_go_on = threading.Event(), threading.Event()

    def exists(path: str) -> bool:
        found = real_exists(path)
        if threading.current_thread().name == "first" and path == str(drain_file):
            first_looked.set()
            first_may_go_on.wait(10)  # descheduled between looking and acting
        return found

    monkeypatch.setattr(os.path, "exists", exists)
    first = threading.Thread(target=wsgi_call, args=(middleware, "GET", "/a"), name="first")
    first.start()
    assert first_looked.wait(10)
    drain_file.unlink()
    second = threading.Thread(target=wsgi_call, args=(middleware, "GET", "/b"), name="second")
    second.start()
    second.join(0.5)  # it may wait for the first look to be acted on, or be done already
    first_may_go_on.set()
    first.join(10)
    second.join(10)
    assert not first.is_alive() and not second.is_alive()

    assert phase_of(lc) is Phase.SERVING, f"drained by a stale look at a removed file: {lc!r}"
