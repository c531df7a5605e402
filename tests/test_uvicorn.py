"""graceful.uvicorn and the middleware's goodbye to long-lived connections, in-process.

- :class:`ServerLink` runs the shared stop sequence on the loop of a real (not started)
  ``uvicorn.Server``: SIGTERM drains then sets ``should_exit``, SIGINT skips the delay, a
  second SIGINT or a SIGQUIT forces, a stuck request is logged and not waited for.
- :func:`attach` chains uvicorn's own signal handler, and leaves it alone under gunicorn.
- Real uvicorn servers on the test's loop (port 0 on 127.0.0.1): plain ``uvicorn.Server`` with
  the middleware (lifespan on and off) and ``graceful.uvicorn.Server``, signalled for real.
- The goodbye at the end of the delay: websockets closed with 1012 (against a stand-in ASGI
  server), open-ended HTTP streams ended under a real uvicorn.
- The install hint when uvicorn is missing.

Signal handlers are put back after every test.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from types import FrameType
from typing import Any

import httpx
import pytest
import uvicorn
from _apps import FakeReceive, Message, Receive, Scope, Send, http_scope, wait_until_async

import graceful
import graceful.uvicorn
from graceful._servers.uvicorn import HANDOVER_GRACE, ServerLink, attach
from graceful.testing import serve_lifespan

Phase = graceful.Phase
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


@pytest.fixture(autouse=True)
def _restore_signal_handlers() -> Iterator[None]:
    saved = {signum: signal.getsignal(signum) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def lifecycle_with(**settings: Any) -> graceful.Lifecycle:
    """A ready lifecycle of its own (never the process-wide one)."""
    settings.setdefault("delay", 30.0)
    lifecycle = graceful.Lifecycle(graceful.Config(**settings))
    lifecycle.mark_ready()
    return lifecycle


async def until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    await wait_until_async(lambda: bool(predicate()), timeout, what)


async def empty_app(scope: Scope, receive: Receive, send: Send) -> None:
    pass


def idle_server() -> uvicorn.Server:
    """A uvicorn server that is never started: the state a stop hands over to."""
    return uvicorn.Server(uvicorn.Config(empty_app, log_config=None))


def phase_of(lifecycle: graceful.Lifecycle) -> graceful.Phase:
    return lifecycle.phase


def flag(server: uvicorn.Server, name: str) -> bool:
    """``server.should_exit`` / ``force_exit`` read through a call (no type narrowing)."""
    return bool(getattr(server, name))


# -- ServerLink: the stop sequence on the loop, handed over to uvicorn ------------------------


def test_sigterm_keeps_serving_through_the_delay_and_waits_for_inflight_then_sets_should_exit() -> (
    None
):
    delay = 0.3
    lifecycle = lifecycle_with(delay=delay, drain_timeout=10)
    server = idle_server()

    async def scenario() -> None:
        link = ServerLink(server, lifecycle, asyncio.get_running_loop(), grace=HANDOVER_GRACE)
        job = lifecycle.hold("job")
        job.__enter__()
        started = time.monotonic()
        link.dispatch(signal.SIGTERM)
        await asyncio.sleep(0)  # one turn of the loop: the stop's task starts
        assert phase_of(lifecycle) is Phase.DRAINING  # readiness fails at once
        delay_end = lifecycle.delay_ends_at()
        assert delay_end is not None
        await until(lambda: time.monotonic() > delay_end + 0.1, what="the delay to pass")
        assert not flag(server, "should_exit"), "stopped while work was in flight"
        job.__exit__(None, None, None)
        await until(lambda: server.should_exit, what="should_exit")
        assert time.monotonic() - started >= delay

    asyncio.run(scenario())
    assert phase_of(lifecycle) is Phase.STOPPING
    assert not server.force_exit
    assert server.config.timeout_graceful_shutdown == HANDOVER_GRACE
    assert server._captured_signals == []  # never handed to uvicorn: it would re-raise it


def test_sigint_stops_without_the_delay() -> None:
    lifecycle = lifecycle_with(delay=30)
    server = idle_server()

    async def scenario() -> None:
        link = ServerLink(server, lifecycle, asyncio.get_running_loop())
        link.dispatch(signal.SIGINT)
        assert phase_of(lifecycle) is Phase.STOPPING
        await until(lambda: server.should_exit, timeout=5, what="should_exit")

    asyncio.run(scenario())
    assert not server.force_exit
    assert server.config.timeout_graceful_shutdown is None  # grace None: the user's setting


@pytest.mark.parametrize(
    ("first", "second"),
    [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGQUIT), (None, signal.SIGQUIT)],
    ids=["SIGINT-SIGINT", "SIGTERM-SIGQUIT", "SIGQUIT"],
)
def test_second_sigint_or_sigquit_forces_exit_at_once(
    first: signal.Signals | None, second: signal.Signals
) -> None:
    lifecycle = lifecycle_with(delay=30, drain_timeout=30, interrupt_timeout=30)
    server = idle_server()

    async def scenario() -> None:
        link = ServerLink(server, lifecycle, asyncio.get_running_loop())
        with lifecycle.hold("stuck"):
            if first is not None:
                link.dispatch(first)
                await asyncio.sleep(0)  # let the stop it started begin waiting
                assert not server.should_exit
            link.dispatch(second)
            assert server.force_exit
            assert server.should_exit

    asyncio.run(scenario())
    assert server.config.timeout_graceful_shutdown == 0


def test_sigint_once_uvicorn_is_shutting_down_forces_it_at_once() -> None:
    lifecycle = lifecycle_with(delay=0)
    server = idle_server()

    async def scenario() -> None:
        link = ServerLink(server, lifecycle, asyncio.get_running_loop())
        link.dispatch(signal.SIGTERM)
        await until(lambda: server.should_exit, what="the hand-over to uvicorn")
        assert not flag(server, "force_exit")
        link.dispatch(signal.SIGINT)  # uvicorn: "Waiting for connections (CTRL+C to force quit)"
        assert flag(server, "force_exit")

    asyncio.run(scenario())


def test_a_request_stuck_past_the_drain_timeout_is_logged_and_not_waited_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lifecycle = lifecycle_with(delay=0.05, drain_timeout=0.3)
    server = idle_server()

    async def scenario() -> float:
        link = ServerLink(server, lifecycle, asyncio.get_running_loop(), grace=HANDOVER_GRACE)
        lifecycle.hold("stuck-job").__enter__()  # never released
        started = time.monotonic()
        link.dispatch(signal.SIGTERM)
        await until(lambda: server.should_exit, what="should_exit at the deadline")
        return time.monotonic() - started

    with caplog.at_level(logging.WARNING, logger="graceful"):
        elapsed = asyncio.run(scenario())
    assert 0.3 <= elapsed < 3
    assert "drain timeout (0.3s) passed with 1 in flight" in caplog.text
    assert "HOLD stuck-job" in caplog.text
    assert server.config.timeout_graceful_shutdown == 0  # uvicorn does not wait for it either


def test_the_signal_handler_only_schedules_the_work_on_the_loop() -> None:
    lifecycle = lifecycle_with(delay=30)
    server = idle_server()

    async def scenario() -> None:
        link = ServerLink(server, lifecycle, asyncio.get_running_loop()).install()
        assert all(signal.getsignal(signum) == link.handle for signum in SIGNALS)
        signal.raise_signal(signal.SIGTERM)  # runs the handler in this (main) thread, now
        assert phase_of(lifecycle) is Phase.SERVING, "the handler did the work itself"
        await until(lambda: phase_of(lifecycle) is Phase.DRAINING, what="the drain")
        link.uninstall()

    before = signal.getsignal(signal.SIGTERM)
    asyncio.run(scenario())
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_signal_after_the_loop_closed_goes_to_the_handler_it_replaced() -> None:
    calls: list[int] = []

    def previous(signum: int, frame: FrameType | None) -> None:
        calls.append(signum)

    signal.signal(signal.SIGTERM, previous)

    async def make() -> ServerLink:
        return ServerLink(idle_server(), lifecycle_with(), asyncio.get_running_loop())

    asyncio.run(make()).install((signal.SIGTERM,))
    signal.raise_signal(signal.SIGTERM)
    assert calls == [signal.SIGTERM]


# -- attach: how the middleware finds uvicorn's handler ---------------------------------------


def test_attach_chains_uvicorns_handler_for_sigterm_sigint_and_sigquit_once() -> None:
    server = idle_server()
    signal.signal(signal.SIGTERM, server.handle_exit)  # what uvicorn's capture_signals does
    signal.signal(signal.SIGINT, server.handle_exit)

    async def scenario() -> None:
        link = attach(lifecycle_with())
        assert link is not None
        assert link.server is server
        assert all(signal.getsignal(signum) == link.handle for signum in SIGNALS)
        assert attach(lifecycle_with()) is link  # a second middleware finds the same link
        link.uninstall()

    asyncio.run(scenario())
    assert signal.getsignal(signal.SIGTERM) == server.handle_exit


def test_when_gunicorn_drives_the_drain_a_worker_s_sigterm_settles_then_runs_uvicorns() -> None:
    """gunicorn's master drives the drain: SIGINT stays uvicorn's; SIGTERM (the master's, at
    its hand-over) first stops the worker accepting and lets its connections finish, then
    runs uvicorn's own handler."""
    server = idle_server()
    signal.signal(signal.SIGTERM, server.handle_exit)
    signal.signal(signal.SIGINT, server.handle_exit)
    lifecycle = lifecycle_with()
    lifecycle.node = _StubNode()

    async def scenario() -> ServerLink | None:
        link = attach(lifecycle)
        assert link is not None
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler) and handler != server.handle_exit  # graceful's, first
        handler(signal.SIGTERM, None)
        await wait_until_async(lambda: flag(server, "should_exit"), what="uvicorn handler ran")
        return link

    try:
        link = asyncio.run(scenario())
        assert link is not None and link.server is server  # still there for the streams
        assert signal.getsignal(signal.SIGINT) == server.handle_exit
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_attach_finds_nothing_when_uvicorn_does_not_own_sigterm() -> None:
    async def scenario() -> ServerLink | None:
        return attach(lifecycle_with())

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert asyncio.run(scenario()) is None


def test_attach_outside_the_main_thread_installs_nothing() -> None:
    server = idle_server()
    signal.signal(signal.SIGTERM, server.handle_exit)
    found: list[ServerLink | None] = []

    async def scenario() -> None:
        found.append(attach(lifecycle_with()))

    thread = threading.Thread(target=asyncio.run, args=(scenario(),))
    thread.start()
    thread.join(10)
    assert len(found) == 1 and found[0] is not None
    assert signal.getsignal(signal.SIGTERM) == server.handle_exit


class _StubNode:
    poll_interval = 0.02

    def others_inflight(self) -> int:
        return 0

    def by_worker(self, own: int) -> dict[str, int]:
        return {"1": own}

    def announce(
        self, phase: graceful.Phase, reason: str, *, final: bool, since: float | None
    ) -> None:
        pass

    def drain_state(self) -> tuple[float | None, bool]:
        return None, False

    def stuck(self, now: float) -> list[tuple[str, str, float]]:
        return []


# -- real uvicorn servers on the test's loop --------------------------------------------------


async def slow_app(scope: Scope, receive: Receive, send: Send) -> None:
    """``/slow?seconds=N`` answers after N seconds; anything else at once; lifespan supported."""
    if scope["type"] == "lifespan":
        return await serve_lifespan(receive, send)
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(float(scope["query_string"].decode().split("=")[1]))  # IS the point
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"done"})


@contextlib.contextmanager
def reraised_signals() -> Iterator[list[int]]:
    """SIGTERM and SIGINT as uvicorn finds them before it serves: recorded, not deadly."""
    seen: list[int] = []

    def record(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)

    signal.signal(signal.SIGTERM, record)
    signal.signal(signal.SIGINT, record)
    yield seen


@contextlib.asynccontextmanager
async def serving(server: uvicorn.Server) -> AsyncIterator[tuple[asyncio.Task[None], str]]:
    """Run ``server`` on this loop; yields its task and base URL; stopped at once after."""
    task = asyncio.ensure_future(server.serve())
    try:
        await until(lambda: server.started or task.done(), what="uvicorn started")
        if task.done():
            task.result()
        port = server.servers[0].sockets[0].getsockname()[1]
        yield task, f"http://127.0.0.1:{port}"
    finally:
        if not task.done():
            server.should_exit = server.force_exit = True
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), 15)
        if not task.done():
            task.cancel()


def config_for(app: Any, **options: Any) -> uvicorn.Config:
    options.setdefault("lifespan", "on")
    return uvicorn.Config(
        app, host="127.0.0.1", port=0, log_config=None, log_level="warning", **options
    )


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(trust_env=False, timeout=15)


@pytest.mark.parametrize("lifespan", ["on", "off"])
def test_plain_uvicorn_with_the_middleware_drains_on_sigterm_and_exits_cleanly(
    lifespan: str,
) -> None:
    delay = 0.4
    lifecycle = graceful.Lifecycle(graceful.Config(delay=delay, drain_timeout=10))
    server = uvicorn.Server(
        config_for(graceful.ASGIMiddleware(slow_app, lifecycle), lifespan=lifespan)
    )

    async def scenario() -> None:
        async with serving(server) as (task, url), client() as http:
            if lifespan == "on":  # chained at lifespan start-up, before any request
                assert isinstance(
                    getattr(signal.getsignal(signal.SIGTERM), "__self__", None), ServerLink
                )
            assert (await http.get(url + "/first")).status_code == 200  # not a probe
            handler = signal.getsignal(signal.SIGTERM)
            assert isinstance(getattr(handler, "__self__", None), ServerLink), handler
            assert (await http.get(url + "/readyz")).status_code == 200
            slow = asyncio.ensure_future(http.get(url + "/slow?seconds=0.8"))
            await until(lambda: lifecycle.inflight == 1, what="the slow request in flight")
            started = time.monotonic()
            signal.raise_signal(signal.SIGTERM)
            await until(lambda: phase_of(lifecycle) is Phase.DRAINING, what="the drain")
            readyz = await http.get(url + "/readyz")
            served = await http.get(url + "/other")
            assert readyz.status_code == 503
            assert (served.status_code, served.headers["graceful-state"]) == (200, "draining")
            assert not task.done()
            assert (await slow).status_code == 200
            await asyncio.wait_for(task, 10)
            assert time.monotonic() - started >= delay

    quit_before = signal.getsignal(signal.SIGQUIT)
    with reraised_signals() as reraised:
        asyncio.run(scenario())
    assert reraised == []  # uvicorn re-raises what it handled: the process would die of it
    assert server._captured_signals == []  # exit status 0, not -SIGTERM
    if lifespan == "on":
        assert phase_of(lifecycle) is Phase.STOPPED
        assert signal.getsignal(signal.SIGQUIT) == quit_before  # put back at lifespan shutdown
    else:
        assert phase_of(lifecycle) is Phase.STOPPING


def test_graceful_server_drains_on_sigterm_and_sets_uvicorns_timeout_from_the_budget() -> None:
    lifecycle = graceful.Lifecycle(graceful.Config(delay=0.2, drain_timeout=7))
    app = graceful.ASGIMiddleware(slow_app, lifecycle)
    # No lifespan: the server alone puts the signal handlers back.
    server = graceful.uvicorn.Server(config_for(app, lifespan="off"), lifecycle)
    assert server.config.timeout_graceful_shutdown == 7
    quit_before = signal.getsignal(signal.SIGQUIT)

    async def scenario() -> None:
        async with serving(server) as (task, url), client() as http:
            assert server.link is not None
            assert signal.getsignal(signal.SIGQUIT) == server.link.handle
            slow = asyncio.ensure_future(http.get(url + "/slow?seconds=0.5"))
            await until(lambda: lifecycle.inflight == 1, what="the slow request in flight")
            signal.raise_signal(signal.SIGTERM)
            assert (await slow).status_code == 200
            await asyncio.wait_for(task, 10)

    with reraised_signals() as reraised:
        asyncio.run(scenario())
    assert reraised == []
    assert server._captured_signals == []
    assert server.config.timeout_graceful_shutdown == HANDOVER_GRACE
    assert signal.getsignal(signal.SIGQUIT) == quit_before


# -- the goodbye: websockets (any server) ----------------------------------------------------


class SocketServer:
    """The server side of one websocket, as uvicorn 0.54 behaves: a close is also a disconnect."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        self.queue.put_nowait({"type": "websocket.connect"})
        self.sent: list[tuple[float, Message]] = []

    async def receive(self) -> Message:
        return await self.queue.get()

    async def send(self, message: Message) -> None:
        self.sent.append((time.monotonic(), message))
        if message["type"] == "websocket.close":
            self.queue.put_nowait({"type": "websocket.disconnect", "code": message.get("code")})

    def closes(self) -> list[Message]:
        return [m for _, m in self.sent if m["type"] == "websocket.close"]


class EchoSocket:
    """A websocket app: accepts, echoes, records how it ended."""

    def __init__(self, *, close_first: bool = False) -> None:
        self.close_first = close_first
        self.ended_with: int | None = None
        self.accepted = asyncio.Event()
        self.release = asyncio.Event()
        self.send_error: BaseException | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.connect":
                await send({"type": "websocket.accept"})
                self.accepted.set()
                if self.close_first:  # then stays busy, reading nothing, until released
                    await send({"type": "websocket.close", "code": 1000})
                    await self.release.wait()
                    return
            elif message["type"] == "websocket.receive":
                await send({"type": "websocket.send", "text": message["text"]})
            elif message["type"] == "websocket.disconnect":
                self.ended_with = message.get("code")
                try:
                    await send({"type": "websocket.send", "text": "too late"})
                except OSError as exc:
                    self.send_error = exc
                return


async def open_socket(
    middleware: graceful.ASGIMiddleware, app: EchoSocket
) -> tuple[SocketServer, asyncio.Future[None]]:
    socket = SocketServer()
    scope = http_scope(path="/ws", kind="websocket")
    task = asyncio.ensure_future(middleware(scope, socket.receive, socket.send))
    await asyncio.wait_for(app.accepted.wait(), 10)
    return socket, task


def test_websocket_is_closed_with_1012_at_the_end_of_the_delay() -> None:
    delay = 0.3
    lifecycle = lifecycle_with(delay=delay)
    app = EchoSocket()
    middleware = graceful.ASGIMiddleware(app, lifecycle)

    async def scenario() -> None:
        socket, task = await open_socket(middleware, app)
        lifecycle.drain("test")  # any drain: the control route, the drain file, gunicorn
        drained_at = time.monotonic()
        await asyncio.wait_for(task, 10)
        assert socket.closes() == [
            {"type": "websocket.close", "code": 1012, "reason": "service restart"}
        ]
        closed_at = next(t for t, m in socket.sent if m["type"] == "websocket.close")
        assert closed_at - drained_at >= delay * 0.9

    asyncio.run(scenario())
    assert app.ended_with == 1012
    assert isinstance(app.send_error, OSError)  # a send after the close fails, as ASGI asks
    assert len(lifecycle.websockets) == 0


def test_websocket_the_app_closed_itself_gets_no_second_close() -> None:
    lifecycle = lifecycle_with(delay=0.05)
    app = EchoSocket(close_first=True)
    middleware = graceful.ASGIMiddleware(app, lifecycle)

    async def scenario() -> SocketServer:
        socket, task = await open_socket(middleware, app)
        lifecycle.drain("test")
        await until(lambda: phase_of(lifecycle) is Phase.DRAINED, what="drained")
        await asyncio.sleep(0.05)  # time for a wrong goodbye to go out: proving an absence
        app.release.set()
        await asyncio.wait_for(task, 10)
        return socket

    socket = asyncio.run(scenario())
    assert socket.closes() == [{"type": "websocket.close", "code": 1000}]


def test_a_resume_before_the_delay_ends_keeps_the_websocket_open() -> None:
    lifecycle = lifecycle_with(delay=0.2)
    app = EchoSocket()
    middleware = graceful.ASGIMiddleware(app, lifecycle)

    async def scenario() -> SocketServer:
        socket, task = await open_socket(middleware, app)
        lifecycle.drain("test")
        lifecycle.resume("test")
        await asyncio.sleep(0.4)  # past the old delay's end: the goodbye must not come
        assert not task.done()
        socket.queue.put_nowait({"type": "websocket.receive", "text": "still here"})
        await until(lambda: len(socket.sent) == 2, what="the echo")
        socket.queue.put_nowait({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(task, 10)
        return socket

    socket = asyncio.run(scenario())
    assert socket.closes() == []
    assert socket.sent[1][1] == {"type": "websocket.send", "text": "still here"}


def test_a_stop_closes_websockets_at_once_and_later_ones_right_after_accept() -> None:
    lifecycle = lifecycle_with(delay=30)
    first, second = EchoSocket(), EchoSocket()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await (first if scope["path"] == "/1" else second)(scope, receive, send)

    middleware = graceful.ASGIMiddleware(app, lifecycle)

    async def scenario() -> tuple[SocketServer, SocketServer]:
        one = SocketServer()
        task = asyncio.ensure_future(
            middleware(http_scope(path="/1", kind="websocket"), one.receive, one.send)
        )
        await asyncio.wait_for(first.accepted.wait(), 10)
        lifecycle.stop("SIGINT: quick stop")  # no delay on a stop
        await asyncio.wait_for(task, 5)
        two = SocketServer()
        await asyncio.wait_for(
            middleware(http_scope(path="/2", kind="websocket"), two.receive, two.send), 5
        )
        return one, two

    one, two = asyncio.run(scenario())
    assert [m["code"] for m in one.closes()] == [1012]
    assert [m["type"] for _, m in two.sent][:2] == ["websocket.accept", "websocket.close"]
    assert second.ended_with == 1012


def test_http_requests_read_the_servers_own_messages_and_send_theirs_as_they_are() -> None:
    """The goodbye costs HTTP requests little: before the response starts, ``receive`` hands
    over the server's own messages (the same objects), and ``send`` only looks at a response's
    status (to remove the reject-mode mark from the app's 503s): every message reaches the
    server as the app sent it, the same object."""
    lifecycle = lifecycle_with()
    request = {"type": "http.request", "body": b"hi", "more_body": False}
    read: list[object] = []
    start = {"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1")]}
    body = {"type": "http.response.body", "body": b"ok"}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        read.append(await receive())
        await send(start)
        await send(body)

    receive, sent = FakeReceive(request), asyncio.Queue[Message]()

    async def send(message: Message) -> None:
        sent.put_nowait(message)

    asyncio.run(graceful.ASGIMiddleware(app, lifecycle)(http_scope(), receive, send))
    assert read == [request] and read[0] is request
    first, second = sent.get_nowait(), sent.get_nowait()
    assert first is start and second is body
    assert sent.empty()


# -- the goodbye: HTTP streams under uvicorn -------------------------------------------------


class StreamApp:
    """``/events``: server-sent events until ``http.disconnect``; ``/download``: a response with
    a Content-Length sent slowly; ``/poll``: answers when ``release`` is set."""

    def __init__(self) -> None:
        self.events_saw_disconnect = asyncio.Event()
        self.release = asyncio.Event()
        self.streaming = 0
        self.late_send_error: BaseException | None = None
        self.spec_version = "2.0"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/events":
            self.spec_version = str(scope.get("asgi", {}).get("spec_version", "2.0"))
            await send({"type": "http.response.start", "status": 200, "headers": []})
            self.streaming += 1
            await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
            while (await receive())["type"] != "http.disconnect":
                pass
            self.events_saw_disconnect.set()
            try:  # a send after the disconnect: dropped, or OSError under ASGI 2.4 (spec)
                await send({"type": "http.response.body", "body": b"late", "more_body": True})
            except Exception as exc:
                self.late_send_error = exc
        elif path == "/download":
            headers = [(b"content-length", b"6")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            self.streaming += 1
            await send({"type": "http.response.body", "body": b"abc", "more_body": True})
            await self.release.wait()
            await send({"type": "http.response.body", "body": b"def"})
        elif path == "/poll":
            self.streaming += 1
            await self.release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"answer"})


def test_open_http_streams_end_at_the_end_of_the_delay_and_others_are_left_to_finish() -> None:
    delay = 0.3
    lifecycle = lifecycle_with(delay=delay, drain_timeout=10)
    app = StreamApp()
    server = uvicorn.Server(config_for(graceful.ASGIMiddleware(app, lifecycle)))

    async def read(http: httpx.AsyncClient, url: str) -> tuple[float, bytes]:
        async with http.stream("GET", url) as response:
            body = await response.aread()  # fails on a cut (incomplete) response
        return time.monotonic(), body

    async def scenario() -> None:
        async with serving(server) as (_, url), client() as http:
            reads = [
                asyncio.ensure_future(read(http, url + path))
                for path in ("/events", "/download", "/poll")
            ]
            await until(lambda: app.streaming == 3, what="three responses under way")
            drained_at = time.monotonic()
            lifecycle.drain("test")  # not a signal: the control route would do the same
            events_done, events_body = await asyncio.wait_for(reads[0], 10)
            assert app.events_saw_disconnect.is_set()
            spec = tuple(int(part) for part in app.spec_version.split(".")[:2])
            if spec >= (2, 4):  # uvicorn 0.30 to 0.3x: "raise an OSError"
                assert isinstance(app.late_send_error, OSError), app.late_send_error
            else:  # newer uvicorn says 2.3 again: the send is dropped
                assert app.late_send_error is None
            assert events_body == b"data: 1\n\n"
            assert events_done - drained_at >= delay * 0.9
            await asyncio.sleep(0.1)  # time for a wrong end to show: proving an absence
            assert not reads[1].done() and not reads[2].done()
            app.release.set()
            assert (await asyncio.wait_for(reads[1], 10))[1] == b"abcdef"
            assert (await asyncio.wait_for(reads[2], 10))[1] == b"answer"

    asyncio.run(scenario())


# -- the install hint --------------------------------------------------------------------------


def test_importing_graceful_uvicorn_without_uvicorn_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # "not installed"
    monkeypatch.delitem(sys.modules, "graceful.uvicorn")
    monkeypatch.delitem(sys.modules, "graceful._servers.uvicorn")
    with pytest.raises(ImportError, match=r"pip install 'graceful-drain\[uvicorn\]'"):
        importlib.import_module("graceful.uvicorn")


def test_the_command_line_takes_uvicorns_options_and_answers_nonsense_as_uvicorn_does() -> None:
    def command(module: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    helped = command("graceful.uvicorn", "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("Usage: python -m graceful.uvicorn [OPTIONS] APP")
    assert "--workers" in helped.stdout and "--timeout-graceful-shutdown" in helped.stdout
    for args in (("app:app", "--workers", "many"), ("no_such_module_anywhere:app", "--port", "0")):
        ours, uvicorns = command("graceful.uvicorn", *args), command("uvicorn", *args)
        assert ours.returncode == uvicorns.returncode != 0, (ours, uvicorns)
        assert ours.stderr.splitlines()[-1] == uvicorns.stderr.splitlines()[-1]
