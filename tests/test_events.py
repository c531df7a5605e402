"""The events stream (server-sent events of phase changes) under WSGI and ASGI."""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _apps import (
    AUTH,
    TOKEN,
    FakeReceive,
    Message,
    Reply,
    SendRecorder,
    WSGIStream,
    asgi_call,
    hello_asgi,
    hello_wsgi,
    http_scope,
    make_environ,
    new_lifecycle,
    sse_data,
    wait_until_async,
    wsgi_call,
)

import graceful
from graceful._core.stream import MAX_QUEUED, MIN_WAIT, ProcessStreams, Subscriber

EVENTS = "/-/graceful/events"
HEARTBEAT = b": heartbeat\n\n"


def _wsgi(lc: graceful.Lifecycle) -> graceful.WSGIMiddleware:
    return graceful.WSGIMiddleware(hello_wsgi, lifecycle=lc)


def _event(chunk: bytes) -> dict[str, object]:
    data = sse_data(chunk)
    assert data is not None, f"not an event: {chunk!r}"
    return data


def _read_until(next_chunk: Callable[[], bytes], newest: object) -> list[dict[str, object]]:
    """The events read up to the one with id ``newest`` (heartbeats skipped; bounded)."""
    events: list[dict[str, object]] = []
    for _ in range(100):
        chunk = next_chunk()
        if chunk != HEARTBEAT:
            events.append(_event(chunk))
            if events[-1]["id"] == newest:
                return events
    raise AssertionError(f"event {newest} never came; got {events}")


def _answer(reply: Reply) -> tuple[int, list[tuple[str, str]], bytes]:
    """A reply with header names in one case, to compare WSGI and ASGI answers."""
    return reply.status, sorted((k.lower(), v) for k, v in reply.headers), reply.body


def _assert_events_full(reply: Reply) -> None:
    assert reply.status == 503
    assert reply.header("Content-Type") == "application/health+json"
    assert reply.header("Cache-Control") == "no-store"
    assert reply.header("Retry-After") == "5"
    assert reply.json() == {"status": "fail", "output": "too many event subscribers"}


def _looks_at(monkeypatch: pytest.MonkeyPatch, path: Path) -> list[float]:
    """The times ``path`` is looked at from now on (os.path.exists still answers)."""
    looks: list[float] = []
    exists = os.path.exists

    def looking(target: object) -> bool:
        if target == str(path):
            looks.append(time.monotonic())
        return exists(target)  # type: ignore[arg-type]

    monkeypatch.setattr(os.path, "exists", looking)
    return looks


class _OtherWorkers:
    """The rest of a node holding ``others`` streams (a ``graceful._core.stream.NodeStreams``)."""

    def __init__(self, others: int) -> None:
        self.held = others
        self.published: list[int] = []

    def publish(self, count: int) -> None:
        self.published.append(count)

    def others(self) -> int:
        return self.held


def _worker_of_a_full_node(others: int) -> ProcessStreams:
    process = ProcessStreams(threading.Lock)
    process.join(None, _OtherWorkers(others))
    return process


def _open_wsgi(lc: graceful.Lifecycle) -> WSGIStream:
    """An events stream, read past the ``retry:`` preamble."""
    stream = WSGIStream(_wsgi(lc), make_environ(path=EVENTS))
    assert stream.start.code == 200
    assert stream.next_chunk() == b"retry: 2000\n\n"
    return stream


# -- WSGI ------------------------------------------------------------------------------------


def test_wsgi_stream_starts_with_the_current_phase() -> None:
    lc = new_lifecycle()
    with _open_wsgi(lc) as stream:
        headers = dict(stream.start.headers)
        assert headers["Content-Type"].startswith("text/event-stream")
        assert headers["Cache-Control"] == "no-store"
        chunk = stream.next_chunk()
        assert b"event: phase\n" in chunk
        first = _event(chunk)
        assert first["phase"] == "serving"
        assert first["retry_after"] == 0
        assert len(lc.events) == 1


def test_wsgi_stream_sends_a_draining_event_with_reason_and_retry_after() -> None:
    lc = new_lifecycle(delay=7.5)
    with _open_wsgi(lc) as stream:
        stream.next_chunk()  # serving
        lc.drain("rolling deploy")
        notice = _event(stream.next_chunk())
        assert notice["phase"] == "draining"
        assert notice["reason"] == "rolling deploy"
        assert notice["retry_after"] == math.ceil(7.5)
        lc.resume("back")
        assert _event(stream.next_chunk())["phase"] == "serving"


def test_wsgi_stream_ends_at_stopping_and_releases_its_subscriber() -> None:
    lc = new_lifecycle()
    with _open_wsgi(lc) as stream:
        stream.next_chunk()
        lc.stop("shutting down")
        assert _event(stream.next_chunk())["phase"] == "stopping"
        with pytest.raises(StopIteration):
            stream.next_chunk()
        assert len(lc.events) == 0


def test_wsgi_client_that_goes_away_releases_its_subscriber() -> None:
    lc = new_lifecycle()
    stream = _open_wsgi(lc)
    try:
        stream.next_chunk()
        assert len(lc.events) == 1
    finally:
        stream.close()  # what the server does when the client disconnects
    assert len(lc.events) == 0


def test_wsgi_client_that_goes_away_before_reading_releases_its_subscriber() -> None:
    lc = new_lifecycle()
    WSGIStream(_wsgi(lc), make_environ(path=EVENTS)).close()
    assert len(lc.events) == 0


def test_wsgi_stream_sends_heartbeat_comments() -> None:
    lc = new_lifecycle(events_heartbeat=0.05)
    with _open_wsgi(lc) as stream:
        stream.next_chunk()
        assert stream.next_chunk() == HEARTBEAT  # nothing happens: a heartbeat comes anyway
        assert stream.next_chunk() == HEARTBEAT


def test_wsgi_subscriber_cap_answers_503_until_a_slot_frees() -> None:
    lc = new_lifecycle(events_max_subscribers=2)
    middleware = _wsgi(lc)
    with _open_wsgi(lc), _open_wsgi(lc):
        reply = wsgi_call(middleware, path=EVENTS)
        assert reply.status == 503
        assert reply.header("Retry-After") is not None
        assert len(lc.events) == 2
    assert len(lc.events) == 0
    with _open_wsgi(lc) as stream:
        assert _event(stream.next_chunk())["phase"] == "serving"


def test_wsgi_cap_taken_by_other_workers_answers_like_the_cap() -> None:
    full = wsgi_call(_wsgi(new_lifecycle(events_max_subscribers=0)), path=EVENTS)
    _assert_events_full(full)
    lc = new_lifecycle(events_max_subscribers=3)
    middleware = _wsgi(lc)
    # The node's other workers hold every slot (this process holds none).
    lc.events.process = _worker_of_a_full_node(others=3)
    reply = wsgi_call(middleware, path=EVENTS)  # wsgiref.validate checks the answer's form
    assert _answer(reply) == _answer(full)
    assert len(lc.events) == 0


@pytest.mark.parametrize("drain_file", [False, True], ids=["heartbeat", "drain-file"])
def test_wsgi_stream_with_tiny_intervals_never_spins(
    drain_file: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A heartbeat of a microsecond, or a drain file looked at on every request (interval 0):
    # the stream still sleeps at least MIN_WAIT between its looks (at most 20 a second).
    assert MIN_WAIT == 0.05
    path = tmp_path / "drain"
    settings: dict[str, Any] = {"events_heartbeat": 1e-6}
    if drain_file:
        settings.update(drain_file=str(path), drain_file_interval=0.0)
    with _open_wsgi(new_lifecycle(**settings)) as stream:
        assert _event(stream.next_chunk())["phase"] == "serving"
        looks = _looks_at(monkeypatch, path)
        started = time.monotonic()
        for _ in range(5):
            assert stream.next_chunk() == HEARTBEAT
        elapsed = time.monotonic() - started
    assert elapsed >= 0.15, f"5 heartbeats in {elapsed:.4f}s: the stream spins"
    if drain_file:
        assert 4 <= len(looks) <= 6, looks  # one look per wake, not thousands


def test_a_subscriber_that_never_reads_keeps_bounded_memory() -> None:
    lc = new_lifecycle(events_heartbeat=0.05)
    with _open_wsgi(lc) as stream:
        assert _event(stream.next_chunk())["phase"] == "serving"
        for _ in range(5_000):  # 10,000 phase changes while the client reads nothing
            lc.drain("again")
            lc.resume("again")
        newest = lc.notice()["id"]
        queued = _read_until(stream.next_chunk, newest)
        assert 1 <= len(queued) <= MAX_QUEUED
        # The oldest notices were dropped; the newest (the current phase) never is.
        assert queued[-1] == lc.notice()


def test_hub_subscriber_queue_stays_bounded() -> None:
    lc = new_lifecycle()
    lc.mark_ready()
    subscriber = lc.subscribe()
    assert isinstance(subscriber, Subscriber)
    try:
        for _ in range(5_000):
            lc.drain()
            lc.resume()
        notices = subscriber.pop_all()
        assert len(notices) <= MAX_QUEUED
        assert notices[-1] == lc.notice()
    finally:
        lc.events.unsubscribe(subscriber)


@pytest.mark.parametrize("token", [None, TOKEN])
def test_events_need_no_token(token: str | None) -> None:
    lc = new_lifecycle(token=token)
    with WSGIStream(_wsgi(lc), make_environ(path=EVENTS)) as stream:
        assert stream.start.code == 200


def test_events_answer_405_to_other_methods() -> None:
    lc = new_lifecycle(token=TOKEN)
    reply = wsgi_call(_wsgi(lc), "POST", EVENTS, headers=AUTH)
    assert reply.status == 405
    assert reply.header("Allow") == "GET"
    assert len(lc.events) == 0


# -- ASGI ------------------------------------------------------------------------------------


class ASGIEvents:
    """An events stream served by the ASGI middleware, read by the test."""

    def __init__(self, lc: graceful.Lifecycle) -> None:
        self.middleware = graceful.ASGIMiddleware(hello_asgi, lifecycle=lc)
        self.receive = FakeReceive()
        self.send = SendRecorder()
        self.task = asyncio.ensure_future(
            self.middleware(http_scope(path=EVENTS), self.receive, self.send)
        )

    async def start(self) -> Message:
        message = await self.send.next_message()
        assert message["type"] == "http.response.start"
        return message

    async def next_chunk(self) -> bytes:
        message = await self.send.next_message()
        assert message["type"] == "http.response.body"
        body: bytes = message["body"]
        if not message.get("more_body", False):
            assert body == b""
            raise StopAsyncIteration
        return body

    async def opened(self) -> ASGIEvents:
        start = await self.start()
        assert start["status"] == 200
        headers = dict(start["headers"])
        assert headers[b"content-type"].startswith(b"text/event-stream")
        assert await self.next_chunk() == b"retry: 2000\n\n"
        return self

    async def disconnect(self) -> None:
        self.receive.disconnect()
        await asyncio.wait_for(self.task, 10)


def test_asgi_stream_starts_with_the_phase_and_follows_a_drain() -> None:
    lc = new_lifecycle(delay=3.0)
    lc.mark_ready()

    async def main() -> None:
        stream = await ASGIEvents(lc).opened()
        try:
            assert _event(await stream.next_chunk())["phase"] == "serving"
            lc.drain("deploy")
            notice = _event(await stream.next_chunk())
            assert (notice["phase"], notice["reason"], notice["retry_after"]) == (
                "draining",
                "deploy",
                3,
            )
        finally:
            await stream.disconnect()

    asyncio.run(main())
    assert len(lc.events) == 0


def test_asgi_stream_ends_at_stopping() -> None:
    lc = new_lifecycle()
    lc.mark_ready()

    async def main() -> None:
        stream = await ASGIEvents(lc).opened()
        await stream.next_chunk()
        lc.stop("bye")
        assert _event(await stream.next_chunk())["phase"] == "stopping"
        with pytest.raises(StopAsyncIteration):
            await stream.next_chunk()
        await asyncio.wait_for(stream.task, 10)
        assert len(lc.events) == 0

    asyncio.run(main())


def test_asgi_client_disconnect_releases_its_subscriber() -> None:
    lc = new_lifecycle()
    lc.mark_ready()

    async def main() -> None:
        stream = await ASGIEvents(lc).opened()
        await stream.next_chunk()
        assert len(lc.events) == 1
        await stream.disconnect()
        assert len(lc.events) == 0
        assert stream.send.messages[-1].get("more_body", False) is True  # no more writes

    asyncio.run(main())


def test_asgi_cancelled_stream_releases_its_subscriber() -> None:
    lc = new_lifecycle()
    lc.mark_ready()

    async def main() -> None:
        stream = await ASGIEvents(lc).opened()
        await stream.next_chunk()
        stream.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stream.task
        assert len(lc.events) == 0

    asyncio.run(main())


def test_asgi_stream_sends_heartbeat_comments() -> None:
    lc = new_lifecycle(events_heartbeat=0.05)
    lc.mark_ready()

    async def main() -> None:
        stream = await ASGIEvents(lc).opened()
        try:
            await stream.next_chunk()
            assert await stream.next_chunk() == HEARTBEAT
            assert await stream.next_chunk() == HEARTBEAT
        finally:
            await stream.disconnect()

    asyncio.run(main())


def test_asgi_subscriber_cap_answers_503() -> None:
    lc = new_lifecycle(events_max_subscribers=1)
    lc.mark_ready()

    async def main() -> None:
        stream = await ASGIEvents(lc).opened()
        try:
            refused = ASGIEvents(lc)
            await asyncio.wait_for(refused.task, 10)
            reply = refused.send.reply()
            assert reply.status == 503
            assert reply.header("retry-after") is not None
            assert len(lc.events) == 1
        finally:
            await stream.disconnect()
        assert len(lc.events) == 0

    asyncio.run(main())


def test_asgi_cap_taken_by_other_workers_answers_like_the_cap() -> None:
    full_lc = new_lifecycle(events_max_subscribers=0)
    full_lc.mark_ready()
    full = asyncio.run(
        asgi_call(graceful.ASGIMiddleware(hello_asgi, lifecycle=full_lc), path=EVENTS)
    )
    _assert_events_full(full)
    lc = new_lifecycle(events_max_subscribers=3)
    lc.mark_ready()
    middleware = graceful.ASGIMiddleware(hello_asgi, lifecycle=lc)
    lc.events.process = _worker_of_a_full_node(others=3)
    reply = asyncio.run(asgi_call(middleware, path=EVENTS))
    assert _answer(reply) == _answer(full)
    wsgi_full = wsgi_call(_wsgi(new_lifecycle(events_max_subscribers=0)), path=EVENTS)
    assert _answer(reply) == _answer(wsgi_full)  # one answer, whatever the adapter


@pytest.mark.parametrize("drain_file", [False, True], ids=["heartbeat", "drain-file"])
def test_asgi_stream_with_tiny_intervals_never_spins(
    drain_file: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "drain"
    settings: dict[str, Any] = {"events_heartbeat": 1e-6}
    if drain_file:
        settings.update(drain_file=str(path), drain_file_interval=0.0)
    lc = new_lifecycle(**settings)
    lc.mark_ready()

    async def main() -> tuple[float, list[float]]:
        stream = await ASGIEvents(lc).opened()
        try:
            assert _event(await stream.next_chunk())["phase"] == "serving"
            looks = _looks_at(monkeypatch, path)
            started = time.monotonic()
            for _ in range(5):
                assert await stream.next_chunk() == HEARTBEAT
            return time.monotonic() - started, list(looks)
        finally:
            await stream.disconnect()

    elapsed, looks = asyncio.run(main())
    assert elapsed >= 0.15, f"5 heartbeats in {elapsed:.4f}s: the stream spins"
    if drain_file:
        assert 4 <= len(looks) <= 6, looks  # one look per wake, not thousands


def test_asgi_subscriber_that_never_reads_keeps_bounded_memory() -> None:
    lc = new_lifecycle(events_heartbeat=0.05)
    lc.mark_ready()

    async def main() -> None:
        stream = await ASGIEvents(lc).opened()
        try:
            await stream.next_chunk()
            for _ in range(5_000):  # synchronous: the stream cannot read meanwhile
                lc.drain("again")
                lc.resume("again")
            newest = lc.notice()["id"]
            queued: list[dict[str, object]] = []
            for _ in range(100):
                chunk = await stream.next_chunk()
                if chunk != HEARTBEAT:
                    queued.append(_event(chunk))
                    if queued[-1]["id"] == newest:
                        break
            assert 1 <= len(queued) <= MAX_QUEUED
            assert queued[-1] == lc.notice()
        finally:
            await stream.disconnect()

    asyncio.run(main())


def test_asgi_many_streams_all_hear_a_drain() -> None:
    lc = new_lifecycle()
    lc.mark_ready()

    async def main() -> None:
        streams = [await ASGIEvents(lc).opened() for _ in range(20)]
        try:
            for stream in streams:
                await stream.next_chunk()
            lc.drain("deploy")
            for stream in streams:
                assert _event(await stream.next_chunk())["phase"] == "draining"
        finally:
            for stream in streams:
                await stream.disconnect()
        await wait_until_async(lambda: len(lc.events) == 0)

    asyncio.run(main())
