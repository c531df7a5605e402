"""The events watcher of each client (the requests pool, the httpx transports: ``pools`` is
parametrized over them) against nodes that do not stream as a graceful node on a thread
server does: ``204 Graceful-Events: off`` (a worker that cannot hold a stream), ``503`` with
``Retry-After`` (the node's subscriber cap), answers that are not event streams, and hostile
streams (no newline, ever; a line or an event past the limit). Every node is a real socket
server on 127.0.0.1 (:class:`_raw_node.RawNode`) that records what the pool sent and when.

Times are asserted only from below (a gap is at least the pause the pool must take): a busy
machine makes gaps longer, never shorter.
"""

from __future__ import annotations

import itertools
import random
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _clients import KINDS, Client, make_client
from _raw_node import Exchange, Handler, RawNode, answer
from conftest import closed_at_end, wait_until

from graceful._client import pool as client
from graceful._core import calls
from graceful._core.protocol import EventStreamError
from graceful.client import NodeState

EVENTS = "/-/graceful/events"
READY = answer("200 OK", [("Content-Type", "application/health+json")], b'{"status":"pass"}\n')
EVENTS_OFF = answer("204 No Content", [("Graceful-Events", "off"), ("Cache-Control", "no-store")])
SSE = [("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-store")]


def serving_stream(exchange: Exchange) -> None:
    """A graceful node's stream: the phase on connect, then heartbeats until the client goes."""
    exchange.head("200 OK", SSE)
    exchange.send(b'id: 1\nevent: phase\ndata: {"id":1,"phase":"serving","reason":"up"}\n\n')
    while exchange.send(b": heartbeat\n\n"):
        if exchange.node.closing.wait(0.2):
            return


def in_turn(*handlers: Handler) -> Handler:
    """The first request gets the first handler, and so on; the last one from then on."""
    count = iter(range(len(handlers) - 1))

    def handle(exchange: Exchange) -> None:
        handlers[next(count, len(handlers) - 1)](exchange)

    return handle


@pytest.fixture
def nodes() -> Iterator[Callable[..., RawNode]]:
    def node(routes: dict[str, Handler], **kwargs: Any) -> RawNode:
        return RawNode({"/readyz": READY, **routes}, **kwargs)

    with closed_at_end(node) as make:
        yield make


@pytest.fixture(params=KINDS)
def pools(request: pytest.FixtureRequest) -> Iterator[Callable[..., Client]]:
    """Clients of one kind (each kind in turn) that watch their nodes' events."""
    made: list[Client] = []

    def pool(*urls: str, **kwargs: Any) -> Client:
        made.append(make_client(request.param, list(urls), watch=True, **kwargs))
        return made[-1]

    try:
        yield pool
    finally:
        for client in made:
            client.dispose()


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def events_at(node: RawNode) -> list[float]:
    return [request.at for request in node.to(EVENTS)]


# -- 204 Graceful-Events: off --------------------------------------------------------------


def test_a_204_events_off_is_asked_again_only_after_ten_probe_intervals(
    nodes: Callable[..., RawNode], pools: Callable[..., Client]
) -> None:
    interval = 0.2
    node = nodes({EVENTS: EVENTS_OFF})
    pool = pools(node.url, probe_interval=interval)

    wait_until(lambda: len(node.to(EVENTS)) >= 2, timeout=30, message="a second events request")

    assert gaps(events_at(node))[0] >= 10 * interval
    assert pool.watch(node.url).woken_by == "10 x probe_interval"
    for n in range(4):  # calls go on as ever, in band
        assert pool.get(f"/call/{n}").text == "raw"
    assert [(s.state, s.reason) for s in pool.nodes] == [(NodeState.IN_SERVICE, "new")]


def test_a_204_events_off_is_asked_again_once_the_node_was_down_and_came_back(
    nodes: Callable[..., RawNode], pools: Callable[..., Client]
) -> None:
    """A new process may run another worker class: its stream is asked for as soon as the
    pool has it back, not 10 x probe_interval (20 s here) after the 204."""
    old = nodes({EVENTS: EVENTS_OFF})
    pool = pools(old.url, probe_interval=2.0)
    wait_until(lambda: pool.watch(old.url).mode == "off", timeout=10, message="events off")
    old.close()
    with pytest.raises(pool.NoNodeAvailable):
        pool.get("/x")  # refused: down
    assert [node.state for node in pool.nodes] == [NodeState.DOWN]

    new = nodes({EVENTS: serving_stream}, port=old.port)

    wait_until(lambda: pool.watch(old.url).mode == "streaming", timeout=20, message="stream")
    assert pool.watch(old.url).woken_by == "node came back"
    assert len(new.to(EVENTS)) == 1
    assert len(old.to(EVENTS)) == 1
    assert pool.nodes[0].state is NodeState.IN_SERVICE


def test_two_pools_hold_no_stream_on_a_node_that_says_events_off(
    nodes: Callable[..., RawNode], pools: Callable[..., Client]
) -> None:
    node = nodes({EVENTS: EVENTS_OFF})
    first, second = pools(node.url), pools(node.url)
    for pool in (first, second):
        wait_until(lambda: pool.watch(node.url).mode == "off", timeout=10)  # noqa: B023
    assert len(node.to(EVENTS)) == 2
    assert first.get("/x").text == second.get("/x").text == "raw"


# -- 503 with Retry-After ------------------------------------------------------------------


@pytest.mark.parametrize(("retry_after", "at_least"), [("2", 2.0), ("0", 1.0)])
def test_a_503_with_retry_after_is_asked_again_after_that_long_at_least_one_second(
    retry_after: str, at_least: float, nodes: Callable[..., RawNode], pools: Callable[..., Client]
) -> None:
    full = answer(
        "503 Service Unavailable",
        [("Content-Type", "application/health+json"), ("Retry-After", retry_after)],
        b'{"output":"too many event subscribers","status":"fail"}\n',
    )
    node = nodes({EVENTS: in_turn(full, serving_stream)})
    pool = pools(node.url, probe_interval=0.1)  # the watcher's own pause would be 0.1 s

    wait_until(lambda: pool.watch(node.url).mode == "streaming", timeout=30)

    assert gaps(events_at(node)) and gaps(events_at(node))[0] >= at_least
    assert pool.nodes[0].state is NodeState.IN_SERVICE


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5", 5.0),
        ("0", 1.0),
        ("1", 1.0),
        ("60", 60.0),
        ("3600", 60.0),
        ("99999999999999999999999", 60.0),
        (" 7 ", 7.0),
        ("-3", None),
        ("1.5", None),
        ("1e3", None),
        ("٣", None),
        ("", None),
        (None, None),
        ("soon", None),
    ],
)
def test_retry_after_is_clamped_to_one_to_sixty_seconds(
    value: str | None, expected: float | None
) -> None:
    assert client._retry_after(value) == expected


def test_retry_after_as_an_http_date() -> None:
    now = 1_000_000.0
    assert client._retry_after("Mon, 12 Jan 1970 13:46:50 GMT", now=now) == 10.0
    assert client._retry_after("Mon, 12 Jan 1970 13:46:30 GMT", now=now) == 1.0  # past: min
    assert client._retry_after("Mon, 12 Jan 1970 16:00:00 GMT", now=now) == 60.0


def test_the_retry_after_wait_adds_at_most_twenty_percent_jitter() -> None:
    rng = random.Random(3)
    waits = [calls.jittered(10.0, rng) for _ in range(500)]
    assert min(waits) >= 10.0
    assert max(waits) <= 12.0
    assert max(waits) - min(waits) > 1.0


# -- answers that are not event streams ----------------------------------------------------


@pytest.mark.parametrize(
    "handler",
    [
        answer("404 Not Found", [("Content-Type", "text/plain")], b"not found\n"),
        answer("200 OK", [("Content-Type", "text/html")], b"<html>a node without graceful</html>"),
        answer("503 Service Unavailable", [], b"no Retry-After\n"),
    ],
    ids=["404", "200 text/html", "503 without Retry-After"],
)
def test_an_answer_that_is_not_an_event_stream_is_asked_again_with_backoff(
    handler: Handler, nodes: Callable[..., RawNode], pools: Callable[..., Client]
) -> None:
    node = nodes({EVENTS: handler})
    pool = pools(node.url, probe_interval=0.1)  # pauses from 0.1 s, doubling

    wait_until(lambda: len(node.to(EVENTS)) >= 5, timeout=30, message="5 events requests")

    for n, gap in enumerate(gaps(events_at(node))[:4]):
        assert gap >= 0.1 * 2**n, gaps(events_at(node))
    assert pool.nodes[0].state is NodeState.IN_SERVICE
    assert pool.get("/x").text == "raw"


def test_a_watcher_backing_off_tries_again_as_soon_as_the_node_is_back_in_service(
    nodes: Callable[..., RawNode], pools: Callable[..., Client]
) -> None:
    """Once a probe has the node back, its stream is asked for at once, not at the end of a
    backoff that grew while the node had no stream to give."""
    streams = {"ready": False}
    not_found = answer("404 Not Found", [], b"not yet\n")

    def events(exchange: Exchange) -> None:
        (serving_stream if streams["ready"] else not_found)(exchange)

    draining = answer("200 OK", [("Graceful-State", "draining")], b"raw")
    node = nodes({EVENTS: events}, default=draining)
    pool = pools(node.url, probe_interval=0.05)  # pauses from 0.05 s: the 7th is >= 3.2 s
    wait_until(lambda: pool.watch(node.url).failures >= 7, timeout=60, message="backoff")

    streams["ready"] = True
    pool.get("/x")  # Graceful-State: draining takes it out; the next probe has it back

    wait_until(lambda: pool.watch(node.url).mode == "streaming", timeout=10)
    assert pool.watch(node.url).woken_by == "node came back"


def test_the_backoff_is_capped() -> None:
    assert [calls.backoff(n, 0.5) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert calls.backoff(30, 0.5) == client.MAX_BACKOFF
    assert calls.backoff(10_000, 1.0) == client.MAX_BACKOFF  # no overflow


# -- hostile streams -----------------------------------------------------------------------


def endless_line(exchange: Exchange) -> None:
    """An event stream that never sends a newline: 64 KiB chunks of ``x`` until the client goes."""
    exchange.head("200 OK", SSE)
    chunk = b"x" * 65536
    while exchange.send(chunk):
        pass


def test_a_stream_that_never_sends_a_newline_is_cut_at_the_limit_and_retried_with_backoff(
    nodes: Callable[..., RawNode], pools: Callable[..., Client]
) -> None:
    """The watcher's buffer stays within the line limit (measured: the pool's own record of the
    largest incomplete line, and the peak of all memory Python allocated meanwhile), the stream
    counts as broken (backoff), and the node's state is not touched."""
    node = nodes({EVENTS: endless_line})
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        pool = pools(node.url, probe_interval=0.1)

        def enough() -> bool:
            most = max((exchange.sent for exchange in node.exchanges), default=0)
            return len(node.to(EVENTS)) >= 5 or most >= 48 * 2**20

        wait_until(enough, timeout=60, message="5 connections, or 48 MiB on one")
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()

    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB allocated at the peak"
    watch = pool.watch(node.url)
    assert watch.largest_pending <= client.MAX_LINE
    assert watch.last.startswith("broken stream: a line longer than")
    assert len(node.to(EVENTS)) >= 5
    for n, gap in enumerate(gaps(events_at(node))[:4]):
        assert gap >= 0.1 * 2**n, gaps(events_at(node))
    assert [(s.state, s.reason) for s in pool.nodes] == [(NodeState.IN_SERVICE, "new")]


def test_a_notice_on_a_line_past_the_limit_is_a_broken_stream_not_a_notice(
    nodes: Callable[..., RawNode], pools: Callable[..., Client]
) -> None:
    reason = "x" * (client.MAX_LINE + 10)
    data = f'data: {{"id":1,"phase":"draining","reason":"{reason}"}}\n\n'.encode()

    def long_notice(exchange: Exchange) -> None:
        exchange.head("200 OK", SSE)
        exchange.send(data)

    node = nodes({EVENTS: long_notice})
    pool = pools(node.url, probe_interval=0.1)

    wait_until(lambda: len(node.to(EVENTS)) >= 3, timeout=30)
    assert pool.watch(node.url).last.startswith("broken stream: a line longer than")
    assert [(s.state, s.reason) for s in pool.nodes] == [(NodeState.IN_SERVICE, "new")]


def test_an_event_of_many_lines_past_the_limit_is_a_broken_stream_not_a_notice(
    nodes: Callable[..., RawNode], pools: Callable[..., Client]
) -> None:
    line = b'data: {"id":1,"phase":"draining","reason":"over and over"}\n'

    def endless_event(exchange: Exchange) -> None:
        exchange.head("200 OK", SSE)
        while exchange.send(line * 64):  # never the blank line that ends an event
            pass

    node = nodes({EVENTS: endless_event})
    pool = pools(node.url, probe_interval=0.1)

    wait_until(lambda: len(node.to(EVENTS)) >= 3, timeout=30)
    assert pool.watch(node.url).last.startswith("broken stream: an event longer than")
    assert [(s.state, s.reason) for s in pool.nodes] == [(NodeState.IN_SERVICE, "new")]


def test_a_stream_that_ends_in_the_middle_of_an_event_announces_nothing(
    nodes: Callable[..., RawNode], pools: Callable[..., Client]
) -> None:
    def cut(exchange: Exchange) -> None:
        exchange.head("200 OK", SSE)
        exchange.send(b'data: {"id":1,"phase":"draining","reason":"cut"}\n')  # no blank line

    node = nodes({EVENTS: cut})
    pool = pools(node.url, probe_interval=0.1)

    wait_until(lambda: len(node.to(EVENTS)) >= 2, timeout=30)
    assert [(s.state, s.reason) for s in pool.nodes] == [(NodeState.IN_SERVICE, "new")]


# -- the parser, alone ---------------------------------------------------------------------


class Chunks:
    """A raw stream that returns the given chunks, then the end."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)

    def read1(self, size: int) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


def test_events_are_parsed_across_chunks_and_line_endings() -> None:
    raw = Chunks(
        b": hello\r\n\r\nid: 1\nevent: phase\nda",
        b'ta: {"phase":"draining",',
        b'"reason":"r"}\r\n\r\ndata: {"phase":',
        b'"serving"}\n\ndata: not json\n\ndata: [1]\n\n',
    )
    reader = client._EventReader(raw)
    assert list(reader) == [{"phase": "draining", "reason": "r"}, {"phase": "serving"}]


def test_data_lines_of_one_event_are_joined() -> None:
    raw = Chunks(b'data: {"phase":\ndata: "draining"}\n\n')
    assert list(client._EventReader(raw)) == [{"phase": "draining"}]


def test_the_reader_never_buffers_more_than_the_line_limit() -> None:
    raw = Chunks(*[b"y" * 1000] * (client.MAX_LINE // 1000 + 2))
    reader = client._EventReader(raw)
    with pytest.raises(EventStreamError, match="a line longer than"):
        list(reader)
    assert reader.largest_pending <= client.MAX_LINE


def test_threads_stop_on_close_even_in_a_long_pause(
    nodes: Callable[..., RawNode], pools: Callable[..., Client]
) -> None:
    node = nodes({EVENTS: EVENTS_OFF})
    pool = pools(node.url, probe_interval=60.0)  # 600 s until it asks again
    wait_until(lambda: pool.watch(node.url).mode == "off", timeout=10)
    pool.close()
    wait_until(lambda: not pool.background(), timeout=5)
