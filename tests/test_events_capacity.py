"""How many events streams a process and its node may hold, and how a WSGI stream notices that
its client has gone (issue 10, item 1; the end-to-end side is
``tests/e2e/test_events_capacity_e2e.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from _apps import (
    AUTH,
    TOKEN,
    Reply,
    WSGIStream,
    asgi_call,
    hello_asgi,
    hello_wsgi,
    make_environ,
    new_lifecycle,
    sse_data,
    wsgi_call,
)

import graceful
from graceful._adapters.peer import peer_closed
from graceful._core.stream import PROCESS, ProcessStreams, Refusal, Subscriber
from graceful._servers.gunicorn_streams import gunicorn_share
from graceful._servers.node_shm import NodeStreams, SharedNode

EVENTS = "/-/graceful/events"
PROBE = b":\n\n"


class OtherWorkers:
    """The node's other workers, holding ``held`` streams; records what this process publishes."""

    def __init__(self, held: int = 0) -> None:
        self.held = held
        self.published: list[int] = []

    def publish(self, count: int) -> None:
        self.published.append(count)

    def others(self) -> int:
        return self.held


@pytest.fixture(autouse=True)
def nothing_leaks() -> Iterator[None]:
    """Every test releases the slots it took from this process's count (a leak would count
    against the cap of every later test in the run)."""
    before = PROCESS.count
    yield
    assert PROCESS.count == before


def worker(share: int | None, others: OtherWorkers | None = None) -> ProcessStreams:
    process = ProcessStreams(threading.Lock)
    process.join(share, others)
    return process


# -- the admission rule -------------------------------------------------------------------


@pytest.mark.parametrize("cap", [0, 1, 100])
def test_a_process_with_no_share_refuses_as_off_whatever_the_cap(cap: int) -> None:
    process = worker(0)
    assert process.admit(cap, 0) is Refusal.OFF
    assert process.count == 0


def test_a_process_admits_up_to_its_share_then_refuses_as_full() -> None:
    process = worker(2, OtherWorkers())
    assert [process.admit(100, 2) for _ in range(3)] == [None, None, Refusal.FULL]
    assert process.count == 2
    process.release()
    assert process.admit(100, 2) is None


def test_without_a_node_the_cap_counts_this_process() -> None:
    process = worker(None)
    assert [process.admit(2, None) for _ in range(3)] == [None, None, Refusal.FULL]
    assert process.node_total() == 2


def test_the_cap_counts_the_other_workers_streams() -> None:
    others = OtherWorkers(held=4)
    process = worker(None, others)
    assert process.admit(5, None) is None
    assert process.admit(5, None) is Refusal.FULL
    assert process.node_total() == 5
    # The count is published before the others are read, and taken back on a refusal.
    assert others.published == [0, 1, 2, 1]
    others.held = 0  # another worker's streams closed
    assert process.admit(5, None) is None


def test_release_never_goes_below_zero() -> None:
    process = worker(None, OtherWorkers())
    process.release()
    assert process.count == 0


def test_two_workers_admitting_at_the_same_instant_never_exceed_the_cap() -> None:
    # Worker B admits in the middle of A's admission: after A published its count and before
    # A read the others'. One of them sees the other and refuses.
    shared = SharedNode(slots=2)
    a_view, b_view = NodeStreams(shared, 0), NodeStreams(shared, 1)
    b = worker(None)
    b.join(None, b_view)
    b_outcome: list[Refusal | None] = []

    class Interleaved:
        def publish(self, count: int) -> None:
            a_view.publish(count)

        def others(self) -> int:
            if not b_outcome:
                b_outcome.append(b.admit(1, None))
            return a_view.others()

    a = worker(None)
    a.join(None, Interleaved())
    a_outcome = a.admit(1, None)
    assert shared.streams() <= 1
    assert [a_outcome, *b_outcome].count(None) <= 1
    assert shared.streams() == a.count + b.count


def test_workers_hammering_the_cap_at_once_never_hold_more_than_it() -> None:
    # Three workers (two threads each) admitting and releasing as fast as they can. The
    # shared words may show a refused admission for an instant (a worker publishes before it
    # looks); the streams actually admitted never exceed the cap.
    shared = SharedNode(slots=3)
    cap = 4
    processes = []
    for index in range(3):
        process = ProcessStreams(threading.Lock)
        process.join(None, NodeStreams(shared, index))
        processes.append(process)
    lock = threading.Lock()
    live = [0]
    most = [0]

    def hammer(process: ProcessStreams, seed: int) -> None:
        chance = random.Random(seed)
        held = 0
        for _ in range(3_000):
            if held and chance.random() < 0.5:
                with lock:
                    live[0] -= 1
                process.release()
                held -= 1
            elif process.admit(cap, None) is None:
                held += 1
                with lock:
                    live[0] += 1
                    most[0] = max(most[0], live[0])
        with lock:
            live[0] -= held
        for _ in range(held):
            process.release()

    threads = [threading.Thread(target=hammer, args=(processes[n % 3], n)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert most[0] == cap  # reached, never passed
    assert shared.streams() == 0


def test_a_dead_workers_streams_leave_the_node_count_when_its_slot_is_released() -> None:
    shared = SharedNode(slots=2)
    a, b = shared.claim(), shared.claim()
    assert a is not None and b is not None
    NodeStreams(shared, a).publish(3)
    assert NodeStreams(shared, b).others() == 3
    shared.release(a)  # the master, after the worker exited (even SIGKILLed)
    assert NodeStreams(shared, b).others() == 0
    NodeStreams(shared, b).publish(2)
    assert shared.claim() == a  # a new worker's slot starts at 0
    assert NodeStreams(shared, b).others() == 0
    assert shared.streams() == 2


# -- gunicorn worker classes --------------------------------------------------------------


class _Cfg:
    def __init__(self, threads: int) -> None:
        self.threads = threads


def _gunicorn_worker(cls: type, threads: int = 1) -> Any:
    instance: Any = object.__new__(cls)  # no arbiter needed to know the class
    instance.cfg = _Cfg(threads)
    return instance


def test_gunicorn_worker_classes_and_their_share() -> None:
    from gunicorn.workers.base_async import AsyncWorker
    from gunicorn.workers.gthread import ThreadWorker
    from gunicorn.workers.sync import SyncWorker
    from uvicorn_worker import UvicornH11Worker, UvicornWorker  # type: ignore[import-untyped]

    assert gunicorn_share(_gunicorn_worker(SyncWorker)) == (True, 0)
    assert gunicorn_share(_gunicorn_worker(ThreadWorker, 8)) == (True, 2)
    assert gunicorn_share(_gunicorn_worker(ThreadWorker, 32)) == (True, 8)
    assert gunicorn_share(_gunicorn_worker(ThreadWorker, 3)) == (True, 0)
    assert gunicorn_share(_gunicorn_worker(AsyncWorker)) == (True, None)
    assert gunicorn_share(_gunicorn_worker(UvicornWorker)) == (True, None)
    assert gunicorn_share(_gunicorn_worker(UvicornH11Worker)) == (True, None)

    class GeventWorker(AsyncWorker):  # type: ignore[misc]  # gevent is not installed here
        pass

    class MyWorker:
        pass

    assert gunicorn_share(_gunicorn_worker(GeventWorker)) == (True, None)
    assert gunicorn_share(_gunicorn_worker(MyWorker)) == (False, None)


# -- how the middlewares answer -----------------------------------------------------------


@pytest.fixture
def decided(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``decided(share)``: this process's share as graceful.gunicorn decides it in a worker."""

    def decide(share: int | None) -> None:
        monkeypatch.setattr(PROCESS, "decided", True)
        monkeypatch.setattr(PROCESS, "share", share)

    return decide


def _assert_off(status: int, headers: list[tuple[str, str]], body: bytes) -> None:
    assert status == 204
    named = {k.lower(): v for k, v in headers}
    assert named == {"graceful-events": "off", "cache-control": "no-store"}
    assert body == b""


def _refused(middleware: graceful.WSGIMiddleware, **environ: Any) -> Reply:
    """An events request that must be refused, read whole (an opened stream fails the test
    instead of being read forever)."""
    with WSGIStream(middleware, {**make_environ(path=EVENTS), **environ}) as stream:
        assert stream.start.code != 200, "a stream was opened"
        body = b"".join(stream.result)
    return Reply(stream.start.code, stream.start.headers, body)


def test_a_single_threaded_wsgi_server_answers_204_off() -> None:
    lc = new_lifecycle()
    middleware = graceful.WSGIMiddleware(hello_wsgi, lifecycle=lc)
    reply = _refused(middleware, **{"wsgi.multithread": False})
    _assert_off(reply.status, reply.headers, reply.body)
    assert len(lc.events) == 0


def test_a_gunicorn_sync_worker_answers_204_off(decided: Any) -> None:
    decided(0)
    lc = new_lifecycle()
    reply = _refused(graceful.WSGIMiddleware(hello_wsgi, lifecycle=lc))
    _assert_off(reply.status, reply.headers, reply.body)
    assert len(lc.events) == 0


def test_gunicorn_without_graceful_hooks_answers_204_off() -> None:
    # No post_fork hook: the worker class and its threads are unknown, so no streams.
    lc = new_lifecycle()
    with tcp_pair() as (server, _client):
        middleware = graceful.WSGIMiddleware(hello_wsgi, lifecycle=lc)
        reply = _refused(middleware, **{"gunicorn.socket": server})
    _assert_off(reply.status, reply.headers, reply.body)


def test_a_gthread_worker_holds_its_share_then_answers_503(decided: Any) -> None:
    decided(1)
    lc = new_lifecycle()
    middleware = graceful.WSGIMiddleware(hello_wsgi, lifecycle=lc)
    with WSGIStream(middleware, make_environ(path=EVENTS)) as stream:
        assert stream.start.code == 200
        reply = _refused(middleware)
        assert reply.status == 503
        assert reply.header("Retry-After") == "5"
    assert len(lc.events) == 0


def test_an_asgi_app_under_an_async_worker_holds_streams_up_to_the_cap(decided: Any) -> None:
    decided(None)
    lc = new_lifecycle(events_max_subscribers=0)
    lc.mark_ready()
    reply = asyncio.run(asgi_call(graceful.ASGIMiddleware(hello_asgi, lifecycle=lc), path=EVENTS))
    assert reply.status == 503


def test_status_counts_the_streams_of_the_whole_node() -> None:
    lc = new_lifecycle(token=TOKEN)
    middleware = graceful.WSGIMiddleware(hello_wsgi, lifecycle=lc)
    lc.events.process = worker(None, OtherWorkers(held=5))
    with WSGIStream(middleware, make_environ(path=EVENTS)) as stream:
        assert stream.start.code == 200
        status = wsgi_call(middleware, path="/-/graceful/status", headers=AUTH).json()
        assert status["events_subscribers"] == 6
    status = wsgi_call(middleware, path="/-/graceful/status", headers=AUTH).json()
    assert status["events_subscribers"] == 5


# -- a WSGI stream's client goes away -------------------------------------------------------


@contextlib.contextmanager
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """``(server side, client side)`` of a TCP connection on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=10)
        server, _ = listener.accept()
    try:
        yield server, client
    finally:
        server.close()
        client.close()


def test_peer_closed_tells_a_live_client_from_a_gone_one_without_reading() -> None:
    with tcp_pair() as (server, client):
        assert not peer_closed(server)
        client.sendall(b"GET /next HTTP/1.1\r\n")  # a client that sent something is alive
        assert not peer_closed(server)
        assert not peer_closed(server)
        assert server.recv(100) == b"GET /next HTTP/1.1\r\n"  # nothing was consumed
        client.close()
        assert peer_closed(server)


def test_peer_closed_sees_a_reset_and_a_closed_socket() -> None:
    with tcp_pair() as (server, client):
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST
        assert peer_closed(server)
        server.close()
        assert peer_closed(server)  # fileno -1


def test_peer_closed_never_blocks_on_a_socket_the_server_set_blocking() -> None:
    with tcp_pair() as (server, _client):
        server.settimeout(None)
        assert not peer_closed(server)  # returns at once: the test would hang otherwise


def _stream_on(lc: graceful.Lifecycle, **environ: Any) -> WSGIStream:
    middleware = graceful.WSGIMiddleware(hello_wsgi, lifecycle=lc)
    stream = WSGIStream(middleware, {**make_environ(path=EVENTS), **environ})
    assert stream.start.code == 200
    assert stream.next_chunk() == b"retry: 2000\n\n"
    data = sse_data(stream.next_chunk())
    assert data is not None and data["phase"] == "serving"
    return stream


def test_a_wsgi_stream_under_gunicorn_ends_when_its_client_closes(decided: Any) -> None:
    decided(2)  # a gthread worker of 8 threads
    lc = new_lifecycle(events_heartbeat=15.0)
    with tcp_pair() as (server, client), _stream_on(lc, **{"gunicorn.socket": server}) as stream:
        assert len(lc.events) == 1
        client.close()
        # Ends within CLIENT_CHECK (1 s) or so; the bound only stops a broken run.
        with pytest.raises(StopIteration):
            stream.next_chunk(timeout=10)
        assert len(lc.events) == 0


def test_a_wsgi_stream_under_gunicorn_stays_while_its_client_is_there(decided: Any) -> None:
    decided(2)
    lc = new_lifecycle(events_heartbeat=0.05)
    with tcp_pair() as (server, _client), _stream_on(lc, **{"gunicorn.socket": server}) as stream:
        for _ in range(3):
            assert stream.next_chunk() == b": heartbeat\n\n"  # no probes: the socket tells
        assert len(lc.events) == 1


def test_a_wsgi_stream_elsewhere_writes_a_probe_every_second() -> None:
    # No socket to look at: a tiny comment every CLIENT_CHECK seconds, whatever the heartbeat,
    # so that a gone client fails a write within a second or two.
    lc = new_lifecycle(events_heartbeat=15.0)
    with _stream_on(lc) as stream:
        assert stream.next_chunk(timeout=10) == PROBE
        assert stream.next_chunk(timeout=10) == PROBE
    assert len(lc.events) == 0


def test_a_wsgi_stream_under_waitress_ends_when_waitress_says_the_client_left() -> None:
    lc = new_lifecycle(events_heartbeat=15.0)
    left = threading.Event()
    with _stream_on(lc, **{"waitress.client_disconnected": left.is_set}) as stream:
        # waitress notices only with channel_request_lookahead > 0: probes are written too.
        assert stream.next_chunk(timeout=10) == PROBE
        left.set()
        with pytest.raises(StopIteration):
            stream.next_chunk(timeout=10)
    assert len(lc.events) == 0


def test_a_subscriber_whose_event_loop_closed_does_not_break_a_phase_change() -> None:
    lc = new_lifecycle()
    lc.mark_ready()
    subscriber = lc.subscribe()
    assert isinstance(subscriber, Subscriber)
    loop = asyncio.new_event_loop()
    loop.close()

    def wake() -> None:
        loop.call_soon_threadsafe(lambda: None)  # RuntimeError: Event loop is closed

    subscriber.wake = wake
    try:
        lc.drain("deploy")
        assert lc.phase is graceful.Phase.DRAINING
    finally:
        lc.events.unsubscribe(subscriber)


def test_this_processs_admissions_take_a_real_lock_once_the_middlewares_are_loaded() -> None:
    # The core makes no lock (no threading there): the adapters give this process's one.
    assert isinstance(PROCESS._lock, type(threading.Lock()))
    assert isinstance(ProcessStreams()._lock, contextlib.AbstractContextManager)
