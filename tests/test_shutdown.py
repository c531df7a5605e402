"""``install_signal_handlers`` in a real process (signals go to its main thread).

Each test runs ``tests/e2e/apps/signal_server.py`` (wsgiref + WSGIMiddleware +
``install_signal_handlers(lifecycle, on_stop=server.shutdown)``), sends it signals, and checks
from outside: the probes, the requests in flight, the exit code, the timing and the log.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests

import graceful

if TYPE_CHECKING:
    from conftest import Proc, Spawn, WaitUntil

SCRIPT = Path(__file__).parent / "e2e" / "apps" / "signal_server.py"


class Node:
    def __init__(self, proc: Proc, wait_until: WaitUntil) -> None:
        self.proc = proc
        self.wait_until = wait_until
        listening = self.wait_for("listening")
        self.url = f"http://127.0.0.1:{listening['port']}"

    def events(self) -> list[dict[str, Any]]:
        lines = self.proc.output().splitlines()
        return [json.loads(line) for line in lines if line.startswith('{"event"')]

    def wait_for(self, event: str, **fields: str) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for item in self.events():
                if item["event"] == event and fields.items() <= item.items():
                    return item
            if not self.proc.alive():
                pytest.fail(f"server exited before {event} {fields}:\n{self.proc.output()}")
            return None

        return self.wait_until(found, timeout=20, message=lambda: f"{event} {fields} in the log")

    def phases(self) -> list[str]:
        return [item["new"] for item in self.events() if item["event"] == "phase"]

    def readyz(self) -> requests.Response:
        return requests.get(self.url + "/readyz", timeout=5)

    def slow(self, seconds: float) -> Request:
        request = Request(f"{self.url}/slow?seconds={seconds:g}")
        self.wait_for("begin")
        return request


class Request(threading.Thread):
    """One GET in a thread; ``response`` or ``error`` once it is over."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.response: requests.Response | None = None
        self.error: Exception | None = None
        self.start()

    def run(self) -> None:
        try:
            self.response = requests.get(self.url, timeout=70)
        except requests.RequestException as exc:
            self.error = exc


Start = Callable[..., Node]


@pytest.fixture
def start(spawn: Spawn, wait_until: WaitUntil) -> Start:
    def start_node(**settings: float) -> Node:
        env = {f"GRACEFUL_{name.upper()}": str(value) for name, value in settings.items()}
        proc = spawn([sys.executable, str(SCRIPT)], env=env, name="signal-server")
        node = Node(proc, wait_until)
        assert node.readyz().status_code == 200
        return node

    return start_node


@pytest.mark.e2e
def test_sigterm_fails_readiness_at_once_serves_through_the_delay_and_waits_for_inflight(
    start: Start, wait_until: WaitUntil
) -> None:
    delay = 2.0
    node = start(delay=delay, drain_timeout=10)
    slow = node.slow(delay + 1.0)  # still running when the delay ends
    sent = time.monotonic()

    node.proc.send_signal(signal.SIGTERM)

    wait_until(lambda: node.readyz().status_code == 503, timeout=5, message="readyz 503")
    readyz = node.readyz()
    served = requests.get(node.url + "/hello", timeout=5)
    livez = requests.get(node.url + "/livez", timeout=5)
    during_delay = time.monotonic() - sent
    assert during_delay < delay, "probes and the request above should fit inside the delay"
    assert readyz.json()["output"] == "draining"
    assert (served.status_code, served.text) == (200, "done /hello\n")
    assert served.headers["Graceful-State"] == "draining"
    assert livez.status_code == 200

    assert node.proc.wait(10) == 0
    exited = time.monotonic() - sent
    slow.join(5)
    assert slow.response is not None, slow.error
    assert slow.response.status_code == 200
    events = [item["event"] for item in node.events()]
    assert events.index("end") < events.index("stopped")  # it waited for the slow request
    assert exited >= delay * 0.9
    assert node.phases() == ["serving", "draining", "drained", "stopping"]


@pytest.mark.e2e
def test_sigterm_with_a_request_stuck_past_the_drain_timeout_exits_at_the_deadline(
    start: Start,
) -> None:
    delay, drain_timeout = 0.3, 1.0
    node = start(delay=delay, drain_timeout=drain_timeout)
    slow = node.slow(60)
    sent = time.monotonic()

    node.proc.send_signal(signal.SIGTERM)

    assert node.proc.wait(10) == 0
    elapsed = time.monotonic() - sent
    assert delay + drain_timeout - 0.1 <= elapsed < delay + drain_timeout + 5
    output = node.proc.output()
    assert "drain timeout (1s) passed with 1 in flight" in output
    stuck = re.search(r"GET /slow \((\d+\.\d)s\)", output)
    assert stuck is not None, output
    assert float(stuck.group(1)) >= delay + drain_timeout - 0.1
    assert "end" not in [item["event"] for item in node.events()]
    slow.join(5)
    assert slow.response is None  # the process went away under it


@pytest.mark.e2e
def test_sigint_skips_the_delay_and_waits_for_the_request_in_flight(start: Start) -> None:
    delay = 10.0
    node = start(delay=delay, interrupt_timeout=10)
    slow = node.slow(1.0)
    sent = time.monotonic()

    node.proc.send_signal(signal.SIGINT)

    assert node.proc.wait(10) == 0
    elapsed = time.monotonic() - sent
    assert elapsed < delay / 2, "a quick stop has no delay"
    slow.join(5)
    assert slow.response is not None, slow.error
    assert slow.response.status_code == 200
    events = [item["event"] for item in node.events()]
    assert events.index("end") < events.index("stopped")
    assert node.phases() == ["serving", "stopping"]


@pytest.mark.e2e
def test_sigint_waits_at_most_the_interrupt_timeout_and_names_the_stuck_request(
    start: Start,
) -> None:
    node = start(delay=10, interrupt_timeout=1)
    node.slow(60)
    sent = time.monotonic()

    node.proc.send_signal(signal.SIGINT)

    assert node.proc.wait(10) == 0
    elapsed = time.monotonic() - sent
    assert 0.9 <= elapsed < 6
    output = node.proc.output()
    assert "quick stop (1s) timed out with 1 in flight" in output
    assert re.search(r"GET /slow \(\d+\.\ds\)", output), output


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("first", "second"),
    [
        (signal.SIGINT, signal.SIGINT),
        (signal.SIGTERM, signal.SIGQUIT),
        (signal.SIGINT, signal.SIGQUIT),
        (None, signal.SIGQUIT),
    ],
    ids=["SIGINT-SIGINT", "SIGTERM-SIGQUIT", "SIGINT-SIGQUIT", "SIGQUIT"],
)
def test_second_sigint_or_sigquit_stops_at_once(
    first: signal.Signals | None, second: signal.Signals, start: Start
) -> None:
    budget = 30.0  # every wait is this long: only an immediate stop ends the process in time
    node = start(delay=budget, drain_timeout=budget, interrupt_timeout=budget)
    node.slow(60)
    if first is not None:
        node.proc.send_signal(first)
        node.wait_for("phase", new="draining" if first is signal.SIGTERM else "stopping")
    sent = time.monotonic()

    node.proc.send_signal(second)

    assert node.proc.wait(10) == 0
    assert time.monotonic() - sent < 5
    assert f"{second.name}: stopping at once" in node.proc.output()
    assert node.events()[-1]["event"] == "stopped"


def test_install_signal_handlers_from_another_thread_raises_and_installs_nothing() -> None:
    lifecycle = graceful.Lifecycle(graceful.Config(delay=0))
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)}
    errors: list[BaseException] = []

    def install() -> None:
        try:
            graceful.install_signal_handlers(lifecycle, on_stop=lambda: None)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=install)
    thread.start()
    thread.join(10)

    assert len(errors) == 1
    assert isinstance(errors[0], RuntimeError)
    assert "main thread" in str(errors[0])
    assert {s: signal.getsignal(s) for s in before} == before


_ASK = "from graceful._runtime.shutdown import terminal_signals_group as t; print(t())"
#: A session leader opening a terminal makes it its controlling terminal (in the foreground).
_ON_TERMINAL = "import os, sys; os.open(sys.argv[1], os.O_RDWR); "


def _asked_in_a_new_session(code: str, *argv: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=30,
        start_new_session=True,  # no controlling terminal until it opens one
    )
    return done.stdout.strip() or done.stderr


def test_without_a_controlling_terminal_a_sigint_came_from_kill() -> None:
    """(A supervisor then passes SIGINT on to its workers.)"""
    assert _asked_in_a_new_session(_ASK) == "False"


def test_in_the_foreground_of_its_terminal_a_sigint_came_from_the_keyboard() -> None:
    """(A Ctrl-C reached the workers too: the supervisor does not pass it on.)"""
    master, slave = os.openpty()
    try:
        assert _asked_in_a_new_session(_ON_TERMINAL + _ASK, os.ttyname(slave)) == "True"
    finally:
        os.close(slave)
        os.close(master)


#: A process whose main thread sleeps in a lock for good (as Granian's WSGI worker's does), and
#: a signal that lands on another of its threads: where the kernel puts a signal sent to the
#: process when the main thread has one pending already. Its C handler runs on that thread;
#: the Python one would wait for the main thread to run Python again.
_SLEEPING_MAIN = """
import os, signal, sys, threading
import graceful
from graceful.testing import poll_until

lifecycle = graceful.Lifecycle(graceful.Config(delay=0))
lifecycle.mark_ready()
main_tid = threading.get_native_id()

def stopped():
    print("stopped in phase", lifecycle.phase.value, flush=True)
    os._exit(0)

graceful.install_signal_handlers(lifecycle, on_stop=stopped)
other = threading.Thread(target=threading.Event().wait, daemon=True)
other.start()

def main_asleep():
    with open(f"/proc/self/task/{main_tid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0] == "S"

def send():
    poll_until(main_asleep, 20, message="the main thread to sleep")
    print("sending to the other thread", flush=True)
    signal.pthread_kill(other.ident, getattr(signal, sys.argv[1]))

threading.Thread(target=send, daemon=True).start()
threading.Event().wait()
"""


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_landing_on_another_thread_while_the_main_one_sleeps_still_stops(
    name: str, spawn: Spawn, wait_until: WaitUntil, tmp_path: Path
) -> None:
    script = tmp_path / "sleeping_main.py"
    script.write_text(_SLEEPING_MAIN)
    proc = spawn([sys.executable, str(script), name], name="sleeping-main")
    wait_until(
        lambda: "stopped in phase" in proc.output() or not proc.alive(),
        timeout=20,
        message=lambda: f"the stop after {name} on another thread:\n{proc.output()}",
    )
    assert proc.wait(10) == 0, proc.output()
    assert "sending to the other thread" in proc.output()
    assert "stopped in phase stopping" in proc.output()
