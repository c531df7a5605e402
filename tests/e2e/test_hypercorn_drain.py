"""Hypercorn with ``graceful.ASGIMiddleware`` in the app: ``python -m graceful.hypercorn`` drains.

Real processes on 127.0.0.1 serving ``tests/e2e/apps/load_app.py``'s ``asgi_app``, started as
``python -m graceful.hypercorn load_app_asgi:asgi_app`` with ``--workers 0`` (the server in the
foreground), ``--workers 1`` (Hypercorn's default: one worker under a supervisor) and
``--workers 2``; the signal goes to the process started, as a container runtime sends it. The
same app under plain ``hypercorn`` is the control: it stops at once, so the same test fails.

HTTP/2 (h2c with prior knowledge): a GOAWAY with the last stream id 2^31-1 comes while the
node still serves, and every stream finishes.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest
import requests
from drain_harness import (
    Node,
    check_control,
    check_drain_under_load,
    check_goodbye,
    check_quick_stop,
    inflight,
)

from graceful.testing import poll_until

if TYPE_CHECKING:
    from conftest import Spawn, WaitUntil

pytest.importorskip("hypercorn", reason="pip install 'graceful-drain[hypercorn]'")
h2_connection = pytest.importorskip("h2.connection", reason="HTTP/2 tests need h2")
h2_config = pytest.importorskip("h2.config")
h2_events = pytest.importorskip("h2.events")

pytestmark = pytest.mark.e2e

APPS = Path(__file__).parent / "apps"
DELAY = 1.0
WORKERS = {"foreground": 0, "one-worker": 1, "two-workers": 2}
GOAWAY_LAST_STREAM = 2**31 - 1
TOKEN = "hypercorn-e2e-Token-7d1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class StartNode(Protocol):
    def __call__(self, kind: str = ..., *, graceful: bool = ...) -> Node: ...


@pytest.fixture
def start_node(spawn: Spawn, tmp_path: Path, free_port: int, wait_until: WaitUntil) -> StartNode:
    def start(kind: str = "one-worker", *, graceful: bool = True) -> Node:
        record_dir = tmp_path / f"record-{time.monotonic_ns()}"
        record_dir.mkdir()
        env = {
            "GRACEFUL_DELAY": str(DELAY),
            "GRACEFUL_DRAIN_TIMEOUT": "5",
            "LOAD_RECORD_DIR": str(record_dir),
            "PYTHONPATH": str(APPS),
            "GRACEFUL_TOKEN": TOKEN,
        }
        command = ["-m", "graceful.hypercorn"] if graceful else ["-m", "hypercorn"]
        argv = [sys.executable, *command, "load_app_asgi:asgi_app"]
        argv += ["--bind", f"127.0.0.1:{free_port}", "--workers", str(WORKERS[kind])]
        proc = spawn(argv, env=env, name=f"hypercorn-{kind}")
        node = Node(proc, f"http://127.0.0.1:{free_port}", free_port, record_dir)
        started = max(1, WORKERS[kind])

        def ready() -> bool:
            if not proc.alive():
                pytest.fail(f"{kind} exited with {proc.popen.returncode}:\n{proc.output()}")
            # Every worker has started (each says where it runs once its lifespan completed).
            if proc.output().count("Running on") < started:
                return False
            return requests.get(node.url + "/readyz", timeout=5).status_code == 200

        wait_until(ready, timeout=30, message=lambda: f"{kind} ready:\n{proc.output()}")
        return node

    return start


@pytest.mark.parametrize("kind", list(WORKERS))
def test_sigterm_under_load_loses_nothing_and_exits_zero(start_node: StartNode, kind: str) -> None:
    node = start_node(kind)

    check_drain_under_load(node, DELAY)  # with a websocket and an event stream open


def test_plain_hypercorn_does_not_drain_and_says_so_at_start_up(start_node: StartNode) -> None:
    """The control: the same app and load under Hypercorn's own command. Readiness never
    fails (the listener closes at once) and the middleware said so when it started."""
    node = start_node(graceful=False)
    assert "plain hypercorn stops at once on SIGTERM" in node.proc.output()

    check_control(node, DELAY)


@pytest.mark.parametrize("kind", ["foreground", "two-workers"])
def test_sigint_fails_readiness_at_once_and_stops_without_the_delay_after_in_flight_work(
    start_node: StartNode, kind: str
) -> None:
    check_quick_stop(start_node(kind), TOKEN, DELAY)


def test_a_worker_that_dies_stops_the_others_with_a_drain_and_the_status_says_so(
    start_node: StartNode, wait_until: WaitUntil
) -> None:
    node = start_node("two-workers")
    seen: set[int] = set()

    def both_seen() -> bool:
        seen.update(worker_pids(node))
        return len(seen) == 2

    wait_until(both_seen, message="both workers answering")
    victim, survivor = sorted(seen)

    os.kill(victim, signal.SIGKILL)

    assert node.proc.wait(15) == 128 + signal.SIGKILL
    output = node.proc.output()
    assert f"worker {victim} exited with -9: the others drain and stop" in output
    assert f"[{survivor}] [INFO] phase serving -> draining (SIGTERM)" in output


def worker_pids(node: Node) -> set[int]:
    """Workers seen answering (the kernel hands fresh connections to either, at random)."""
    return {int(requests.get(node.url + "/version", timeout=5).json()["pid"]) for _ in range(5)}


# -- the goodbye at the end of the delay -------------------------------------------------------


@pytest.mark.parametrize("kind", ["foreground", "one-worker"])
def test_websocket_gets_1012_and_event_stream_ends_at_the_end_of_the_delay(
    start_node: StartNode, kind: str
) -> None:
    node = start_node(kind)
    check_goodbye(node, DELAY)


# -- HTTP/2 ------------------------------------------------------------------------------------


class H2Client:
    """One HTTP/2 connection (h2c, prior knowledge) and its streams, read in a thread."""

    def __init__(self, port: int) -> None:
        #: While set, what the client would send after a read (a PING's ACK) waits for flush().
        self.hold_acks = False
        self.pings: list[tuple[float, bytes]] = []
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.conn = h2_connection.H2Connection(h2_config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.lock = threading.Lock()
        self.flush()
        self.statuses: dict[int, int] = {}
        self.ended: dict[int, float] = {}
        self.goaway: tuple[float, int] | None = None
        self.closed_at: float | None = None
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def flush(self) -> None:
        with self.lock:
            self.sock.sendall(self.conn.data_to_send())

    def get(self, path: str) -> int:
        with self.lock:
            stream_id: int = self.conn.get_next_available_stream_id()
            self.conn.send_headers(
                stream_id,
                [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "n")],
                end_stream=True,
            )
            self.sock.sendall(self.conn.data_to_send())
        return stream_id

    def read(self) -> None:
        try:
            while data := self.sock.recv(65536):
                with self.lock:
                    events = self.conn.receive_data(data)
                    if not self.hold_acks:
                        self.sock.sendall(self.conn.data_to_send())
                for event in events:
                    self.on(event)
        except OSError:
            pass
        self.closed_at = time.monotonic()

    def on(self, event: Any) -> None:
        if isinstance(event, h2_events.ResponseReceived):
            self.statuses[event.stream_id] = int(dict(event.headers)[b":status"])
        elif isinstance(event, h2_events.StreamEnded):
            self.ended[event.stream_id] = time.monotonic()
        elif isinstance(event, h2_events.DataReceived):
            with self.lock:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2_events.PingReceived):
            self.pings.append((time.monotonic(), bytes(event.ping_data)))
        elif isinstance(event, h2_events.ConnectionTerminated) and self.goaway is None:
            self.goaway = (time.monotonic(), event.last_stream_id)


@pytest.mark.parametrize("kind", ["foreground", "two-workers"])
def test_http2_connections_get_goaway_once_idle_while_the_node_serves_and_lose_no_stream(
    start_node: StartNode, kind: str
) -> None:
    """An idle connection gets its GOAWAY at once; a busy one once its streams have finished
    (clients on the ``h2`` library fail open streams on any GOAWAY): both within the delay."""
    node = start_node(kind)
    idle, busy = H2Client(node.port), H2Client(node.port)
    pings = [idle.get("/ping"), busy.get("/ping")]
    poll_until(lambda: pings[0] in idle.ended and pings[1] in busy.ended, message="pings")
    slow = [busy.get("/slow?seconds=0.5") for _ in range(3)]
    poll_until(lambda: inflight(node, TOKEN) >= 1, timeout=10, message="the slow streams running")
    sent = time.monotonic()

    node.proc.send_signal(signal.SIGTERM)

    poll_until(lambda: idle.goaway and busy.goaway, timeout=5, message="both GOAWAYs")
    assert idle.goaway is not None and busy.goaway is not None
    # While the node still serves: readiness fails, new connections are answered.
    assert requests.get(node.url + "/readyz", timeout=5).status_code == 503
    assert requests.get(node.url + "/ping", timeout=5).status_code == 200
    assert idle.goaway[0] - sent < 0.5
    assert busy.goaway[0] >= max(busy.ended[s] for s in slow)  # after its streams, not before
    assert busy.goaway[0] - sent < DELAY
    assert (idle.goaway[1], busy.goaway[1]) == (pings[0], max(slow))  # the last it processed
    assert {s: busy.statuses.get(s) for s in slow} == dict.fromkeys(slow, 200)
    assert node.proc.wait(15) == 0


def test_an_idle_connection_gets_its_goaway_only_once_its_client_answered_a_ping(
    start_node: StartNode,
) -> None:
    """httpcore fails a stream whose answer came in the same read as a GOAWAY while its task
    waited to read: so the GOAWAY waits until the client has read every answer, which its
    acknowledgement of a PING sent when the connection went idle proves."""
    node = start_node("foreground")
    client = H2Client(node.port)
    ping = client.get("/ping")
    poll_until(lambda: ping in client.ended, message="the answer")
    client.hold_acks = True

    node.proc.send_signal(signal.SIGTERM)

    poll_until(lambda: client.pings, timeout=5, message="graceful's PING")
    assert client.goaway is None  # nothing yet: the PING has had no answer
    answered = time.monotonic()
    client.hold_acks = False
    client.flush()  # the PING's ACK
    poll_until(lambda: client.goaway, timeout=5, message="the GOAWAY")
    assert client.goaway is not None and client.goaway[0] >= answered
    assert client.goaway[1] == ping  # the last stream it processed
    assert node.proc.wait(15) == 0


@pytest.mark.parametrize("kind", ["foreground", "two-workers"])
def test_httpx_over_http2_through_a_drain_loses_nothing_and_runs_each_post_once(
    start_node: StartNode, kind: str
) -> None:
    """Callers each with an ``httpx`` client (HTTP/2, prior knowledge) GET and POST through
    the delay. A GOAWAY comes between two requests; a request the client sent before it read
    the GOAWAY is refused unprocessed, and httpx sends it again on a new connection.

    One client per caller: an ``httpx`` client shared by threads fails the requests of the
    threads that race any server's GOAWAY (httpcore reads it in one thread while another
    starts a stream: ``RemoteProtocolError``), graceful's or the server's own at its stop."""
    httpx = pytest.importorskip("httpx")
    node = start_node(kind)
    failures: list[str] = []
    acked: list[str] = []
    stop_at: list[float] = []

    def caller(number: int) -> None:
        with httpx.Client(base_url=node.url, http1=False, http2=True, timeout=10) as client:
            for sent in range(2000):  # bounded; the load stops at stop_at
                if stop_at and time.monotonic() > stop_at[0]:
                    return
                order = f"h2-{number}-{sent}"
                try:
                    if sent % 2:
                        answer = client.post("/orders", content=f"id={order}")
                        if answer.status_code == 201:
                            acked.append(order)
                    else:
                        answer = client.get("/ping")
                    if answer.status_code not in (200, 201):
                        failures.append(f"{order}: status {answer.status_code}")
                except httpx.HTTPError as exc:
                    failures.append(f"{order}: {exc!r}")

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    poll_until(lambda: len(acked) >= 50, timeout=30, message="answers before the signal")
    node.proc.send_signal(signal.SIGTERM)
    stop_at.append(time.monotonic() + DELAY * 0.7)  # within the delay: the node serves
    for thread in threads:
        thread.join(30)
    assert node.proc.wait(15) == 0
    assert not failures, failures[:10]
    recorded = node.records("ids")
    assert sorted(recorded) == sorted(set(recorded)), "a POST ran twice"
    assert set(acked) <= set(recorded)
    assert "GOAWAY going to" in node.proc.output()


def test_the_runner_refuses_a_worker_class_it_cannot_run_and_answers_help() -> None:
    import subprocess

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "graceful.hypercorn", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    helped = command("--help")
    assert helped.returncode == 0 and "--workers" in helped.stdout, helped.stderr
    trio = command("app:app", "--worker-class", "trio")
    assert trio.returncode == 2
    assert "--worker-class trio: graceful.hypercorn runs asyncio and uvloop" in trio.stderr
