"""ASGI middleware: counting HTTP requests and websockets, lifespan, and the draining headers."""

from __future__ import annotations

import asyncio

import pytest
from _apps import (
    ASGIApp,
    FakeClock,
    FakeReceive,
    Message,
    Receive,
    Scope,
    Send,
    SendRecorder,
    asgi_call,
    hello_asgi,
    http_scope,
    new_lifecycle,
    phase_of,
    wait_until_async,
)

import graceful

Phase = graceful.Phase


def _middleware(app: ASGIApp, lifecycle: graceful.Lifecycle) -> graceful.ASGIMiddleware:
    return graceful.ASGIMiddleware(app, lifecycle=lifecycle)


# -- HTTP counting ---------------------------------------------------------------------------


def test_http_request_counts_until_the_app_returns_not_until_the_response_is_sent() -> None:
    lc = new_lifecycle()
    seen: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(lc.inflight)
        await hello_asgi(scope, receive, send)
        seen.append(lc.inflight)  # work after the response (a background task) still counts

    reply = asyncio.run(asgi_call(_middleware(app, lc)))
    assert (reply.status, reply.body) == (200, b"hello")
    assert seen == [1, 1]
    assert lc.inflight == 0


def test_app_that_raises_is_released_and_the_error_propagates() -> None:
    lc = new_lifecycle()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("boom in app")

    with pytest.raises(RuntimeError, match="boom in app"):
        asyncio.run(asgi_call(_middleware(app, lc)))
    assert lc.inflight == 0


def test_cancelled_request_is_released() -> None:
    lc = new_lifecycle()

    async def main() -> None:
        entered = asyncio.Event()

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            entered.set()
            await asyncio.Event().wait()  # never answers

        task = asyncio.ensure_future(
            _middleware(app, lc)(http_scope(), FakeReceive(), SendRecorder())
        )
        await asyncio.wait_for(entered.wait(), 10)
        assert lc.inflight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert lc.inflight == 0

    asyncio.run(main())


def test_client_disconnect_ends_the_request_and_releases_it() -> None:
    lc = new_lifecycle()

    async def main() -> None:
        async def streaming_app(scope: Scope, receive: Receive, send: Send) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            while (await receive())["type"] != "http.disconnect":
                pass

        receive, send = FakeReceive(), SendRecorder()
        task = asyncio.ensure_future(_middleware(streaming_app, lc)(http_scope(), receive, send))
        await send.next_message()  # the response started: the request is under way
        assert lc.inflight == 1
        receive.disconnect()
        await asyncio.wait_for(task, 10)
        assert lc.inflight == 0

    asyncio.run(main())


def test_2000_concurrent_requests_end_at_zero() -> None:
    lc = new_lifecycle()

    async def main() -> None:
        gate = asyncio.Event()

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await gate.wait()
            await hello_asgi(scope, receive, send)

        middleware = _middleware(app, lc)
        tasks = [asyncio.ensure_future(asgi_call(middleware)) for _ in range(2000)]
        try:
            await wait_until_async(lambda: lc.inflight == 2000, what="2000 requests in flight")
        finally:
            gate.set()
        replies = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert [r.status for r in replies] == [200] * 2000
        assert lc.inflight == 0

    asyncio.run(main())


def test_non_http_scopes_pass_through_uncounted() -> None:
    lc = new_lifecycle()
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])
        assert lc.inflight == 0

    asyncio.run(_middleware(app, lc)({"type": "custom"}, FakeReceive(), SendRecorder()))
    assert seen == ["custom"]


# -- websockets ------------------------------------------------------------------------------


def test_websocket_is_counted_apart_and_does_not_hold_a_drain_open() -> None:
    clock = FakeClock()
    lc = new_lifecycle(clock, delay=0.0)

    async def main() -> None:
        seen: list[tuple[int, int]] = []

        async def ws_app(scope: Scope, receive: Receive, send: Send) -> None:
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept"})
            seen.append((lc.inflight, len(lc.websockets)))
            while (await receive())["type"] != "websocket.disconnect":
                pass

        sent: list[Message] = []

        async def send(message: Message) -> None:
            sent.append(message)

        receive = FakeReceive({"type": "websocket.connect"})
        scope = http_scope(path="/ws", kind="websocket")
        task = asyncio.ensure_future(_middleware(ws_app, lc)(scope, receive, send))
        await wait_until_async(lambda: bool(seen), what="the websocket to be accepted")
        assert seen == [(0, 1)]
        lc.drain("deploy")
        assert phase_of(lc) is Phase.DRAINED  # an open websocket does not keep the node draining
        receive.put({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(task, 10)
        assert len(lc.websockets) == 0
        assert sent == [{"type": "websocket.accept"}]

    asyncio.run(main())


# -- lifespan --------------------------------------------------------------------------------


class LifespanServer:
    """Plays the server's side of the lifespan protocol against an app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.receive = FakeReceive({"type": "lifespan.startup"})
        self.sent: asyncio.Queue[Message] = asyncio.Queue()
        self.task: asyncio.Future[None] | None = None

    async def _send(self, message: Message) -> None:
        self.sent.put_nowait(message)

    def start(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}
        self.task = asyncio.ensure_future(self.app(scope, self.receive, self._send))

    async def next_sent(self) -> str:
        message = await asyncio.wait_for(self.sent.get(), 10)
        kind: str = message["type"]
        return kind


def _lifespan_app(lc: graceful.Lifecycle, phases: list[Phase], *, fail: bool = False) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "lifespan"
        assert (await receive())["type"] == "lifespan.startup"
        phases.append(lc.phase)
        if fail:
            await send({"type": "lifespan.startup.failed", "message": "no database"})
            return
        await send({"type": "lifespan.startup.complete"})
        assert (await receive())["type"] == "lifespan.shutdown"
        phases.append(lc.phase)
        await send({"type": "lifespan.shutdown.complete"})

    return app


def test_lifespan_startup_complete_marks_ready_and_shutdown_stops() -> None:
    lc = new_lifecycle()
    phases: list[Phase] = []

    async def main() -> None:
        server = LifespanServer(_middleware(_lifespan_app(lc, phases), lc))
        server.start()
        assert await server.next_sent() == "lifespan.startup.complete"
        assert phases == [Phase.STARTING]  # not ready before start-up completed
        assert phase_of(lc) is Phase.SERVING
        server.receive.put({"type": "lifespan.shutdown"})
        assert await server.next_sent() == "lifespan.shutdown.complete"
        assert server.task is not None
        await asyncio.wait_for(server.task, 10)
        assert phases == [Phase.STARTING, Phase.STOPPING]  # the app saw STOPPING at shutdown
        assert phase_of(lc) is Phase.STOPPED

    asyncio.run(main())


def test_lifespan_startup_failed_leaves_the_node_not_ready_even_after_requests() -> None:
    lc = new_lifecycle()
    phases: list[Phase] = []

    async def main() -> None:
        middleware = _middleware(_lifespan_app(lc, phases, fail=True), lc)
        server = LifespanServer(middleware)
        server.start()
        assert await server.next_sent() == "lifespan.startup.failed"
        assert server.task is not None
        await asyncio.wait_for(server.task, 10)
        assert phase_of(lc) is Phase.STARTING
        # A request must not turn the node ready behind the failed start-up's back.
        ready = await asgi_call(middleware, path="/readyz")
        assert (ready.status, ready.json()["output"]) == (503, "starting")
        assert phase_of(lc) is Phase.STARTING

    asyncio.run(main())


def test_app_without_lifespan_support_is_ready_when_it_raises_on_lifespan() -> None:
    lc = new_lifecycle()

    async def http_only(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise ValueError("only http is supported")
        await hello_asgi(scope, receive, send)

    async def main() -> None:
        server = LifespanServer(_middleware(http_only, lc))
        server.start()
        assert server.task is not None
        with pytest.raises(ValueError, match="only http"):
            await asyncio.wait_for(server.task, 10)
        assert phase_of(lc) is Phase.SERVING

    asyncio.run(main())


def test_without_any_lifespan_the_first_request_marks_ready() -> None:
    lc = new_lifecycle()
    middleware = _middleware(hello_asgi, lc)
    assert phase_of(lc) is Phase.STARTING
    reply = asyncio.run(asgi_call(middleware))
    assert reply.status == 200
    assert phase_of(lc) is Phase.SERVING


def test_without_any_lifespan_a_first_readiness_probe_passes() -> None:
    lc = new_lifecycle()
    middleware = _middleware(hello_asgi, lc)
    reply = asyncio.run(asgi_call(middleware, path="/readyz"))
    assert (reply.status, reply.json()["status"]) == (200, "pass")


def test_auto_ready_off_waits_for_mark_ready() -> None:
    lc = new_lifecycle()
    middleware = graceful.ASGIMiddleware(hello_asgi, lifecycle=lc, auto_ready=False)
    assert asyncio.run(asgi_call(middleware)).status == 200
    assert phase_of(lc) is Phase.STARTING
    lc.mark_ready()
    assert asyncio.run(asgi_call(middleware, path="/readyz")).status == 200


# -- draining headers ------------------------------------------------------------------------


async def _keep_alive_app(scope: Scope, receive: Receive, send: Send) -> None:
    headers = [(b"content-type", b"text/plain"), (b"connection", b"keep-alive")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


def test_no_draining_headers_while_serving() -> None:
    lc = new_lifecycle()
    reply = asyncio.run(asgi_call(_middleware(_keep_alive_app, lc)))
    assert reply.header("graceful-state") is None
    assert reply.header("connection") == "keep-alive"


@pytest.mark.parametrize("http_version", ["1.0", "1.1"])
def test_draining_http1_responses_announce_and_close_the_connection(http_version: str) -> None:
    lc = new_lifecycle(FakeClock(), delay=10.0)
    middleware = _middleware(_keep_alive_app, lc)
    lc.mark_ready()
    lc.drain("deploy")
    reply = asyncio.run(asgi_call(middleware, http_version=http_version))
    assert (reply.status, reply.body) == (200, b"ok")  # served, not refused
    assert reply.header("graceful-state") == "draining"
    assert reply.header("connection") == "close"
    assert reply.header("content-type") == "text/plain"


def test_draining_http2_responses_announce_without_connection_close() -> None:
    lc = new_lifecycle(FakeClock(), delay=10.0)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = _middleware(app, lc)
    lc.mark_ready()
    lc.drain("deploy")
    reply = asyncio.run(asgi_call(middleware, http_version="2"))
    assert reply.header("graceful-state") == "draining"
    assert reply.header("connection") is None


def test_draining_headers_stop_after_resume() -> None:
    lc = new_lifecycle(FakeClock(), delay=10.0)
    middleware = _middleware(_keep_alive_app, lc)
    lc.mark_ready()
    lc.drain()
    lc.resume()
    reply = asyncio.run(asgi_call(middleware))
    assert reply.header("graceful-state") is None
    assert reply.header("connection") == "keep-alive"


# -- Starlette -------------------------------------------------------------------------------


def test_works_as_starlette_add_middleware() -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    lc = new_lifecycle(FakeClock(), delay=10.0)
    seen: list[int] = []

    async def home(request: Request) -> PlainTextResponse:
        seen.append(lc.inflight)
        return PlainTextResponse("home")

    app = Starlette(routes=[Route("/", home)])
    app.add_middleware(graceful.ASGIMiddleware, lifecycle=lc)

    async def main() -> None:
        assert phase_of(lc) is Phase.STARTING
        server = LifespanServer(app)
        server.start()
        assert await server.next_sent() == "lifespan.startup.complete"
        assert phase_of(lc) is Phase.SERVING
        assert (await asgi_call(app, path="/readyz")).status == 200
        response = await asgi_call(app)
        assert (response.status, response.body) == (200, b"home")
        assert seen == [1]
        assert lc.inflight == 0
        lc.drain("deploy")
        assert (await asgi_call(app, path="/readyz")).status == 503
        draining = await asgi_call(app)
        assert (draining.status, draining.body) == (200, b"home")
        assert draining.header("graceful-state") == "draining"
        assert draining.header("connection") == "close"
        server.receive.put({"type": "lifespan.shutdown"})
        assert await server.next_sent() == "lifespan.shutdown.complete"
        assert phase_of(lc) is Phase.STOPPED

    asyncio.run(main())
    assert seen == [1, 1]


# -- the goodbye to open HTTP streams, through ASGI alone (any server) ------------------------


class Streams:
    """``/events``: a chunk, then ``receive()`` until ``http.disconnect``, then one late send
    (recorded: dropped, or its error); ``/sized``: a response with a Content-Length, sent in
    two parts, the second when ``release`` is set."""

    def __init__(self) -> None:
        self.streaming = 0
        self.saw_disconnect = False
        self.late_error: BaseException | None = None
        self.release = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/sized":
            headers = [(b"content-length", b"4")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            self.streaming += 1
            await send({"type": "http.response.body", "body": b"ab", "more_body": True})
            await self.release.wait()
            await send({"type": "http.response.body", "body": b"cd"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        self.streaming += 1
        while (await receive())["type"] != "http.disconnect":
            pass
        self.saw_disconnect = True
        try:
            await send({"type": "http.response.body", "body": b"late", "more_body": True})
        except OSError as exc:
            self.late_error = exc


async def _stream_through_a_drain(spec_version: str) -> tuple[Streams, SendRecorder, SendRecorder]:
    lc = new_lifecycle(delay=0.05, drain_timeout=10)
    lc.mark_ready()
    app = Streams()
    middleware = _middleware(app, lc)
    events, sized = SendRecorder(), SendRecorder()

    def scope(path: str) -> Scope:
        found = http_scope(path=path)
        found["asgi"] = {"version": "3.0", "spec_version": spec_version}
        return found

    running = [
        asyncio.ensure_future(middleware(scope("/events"), FakeReceive(), events)),
        asyncio.ensure_future(middleware(scope("/sized"), FakeReceive(), sized)),
    ]
    await wait_until_async(lambda: app.streaming == 2, what="both responses under way")
    lc.drain("test")
    await asyncio.wait_for(running[0], 10)  # the stream's app returns once disconnected
    assert not running[1].done()  # a response with a Content-Length is left to finish
    app.release.set()
    await asyncio.wait_for(running[1], 10)
    return app, events, sized


def test_the_goodbye_finishes_an_open_stream_and_disconnects_the_apps_receive() -> None:
    app, events, sized = asyncio.run(_stream_through_a_drain("2.3"))
    assert events.finished  # the last chunk went out: the client sees a complete body
    assert events.reply().body == b"data: 1\n\n"
    assert app.saw_disconnect
    assert app.late_error is None  # a send after the end is dropped, as after a disconnect
    assert sized.finished and sized.reply().body == b"abcd"


def test_on_an_asgi_2_4_server_a_send_after_the_goodbye_raises_oserror() -> None:
    app, events, _ = asyncio.run(_stream_through_a_drain("2.4"))
    assert events.finished and app.saw_disconnect
    assert isinstance(app.late_error, OSError)


class SlowLastChunk(SendRecorder):
    """A server whose socket is slow to take the last body: it waits for ``written``."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = asyncio.Event()
        self.written = asyncio.Event()

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.writing.set()
            await self.written.wait()
        await super().__call__(message)


def test_a_send_while_the_last_body_is_being_written_never_raises_even_under_asgi_2_4() -> None:
    """An error then would have the server close the connection under the last body (seen
    with uvicorn 0.30, which says ASGI 2.4: the client read an incomplete response)."""

    async def scenario() -> None:
        lc = new_lifecycle(delay=0.05, drain_timeout=10)
        lc.mark_ready()
        sent_meanwhile: list[BaseException | None] = []

        async def ticker(scope: Scope, receive: Receive, send: Send) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"tick", "more_body": True})
            await server.writing.wait()  # the goodbye is writing the last body now
            try:
                await send({"type": "http.response.body", "body": b"tick", "more_body": True})
                sent_meanwhile.append(None)
            except OSError as exc:
                sent_meanwhile.append(exc)
            server.written.set()

        server = SlowLastChunk()
        scope = http_scope(path="/ticks")
        scope["asgi"] = {"version": "3.0", "spec_version": "2.4"}
        running = asyncio.ensure_future(_middleware(ticker, lc)(scope, FakeReceive(), server))
        await wait_until_async(lambda: len(server.messages) == 2, what="the stream under way")
        lc.drain("test")
        await asyncio.wait_for(running, 10)
        assert sent_meanwhile == [None]
        assert server.finished, "the last body went out"

    asyncio.run(scenario())


def test_a_resume_before_the_end_of_the_delay_leaves_streams_open() -> None:
    async def scenario() -> None:
        lc = new_lifecycle(delay=30.0)
        lc.mark_ready()
        app = Streams()
        events = SendRecorder()
        middleware = _middleware(app, lc)
        running = asyncio.ensure_future(middleware(http_scope(), FakeReceive(), events))
        await wait_until_async(lambda: app.streaming == 1, what="the stream under way")
        lc.drain("test")
        goodbye = middleware._goodbye
        await wait_until_async(lambda: goodbye._task is not None, what="the goodbye armed")
        lc.resume("changed my mind")
        task = goodbye._task
        assert task is not None
        await asyncio.wait_for(task, 10)  # the goodbye gave up: resumed before the delay
        assert not goodbye.said
        assert not events.finished and not app.saw_disconnect
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running

    asyncio.run(scenario())


def test_a_stream_opened_after_the_goodbye_ends_after_its_first_chunk() -> None:
    async def scenario() -> tuple[Streams, SendRecorder]:
        lc = new_lifecycle(delay=0.01, drain_timeout=10)
        lc.mark_ready()
        app = Streams()
        middleware = _middleware(app, lc)
        await asgi_call(middleware, path="/-/graceful/status")  # on the loop: the goodbye follows
        lc.drain("test")
        goodbye = middleware._goodbye
        await wait_until_async(lambda: goodbye.said, what="the goodbye said")
        events = SendRecorder()
        await asyncio.wait_for(middleware(http_scope(), FakeReceive(), events), 10)
        return app, events

    app, events = asyncio.run(scenario())
    assert events.finished and events.reply().body == b"data: 1\n\n"
    assert app.saw_disconnect and app.late_error is None
    assert events.reply().header("graceful-state") == "draining"
