"""graceful.grpc on real in-process gRPC servers (127.0.0.1, port 0), sync and asyncio.

The server side: in-flight RPCs counted (unary and server-streaming, until the stream ends),
the standard health service in step with the lifecycle (NOT_SERVING the moment a drain starts,
SERVING on resume), its ``Watch`` streams uncounted and ended at a stop, the control port, and
``serve`` itself under a SIGTERM. The client side: the channel's service config, and what gRPC
does with it (health checking routes around a draining node; only the listed methods retry).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import grpc.aio
import pytest
from conftest import wait_until
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import graceful
import graceful.grpc
from graceful._servers.grpc import _Stop, watches_of
from graceful.testing import http_status, poll_until_async

SERVICE = "test.Echo"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def new_lifecycle(**settings: float) -> graceful.Lifecycle:
    options: dict[str, float] = {"delay": 0.2, "drain_timeout": 5.0, **settings}
    return graceful.Lifecycle(graceful.Config(**options))  # type: ignore[arg-type]


class Gate:
    """Holds handlers until released (thread-safe); counts the calls that ran."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.ran = 0
        self.lock = threading.Lock()

    def mark(self) -> None:
        with self.lock:
            self.ran += 1


def sync_handlers(gate: Gate) -> grpc.GenericRpcHandler:
    def unary(request: bytes, context: Any) -> bytes:
        gate.mark()
        gate.open.wait(10)
        return b"ok " + request

    def stream(request: bytes, context: Any) -> Iterator[bytes]:
        gate.mark()
        yield b"first"
        gate.open.wait(10)
        yield b"last"

    def unavailable(request: bytes, context: Any) -> bytes:
        gate.mark()
        context.abort(grpc.StatusCode.UNAVAILABLE, "try another node")
        return b""  # never reached: abort raises

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Unavailable": grpc.unary_unary_rpc_method_handler(unavailable),
            "Idempotent": grpc.unary_unary_rpc_method_handler(unavailable),
        },
    )


class SyncNode:
    """A ``grpc.server`` with graceful's interceptor and health service, started."""

    def __init__(self, lifecycle: graceful.Lifecycle, gate: Gate | None = None) -> None:
        self.lifecycle = lifecycle
        self.gate = gate or Gate()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(8), interceptors=[graceful.grpc.Interceptor(lifecycle)]
        )
        self.server.add_generic_rpc_handlers([sync_handlers(self.gate)])
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.link = graceful.grpc.HealthLink(self.health, lifecycle)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self.server.start()
        lifecycle.mark_ready()

    def close(self) -> None:
        self.gate.open.set()
        self.link.close()
        self.server.stop(None)


@pytest.fixture
def node() -> Iterator[SyncNode]:
    made = SyncNode(new_lifecycle())
    try:
        yield made
    finally:
        made.close()


def rpc(channel: Any, name: str) -> Any:
    """The unary method ``name`` (raw bytes both ways)."""
    return channel.unary_unary(f"/{SERVICE}/{name}")


def streaming(channel: Any, name: str) -> Any:
    """The server-streaming method ``name`` (raw bytes both ways)."""
    return channel.unary_stream(f"/{SERVICE}/{name}")


def health_stub(channel: Any) -> Any:
    return health_pb2_grpc.HealthStub(channel)


#: The servicer context a direct call of ``HealthServicer.Check`` does without.
NO_CONTEXT: Any = None


def watch_statuses(channel: grpc.Channel, seen: list[int]) -> Callable[[], None]:
    """Watch the server's health in a thread, appending each status; returns a canceller."""
    stream = health_stub(channel).Watch(health_pb2.HealthCheckRequest(service=""))

    def read() -> None:
        try:
            for response in stream:
                seen.append(response.status)
        except grpc.RpcError:
            pass

    threading.Thread(target=read, daemon=True).start()
    return stream.cancel  # type: ignore[no-any-return]


# -- in-flight RPCs ----------------------------------------------------------------------------


def test_a_unary_rpc_is_in_flight_until_it_returns(node: SyncNode) -> None:
    with grpc.insecure_channel(node.address) as channel:
        call = rpc(channel, "Unary").future(b"1")
        wait_until(lambda: node.lifecycle.inflight == 1, 5)
        [(method, path, _age)] = node.lifecycle.stuck()
        assert (method, path) == ("GRPC", f"/{SERVICE}/Unary")
        node.gate.open.set()
        assert call.result(5) == b"ok 1"
    wait_until(lambda: node.lifecycle.inflight == 0, 5)


def test_a_server_stream_is_in_flight_until_its_response_stream_ends(node: SyncNode) -> None:
    with grpc.insecure_channel(node.address) as channel:
        responses = streaming(channel, "Stream")(b"")
        assert next(responses) == b"first"
        assert node.lifecycle.inflight == 1
        node.gate.open.set()
        assert list(responses) == [b"last"]
    wait_until(lambda: node.lifecycle.inflight == 0, 5)


def test_a_cancelled_stream_is_no_longer_in_flight(node: SyncNode) -> None:
    with grpc.insecure_channel(node.address) as channel:
        responses = streaming(channel, "Stream")(b"")
        assert next(responses) == b"first"
        assert node.lifecycle.inflight == 1
        responses.cancel()
        wait_until(lambda: node.lifecycle.inflight == 0, 5)


def test_health_watch_streams_are_not_counted(node: SyncNode) -> None:
    seen: list[int] = []
    with grpc.insecure_channel(node.address) as channel:
        cancel = watch_statuses(channel, seen)
        wait_until(lambda: seen == [SERVING], 5)
        assert node.lifecycle.inflight == 0
        assert len(watches_of(node.lifecycle)) == 1
        cancel()
    wait_until(lambda: len(watches_of(node.lifecycle)) == 0, 5)


# -- the health service ------------------------------------------------------------------------


def test_health_says_not_serving_the_moment_a_drain_starts_and_serving_on_resume(
    node: SyncNode,
) -> None:
    seen: list[int] = []
    with grpc.insecure_channel(node.address) as channel:
        cancel = watch_statuses(channel, seen)
        wait_until(lambda: seen == [SERVING], 5)
        node.lifecycle.drain("test")
        wait_until(lambda: seen == [SERVING, NOT_SERVING], 5)
        check = health_stub(channel).Check
        assert check(health_pb2.HealthCheckRequest(service="")).status == NOT_SERVING
        node.lifecycle.resume()
        wait_until(lambda: seen == [SERVING, NOT_SERVING, SERVING], 5)
        cancel()


def test_health_is_not_serving_while_starting() -> None:
    lifecycle = new_lifecycle()
    servicer = health.HealthServicer()
    link = graceful.grpc.HealthLink(servicer, lifecycle, services=("", SERVICE))
    try:
        for service in ("", SERVICE):
            request = health_pb2.HealthCheckRequest(service=service)
            assert servicer.Check(request, NO_CONTEXT).status == NOT_SERVING
        lifecycle.mark_ready()
        request = health_pb2.HealthCheckRequest(service=SERVICE)
        wait_until(lambda: servicer.Check(request, NO_CONTEXT).status == SERVING, 5)
    finally:
        link.close()


def test_an_asyncio_health_servicer_needs_the_servers_loop() -> None:
    with pytest.raises(TypeError, match="serve_async"):
        graceful.grpc.HealthLink(health.aio.HealthServicer(), new_lifecycle())


# -- the stop ----------------------------------------------------------------------------------


def test_the_stop_ends_health_watches_so_the_server_stops_without_waiting_its_grace(
    node: SyncNode,
) -> None:
    seen: list[int] = []
    with grpc.insecure_channel(node.address) as channel:
        watch_statuses(channel, seen)
        wait_until(lambda: seen == [SERVING], 5)
        node.lifecycle.stop("test")
        started = time.monotonic()
        _Stop(node.server, node.lifecycle).stop()  # grace: the whole drain timeout (5 s)
        assert not node.server.wait_for_termination(4)  # True: timed out
        assert time.monotonic() - started < 2


def test_the_stop_lets_an_rpc_still_running_finish_within_its_grace(node: SyncNode) -> None:
    with grpc.insecure_channel(node.address) as channel:
        call = rpc(channel, "Unary").future(b"late")
        wait_until(lambda: node.lifecycle.inflight == 1, 5)
        node.lifecycle.stop("test")
        _Stop(node.server, node.lifecycle).stop()  # GOAWAY; the call keeps running
        node.gate.open.set()
        assert call.result(5) == b"ok late"
    assert not node.server.wait_for_termination(4)


def test_the_stops_grace_is_what_is_left_of_the_drain_timeout() -> None:
    clock = graceful.testing.FakeClock()
    lifecycle = graceful.Lifecycle(graceful.Config(delay=1, drain_timeout=10), clock=clock)
    stop = _Stop(None, lifecycle)
    assert stop.grace() == 10  # no drain: all of it
    lifecycle.mark_ready()
    lifecycle.drain("test", final=True)
    clock.advance(4)
    assert stop.grace() == pytest.approx(7)
    stop.gave_up = lambda: True
    assert stop.grace() == 0


# -- the control port --------------------------------------------------------------------------


def test_the_control_port_answers_readyz_503_while_draining(node: SyncNode) -> None:
    control = graceful.grpc.ControlServer(node.lifecycle, 0, "127.0.0.1")
    try:
        assert http_status(control.port, "/readyz") == 200
        assert http_status(control.port, "/livez") == 200
        assert http_status(control.port, "/") == 404
        node.lifecycle.drain("test")
        assert http_status(control.port, "/readyz") == 503
        assert http_status(control.port, "/livez") == 200
    finally:
        control.close()


def post(port: int, path: str, token: str | None) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        connection.request("POST", path, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_the_control_port_s_drain_route_needs_the_token_and_turns_health_not_serving() -> None:
    token = "grpc-control-Token-7e3c1"
    made = SyncNode(graceful.Lifecycle(graceful.Config(delay=0.2, token=token)))
    control = graceful.grpc.ControlServer(made.lifecycle, 0, "127.0.0.1")
    try:
        with grpc.insecure_channel(made.address) as channel:
            check = health_stub(channel).Check
            request = health_pb2.HealthCheckRequest(service="")
            assert check(request).status == SERVING
            assert post(control.port, "/-/graceful/drain", None) == 401
            assert post(control.port, "/-/graceful/drain", "wrong-token-000000") == 401
            assert check(request).status == SERVING  # nothing changed
            assert post(control.port, "/-/graceful/drain", token) == 200
            wait_until(lambda: check(request).status == NOT_SERVING, 5)
            assert post(control.port, "/-/graceful/resume", token) == 200
            wait_until(lambda: check(request).status == SERVING, 5)
    finally:
        control.close()
        made.close()


def test_without_a_token_the_control_port_s_control_routes_are_off(node: SyncNode) -> None:
    control = graceful.grpc.ControlServer(node.lifecycle, 0, "127.0.0.1")
    try:
        assert post(control.port, "/-/graceful/drain", "any-token-at-all-00") == 404
        assert node.lifecycle.phase is graceful.Phase.SERVING
    finally:
        control.close()


# -- serve() under a signal --------------------------------------------------------------------


def test_serve_drains_on_sigterm_finishes_what_is_in_flight_and_returns() -> None:
    lifecycle = new_lifecycle(delay=0.3)
    gate = Gate()
    server = grpc.server(
        futures.ThreadPoolExecutor(4), interceptors=[graceful.grpc.Interceptor(lifecycle)]
    )
    server.add_generic_rpc_handlers([sync_handlers(gate)])
    port = server.add_insecure_port("127.0.0.1:0")
    outcome: dict[str, Any] = {}

    def client() -> None:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = rpc(channel, "Unary").future(b"x", wait_for_ready=True)
                wait_until(lambda: lifecycle.inflight == 1, 5)
                os.kill(os.getpid(), signal.SIGTERM)
                wait_until(lambda: lifecycle.phase is graceful.Phase.DRAINING, 5)
                gate.open.set()
                outcome["answer"] = call.result(5)
        finally:
            if "answer" not in outcome:  # failed: end serve() all the same
                server.stop(0)

    caller = threading.Thread(target=client, daemon=True)
    caller.start()
    graceful.grpc.serve(server, lifecycle=lifecycle)  # returns once the server has stopped
    caller.join(5)
    assert outcome == {"answer": b"ok x"}
    assert lifecycle.phase is graceful.Phase.STOPPED


# -- asyncio -----------------------------------------------------------------------------------


def aio_handlers(gate: asyncio.Event, ran: list[str]) -> grpc.GenericRpcHandler:
    async def unary(request: bytes, context: Any) -> bytes:
        ran.append("unary")
        await gate.wait()
        return b"ok " + request

    async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        ran.append("stream")
        yield b"first"
        await gate.wait()
        yield b"last"

    async def written(request: bytes, context: Any) -> None:
        await context.write(b"first")
        await gate.wait()
        await context.write(b"last")

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Written": grpc.unary_stream_rpc_method_handler(written),
        },
    )


async def aio_node(
    lifecycle: graceful.Lifecycle, gate: asyncio.Event, ran: list[str]
) -> tuple[grpc.aio.Server, Any, int]:
    server = grpc.aio.server(interceptors=[graceful.grpc.AsyncInterceptor(lifecycle)])
    server.add_generic_rpc_handlers([aio_handlers(gate, ran)])
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    lifecycle.mark_ready()
    return server, servicer, port


def test_asyncio_rpcs_are_in_flight_until_they_end() -> None:
    async def main() -> None:
        lifecycle, gate = new_lifecycle(), asyncio.Event()
        ran: list[str] = []
        server, _servicer, port = await aio_node(lifecycle, gate, ran)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                unary = asyncio.ensure_future(rpc(channel, "Unary")(b"1"))
                stream = streaming(channel, "Stream")(b"")
                written = streaming(channel, "Written")(b"")
                assert await stream.read() == b"first"
                assert await written.read() == b"first"
                await poll_until_async(lambda: lifecycle.inflight == 3, 5)
                gate.set()
                assert await unary == b"ok 1"
                assert await stream.read() == b"last"
                assert await written.read() == b"last"
                assert await stream.read() is grpc.aio.EOF
            await poll_until_async(lambda: lifecycle.inflight == 0, 5)
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_asyncio_health_flips_on_drain_and_resume_and_watches_end_at_the_stop() -> None:
    async def main() -> None:
        lifecycle, gate = new_lifecycle(), asyncio.Event()
        ran: list[str] = []
        server, servicer, port = await aio_node(lifecycle, gate, ran)
        link = graceful.grpc.HealthLink(servicer, lifecycle, loop=asyncio.get_running_loop())
        seen: list[int] = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                watch = health_stub(channel).Watch(health_pb2.HealthCheckRequest(service=""))

                async def read() -> None:
                    async for response in watch:
                        seen.append(response.status)

                reader = asyncio.ensure_future(read())
                await poll_until_async(lambda: seen == [SERVING], 5)
                assert lifecycle.inflight == 0
                lifecycle.drain("test")
                await poll_until_async(lambda: seen == [SERVING, NOT_SERVING], 5)
                lifecycle.resume()
                await poll_until_async(lambda: seen == [SERVING, NOT_SERVING, SERVING], 5)
                lifecycle.stop("test")
                started = time.monotonic()
                await _Stop(server, lifecycle).stop_async()  # grace: 5 s
                assert time.monotonic() - started < 2
                await asyncio.wait_for(reader, 2)  # the watch ended (status OK)
        finally:
            link.close()
            await server.stop(None)

    asyncio.run(main())


def test_serve_async_drains_on_sigterm_finishes_what_is_in_flight_and_returns() -> None:
    lifecycle = new_lifecycle(delay=0.3)
    outcome: dict[str, Any] = {}

    async def main() -> None:
        gate, ran = asyncio.Event(), list[str]()
        server = grpc.aio.server(interceptors=[graceful.grpc.AsyncInterceptor(lifecycle)])
        server.add_generic_rpc_handlers([aio_handlers(gate, ran)])
        port = server.add_insecure_port("127.0.0.1:0")

        async def client() -> None:
            try:
                async with graceful.grpc.aio_channel([f"127.0.0.1:{port}"]) as channel:
                    call = rpc(channel, "Unary")(b"x", wait_for_ready=True)
                    answer = asyncio.ensure_future(call)
                    await poll_until_async(lambda: lifecycle.inflight == 1, 5)
                    os.kill(os.getpid(), signal.SIGTERM)
                    await poll_until_async(lambda: lifecycle.phase is graceful.Phase.DRAINING, 5)
                    gate.set()
                    outcome["answer"] = await answer
            finally:
                if "answer" not in outcome:  # failed: end serve_async() all the same
                    await server.stop(0)

        caller = asyncio.ensure_future(client())
        await graceful.grpc.serve_async(server, lifecycle=lifecycle)
        await asyncio.wait_for(caller, 5)

    asyncio.run(main())
    assert outcome == {"answer": b"ok x"}
    assert lifecycle.phase is graceful.Phase.STOPPED


# -- the channel -------------------------------------------------------------------------------


def test_the_service_config_balances_round_robin_checks_health_and_retries_only_the_listed() -> (
    None
):
    config = graceful.grpc.service_config([f"/{SERVICE}/Idempotent", "/other.Service/*"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": ""}
    [method_config] = config["methodConfig"]
    assert method_config["name"] == [
        {"service": SERVICE, "method": "Idempotent"},
        {"service": "other.Service"},
    ]
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert "methodConfig" not in graceful.grpc.service_config()
    assert "healthCheckConfig" not in graceful.grpc.service_config(health_service=None)


def test_the_channel_targets_every_node_with_retries_on() -> None:
    from graceful._client.grpc import channel_options, target

    assert target(["10.0.0.5:50051", "10.0.0.6:50051"]) == "ipv4:10.0.0.5:50051,10.0.0.6:50051"
    assert target(["[::1]:50051"]) == "ipv6:[::1]:50051"
    assert target("dns:///orders:50051") == "dns:///orders:50051"
    options = dict(channel_options({}, [("grpc.max_reconnect_backoff_ms", 500)]))
    assert options["grpc.enable_retries"] == 1
    assert options["grpc.max_reconnect_backoff_ms"] == 500
    assert json.loads(options["grpc.service_config"]) == {}


@pytest.mark.parametrize(
    ("nodes", "methods", "match"),
    [
        (["orders:50051"], [], "dns:///orders:50051"),
        (["10.0.0.5"], [], "no port"),
        (["10.0.0.5:1", "[::1]:1"], [], "IPv4 and IPv6"),
        ([], [], "no nodes"),
        (["10.0.0.5:1"], ["Get"], "/package.Service/Method"),
    ],
)
def test_the_channel_refuses_what_it_cannot_use_saying_what_to_do(
    nodes: list[str], methods: list[str], match: str
) -> None:
    with pytest.raises(graceful.grpc.ChannelError, match=match):
        graceful.grpc.channel(nodes, idempotent_methods=methods)


def test_the_channel_refuses_to_switch_health_checking_off() -> None:
    with pytest.raises(graceful.grpc.ChannelError, match="inhibit_health_checking"):
        graceful.grpc.channel(["10.0.0.5:1"], options=[("grpc.inhibit_health_checking", 1)])


def test_a_non_idempotent_method_is_never_retried_after_it_may_have_run(node: SyncNode) -> None:
    idempotent = f"/{SERVICE}/Idempotent"
    with graceful.grpc.channel([node.address], idempotent_methods=[idempotent]) as channel:
        with pytest.raises(grpc.RpcError) as failed:
            rpc(channel, "Unavailable")(b"", timeout=5, wait_for_ready=True)
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
        assert node.gate.ran == 1  # ran once: never sent again
        with pytest.raises(grpc.RpcError):
            rpc(channel, "Idempotent")(b"", timeout=5)
        assert node.gate.ran == 1 + 5  # the listed method: retried up to max_attempts


def test_the_channel_leaves_a_draining_node_alone_and_comes_back_when_it_resumes() -> None:
    nodes = [SyncNode(new_lifecycle()) for _ in range(2)]
    for each in nodes:
        each.gate.open.set()
    try:
        with graceful.grpc.channel([n.address for n in nodes]) as channel:
            call = rpc(channel, "Unary")

            def spread() -> list[int]:
                before = [n.gate.ran for n in nodes]
                for _ in range(20):
                    call(b"", timeout=5, wait_for_ready=True)
                return [n.gate.ran - b for n, b in zip(nodes, before, strict=True)]

            wait_until(lambda: min(spread()) > 0, 10, message="both nodes taking calls")
            nodes[0].lifecycle.drain("test")
            wait_until(lambda: spread()[0] == 0, 5, message="the draining node left alone")
            assert spread() == [0, 20]
            nodes[0].lifecycle.resume()
            wait_until(lambda: min(spread()) > 0, 10, message="the resumed node used again")
    finally:
        for each in nodes:
            each.close()
