"""One node, no balancer, restarted in place with ``graceful reload`` under load: gunicorn
(sync, gthread and uvicorn workers) and ``python -m graceful.uvicorn`` (one process, and
``--workers 2``).

Callers on 127.0.0.1 only: keep-alive ones (a ``requests.Session`` each) and ones that open a
new connection for every call (``http.client``), GETs and POSTs. The node is restarted in place
five times in a row, with new code each time (``/version``). Every call must end with its
answer: no refused or reset connection, no error status; the app's ledger shows every answered
POST ran exactly once, and no POST ran twice.

The naive restart of the same node (stop, then start on the same port) fails calls: the test
of the test. A deploy whose new code cannot start leaves the old master serving, and the
command exits 1.
"""

from __future__ import annotations

import dataclasses
import http.client
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pytest
import requests
from conftest import unused_port

from graceful._tools.reload import Process, read_pid

if TYPE_CHECKING:
    from conftest import Proc, Spawn, WaitUntil

pytestmark = pytest.mark.e2e

APPS = Path(__file__).parent / "apps"
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))
CALLERS = 16  # of each kind
# Bounds on the load, far beyond what a run needs: 32 callers make ~2,500 calls a second on a
# quiet machine, and a run of five restarts can take a minute on a busy one.
MAX_CALLS = 600_000
MAX_SECONDS = 240.0
TIMEOUT = 15.0

WORKERS = {
    "sync": ("--workers", "4", "reload_app:app"),
    "gthread": ("--workers", "2", "--threads", "8", "reload_app:app"),
    "uvicorn-worker": (
        *("--workers", "2", "--worker-class", "uvicorn_worker.UvicornWorker"),
        "reload_app:asgi_app",
    ),
    "uvicorn": (),  # python -m graceful.uvicorn, one process
    "uvicorn-supervisor": ("--workers", "2"),  # python -m graceful.uvicorn --workers 2
}


@dataclasses.dataclass
class Load:
    """Callers of both kinds; what went wrong, and the POSTs that were answered."""

    port: int
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    calls: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)
    acked: list[str] = dataclasses.field(default_factory=list)
    threads: list[threading.Thread] = dataclasses.field(default_factory=list)
    deadline: float = dataclasses.field(default_factory=lambda: time.monotonic() + MAX_SECONDS)

    def start(self) -> None:
        for number in range(CALLERS):
            for target in (self.keep_alive, self.new_connections):
                thread = threading.Thread(target=target, args=(number,), daemon=True)
                thread.start()
                self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(TIMEOUT + 5)
        assert not any(thread.is_alive() for thread in self.threads), "a caller never finished"

    def ticket(self) -> int | None:
        with self.lock:
            if self.stop.is_set() or not self.ticket_left():
                return None
            self.calls += 1
            return self.calls

    def record(self, order: str, method: str, status: int | None, error: str = "") -> None:
        with self.lock:
            if error or status not in (200, 201):
                self.failures.append(f"{method} {order}: {error or status}")
            elif method == "POST":
                self.acked.append(order)

    def keep_alive(self, number: int) -> None:
        with requests.Session() as session:
            session.trust_env = False
            while (call := self.ticket()) is not None:
                order, method = f"k{number}-{call}", "POST" if call % 2 else "GET"
                try:
                    if method == "POST":
                        answer = session.post(
                            self.url("/orders"), data={"id": order}, timeout=TIMEOUT
                        )
                    else:
                        answer = session.get(self.url("/ping"), timeout=TIMEOUT)
                    self.record(order, method, answer.status_code)
                except requests.RequestException as exc:
                    self.record(order, method, None, repr(exc))

    def new_connections(self, number: int) -> None:
        while (call := self.ticket()) is not None:
            order, method = f"n{number}-{call}", "POST" if call % 2 else "GET"
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
            try:
                if method == "POST":
                    body = f"id={order}"
                    headers = {"Content-Type": "application/x-www-form-urlencoded"}
                    connection.request("POST", "/orders", body=body, headers=headers)
                else:
                    connection.request("GET", "/ping")
                answer = connection.getresponse()
                answer.read()
                self.record(order, method, answer.status)
            except (OSError, http.client.HTTPException) as exc:
                self.record(order, method, None, repr(exc))
            finally:
                connection.close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def answered(self) -> int:
        with self.lock:
            return len(self.acked)

    def wait_for_more(self, wait_until: WaitUntil, more: int = 20) -> None:
        target = self.answered() + more
        wait_until(lambda: self.answered() >= target, timeout=30, message=self.progress)

    def progress(self) -> str:
        with self.lock:
            spent = "" if self.ticket_left() else " (the load's bound was reached: it stopped)"
            return (
                f"more answers{spent}: {self.calls} calls, {len(self.acked)} POSTs acknowledged, "
                f"{len(self.failures)} failed, the last: {self.failures[-3:]}"
            )

    def ticket_left(self) -> bool:
        """Within the load's bounds (called with the lock held)."""
        return self.calls < MAX_CALLS and time.monotonic() <= self.deadline


@dataclasses.dataclass
class Node:
    proc: Proc
    port: int
    pidfile: Path
    version_file: Path
    ledger: Path
    argv: list[str]
    env: dict[str, str]

    def version(self) -> str:
        return requests.get(f"http://127.0.0.1:{self.port}/version", timeout=TIMEOUT).text

    def master(self) -> int:
        pid = read_pid(self.pidfile)
        assert pid is not None, f"{self.pidfile} holds no pid"
        return pid

    def reload(self, version: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        self.version_file.write_text(version)
        command = [sys.executable, "-m", "graceful", "reload", str(self.pidfile)]
        done = subprocess.run(
            [*command, "--timeout", str(timeout)],
            capture_output=True,
            text=True,
            timeout=timeout + 90,
            check=False,
        )
        return done

    def ran(self) -> list[str]:
        lines: list[str] = []
        for path in self.ledger.glob("*.ran"):
            lines += path.read_text().split()
        return lines


class StartNode(Protocol):
    def __call__(self, workers: str, *, hooks: bool = ...) -> Node: ...


@pytest.fixture
def start_node(spawn: Spawn, tmp_path: Path, wait_until: WaitUntil) -> StartNode:
    """A gunicorn node with ``--pid``. The masters a reload starts stay in the first one's
    process group (gunicorn forks them): the harness ends the group at teardown."""

    def start(workers: str, *, hooks: bool = True) -> Node:
        port = unused_port()
        ledger = tmp_path / "ledger"
        ledger.mkdir(exist_ok=True)
        version_file, pidfile = tmp_path / "version", tmp_path / "gunicorn.pid"
        version_file.write_text("v0")
        env = {
            "RELOAD_VERSION_FILE": str(version_file),
            "LEDGER_DIR": str(ledger),
            "GRACEFUL_DELAY": "5",  # a balancer's delay: the hand-over must not wait it out
            "GRACEFUL_HANDOVER_DELAY": "0.5",
            "GRACEFUL_DRAIN_TIMEOUT": "20",
        }
        if workers.startswith("uvicorn") and workers != "uvicorn-worker":
            # graceful's runner: the pid file comes from the environment
            env["GRACEFUL_PID_FILE"] = str(pidfile)
            argv = [
                *(sys.executable, "-m", "graceful.uvicorn", "reload_app:asgi_app"),
                *("--app-dir", str(APPS), "--host", "127.0.0.1", "--port", str(port)),
                *("--no-access-log", *WORKERS[workers]),
            ]
        else:
            config = ("-c", "python:graceful.gunicorn") if hooks else ()
            argv = [
                *(GUNICORN, *config, "--chdir", str(APPS), "--bind", f"127.0.0.1:{port}"),
                *("--pid", str(pidfile), "--graceful-timeout", "20", *WORKERS[workers]),
            ]
        proc = spawn(argv, env=env, name=workers)
        node = Node(proc, port, pidfile, version_file, ledger, argv, env)
        wait_ready(node, proc, wait_until, hooks=hooks)
        return node

    return start


def wait_ready(node: Node, proc: Proc, wait_until: WaitUntil, *, hooks: bool = True) -> None:
    """Until ``proc`` says it is ready (``PIDFILE.ready``), or answers without the hooks."""

    def answering() -> bool:
        try:
            return node.version() != ""
        except requests.RequestException:
            return False

    wait_until(
        (lambda: read_pid(Path(f"{node.pidfile}.ready")) == proc.pid) if hooks else answering,
        timeout=30,
        message=lambda: f"gunicorn ready:\n{proc.output()}",
    )


def gone(pid: int) -> bool:
    process = Process.find(pid)
    return process is None or not process.alive()


@pytest.mark.parametrize("workers", list(WORKERS))
def test_five_in_place_restarts_under_load_lose_nothing_and_run_each_post_once(
    start_node: StartNode, workers: str, wait_until: WaitUntil
) -> None:
    node = start_node(workers)
    load = Load(node.port)
    load.start()
    try:
        wait_until(lambda: load.answered() >= 50, timeout=30, message="answers before")
        for release in range(1, 6):
            old = node.master()
            done = node.reload(f"v{release}")
            assert done.returncode == 0, done.stdout + done.stderr
            new = node.master()
            assert new != old
            assert gone(old)
            assert node.version() == f"v{release}"
            load.wait_for_more(wait_until)  # answers from the new code before the next
    finally:
        load.finish()
    assert not load.failures, load.failures[:10]
    ran = node.ran()
    assert len(ran) == len(set(ran)), "a POST ran twice"
    assert set(load.acked) <= set(ran)
    # Each old generation handed over (handover_delay), rather than draining for the delay.
    successor = {"uvicorn": "runner", "uvicorn-supervisor": "supervisor"}.get(workers, "master")
    handed = node.proc.output().count(f"in-place restart: the new {successor} (pid")
    assert handed >= 5, node.proc.output()[-3000:]


def test_a_naive_restart_of_the_same_node_fails_calls(
    start_node: StartNode, spawn: Spawn, wait_until: WaitUntil
) -> None:
    """The control: a plain gunicorn (no graceful hooks, as most run it today) stopped, then
    started again on the same port."""
    node = start_node("gthread", hooks=False)
    load = Load(node.port)
    load.start()
    try:
        wait_until(lambda: load.answered() >= 50, timeout=30, message="answers before")
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(30) == 0
        again = spawn(node.argv, env=node.env, name="gunicorn-again")
        wait_ready(node, again, wait_until, hooks=False)
        load.wait_for_more(wait_until)
    finally:
        load.finish()
    assert load.failures, "a naive restart lost nothing: this test cannot tell"


@pytest.mark.parametrize("workers", ["sync", "uvicorn", "uvicorn-supervisor"])
def test_new_code_that_cannot_start_leaves_the_old_master_serving(
    start_node: StartNode, workers: str
) -> None:
    node = start_node(workers)
    old = node.master()
    # uvicorn's supervisor starts a worker that failed to import again and again (it exits 1,
    # not uvicorn's start-up failure 3): that new supervisor is stopped at the timeout.
    done = node.reload("broken", timeout=10 if workers == "uvicorn-supervisor" else 30)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "keeps serving" in done.stderr
    assert node.master() == old and node.version() == "v0"
    done = node.reload("v1")  # the next deploy, fixed, goes through
    assert done.returncode == 0, done.stdout + done.stderr
    assert node.version() == "v1"


def test_the_uvicorn_supervisor_without_a_pid_file_ignores_sigusr2_and_says_why(
    spawn: Spawn, wait_until: WaitUntil, tmp_path: Path
) -> None:
    """Without GRACEFUL_PID_FILE nothing could follow an in-place restart: SIGUSR2 (whose
    default would end the supervisor) is ignored, with what to do instead."""
    port = unused_port()
    (tmp_path / "version").write_text("v0")
    env = {"RELOAD_VERSION_FILE": str(tmp_path / "version"), "LEDGER_DIR": str(tmp_path)}
    proc = spawn(
        [
            *(sys.executable, "-m", "graceful.uvicorn", "reload_app:asgi_app", "--workers", "2"),
            *("--app-dir", str(APPS), "--host", "127.0.0.1", "--port", str(port)),
        ],
        env=env,
        name="uvicorn-workers",
    )
    url = f"http://127.0.0.1:{port}/version"

    def answers() -> bool:
        try:
            return requests.get(url, timeout=TIMEOUT).text == "v0"
        except requests.RequestException:
            return False

    wait_until(answers, timeout=30, message=lambda: proc.output())
    proc.send_signal(signal.SIGUSR2)
    said = "SIGUSR2 ignored: an in-place restart needs a pid file"
    wait_until(lambda: said in proc.output(), timeout=10)
    assert proc.alive() and answers()
