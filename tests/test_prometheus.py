"""graceful.prometheus: what a scrape reports, read from the lifecycle at scrape time."""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from collections.abc import Iterable
from wsgiref.util import setup_testing_defaults

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import graceful
import graceful.prometheus
from graceful import Config, Lifecycle, Phase
from graceful._core.types import Environ, Message, Receive, Scope, Send, StartResponse
from graceful._servers.node_shm import SharedNode, SlotView


@pytest.fixture
def registry(graceful_lifecycle: Lifecycle) -> CollectorRegistry:
    registry = CollectorRegistry()
    graceful.prometheus.register(registry, graceful_lifecycle)
    return registry


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def hello(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


def call_wsgi(app: graceful.WSGIMiddleware, path: str = "/") -> Iterable[bytes]:
    """Call the app and return its (not yet closed) response: it is in flight until close()."""
    environ: Environ = {"PATH_INFO": path}
    setup_testing_defaults(environ)
    return app(environ, lambda status, headers, exc_info=None: lambda data: None)


def close(result: Iterable[bytes]) -> None:
    closer = getattr(result, "close", None)
    if closer is not None:
        closer()


def test_phase_gauge_is_one_for_the_current_phase_only(
    graceful_lifecycle: Lifecycle, registry: CollectorRegistry
) -> None:
    graceful_lifecycle.mark_ready()
    assert value(registry, "graceful_phase", phase="serving") == 1
    graceful_lifecycle.drain()
    phases = {phase.value: value(registry, "graceful_phase", phase=phase.value) for phase in Phase}
    assert phases == {p.value: (1.0 if p is Phase.DRAINING else 0.0) for p in Phase}
    graceful_lifecycle.resume()
    assert value(registry, "graceful_phase", phase="serving") == 1
    assert value(registry, "graceful_phase", phase="draining") == 0


def test_inflight_gauge_counts_requests_until_their_response_is_closed(
    graceful_lifecycle: Lifecycle, registry: CollectorRegistry
) -> None:
    app = graceful.WSGIMiddleware(hello, graceful_lifecycle)
    open_responses = [call_wsgi(app) for _ in range(3)]
    assert value(registry, "graceful_inflight") == 3
    assert value(registry, "graceful_inflight_by_worker", pid=str(os.getpid())) == 3
    for result in open_responses:
        close(result)
    assert value(registry, "graceful_inflight") == 0
    with graceful_lifecycle.hold("export"):
        assert value(registry, "graceful_inflight") == 1


def test_inflight_gauge_is_the_node_total_over_the_shared_worker_slots(
    graceful_lifecycle: Lifecycle, registry: CollectorRegistry
) -> None:
    shared = SharedNode(slots=4)
    mine, other = shared.claim(), shared.claim()
    assert mine is not None and other is not None
    graceful_lifecycle.node = SlotView(shared, mine)
    elsewhere = Lifecycle(Config())  # another worker: 2 in flight, 5 served while draining
    for _ in range(2):
        elsewhere.requests.begin("GET", "/slow", 100.0)
    elsewhere.served_while_draining = 5
    shared.publish(other, elsewhere, pid=4242)
    app = graceful.WSGIMiddleware(hello, graceful_lifecycle)
    result = call_wsgi(app)
    assert value(registry, "graceful_inflight") == 3
    assert value(registry, "graceful_inflight_by_worker", pid="4242") == 2
    assert value(registry, "graceful_inflight_by_worker", pid=str(os.getpid())) == 1
    # The other worker served 5 requests while draining; they count on any worker's scrape.
    assert value(registry, "graceful_requests_while_draining_total") == 5
    close(result)
    shared.release(other)  # the master, once that worker has exited
    assert value(registry, "graceful_inflight") == 0
    assert value(registry, "graceful_inflight_by_worker", pid="4242") is None
    # A counter never goes down: the exited worker's 5 stay in the node's total.
    assert value(registry, "graceful_requests_while_draining_total") == 5


def test_drains_counter_counts_each_drain_once(
    graceful_lifecycle: Lifecycle, registry: CollectorRegistry
) -> None:
    graceful_lifecycle.mark_ready()
    assert value(registry, "graceful_drains_total") == 0
    graceful_lifecycle.drain()
    graceful_lifecycle.drain()  # repeating a drain is no new drain
    graceful_lifecycle.resume()
    graceful_lifecycle.drain()
    assert value(registry, "graceful_drains_total") == 2


def test_wsgi_requests_are_counted_only_when_they_arrive_while_draining(
    graceful_lifecycle: Lifecycle, registry: CollectorRegistry
) -> None:
    app = graceful.WSGIMiddleware(hello, graceful_lifecycle)
    close(call_wsgi(app))
    assert value(registry, "graceful_requests_while_draining_total") == 0
    graceful_lifecycle.drain()
    for _ in range(2):
        close(call_wsgi(app))
    close(call_wsgi(app, "/readyz"))  # probes are not requests
    graceful_lifecycle.resume()
    close(call_wsgi(app))
    assert value(registry, "graceful_requests_while_draining_total") == 2


def test_asgi_requests_are_counted_only_when_they_arrive_while_draining(
    graceful_lifecycle: Lifecycle, registry: CollectorRegistry
) -> None:
    async def hello_asgi(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"hello"})

    app = graceful.ASGIMiddleware(hello_asgi, graceful_lifecycle)

    async def call() -> None:
        async def receive() -> Message:
            return {"type": "http.request", "body": b""}

        async def send(message: Message) -> None:
            pass

        scope: Scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
        await app(scope, receive, send)

    async def scenario() -> None:
        await call()
        graceful_lifecycle.drain()
        await call()
        await call()

    asyncio.run(scenario())
    assert value(registry, "graceful_requests_while_draining_total") == 2


def test_the_exposition_names_every_metric_with_help_text(registry: CollectorRegistry) -> None:
    text = generate_latest(registry).decode()
    for name in (
        "graceful_phase",
        "graceful_inflight",
        "graceful_inflight_by_worker",
        "graceful_websockets",
        "graceful_drains_total",
        "graceful_requests_while_draining_total",
    ):
        assert f"\n{name}" in text or text.startswith(name), name
    assert "# HELP graceful_inflight Requests and held work in flight on the node" in text


def test_without_a_lifecycle_the_collector_reads_the_process_wide_one_at_each_scrape(
    graceful_lifecycle: Lifecycle,
) -> None:
    registry = CollectorRegistry()
    graceful.prometheus.register(registry)
    assert value(registry, "graceful_phase", phase="starting") == 1
    second = Lifecycle(Config(delay=1.0))
    second.mark_ready()
    graceful.set_lifecycle(second)  # the plugin's fixture puts the previous one back after
    assert value(registry, "graceful_phase", phase="serving") == 1


def test_import_without_prometheus_client_names_the_package_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "graceful.prometheus")
    with pytest.raises(ImportError, match=r"pip install 'graceful-drain\[prometheus\]'"):
        importlib.import_module("graceful.prometheus")
