"""A stop cannot be undone, a drained node stops at once, and a drain is logged: real servers.

Real gunicorn (sync and gthread, ``-c python:graceful.gunicorn``) and plain uvicorn (the ASGI
middleware in the app) on 127.0.0.1, serving ``tests/e2e/apps/load_app.py``:

- SIGTERM with a drain file in place, then the file removed and ``POST /-/graceful/resume``
  with a valid token: the resume answers 409, ``/readyz`` stays 503 on every worker, a 6 s
  request in flight gets its whole answer, the server exits 0;
- a node drained over the control route (as ``graceful rollout`` does) stops at once on SIGTERM
  instead of waiting the delay again;
- the server's own log shows the drain, one line per step, in order.
"""

from __future__ import annotations

import http.client
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pytest
import requests

if TYPE_CHECKING:
    from conftest import Proc, Spawn, WaitUntil

pytestmark = pytest.mark.e2e

APPS = Path(__file__).parent / "apps"
TOKEN = "final-stop-e2e-Token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SERVERS = ("uvicorn", "gunicorn-sync", "gunicorn-gthread")
GUNICORN_WORKERS = 3


@dataclass
class Node:
    proc: Proc
    url: str
    port: int
    workers: int


class StartNode(Protocol):
    def __call__(self, server: str, env: dict[str, str]) -> Node: ...


def argv_for(server: str, port: int) -> list[str]:
    if server == "uvicorn":
        return [
            *(sys.executable, "-m", "uvicorn", "load_app:asgi_app", "--app-dir", str(APPS)),
            *("--host", "127.0.0.1", "--port", str(port)),
        ]
    worker = server.removeprefix("gunicorn-")
    return [
        *(sys.executable, "-m", "gunicorn", "-c", "python:graceful.gunicorn"),
        *("--bind", f"127.0.0.1:{port}", "--workers", str(GUNICORN_WORKERS)),
        *("--chdir", str(APPS), "-k", worker, "--threads", "4" if worker == "gthread" else "1"),
        *("--graceful-timeout", "20", "load_app:wsgi_app"),
    ]


@pytest.fixture
def start_node(spawn: Spawn, tmp_path: Path, free_port: int, wait_until: WaitUntil) -> StartNode:
    def start(server: str, env: dict[str, str]) -> Node:
        record_dir = tmp_path / "record"
        record_dir.mkdir(exist_ok=True)
        settings = {"GRACEFUL_TOKEN": TOKEN, "LOAD_RECORD_DIR": str(record_dir), **env}
        proc = spawn(argv_for(server, free_port), env=settings, name=server)
        workers = 1 if server == "uvicorn" else GUNICORN_WORKERS
        node = Node(proc, f"http://127.0.0.1:{free_port}", free_port, workers)

        def up() -> bool:
            if not proc.alive():
                pytest.fail(f"{server} exited with {proc.popen.returncode}:\n{proc.output()}")
            if server == "uvicorn" and "Application startup complete." not in proc.output():
                return False  # the middleware takes over SIGTERM at lifespan start-up
            by_worker = _status(node)["inflight_by_worker"]
            return isinstance(by_worker, dict) and len(by_worker) == workers

        wait_until(up, timeout=30, message=lambda: f"{server} up:\n{proc.output()}")
        return node

    return start


def _status(node: Node) -> dict[str, object]:
    response = requests.get(node.url + "/-/graceful/status", headers=AUTH, timeout=5)
    response.raise_for_status()
    status: dict[str, object] = response.json()
    return status


def _readyz(node: Node) -> int:
    return requests.get(node.url + "/readyz", timeout=5).status_code


class Slow(threading.Thread):
    """``GET /slow?seconds=N`` on its own connection; ``status`` and ``body`` once answered."""

    def __init__(self, node: Node, seconds: float) -> None:
        super().__init__(daemon=True)
        self.connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=60)
        self.connection.request("GET", f"/slow?seconds={seconds:g}")  # written before we go on
        self.status = 0
        self.body = b""
        self.error: str | None = None
        self.start()

    def run(self) -> None:
        try:
            response = self.connection.getresponse()
            self.status, self.body = response.status, response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.connection.close()

    def outcome(self) -> tuple[int, bytes, str | None]:
        self.join(60)
        return self.status, self.body, self.error


# -- item 4: once a stop has begun it cannot be undone ---------------------------------------


@pytest.mark.parametrize("server", SERVERS)
def test_removing_the_drain_file_and_resuming_during_a_sigterm_drain_change_nothing(
    start_node: StartNode, server: str, tmp_path: Path, wait_until: WaitUntil
) -> None:
    drain_file = tmp_path / "drain"
    drain_file.touch()
    node = start_node(
        server,
        {
            "GRACEFUL_DRAIN_FILE": str(drain_file),
            "GRACEFUL_DELAY": "1",
            "GRACEFUL_DRAIN_TIMEOUT": "30",
        },
    )
    assert _readyz(node) == 503  # the file drains the node from the first probe
    slow = Slow(node, 6.0)
    wait_until(lambda: _status(node)["inflight"] == 1, message="the 6 s request in flight")

    node.proc.send_signal(signal.SIGTERM)
    wait_until(
        lambda: _status(node)["final"] is True,
        timeout=10,
        message=lambda: f"the SIGTERM drain under way:\n{node.proc.output()}",
    )
    drain_file.unlink()
    resumed = requests.post(node.url + "/-/graceful/resume", headers=AUTH, timeout=5)
    assert resumed.status_code == 409, resumed.text
    body = resumed.json()
    assert body["phase"] in ("draining", "drained", "stopping"), body
    assert "stop" in body["output"], body
    # Fresh connections land on every worker; none turns ready again.
    answers = [_readyz(node) for _ in range(10 * node.workers)]
    assert set(answers) == {503}, answers

    status, payload, error = slow.outcome()
    assert (status, payload, error) == (200, b"slept 6\n", None), node.proc.output()
    assert node.proc.wait(30) == 0, node.proc.output()
    assert "drain timeout" not in node.proc.output()


# -- item 18: a node already drained stops at once -------------------------------------------


@pytest.mark.parametrize("server", SERVERS)
def test_a_node_drained_over_the_control_route_stops_at_once_on_sigterm(
    start_node: StartNode, server: str
) -> None:
    delay = 6.0
    node = start_node(server, {"GRACEFUL_DELAY": str(delay), "GRACEFUL_DRAIN_TIMEOUT": "30"})
    drained = requests.post(node.url + "/-/graceful/drain?wait=1", headers=AUTH, timeout=30)
    assert (drained.status_code, drained.json()["phase"]) == (200, "drained"), drained.text
    sent = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(30) == 0, node.proc.output()
    # Waiting the delay again takes `delay` at least; a stop that joins the drain that is
    # already over takes only the server's own stop.
    took = time.monotonic() - sent
    assert took < delay, (took, node.proc.output())


# -- item 19: the drain in the server's log --------------------------------------------------


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn-gthread"])
def test_the_servers_log_shows_each_step_of_a_sigterm_drain_in_order(
    start_node: StartNode, server: str, wait_until: WaitUntil
) -> None:
    node = start_node(server, {"GRACEFUL_DELAY": "1", "GRACEFUL_DRAIN_TIMEOUT": "30"})
    slow = Slow(node, 2.0)
    wait_until(lambda: _status(node)["inflight"] == 1, message="the request in flight")
    node.proc.send_signal(signal.SIGTERM)
    assert slow.outcome()[:2] == (200, b"slept 2\n")
    assert node.proc.wait(30) == 0
    log = node.proc.output()
    steps = [
        "phase serving -> draining (SIGTERM), 1 in flight; drain started",
        "delay over (1s): 1 in flight, waiting up to 30s for it",
        "phase draining -> drained (drained), 0 in flight",
        "phase drained -> stopping (SIGTERM: drained)",
    ]
    positions = [log.find(step) for step in steps]
    assert -1 not in positions and positions == sorted(positions), (positions, log)
    assert TOKEN not in log
    if server.startswith("gunicorn"):
        assert "[INFO] phase serving -> draining (SIGTERM)" in log, log


# -- a worker's own stop ----------------------------------------------------------------------


def test_a_uvicorn_worker_recycled_at_max_requests_leaves_the_node_ready(
    spawn: Spawn, free_port: int, tmp_path: Path, wait_until: WaitUntil
) -> None:
    argv = [
        *(sys.executable, "-m", "gunicorn", "-c", "python:graceful.gunicorn"),
        *("--bind", f"127.0.0.1:{free_port}", "--workers", "2", "--chdir", str(APPS)),
        *("-k", "uvicorn_worker.UvicornWorker", "--max-requests", "3", "load_app:asgi_app"),
    ]
    proc = spawn(argv, env={"LOAD_RECORD_DIR": str(tmp_path)}, name="gunicorn-uvicorn")
    url = f"http://127.0.0.1:{free_port}"
    wait_until(lambda: requests.get(url + "/readyz", timeout=2).status_code == 200, timeout=30)
    for _ in range(12):  # every worker reaches max_requests at least once
        assert requests.get(url + "/ping", timeout=10).status_code == 200
    wait_until(
        lambda: proc.output().count("Booting worker") >= 3,
        timeout=30,
        message=lambda: f"a worker recycled:\n{proc.output()}",
    )
    answers, resets = _readyz_answers(url, 8)
    assert set(answers) == {"serving"}, (answers, resets)


def _readyz_answers(url: str, count: int) -> tuple[list[str], int]:
    """``count`` answers of /readyz, and how many connections were reset on the way. The probes
    recycle workers too (max-requests 3), and uvicorn's own stop closes a connection it has
    just accepted: a reset is no answer, neither ready nor not."""
    answers: list[str] = []
    resets = 0
    while len(answers) < count:
        try:
            answers.append(requests.get(url + "/readyz", timeout=10).json()["output"])
        except requests.ConnectionError:
            resets += 1
            if resets > 3 * count:
                raise
    return answers, resets
