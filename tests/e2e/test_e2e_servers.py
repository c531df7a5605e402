"""Real servers (uvicorn, gunicorn sync and gthread) drained and resumed with the command line.

Each test starts the server on 127.0.0.1 with the middleware in the app and GRACEFUL_TOKEN in its
environment, polls ``/readyz`` until it answers 200, then drives it with
``python -m graceful.cli`` and checks the probes and the app from outside.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

if TYPE_CHECKING:
    from conftest import Proc, Spawn, WaitUntil

pytestmark = pytest.mark.e2e

APPS = Path(__file__).parent / "apps"
TOKEN = "e2e-Secret-7f3a-0042"
DELAY = 0.5
SERVERS = ("uvicorn", "gunicorn-sync", "gunicorn-gthread")


def server_argv(server: str, port: int) -> list[str]:
    if server == "uvicorn":
        return [
            *(sys.executable, "-m", "uvicorn", "e2e_asgi_app:app", "--app-dir", str(APPS)),
            *("--host", "127.0.0.1", "--port", str(port), "--lifespan", "on"),
            *("--log-level", "warning"),
        ]
    worker = server.removeprefix("gunicorn-")
    return [
        *(sys.executable, "-m", "gunicorn", "--chdir", str(APPS), "e2e_wsgi_app:app"),
        *("--bind", f"127.0.0.1:{port}", "--workers", "1", "--worker-class", worker),
        # More than one thread would turn the sync worker into gthread.
        *("--threads", "4" if worker == "gthread" else "1"),
        *("--graceful-timeout", "3", "--log-level", "warning"),
    ]


def get(url: str, params: dict[str, str] | None = None) -> requests.Response:
    return requests.get(url, params=params, timeout=10)


def cli(*args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "NO_PROXY": "127.0.0.1"}
    if token is not None:
        env["GRACEFUL_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "graceful.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def start_server(spawn: Spawn, wait_until: WaitUntil, server: str, port: int) -> tuple[Proc, str]:
    env = {"GRACEFUL_TOKEN": TOKEN, "GRACEFUL_DELAY": str(DELAY), "GRACEFUL_DRAIN_TIMEOUT": "10"}
    proc = spawn(server_argv(server, port), env=env, name=server)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if not proc.alive():
            pytest.fail(f"{server} exited with {proc.popen.returncode}:\n{proc.output()}")
        return get(url + "/readyz").status_code == 200

    wait_until(ready, timeout=30, message=lambda: f"{server} ready; output:\n{proc.output()}")
    return proc, url


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert result.stderr == ""
    assert TOKEN not in result.stdout
    return result.stdout


@pytest.mark.parametrize("server", SERVERS)
def test_cli_drain_fails_readiness_keeps_serving_and_resume_gives_traffic_back(
    server: str, spawn: Spawn, wait_until: WaitUntil, free_port: int
) -> None:
    proc, url = start_server(spawn, wait_until, server, free_port)

    assert f"{url} phase=serving inflight=0" in ok(cli("status", url))
    assert "phase=draining" in ok(cli("drain", url))

    readyz = get(url + "/readyz")
    assert readyz.status_code == 503
    assert readyz.headers["Content-Type"] == "application/health+json"
    assert readyz.json()["status"] == "fail"
    assert readyz.json()["output"] in ("draining", "drained")
    livez = get(url + "/livez")
    assert (livez.status_code, livez.json()["status"]) == (200, "pass")
    served = get(url + "/hello")
    assert (served.status_code, served.text) == (200, "hello from /hello\n")
    assert served.headers["Graceful-State"] == "draining"
    if server == "uvicorn":
        assert served.headers["Connection"] == "close"

    assert ok(cli("wait", url, "--for", "drained", "--timeout", "20")).strip() == f"{url} drained"
    readyz = get(url + "/readyz")
    assert (readyz.status_code, readyz.json()["output"]) == (503, "drained")
    assert get(url + "/livez").status_code == 200
    assert get(url + "/hello").headers["Graceful-State"] == "draining"

    assert "phase=serving" in ok(cli("resume", url))
    readyz = get(url + "/readyz")
    assert (readyz.status_code, readyz.json()["status"]) == (200, "pass")
    assert "Graceful-State" not in get(url + "/hello").headers
    assert ok(cli("wait", url, "--for", "ready", "--timeout", "20")).strip() == f"{url} ready"
    assert proc.alive()


@pytest.mark.parametrize("server", SERVERS)
def test_cli_drain_wait_returns_once_drained_after_the_delay(
    server: str, spawn: Spawn, wait_until: WaitUntil, free_port: int
) -> None:
    _, url = start_server(spawn, wait_until, server, free_port)

    started = time.monotonic()
    out = ok(cli("drain", url, "--wait", "--timeout", "20"))
    elapsed = time.monotonic() - started

    assert "phase=drained inflight=0" in out
    assert elapsed >= DELAY * 0.9  # the delay is served before the node counts as drained
    assert get(url + "/readyz").json()["output"] == "drained"


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn-gthread"])
def test_cli_drain_wait_waits_for_a_request_in_flight(
    server: str, spawn: Spawn, wait_until: WaitUntil, free_port: int
) -> None:
    _, url = start_server(spawn, wait_until, server, free_port)
    slow: dict[str, object] = {}

    def slow_request() -> None:
        response = get(url + "/slow", params={"seconds": "2"})
        slow.update(done=time.monotonic(), status=response.status_code)

    thread = threading.Thread(target=slow_request, daemon=True)
    thread.start()
    try:
        wait_until(
            lambda: "inflight=1" in ok(cli("status", url)), message="the slow request in flight"
        )
        out = ok(cli("drain", url, "--wait", "--timeout", "20"))
        drain_returned = time.monotonic()
    finally:
        thread.join(15)

    assert "phase=drained inflight=0" in out
    assert slow["status"] == 200
    assert isinstance(slow["done"], float)
    assert slow["done"] <= drain_returned  # the drain waited for it


def test_control_routes_refuse_a_wrong_token_and_change_nothing(
    spawn: Spawn, wait_until: WaitUntil, free_port: int
) -> None:
    _, url = start_server(spawn, wait_until, "uvicorn", free_port)

    wrong = cli("drain", url, token="not-the-token")

    assert (wrong.returncode, wrong.stdout) == (4, "")
    assert "401" in wrong.stderr
    assert "not-the-token" not in wrong.stderr
    assert get(url + "/readyz").status_code == 200
    assert "phase=serving" in ok(cli("status", url))
