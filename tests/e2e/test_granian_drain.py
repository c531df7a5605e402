"""Granian's plain command with graceful's middleware in the app: SIGTERM drains.

Real processes on 127.0.0.1: ``granian --interface asgi|wsgi load_app:asgi_app|wsgi_app``
(``tests/e2e/apps/load_app.py``), one worker (Granian's default) and ``--workers 2``; the
signal goes to Granian's main process, as a container runtime sends it. The control is the same
command serving the app without the middleware (``asgi_routes``, ``wsgi_routes``): Granian
closes its listener at once, so readiness never fails with 503 and requests fail.
"""

from __future__ import annotations

import signal
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

    # ASGI: with a websocket and an event stream open
    workers = KINDS[kind][1]
    check_drain_under_load(
        node, DELAY, long_lived=kind.startswith("asgi"), own_listeners=workers > 1
    )


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_without_the_library_granian_stops_at_once(start_node: StartNode, kind: str) -> None:
    """The control: the same command and load, the app without the middleware."""
    check_control(start_node(kind, graceful=False), DELAY)


@pytest.mark.parametrize("kind", ["asgi-workers", "wsgi"])
def test_ctrl_c_fails_readiness_at_once_and_stops_without_the_delay_after_in_flight_work(
    start_node: StartNode, kind: str
) -> None:
    """Ctrl-C: SIGINT to the whole process group, workers included. (Granian's main process
    passes a SIGINT of its own on to the workers as SIGTERM, which drains: see the next test.)"""
    check_quick_stop(start_node(kind), TOKEN, DELAY, group=True)


def test_sigint_to_the_main_process_alone_drains_as_granian_passes_it_on_as_sigterm(
    start_node: StartNode,
) -> None:
    node = start_node("wsgi")
    node.proc.send_signal(signal.SIGINT)
    assert node.proc.wait(15) == 0
    output = node.proc.output()
    assert "phase serving -> draining (SIGTERM)" in output, output[-3000:]
    assert "delay over" in output, output[-3000:]


def test_websocket_gets_1012_and_event_stream_ends_at_the_end_of_the_delay(
    start_node: StartNode,
) -> None:
    node = start_node("asgi")
    check_goodbye(node, DELAY)
