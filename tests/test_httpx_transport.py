"""What only the httpx transports have (their rules are the pools': tests/test_client.py and
tests/test_client_events.py run those on all three clients): the client's base URL names the
service and the node is the transport's choice, path and query kept; ``close()`` and
``aclose()`` leave no thread or task behind; the inner transport's options pass through;
``NoNodeAvailable`` is an httpx error; what an HTTP/2 refusal says about a request.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import h2.errors
import h2.events
import httpcore
import httpx
import pytest
from _apps import wait_until_async
from _raw_node import Exchange, RawNode, answer
from conftest import closed_at_end, unused_port, wait_until

from graceful import GracefulError
from graceful._client.httpx_common import Lanes
from graceful._client.httpx_failures import failure_of
from graceful._core.calls import Failure, may_resend
from graceful.httpx import AsyncPoolTransport, NodeState, NoNodeAvailable, PoolTransport

EVENTS = "/-/graceful/events"
SSE = [("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-store")]


def serving_stream(exchange: Exchange) -> None:
    exchange.head("200 OK", SSE)
    exchange.send(b'id: 1\nevent: phase\ndata: {"id":1,"phase":"serving","reason":"up"}\n\n')
    while exchange.send(b": heartbeat\n\n"):
        if exchange.node.closing.wait(0.2):
            return


@pytest.fixture
def raw_nodes() -> Iterator[Callable[..., RawNode]]:
    def node(**kwargs: Any) -> RawNode:
        return RawNode({EVENTS: serving_stream}, default=answer(body=b"raw"), **kwargs)

    with closed_at_end(node) as make:
        yield make


# -- the node is the transport's choice --------------------------------------------------------


def test_the_base_url_names_the_service_and_the_node_gets_the_path_and_query(
    raw_nodes: Callable[..., RawNode],
) -> None:
    node = raw_nodes()
    transport = PoolTransport([node.url], watch=False)
    with httpx.Client(transport=transport, base_url="http://orders") as client:
        assert client.get("/orders/1", params={"q": "a", "r": "2"}).text == "raw"
        assert client.get("https://elsewhere.example:8443/x?y=1").text == "raw"

    first, second = node.to("/orders/1")[0], node.to("/x")[0]
    assert first.path == "/orders/1?q=a&r=2"
    assert second.path == "/x?y=1"
    assert first.headers["host"] == second.headers["host"] == f"127.0.0.1:{node.port}"


def test_a_node_base_url_with_a_path_prefixes_each_request_path(
    raw_nodes: Callable[..., RawNode],
) -> None:
    node = raw_nodes()
    with httpx.Client(transport=PoolTransport([node.url + "/api/"], watch=False)) as client:
        assert client.get("http://orders/orders/1?x=1").text == "raw"
    assert [r.path for r in node.requests] == ["/api/orders/1?x=1"]


def test_the_async_transport_spreads_calls_and_keeps_path_and_query(
    raw_nodes: Callable[..., RawNode],
) -> None:
    first, second = raw_nodes(), raw_nodes()

    async def main() -> list[str]:
        transport = AsyncPoolTransport([first.url, second.url], watch=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://orders") as client:
            return [(await client.get(f"/orders/{n}?x={n}")).text for n in range(4)]

    assert asyncio.run(main()) == ["raw"] * 4
    assert [r.path for r in first.requests] == ["/orders/0?x=0", "/orders/2?x=2"]
    assert [r.path for r in second.requests] == ["/orders/1?x=1", "/orders/3?x=3"]


# -- background work ends with the client -------------------------------------------------------


def test_closing_the_client_stops_the_transports_threads(
    raw_nodes: Callable[..., RawNode],
) -> None:
    nodes = [raw_nodes(), raw_nodes()]
    transport = PoolTransport([node.url for node in nodes], probe_interval=0.2)
    client = httpx.Client(transport=transport, base_url="http://orders")
    wait_until(lambda: all(len(node.to(EVENTS)) == 1 for node in nodes), timeout=10)
    assert client.get("/x").text == "raw"

    client.close()

    def left() -> list[str]:
        """This transport's threads still running: its prober and watchers, and any probe
        of its nodes (other tests' threads may be about: a lifecycle's delay timer...)."""
        urls = [node.url for node in nodes]
        return [
            thread.name
            for thread in threading.enumerate()
            if thread in transport._threads or any(url in thread.name for url in urls)
        ]

    wait_until(lambda: not left(), timeout=5, message=lambda: str(left()))
    with pytest.raises(RuntimeError, match="this PoolTransport is closed"):
        transport.handle_request(httpx.Request("GET", "http://orders/x"))


def test_the_async_transport_starts_its_tasks_at_the_first_request_and_aclose_ends_them(
    raw_nodes: Callable[..., RawNode],
) -> None:
    node = raw_nodes()
    transport = AsyncPoolTransport([node.url])  # no running loop here: nothing starts yet

    async def main() -> tuple[list[str], list[str]]:
        client = httpx.AsyncClient(transport=transport, base_url="http://orders")
        assert transport._tasks == set()
        assert (await client.get("/x")).text == "raw"
        running = sorted(task.get_name() for task in transport._tasks)
        # the watch task opens its stream in its own time
        await wait_until_async(lambda: bool(node.to(EVENTS)), what="the watch connects")
        await client.aclose()
        current = asyncio.current_task()
        left = [task.get_name() for task in asyncio.all_tasks() if task is not current]
        return running, left

    running, left = asyncio.run(main())
    assert running == ["graceful-probe", f"graceful-watch {node.url}"]
    assert left == []
    assert len(node.to(EVENTS)) == 1


def test_a_push_notice_reaches_the_async_transport(raw_nodes: Callable[..., RawNode]) -> None:
    def draining_stream(exchange: Exchange) -> None:
        exchange.head("200 OK", SSE)
        exchange.send(b'data: {"id":1,"phase":"draining","reason":"deploy"}\n\n')
        exchange.node.closing.wait(10)

    node = RawNode({EVENTS: draining_stream})
    try:

        async def main() -> tuple[NodeState, str]:
            transport = AsyncPoolTransport([node.url], probe_interval=60)  # made in the loop
            for _ in range(200):  # bounded: 10 s
                if transport.nodes[0].state is NodeState.DRAINING:
                    break
                await asyncio.sleep(0.05)
            await transport.aclose()
            return transport.nodes[0].state, transport.nodes[0].reason

        assert asyncio.run(main()) == (NodeState.DRAINING, "notice: draining (deploy)")
    finally:
        node.close()


# -- options and errors -------------------------------------------------------------------------


@pytest.mark.parametrize("transport_class", [PoolTransport, AsyncPoolTransport])
def test_the_inner_transport_gets_http2_and_limits(transport_class: type[Any]) -> None:
    limits = httpx.Limits(max_connections=7)
    node = f"http://127.0.0.1:{unused_port()}"
    transport = transport_class([node], http2=True, limits=limits)
    try:
        inner = transport._lanes.take(node)._pool
        assert (inner._http2, inner._max_connections) == (True, 7)
    finally:
        if isinstance(transport, PoolTransport):
            transport.close()
        else:
            asyncio.run(transport.aclose())


def test_an_unknown_option_fails_naming_itself() -> None:
    with pytest.raises(TypeError, match="probe_intervall"):
        PoolTransport(["http://127.0.0.1:1"], probe_intervall=1.0)


def test_no_node_available_is_a_graceful_error_and_an_httpx_connect_error() -> None:
    dead = f"http://127.0.0.1:{unused_port()}"
    with (
        httpx.Client(transport=PoolTransport([dead], watch=False)) as client,
        pytest.raises(NoNodeAvailable) as raised,
    ):
        client.get("http://orders/x")
    assert isinstance(raised.value, GracefulError)
    assert isinstance(raised.value, httpx.ConnectError)
    assert str(raised.value) == f"no node could take the request: {dead} (connection refused)"


def test_without_httpx_the_import_error_says_what_to_install() -> None:
    code = "import sys; sys.modules['httpx'] = None; import graceful.httpx"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    assert "pip install 'graceful-drain[httpx]'" in result.stderr


# -- HTTP/2: what a refusal says ----------------------------------------------------------------


def remote_protocol_error(event: object) -> httpx.RemoteProtocolError:
    """httpx's error as it reaches the transport: httpcore's, with h2's event, as the cause."""
    error = httpx.RemoteProtocolError(str(event))
    error.__cause__ = httpcore.RemoteProtocolError(event)
    return error


def stream_reset(code: h2.errors.ErrorCodes) -> h2.events.StreamReset:
    return h2.events.StreamReset(stream_id=3, error_code=code)


def test_a_stream_refused_by_http2_was_not_processed_and_may_go_to_the_next_node() -> None:
    refused = failure_of(remote_protocol_error(stream_reset(h2.errors.ErrorCodes.REFUSED_STREAM)))
    assert refused is Failure.NOT_PROCESSED
    assert may_resend(refused, "POST", [], with_idempotency_key=False)


@pytest.mark.parametrize(
    "event",
    [
        stream_reset(h2.errors.ErrorCodes.CANCEL),
        stream_reset(h2.errors.ErrorCodes.INTERNAL_ERROR),
        h2.events.ConnectionTerminated(),  # GOAWAY at or above this stream: maybe processed
        "Server disconnected without sending a response.",
    ],
    ids=["CANCEL", "INTERNAL_ERROR", "GOAWAY", "disconnected"],
)
def test_any_other_end_before_an_answer_is_closed_before_an_answer(event: object) -> None:
    closed = failure_of(remote_protocol_error(event))
    assert closed is Failure.CLOSED
    assert not may_resend(closed, "POST", [], with_idempotency_key=False)
    assert may_resend(closed, "GET", [], with_idempotency_key=False)


def test_the_public_names_are_sorted_and_complete() -> None:
    import graceful.httpx

    assert graceful.httpx.__all__ == sorted(graceful.httpx.__all__)
    # (pytest rewrites graceful's modules, a pytest plugin's package: "@py_builtins" and such)
    names = (name for name in vars(graceful.httpx) if name.isidentifier())
    public = {name for name in names if not name.startswith("_")}
    assert public - {"annotations"} == set(graceful.httpx.__all__)


# -- each node's own connection pool --------------------------------------------------------------


def test_a_node_that_left_rotation_gets_a_fresh_pool_and_its_old_one_closes_once_unused() -> None:
    """A node that restarted must not be sent a request over a connection of its old process
    (an idle HTTP/2 connection whose GOAWAY was never read looks usable)."""
    made: list[Any] = []

    class FakePool:
        def __init__(self) -> None:
            self.closed = False
            made.append(self)

    lanes = Lanes(FakePool)
    first = lanes.take("a")
    assert lanes.take("a") is first  # one pool per node
    assert lanes.retire("a") is None  # two sends still on it: closed later
    fresh = lanes.take("a")
    assert fresh is not first
    assert lanes.give_back(first) is None
    assert lanes.give_back(first) is first  # its last send is done: close it now
    assert lanes.give_back(fresh) is None  # the current one stays
    assert lanes.retire("a") is fresh  # unused: close it at once
    assert lanes.retire("a") is None
    assert lanes.drain_all() == []
