"""The reject-mode mark (issue 10, items 2 and 3; contract C1), both middlewares, in process.

Only the middleware's own rejection carries ``Graceful-Rejected``: the middlewares remove it from
any 503 the app produced, serving or draining, so that a pool or a proxy can never mistake the
app's answer (the request ran) for a rejection (it did not). In reject mode only the requests a
proxy re-sends without ``non_idempotent`` are rejected: POST, PATCH and LOCK are served.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import pytest
from _apps import (
    KINDS,
    Environ,
    FakeClock,
    Kind,
    Receive,
    Reply,
    Scope,
    Send,
    StartResponse,
    asgi_call,
    make_client,
    new_lifecycle,
    wsgi_call,
)

import graceful
from graceful._core.surface import NEVER_REJECTED, REJECTED_HEADER

pytestmark = pytest.mark.filterwarnings("ignore:Unknown REQUEST_METHOD")

MARKED = [
    ("Content-Type", "text/plain"),
    ("Content-Length", "5"),
    ("Graceful-Rejected", "1"),
    ("graceful-state", "draining"),
    ("Retry-After", "7"),
]


def busy_wsgi(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """An app that answers 503 dressed up as graceful's own rejection (the mark twice, in any
    case)."""
    start_response("503 Service Unavailable", [*MARKED, ("GRACEFUL-REJECTED", "yes")])
    return [b"busy!"]


def teapot_wsgi(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    start_response("418 I'm a teapot", list(MARKED))
    return [b"teapot"[:5]]


async def busy_asgi(scope: Scope, receive: Receive, send: Send) -> None:
    headers = [(k.lower().encode(), v.encode()) for k, v in MARKED]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": b"busy!"})


def call(kind: Kind, lifecycle: graceful.Lifecycle, method: str = "POST") -> Reply:
    if kind == "wsgi":
        return wsgi_call(graceful.WSGIMiddleware(busy_wsgi, lifecycle=lifecycle), method, "/x")
    middleware = graceful.ASGIMiddleware(busy_asgi, lifecycle=lifecycle)
    return asyncio.run(asgi_call(middleware, method, "/x"))


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> Kind:
    value: Kind = request.param
    return value


def test_the_constants_name_the_mark_and_the_methods_never_rejected() -> None:
    assert REJECTED_HEADER == "Graceful-Rejected"
    assert frozenset({"POST", "PATCH", "LOCK"}) == NEVER_REJECTED


def test_the_middlewares_own_rejection_carries_the_mark(kind: Kind) -> None:
    lc = new_lifecycle(FakeClock(), delay=10.0, reject_when_draining=True)
    client = make_client(kind, lc)
    lc.drain("deploy")
    reply = client.request("GET", "/orders")
    assert reply.status == 503
    assert reply.header("Graceful-Rejected") == "1"
    assert reply.header("Graceful-State") == "draining"
    assert client.calls == []


@pytest.mark.parametrize("draining", [False, True], ids=["serving", "draining"])
def test_an_apps_own_503_reaches_the_client_without_the_mark(kind: Kind, draining: bool) -> None:
    lc = new_lifecycle(FakeClock(), delay=10.0)
    lc.mark_ready()
    if draining:
        lc.drain("deploy")
    reply = call(kind, lc)
    assert (reply.status, reply.body) == (503, b"busy!")
    assert reply.header("Graceful-Rejected") is None
    assert reply.header("Retry-After") == "7"  # everything else as the app sent it
    assert lc.inflight == 0


def test_an_apps_own_503_in_reject_mode_is_not_marked_either(kind: Kind) -> None:
    lc = new_lifecycle(FakeClock(), delay=10.0, reject_when_draining=True)
    lc.mark_ready()
    lc.drain("deploy")
    reply = call(kind, lc, method="POST")  # served while draining: the app answers 503
    assert (reply.status, reply.body) == (503, b"busy!")
    assert reply.header("Graceful-Rejected") is None
    assert lc.served_while_draining == 1


def test_other_statuses_are_passed_as_they_are() -> None:
    lc = new_lifecycle(FakeClock(), delay=10.0)
    reply = wsgi_call(graceful.WSGIMiddleware(teapot_wsgi, lifecycle=lc), "GET", "/")
    assert reply.status == 418
    assert reply.header("Graceful-Rejected") == "1"  # only a 503 can be read as a rejection


@pytest.mark.parametrize("method", sorted(NEVER_REJECTED))
def test_non_idempotent_requests_are_served_and_counted_in_reject_mode_while_draining(
    kind: Kind, method: str
) -> None:
    lc = new_lifecycle(FakeClock(), delay=10.0, reject_when_draining=True)
    client = make_client(kind, lc)
    lc.drain("deploy")
    reply = client.request(method, "/orders")
    assert (reply.status, reply.body) == (200, b"hello")
    assert reply.header("Graceful-State") == "draining"
    assert reply.header("Graceful-Rejected") is None
    assert client.calls == [("/orders", 1)]  # counted in flight while the app ran
    assert lc.served_while_draining == 1


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "OPTIONS", "post", "PURGE"])
def test_every_other_method_is_rejected_in_reject_mode_while_draining(
    kind: Kind, method: str
) -> None:
    lc = new_lifecycle(FakeClock(), delay=10.0, reject_when_draining=True)
    client = make_client(kind, lc)
    lc.drain("deploy")
    reply = client.request(method, "/orders")
    assert (reply.status, reply.header("Graceful-Rejected")) == (503, "1")
    assert client.calls == []
    assert lc.served_while_draining == 0
