"""Granian's plain command with graceful's middleware in the app: SIGTERM drains.

Real processes on 127.0.0.1: ``granian --interface asgi|wsgi load_app:asgi_app|wsgi_app``
(``tests/e2e/apps/load_app.py``), one worker (Granian's default) and ``--workers 2``; the
signal goes to Granian's main process, as a container runtime sends it. The control is the same
command serving the app without the middleware (``asgi_routes``, ``wsgi_routes``): Granian
closes its listener at once, so readiness never fails with 503 and requests fail.
"""

from __future__ import annotations

import signal
import struct
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pytest
import requests
from drain_harness import (
    EventStream,
    Node,
    Slow,
    assert_livez_held,
    assert_lossless,
    inflight,
    probe_readyz_after_signal,
    sigterm_under_load,
)
from ws_client import WebSocket

if TYPE_CHECKING:
    from conftest import Spawn, WaitUntil

pytest.importorskip("granian", reason="pip install 'graceful-drain[granian]'")

pytestmark = pytest.mark.e2e

APPS = Path(__file__).parent / "apps"
DELAY = 1.0
TOKEN = "granian-e2e-Token-3f9"
KINDS = {
    "asgi": ("asgi", 1),
    "asgi-workers": ("asgi", 2),
    "wsgi": ("wsgi", 1),
    "wsgi-workers": ("wsgi", 2),
}


class StartNode(Protocol):
    def __call__(self, kind: str = ..., *, graceful: bool = ...) -> Node: ...


@pytest.fixture
def start_node(spawn: Spawn, tmp_path: Path, free_port: int, wait_until: WaitUntil) -> StartNode:
    def start(kind: str = "asgi", *, graceful: bool = True) -> Node:
        interface, workers = KINDS[kind]
        record_dir = tmp_path / f"record-{time.monotonic_ns()}"
        record_dir.mkdir()
        env = {
            "GRACEFUL_DELAY": str(DELAY),
            "GRACEFUL_DRAIN_TIMEOUT": "5",
            "LOAD_RECORD_DIR": str(record_dir),
            "GRACEFUL_TOKEN": TOKEN,
            "PYTHONPATH": str(APPS),
        }
        app = f"load_app:{interface}_{'app' if graceful else 'routes'}"
        argv = [sys.executable, "-m", "granian", "--interface", interface]
        argv += ["--host", "127.0.0.1", "--port", str(free_port), "--workers", str(workers), app]
        proc = spawn(argv, env=env, cwd=APPS, name=f"granian-{kind}")
        node = Node(proc, f"http://127.0.0.1:{free_port}", free_port, record_dir)

        def ready() -> bool:
            if not proc.alive():
                pytest.fail(f"{kind} exited with {proc.popen.returncode}:\n{proc.output()}")
            if proc.output().count("Started worker-") < workers:
                return False
            path = "/readyz" if graceful else "/ping"
            return requests.get(node.url + path, timeout=5).status_code == 200

        wait_until(ready, timeout=30, message=lambda: f"{kind} ready:\n{proc.output()}")
        return node

    return start


@pytest.mark.parametrize("kind", list(KINDS))
def test_sigterm_under_load_loses_nothing_and_exits_zero(start_node: StartNode, kind: str) -> None:
    node = start_node(kind)
    slow_seconds = 2.0

    report = sigterm_under_load(
        node.proc, node.url, node.record_dir, slow_requests=3, slow_seconds=slow_seconds
    )

    summary = report.summary()
    print(summary)
    assert_lossless(report)
    assert report.readyz_failed_with == "status 503", summary
    assert report.readyz_ok_after_failure == 0, summary
    # An upper bound: it includes up to one probe interval (100 ms) and the probe itself.
    assert report.readyz_reaction is not None and report.readyz_reaction < 0.3, summary
    assert report.livez_ok_until is not None and report.last_response_at is not None, summary
    assert report.livez_ok_until - report.signal_at >= DELAY, summary
    assert_livez_held(report)
    assert report.exit_code == 0, summary
    after_last = report.exit_after_last_response
    assert after_last is not None and 0 <= after_last < 1.0, summary
    after_signal = report.exit_after_signal
    assert after_signal is not None, summary
    assert slow_seconds * 0.8 <= after_signal <= DELAY + slow_seconds + 1.0, summary


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_without_the_library_granian_stops_at_once(start_node: StartNode, kind: str) -> None:
    """The control: the same command and load, the app without the middleware."""
    node = start_node(kind, graceful=False)

    report = sigterm_under_load(node.proc, node.url, node.record_dir, slow_requests=0)

    print(report.summary())
    assert report.readyz_failed_with != "status 503", report.summary()
    assert report.livez_ok_until is None or report.livez_ok_until - report.signal_at < DELAY


@pytest.mark.parametrize("kind", ["asgi-workers", "wsgi"])
def test_sigint_fails_readiness_at_once_and_stops_without_the_delay_after_in_flight_work(
    start_node: StartNode, kind: str, wait_until: WaitUntil
) -> None:
    node = start_node(kind)
    slow = Slow(node.port, 1.0)
    wait_until(lambda: inflight(node, TOKEN) >= 1, timeout=10, message="a request in flight")

    node.proc.send_signal(signal.SIGINT)
    sent = time.monotonic()

    first_fail, answers = probe_readyz_after_signal(node.url, sent, within=0.5, after_failure=3)
    assert first_fail is not None and first_fail < 0.2, (first_fail, answers)
    assert node.proc.wait(10) == 0
    assert time.monotonic() - sent < DELAY + 1.0  # no delay: only the request in flight
    slow.join(5)
    assert slow.status == 200, slow.error


def test_websocket_gets_1012_and_event_stream_ends_at_the_end_of_the_delay(
    start_node: StartNode,
) -> None:
    node = start_node("asgi")
    ws = WebSocket(node.port, "/ws")
    stream = EventStream(node.port)
    try:
        ws.send(0x1, b"hello")
        assert ws.receive() == (0x1, b"hello")
        sent = time.monotonic()

        node.proc.send_signal(signal.SIGTERM)

        opcode, payload = ws.receive()
        closed_after = time.monotonic() - sent
        ws.send(0x8, payload[:2])
    finally:
        ws.close()
    assert opcode == 0x8
    assert struct.unpack("!H", payload[:2])[0] == 1012
    assert DELAY * 0.9 <= closed_after < DELAY + 1.0
    stream.join(10)
    assert stream.error is None, stream.error
    assert stream.ended_at is not None and DELAY * 0.9 <= stream.ended_at - sent < DELAY + 1.0
    assert b"data: tick" in stream.body and stream.body.endswith(b"0\r\n\r\n"), stream.body[-80:]
    assert node.proc.wait(10) == 0
    assert len(node.records("ws")) == 1
    assert node.records("streams") == ["stream-ended"]
