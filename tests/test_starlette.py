"""Starlette and FastAPI: both ways in, readiness after the user's start-up, the lifecycle in
endpoints, and ``await lifecycle.draining()``. All in-process, over raw ASGI messages."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import pytest
from _apps import (
    FakeReceive,
    Message,
    SendRecorder,
    asgi_call,
    http_scope,
    new_lifecycle,
    phase_of,
)

import graceful
import graceful.starlette
from graceful.pytest_plugin import FakeClock, RequestDrain

pytest.importorskip("starlette")
pytest.importorskip("fastapi")

from fastapi import Depends, FastAPI, WebSocket
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

Phase = graceful.Phase
Form = Literal["add_middleware", "wrapped"]
FORMS: tuple[Form, ...] = ("add_middleware", "wrapped")
LifecycleDep = Annotated[graceful.Lifecycle, Depends(graceful.starlette.get_lifecycle)]


def _serve(api: Starlette, form: Form, lifecycle: graceful.Lifecycle, **options: Any) -> Any:
    """The ASGI app a server would run: the framework app with the middleware added, or wrapped."""
    if form == "add_middleware":
        api.add_middleware(graceful.ASGIMiddleware, lifecycle=lifecycle, **options)
        return api
    return graceful.ASGIMiddleware(api, lifecycle=lifecycle, **options)


def _starlette_app() -> Starlette:
    async def inflight(request: Request) -> PlainTextResponse:
        lifecycle = graceful.starlette.get_lifecycle(request)  # a plain call in Starlette
        return PlainTextResponse(str(lifecycle.inflight))

    return Starlette(routes=[Route("/inflight", inflight)])


def _fastapi_app() -> FastAPI:
    api = FastAPI()

    @api.get("/inflight", response_class=PlainTextResponse)
    async def inflight(lifecycle: LifecycleDep) -> str:
        return str(lifecycle.inflight)

    return api


FRAMEWORKS: dict[str, Callable[[], Starlette]] = {
    "starlette": _starlette_app,
    "fastapi": _fastapi_app,
}


# -- both ways in ------------------------------------------------------------------------------


@pytest.mark.parametrize("framework", sorted(FRAMEWORKS))
@pytest.mark.parametrize("form", FORMS)
def test_added_or_wrapped_middleware_counts_requests_and_answers_probes(
    framework: str, form: Form, graceful_lifecycle: graceful.Lifecycle
) -> None:
    graceful_lifecycle.mark_ready()
    app = _serve(FRAMEWORKS[framework](), form, graceful_lifecycle)

    async def scenario() -> None:
        counted = await asgi_call(app, "GET", "/inflight")
        assert (counted.status, counted.body) == (200, b"1")
        assert (await asgi_call(app, "GET", "/readyz")).status == 200
        graceful_lifecycle.drain()
        assert (await asgi_call(app, "GET", "/readyz")).status == 503
        served = await asgi_call(app, "GET", "/inflight")
        assert (served.status, served.header("graceful-state")) == (200, "draining")

    asyncio.run(scenario())
    assert graceful_lifecycle.inflight == 0


@pytest.mark.parametrize(("form", "counted_while_sent"), [("add_middleware", 0), ("wrapped", 1)])
def test_a_500_from_an_exception_is_counted_until_sent_only_when_wrapped(
    form: Form, counted_while_sent: int, graceful_lifecycle: graceful.Lifecycle
) -> None:
    graceful_lifecycle.mark_ready()
    api = FastAPI()

    @api.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom in endpoint")

    app = _serve(api, form, graceful_lifecycle)
    send = SendRecorder()
    seen: list[int] = []

    async def watching_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            seen.append(graceful_lifecycle.inflight)
        await send(message)

    with pytest.raises(RuntimeError, match="boom in endpoint"):  # re-raised for the server
        asyncio.run(app(http_scope("GET", "/boom"), FakeReceive(), watching_send))

    assert send.reply().status == 500
    assert seen == [counted_while_sent]
    assert graceful_lifecycle.inflight == 0


@pytest.mark.parametrize("framework", sorted(FRAMEWORKS))
@pytest.mark.parametrize("form", FORMS)
def test_a_drain_during_a_request_is_held_open_until_the_response_is_sent(
    framework: str,
    form: Form,
    graceful_lifecycle: graceful.Lifecycle,
    graceful_drain_during_request: Callable[..., RequestDrain],
) -> None:
    graceful_lifecycle.mark_ready()
    app = _serve(FRAMEWORKS[framework](), form, graceful_lifecycle)
    outcome = graceful_drain_during_request(app, "/inflight")
    assert (outcome.status, outcome.body) == (200, b"1")  # served, and counted while served
    assert outcome.inflight_at_drain == 1
    assert outcome.phase_in_flight is Phase.DRAINING  # the delay is over: the request holds it
    assert outcome.phase_after is Phase.DRAINED


# -- the lifespan helper ---------------------------------------------------------------------


class Lifespan:
    """Runs the ASGI lifespan protocol against an app, as a server does."""

    def __init__(self, app: Any) -> None:
        self.scope: dict[str, Any] = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self.receive = FakeReceive({"type": "lifespan.startup"})
        self.sent: asyncio.Queue[Message] = asyncio.Queue()
        self.task = asyncio.ensure_future(app(self.scope, self.receive, self.send))

    async def send(self, message: Message) -> None:
        await self.sent.put(message)

    async def next_message(self) -> str:
        message = await asyncio.wait_for(self.sent.get(), 10)
        return str(message["type"])

    async def shutdown(self) -> str:
        self.receive.put({"type": "lifespan.shutdown"})
        kind = await self.next_message()
        await asyncio.wait_for(self.task, 10)
        return kind


@pytest.mark.parametrize("form", FORMS)
def test_node_turns_ready_only_when_the_users_start_up_has_finished(
    form: Form, graceful_lifecycle: graceful.Lifecycle
) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    @asynccontextmanager
    async def user_lifespan(app: FastAPI) -> AsyncIterator[dict[str, str]]:
        entered.set()
        await release.wait()  # the user's start-up: a pool to open, a cache to warm
        yield {"pool": "open"}

    api = FastAPI(lifespan=graceful.starlette.lifespan(user_lifespan, lifecycle=graceful_lifecycle))
    app = _serve(api, form, graceful_lifecycle, auto_ready=False)

    async def scenario() -> None:
        lifespan = Lifespan(app)
        await asyncio.wait_for(entered.wait(), 10)
        during = await asgi_call(app, "GET", "/readyz")
        assert (during.status, b"starting" in during.body) == (503, True)

        release.set()

        assert await lifespan.next_message() == "lifespan.startup.complete"
        assert graceful_lifecycle.phase is Phase.SERVING
        assert (await asgi_call(app, "GET", "/readyz")).status == 200
        assert lifespan.scope["state"] == {"pool": "open"}  # the user's state, unchanged
        assert await lifespan.shutdown() == "lifespan.shutdown.complete"

    asyncio.run(scenario())
    assert graceful_lifecycle.phase is Phase.STOPPED


def test_start_up_that_fails_leaves_the_node_starting(
    graceful_lifecycle: graceful.Lifecycle,
) -> None:
    @asynccontextmanager
    async def user_lifespan(app: FastAPI) -> AsyncIterator[None]:
        raise ConnectionError("database unreachable")
        yield

    api = FastAPI(lifespan=graceful.starlette.lifespan(user_lifespan, lifecycle=graceful_lifecycle))
    app = graceful.ASGIMiddleware(api, lifecycle=graceful_lifecycle, auto_ready=False)

    async def scenario() -> None:
        lifespan = Lifespan(app)
        assert await lifespan.next_message() == "lifespan.startup.failed"
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(lifespan.task, 10)

    asyncio.run(scenario())
    assert graceful_lifecycle.phase is Phase.STARTING


def test_lifespan_without_a_user_lifespan_marks_the_default_lifecycle_ready(
    graceful_lifecycle: graceful.Lifecycle,
) -> None:
    api = FastAPI(lifespan=graceful.starlette.lifespan())
    app = graceful.ASGIMiddleware(api, auto_ready=False)

    async def scenario() -> None:
        assert phase_of(graceful_lifecycle) is Phase.STARTING
        lifespan = Lifespan(app)
        assert await lifespan.next_message() == "lifespan.startup.complete"
        assert phase_of(graceful_lifecycle) is Phase.SERVING
        assert await lifespan.shutdown() == "lifespan.shutdown.complete"

    asyncio.run(scenario())


# -- the dependency --------------------------------------------------------------------------


def _phase_app(lifespan: graceful.starlette.UserLifespan | None = None) -> FastAPI:
    api = FastAPI(lifespan=lifespan)

    @api.get("/which")
    async def which(lifecycle: LifecycleDep) -> dict[str, Any]:
        return {"id": id(lifecycle), "phase": lifecycle.phase.value}

    @api.websocket("/ws")
    async def ws(websocket: WebSocket, lifecycle: LifecycleDep) -> None:
        await websocket.accept()
        await websocket.send_json({"id": id(lifecycle)})
        await websocket.close(1000)

    return api


def _websocket_id(app: Any) -> int:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    receive = FakeReceive({"type": "websocket.connect"})
    asyncio.run(app(http_scope("GET", "/ws", kind="websocket"), receive, send))
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    found: int = json.loads(sent[1]["text"])["id"]
    return found


def test_dependency_gives_endpoints_the_lifecycle_the_lifespan_helper_marked_ready(
    graceful_lifecycle: graceful.Lifecycle,
) -> None:
    custom = new_lifecycle()
    app = graceful.ASGIMiddleware(
        _phase_app(graceful.starlette.lifespan(lifecycle=custom)), lifecycle=custom
    )

    async def scenario() -> dict[str, Any]:
        lifespan = Lifespan(app)
        assert await lifespan.next_message() == "lifespan.startup.complete"
        reply = await asgi_call(app, "GET", "/which")
        await lifespan.shutdown()
        return dict(json.loads(reply.body))

    assert asyncio.run(scenario()) == {"id": id(custom), "phase": "serving"}
    assert custom is not graceful_lifecycle


def test_dependency_falls_back_to_the_process_wide_lifecycle_for_http_and_websockets(
    graceful_lifecycle: graceful.Lifecycle,
) -> None:
    app = graceful.ASGIMiddleware(_phase_app())
    reply = asyncio.run(asgi_call(app, "GET", "/which"))
    assert reply.status == 200
    assert json.loads(reply.body)["id"] == id(graceful_lifecycle)
    assert _websocket_id(app) == id(graceful_lifecycle)


# -- await lifecycle.draining() --------------------------------------------------------------


@pytest.mark.parametrize("how", ["drain", "stop"])
def test_draining_returns_when_a_drain_or_a_stop_starts(
    how: str, graceful_lifecycle: graceful.Lifecycle
) -> None:
    graceful_lifecycle.mark_ready()

    async def scenario() -> None:
        waiter = asyncio.ensure_future(graceful_lifecycle.draining())
        await asyncio.sleep(0)  # let it start waiting
        assert not waiter.done()
        getattr(graceful_lifecycle, how)()
        await asyncio.wait_for(waiter, 5)

    asyncio.run(scenario())
    assert not graceful_lifecycle._async_waiters


@pytest.mark.parametrize("phase", [Phase.DRAINING, Phase.DRAINED, Phase.STOPPING, Phase.STOPPED])
def test_draining_returns_at_once_when_already_past_serving(
    phase: Phase, graceful_lifecycle: graceful.Lifecycle, graceful_clock: FakeClock
) -> None:
    graceful_lifecycle.mark_ready()
    graceful_lifecycle.drain()
    if phase is Phase.DRAINED:
        graceful_clock.advance(graceful_lifecycle.config.delay + 1.0)
        graceful_lifecycle.tick()
    elif phase in (Phase.STOPPING, Phase.STOPPED):
        graceful_lifecycle.stop()
        if phase is Phase.STOPPED:
            graceful_lifecycle.mark_stopped()
    assert graceful_lifecycle.phase is phase

    asyncio.run(asyncio.wait_for(graceful_lifecycle.draining(), 5))


def test_draining_is_woken_by_a_drain_from_another_thread(
    graceful_lifecycle: graceful.Lifecycle,
) -> None:
    graceful_lifecycle.mark_ready()

    async def scenario() -> None:
        waiter = asyncio.ensure_future(graceful_lifecycle.draining())
        await asyncio.sleep(0)
        thread = threading.Thread(target=graceful_lifecycle.drain)
        thread.start()
        await asyncio.wait_for(waiter, 5)
        thread.join(5)

    asyncio.run(scenario())


def test_draining_keeps_waiting_through_phase_changes_that_are_not_a_drain(
    graceful_lifecycle: graceful.Lifecycle,
) -> None:
    async def scenario() -> None:
        waiter = asyncio.ensure_future(graceful_lifecycle.draining())
        await asyncio.sleep(0)
        graceful_lifecycle.mark_ready()  # a phase change: wakes the waiter, which waits on
        for _ in range(3):
            await asyncio.sleep(0)  # the wake-up runs
        assert not waiter.done()
        graceful_lifecycle.drain()
        await asyncio.wait_for(waiter, 5)

    asyncio.run(scenario())


def test_draining_cancelled_leaves_no_waiter_behind(graceful_lifecycle: graceful.Lifecycle) -> None:
    graceful_lifecycle.mark_ready()

    async def scenario() -> None:
        waiter = asyncio.ensure_future(graceful_lifecycle.draining())
        await asyncio.sleep(0)
        assert len(graceful_lifecycle._async_waiters) == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(scenario())
    assert not graceful_lifecycle._async_waiters
