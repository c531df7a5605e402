"""Daphne's plain command with graceful's middleware in the app: SIGTERM drains.

Real processes on 127.0.0.1: ``daphne load_app:asgi_app`` (``tests/e2e/apps/load_app.py``);
Daphne serves in one process (it has no workers), which gets the signal as a container runtime
sends it. Also Daphne started from Python after graceful was imported
(``apps/daphne_embedded.py``), where the middleware links at its first request. The control is
the same command serving the app without the middleware (``asgi_routes``): Daphne stops at
once, so readiness never fails with 503.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pytest
import requests
from drain_harness import (
    Node,
    check_control,
    check_drain_under_load,
    check_goodbye,
    check_quick_stop,
)

if TYPE_CHECKING:
    from conftest import Spawn, WaitUntil

pytest.importorskip("daphne", reason="pip install 'graceful-drain[daphne]'")

pytestmark = pytest.mark.e2e

APPS = Path(__file__).parent / "apps"
DELAY = 1.0
TOKEN = "daphne-e2e-Token-5c2"


class StartNode(Protocol):
    def __call__(self, kind: str = ...) -> Node: ...


@pytest.fixture
def start_node(spawn: Spawn, tmp_path: Path, free_port: int, wait_until: WaitUntil) -> StartNode:
    def start(kind: str = "command") -> Node:
        record_dir = tmp_path / f"record-{time.monotonic_ns()}"
        record_dir.mkdir()
        env = {
            "GRACEFUL_DELAY": str(DELAY),
            "GRACEFUL_DRAIN_TIMEOUT": "5",
            "LOAD_RECORD_DIR": str(record_dir),
            "GRACEFUL_TOKEN": TOKEN,
            "PYTHONPATH": str(APPS),
        }
        if kind == "embedded":
            argv = [sys.executable, str(APPS / "daphne_embedded.py"), str(free_port)]
        else:
            app = "load_app:asgi_routes" if kind == "control" else "load_app:asgi_app"
            argv = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(free_port), app]
        proc = spawn(argv, env=env, cwd=APPS, name=f"daphne-{kind}")
        node = Node(proc, f"http://127.0.0.1:{free_port}", free_port, record_dir)

        def ready() -> bool:
            if not proc.alive():
                pytest.fail(f"daphne exited with {proc.popen.returncode}:\n{proc.output()}")
            # /ping first: the embedded node links to the reactor at its first request (and
            # logs nothing: Daphne's command line sets up the logging).
            try:
                ping = requests.get(node.url + "/ping", timeout=5)
            except requests.ConnectionError:
                return False  # not listening yet
            path = "/ping" if kind == "control" else "/readyz"
            return ping.status_code == 200 and requests.get(node.url + path, timeout=5).ok

        wait_until(ready, timeout=30, message=lambda: f"daphne ready:\n{proc.output()}")
        return node

    return start


@pytest.mark.parametrize("kind", ["command", "embedded"])
def test_sigterm_under_load_loses_nothing_and_exits_zero(start_node: StartNode, kind: str) -> None:
    node = start_node(kind)

    check_drain_under_load(node, DELAY)  # with a websocket and an event stream open
    if kind == "command":
        assert "graceful: SIGTERM drains this Daphne server" in node.proc.output()


def test_without_the_library_daphne_stops_at_once(start_node: StartNode) -> None:
    """The control: the same command and load, the app without the middleware."""
    check_control(start_node("control"), DELAY)


def test_sigint_fails_readiness_at_once_and_stops_without_the_delay_after_in_flight_work(
    start_node: StartNode,
) -> None:
    check_quick_stop(start_node(), TOKEN, DELAY)


def test_websocket_gets_1012_and_event_stream_ends_at_the_end_of_the_delay(
    start_node: StartNode,
) -> None:
    check_goodbye(start_node(), DELAY)
