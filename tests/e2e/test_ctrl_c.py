"""Ctrl-C in a terminal stops graceful's multi-worker commands without the delay and without
cutting what is in flight.

A terminal sends Ctrl-C's SIGINT to every process of its foreground group: the supervisor and
its workers alike. A supervisor that passed it on as well would give each worker a second
SIGINT, which stops at once. Real processes on 127.0.0.1, each the leader of a session whose
controlling terminal is a pseudo-terminal this test holds; ``^C`` is written to it, as a
keyboard would.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests
from drain_harness import Node, Slow, inflight

from graceful.testing import poll_until

if TYPE_CHECKING:
    from collections.abc import Iterator

    from conftest import Spawn, WaitUntil

pytestmark = pytest.mark.e2e

APPS = Path(__file__).parent / "apps"
DELAY = 3.0
TOKEN = "ctrl-c-e2e-Token-81f"
#: Run by the child, the leader of a new session: opening the terminal makes it the session's
#: controlling terminal (and the child's group its foreground group), then the server runs.
ON_TERMINAL = "import os, sys; os.open(sys.argv[1], os.O_RDWR); os.execv(sys.argv[2], sys.argv[2:])"
COMMANDS = {
    "uvicorn": ["-m", "graceful.uvicorn", "load_app:asgi_app", "--app-dir", str(APPS)],
    "hypercorn": ["-m", "graceful.hypercorn", "load_app_asgi:asgi_app"],
}
STARTED = {"uvicorn": "Application startup complete.", "hypercorn": "Running on"}


@pytest.fixture
def terminal() -> Iterator[tuple[int, str]]:
    """A pseudo-terminal: the fd of its master side, and the path of its slave side."""
    master, slave = os.openpty()
    try:
        yield master, os.ttyname(slave)
    finally:
        os.close(slave)
        os.close(master)


@pytest.mark.parametrize("server", list(COMMANDS))
def test_ctrl_c_reaches_each_worker_once_and_in_flight_work_finishes(
    server: str,
    terminal: tuple[int, str],
    spawn: Spawn,
    tmp_path: Path,
    free_port: int,
    wait_until: WaitUntil,
) -> None:
    if server == "hypercorn":
        pytest.importorskip("hypercorn", reason="pip install 'graceful-drain[hypercorn]'")
    master, tty = terminal
    command = [sys.executable, *COMMANDS[server], "--workers", "2"]
    command += (
        ["--host", "127.0.0.1", "--port", str(free_port)]
        if server == "uvicorn"
        else ["--bind", f"127.0.0.1:{free_port}"]
    )
    env = {
        "GRACEFUL_DELAY": str(DELAY),
        "GRACEFUL_DRAIN_TIMEOUT": "10",
        "GRACEFUL_TOKEN": TOKEN,
        "LOAD_RECORD_DIR": str(tmp_path),
        "PYTHONPATH": str(APPS),
    }
    proc = spawn([sys.executable, "-c", ON_TERMINAL, tty, *command], env=env, name=server)
    node = Node(proc, f"http://127.0.0.1:{free_port}", free_port, tmp_path)

    def ready() -> bool:
        if not proc.alive():
            pytest.fail(f"{server} exited with {proc.popen.returncode}:\n{proc.output()}")
        if proc.output().count(STARTED[server]) < 2:
            return False
        return requests.get(node.url + "/readyz", timeout=5).status_code == 200

    wait_until(ready, timeout=30, message=lambda: f"{server} ready:\n{proc.output()}")
    slow = Slow(free_port, 1.5)
    poll_until(lambda: inflight(node, TOKEN) >= 1, 10, message="a request in flight")

    os.write(master, b"\x03")  # Ctrl-C
    pressed = time.monotonic()

    assert proc.wait(DELAY + 10) == 0, proc.output()
    assert time.monotonic() - pressed < DELAY  # no delay: only the request in flight
    slow.join(5)
    assert slow.error is None and slow.status == 200, (slow.error, proc.output())
    assert "stopping at once" not in proc.output()  # no worker saw a second SIGINT
