"""Reject mode (``reject_when_draining``): while the node announces, new requests get 503 before
the app sees them, uncounted, marked ``Graceful-Rejected: 1``; POST, PATCH and LOCK (which a
proxy does not re-send) are served; requests already running finish; probes and control routes
are unaffected. Both middlewares, in-process (the mark itself: ``test_rejected_mark.py``)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from typing import Any

import pytest
from _apps import (
    AUTH,
    KINDS,
    TOKEN,
    Environ,
    FakeClock,
    FakeReceive,
    Kind,
    Receive,
    Reply,
    Scope,
    Send,
    SendRecorder,
    StartResponse,
    asgi_call,
    hello_asgi,
    hello_wsgi,
    http_scope,
    make_client,
    new_lifecycle,
    phase_of,
    wait_until,
    wsgi_call,
)

import graceful
from graceful import Config, ConfigError

Phase = graceful.Phase
ENV = "GRACEFUL_REJECT_WHEN_DRAINING"


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> Kind:
    value: Kind = request.param
    return value


def _announce(lc: graceful.Lifecycle, clock: FakeClock, phase: Phase) -> None:
    """Take a serving lifecycle to ``phase`` (one of the announcing phases)."""
    lc.drain("deploy")
    if phase is Phase.DRAINED:
        clock.advance(lc.config.delay + 0.1)
        lc.tick()
    elif phase is Phase.STOPPING:
        with lc.hold("keeps the stop from finishing"):
            lc.stop("deploy")
            assert phase_of(lc) is Phase.STOPPING
        return
    assert phase_of(lc) is phase


def _assert_rejected(reply: Reply, retry_after: str = "10") -> None:
    assert reply.status == 503, reply
    assert reply.header("Retry-After") == retry_after
    assert reply.header("Graceful-State") == "draining"
    assert reply.header("Graceful-Rejected") == "1"
    assert reply.header("Cache-Control") == "no-store"
    assert reply.header("Content-Type") == "text/plain; charset=utf-8"
    assert reply.header("Content-Length") == str(len(reply.body))
    assert reply.body == b"draining: retry on another node\n"


# -- the setting -----------------------------------------------------------------------------


def test_reject_mode_is_off_by_default_and_a_draining_node_serves_new_requests(kind: Kind) -> None:
    assert Config(delay=1.0).reject_when_draining is False
    assert Config.from_env({}).reject_when_draining is False
    lc = new_lifecycle(FakeClock(), delay=10.0)
    client = make_client(kind, lc)
    lc.drain("deploy")
    reply = client.request("POST", "/orders")
    assert (reply.status, reply.body) == (200, b"hello")
    assert reply.header("Graceful-State") == "draining"
    assert client.calls == [("/orders", 1)]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        (" yes ", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
    ],
)
def test_environment_variable_is_read_as_a_yes_or_no(raw: str, expected: bool) -> None:
    assert Config.from_env({ENV: raw}).reject_when_draining is expected


@pytest.mark.parametrize("raw", ["", "2", "maybe", "enabled", "tru"])
def test_a_bad_environment_value_is_a_config_error_naming_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({ENV: raw})
    message = str(info.value)
    assert message.startswith(f"{ENV}={raw!r} is not allowed")
    assert "true/false" in message


@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_a_value_that_is_not_a_bool_is_a_config_error(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"^reject_when_draining=.* expected True or False"):
        Config(reject_when_draining=value)


# -- rejecting -------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", [Phase.DRAINING, Phase.DRAINED, Phase.STOPPING])
def test_new_requests_while_announcing_get_503_without_reaching_the_app_or_being_counted(
    kind: Kind, phase: Phase
) -> None:
    clock = FakeClock()
    lc = new_lifecycle(clock, delay=10.0, reject_when_draining=True)
    client = make_client(kind, lc)
    _announce(lc, clock, phase)
    arrival = lc.requests.last_arrival  # None, or the hold that kept the stop going
    clock.advance(1.0)
    for method in ("GET", "PUT", "DELETE"):
        _assert_rejected(client.request(method, "/orders"))
    assert client.calls == []
    assert lc.requests.last_arrival == arrival  # never counted, not even as an arrival
    assert lc.served_while_draining == 0
    assert lc.inflight == 0


def test_requests_reach_the_app_while_serving_and_again_after_resume(kind: Kind) -> None:
    lc = new_lifecycle(FakeClock(), delay=10.0, reject_when_draining=True)
    client = make_client(kind, lc)
    assert client.request("GET", "/a").body == b"hello"
    lc.drain("deploy")
    _assert_rejected(client.request("GET", "/b"))
    lc.resume()
    reply = client.request("GET", "/c")
    assert (reply.status, reply.body) == (200, b"hello")
    assert reply.header("Graceful-State") is None
    assert client.calls == [("/a", 1), ("/c", 1)]


@pytest.mark.parametrize(("delay", "retry_after"), [(0.0, "1"), (0.2, "1"), (2.5, "3"), (5, "5")])
def test_retry_after_is_the_delay_rounded_up_and_at_least_one_second(
    kind: Kind, delay: float, retry_after: str
) -> None:
    clock = FakeClock()
    lc = new_lifecycle(clock, delay=delay, reject_when_draining=True)
    client = make_client(kind, lc)
    lc.drain("deploy")
    _assert_rejected(client.request("GET", "/"), retry_after)


def test_probes_and_control_routes_answer_as_usual(kind: Kind) -> None:
    lc = new_lifecycle(FakeClock(), delay=10.0, token=TOKEN, reject_when_draining=True)
    client = make_client(kind, lc)
    lc.drain("deploy")
    livez = client.request("GET", "/livez")
    assert (livez.status, livez.json()["status"]) == (200, "pass")
    readyz = client.request("GET", "/readyz")
    assert (readyz.status, readyz.json()["output"]) == (503, "draining")
    status = client.request("GET", "/-/graceful/status", headers=AUTH)
    assert (status.status, status.json()["phase"]) == (200, "draining")
    assert client.request("POST", "/-/graceful/resume", headers=AUTH).status == 200
    assert client.request("POST", "/-/graceful/drain", headers=AUTH).status == 200
    assert client.request("GET", "/-/graceful/nope", headers=AUTH).status == 404
    assert client.calls == []


def test_wsgi_rejection_has_no_hop_by_hop_header() -> None:
    # PEP 3333 forbids Connection from the app (wsgiref's validator, used by wsgi_call, would
    # fail the call); servers decide about the connection themselves.
    lc = new_lifecycle(FakeClock(), delay=10.0, reject_when_draining=True)
    middleware = graceful.WSGIMiddleware(hello_wsgi, lifecycle=lc)
    lc.drain("deploy")
    reply = wsgi_call(middleware, "GET", "/")
    _assert_rejected(reply)
    assert reply.header("Connection") is None


@pytest.mark.parametrize(("http_version", "connection"), [("1.0", "close"), ("1.1", "close")])
def test_asgi_rejection_closes_http1_connections(http_version: str, connection: str) -> None:
    lc = new_lifecycle(FakeClock(), delay=10.0, reject_when_draining=True)
    middleware = graceful.ASGIMiddleware(hello_asgi, lifecycle=lc)
    lc.mark_ready()
    lc.drain("deploy")
    reply = asyncio.run(asgi_call(middleware, http_version=http_version))
    _assert_rejected(reply)
    assert reply.header("Connection") == connection


def test_asgi_rejection_on_http2_has_no_connection_header() -> None:
    lc = new_lifecycle(FakeClock(), delay=10.0, reject_when_draining=True)
    middleware = graceful.ASGIMiddleware(hello_asgi, lifecycle=lc)
    lc.mark_ready()
    lc.drain("deploy")
    reply = asyncio.run(asgi_call(middleware, http_version="2"))
    _assert_rejected(reply)
    assert reply.header("Connection") is None


# -- requests already running ----------------------------------------------------------------


def test_wsgi_request_in_flight_when_the_drain_starts_finishes_normally() -> None:
    clock = FakeClock()
    lc = new_lifecycle(clock, delay=10.0, reject_when_draining=True)
    release = threading.Event()
    seen: list[str] = []

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        seen.append(environ["PATH_INFO"])
        if environ["PATH_INFO"] == "/slow":
            assert release.wait(10.0), "the test never released the slow request"
        return hello_wsgi(environ, start_response)

    middleware = graceful.WSGIMiddleware(app, lifecycle=lc)
    replies: list[Reply] = []
    slow = threading.Thread(target=lambda: replies.append(wsgi_call(middleware, "POST", "/slow")))
    slow.start()
    try:
        wait_until(lambda: lc.inflight == 1, what="the slow request in flight")
        lc.drain("deploy")
        _assert_rejected(wsgi_call(middleware, "PUT", "/new"))
        assert lc.inflight == 1
        clock.advance(11.0)
        assert lc.tick() is Phase.DRAINING  # the delay is over, the slow request holds it
    finally:
        release.set()
        slow.join(10.0)
    assert [(r.status, r.body, r.header("Graceful-State")) for r in replies] == [
        (200, b"hello", None)  # arrived while serving: answered as then
    ]
    assert seen == ["/slow"]
    assert lc.inflight == 0
    assert lc.tick() is Phase.DRAINED


def test_asgi_request_in_flight_when_the_drain_starts_finishes_normally() -> None:
    clock = FakeClock()
    lc = new_lifecycle(clock, delay=10.0, reject_when_draining=True)
    seen: list[str] = []

    async def scenario() -> tuple[Reply, Reply]:
        release = asyncio.Event()

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            seen.append(scope["path"])
            if scope["path"] == "/slow":
                await asyncio.wait_for(release.wait(), 10.0)
            await hello_asgi(scope, receive, send)

        middleware = graceful.ASGIMiddleware(app, lifecycle=lc)
        lc.mark_ready()
        slow_send = SendRecorder()
        slow = asyncio.ensure_future(
            middleware(http_scope("POST", "/slow"), FakeReceive(), slow_send)
        )
        while lc.inflight == 0:  # let the slow request start (bounded by the wait_for below)
            await asyncio.sleep(0)
        lc.drain("deploy")
        rejected = await asgi_call(middleware, "PUT", "/new")
        assert lc.inflight == 1
        release.set()
        await asyncio.wait_for(slow, 10.0)
        return slow_send.reply(), rejected

    finished, rejected = asyncio.run(asyncio.wait_for(scenario(), 20.0))
    assert (finished.status, finished.body, finished.header("Graceful-State")) == (
        200,
        b"hello",
        None,
    )
    _assert_rejected(rejected)
    assert seen == ["/slow"]
    assert lc.inflight == 0
    clock.advance(11.0)
    assert lc.tick() is Phase.DRAINED
