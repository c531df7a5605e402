"""A gunicorn node's stop resets nothing the kernel had queued in its listen backlog.

When gunicorn's workers are all busy, new connections wait in the listening socket's accept
queue; when the last copy of the socket closed, the kernel reset every one of them (gunicorn
issue #3397). A proxy had written its request on each: it cannot tell whether the app ran it,
so it cannot resend a POST (nginx answers 502). ``graceful.gunicorn`` now makes the listeners
drop new connection attempts at its hand-over to gunicorn's own stop, lets the workers serve
what is queued, and only then lets gunicorn close them.

Real gunicorn (``-w 2``, tests/e2e/apps/nginx_ledger_app.py). Raw-socket callers open a new
connection for every POST and write it at once, right up to the master's exit. Slow clients
(one per worker thread) send their request line and hold the rest back: every worker is busy
reading one of them while nothing is in flight in the app, so the node is drained at once while
the callers' connections wait (sync: in the listen backlog; gthread accepts them and queues
them in its thread pool): the moment gunicorn #3397 bites, made certain instead of left to
chance. Once the master has handed over (its lifecycle logged "stopping"),
the slow clients finish their requests.

Every connection must end in one of two ways: a complete HTTP response, or a connection that
never opened (refused, or its connect timed out: nothing was sent, so any caller may retry).
The app's ledger shows no POST ran twice and every answered POST ran once.
"""

from __future__ import annotations

import collections
import dataclasses
import secrets
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import unused_port

from graceful.testing import wait_answering

if TYPE_CHECKING:
    from conftest import Proc, Spawn, WaitUntil

pytestmark = pytest.mark.e2e

APPS = Path(__file__).parent / "apps"
CALLERS = 12
CONNECT_TIMEOUT = 10.0  # a blocked listener drops SYNs: the client's kernel retries a while
READ_TIMEOUT = 30.0
MAX_REQUESTS = 20_000
MAX_SECONDS = 90.0
ANSWERED_BEFORE = 30
#: How long the slow clients hold their request back once the master has handed over (s).
HOLD_AFTER_HAND_OVER = 0.3
#: The gunicorn log line of the master's lifecycle that precedes the hand-over.
STOPPING = "-> stopping ("


@dataclasses.dataclass
class Outcome:
    order: str
    kind: str  # "answered", "refused" (never connected) or "reset" (after the request was sent)
    detail: str = ""
    seconds: float = 0.0  # how long the connection attempt took


def request_parts(port: int, order: str) -> tuple[bytes, bytes]:
    """A POST of ``order`` to the ledger app: its request line, and the rest."""
    body = f"id={order}".encode()
    rest = (
        f"Host: 127.0.0.1:{port}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    return b"POST /orders HTTP/1.1\r\n", rest


def post_once(port: int, order: str, hold: threading.Event | None = None) -> Outcome:
    """One POST on a new connection, written as soon as it opens (the part after the request
    line only once ``hold`` is set, when given)."""
    line, rest = request_parts(port, order)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        started = time.monotonic()
        try:
            sock.connect(("127.0.0.1", port))
        except (ConnectionRefusedError, TimeoutError) as exc:
            return Outcome(order, "refused", type(exc).__name__, time.monotonic() - started)
        return send_parts(sock, order, line, rest, hold)
    finally:
        sock.close()


def send_parts(
    sock: socket.socket, order: str, line: bytes, rest: bytes, hold: threading.Event | None
) -> Outcome:
    """Send the request line, then (once ``hold`` is set, when given) the rest, on a connected
    ``sock``; what came back."""
    sock.settimeout(READ_TIMEOUT)
    try:
        sock.sendall(line)
        if hold is not None:
            hold.wait(MAX_SECONDS)
        sock.sendall(rest)
        return read_response(sock, order)
    except OSError as exc:
        return Outcome(order, "reset", f"{type(exc).__name__}: {exc}")


def read_response(sock: socket.socket, order: str) -> Outcome:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    lengths = [int(v.split(":", 1)[1]) for v in lines if v.lower().startswith("content-length:")]
    if not lines[0].startswith("HTTP/1.1 ") or not lengths or len(body) < lengths[0]:
        return Outcome(order, "reset", f"incomplete response: {data[:80]!r}")
    return Outcome(order, "answered", lines[0].split(" ", 2)[1])


class Callers:
    """Callers that POST on new connections until the node refuses one (or has exited), and
    slow clients that hold their request back until ``release`` is set."""

    def __init__(self, proc: Proc, port: int) -> None:
        self.proc, self.port = proc, port
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.deadline = time.monotonic() + MAX_SECONDS
        self.prefix = secrets.token_hex(3)
        self.threads: list[threading.Thread] = []

    def _run(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self.threads.append(thread)

    def start_callers(self) -> None:
        for number in range(CALLERS):
            self._run(self.caller, number)

    def start_slow_clients(self, count: int) -> None:
        for number in range(count):
            self._run(self.slow_client, number)

    def caller(self, number: int) -> None:
        for sent in range(MAX_REQUESTS // CALLERS):
            if not self.proc.alive() or time.monotonic() > self.deadline:
                return
            outcome = post_once(self.port, f"{self.prefix}-{number}-{sent}")
            self._record(outcome)
            if outcome.kind == "refused":  # the node is going away
                return

    def slow_client(self, number: int) -> None:
        self._record(post_once(self.port, f"{self.prefix}-slow-{number}", self.release))

    def _record(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)

    def answered(self) -> int:
        with self.lock:
            return sum(o.kind == "answered" for o in self.outcomes)

    def join(self) -> list[Outcome]:
        self.release.set()
        for thread in self.threads:
            thread.join(CONNECT_TIMEOUT + READ_TIMEOUT + 5)
        with self.lock:
            return list(self.outcomes)


def waiting(port: int) -> int:
    """Connections to ``port`` holding a request nobody has read: in the listener's accept
    queue, or accepted by a worker that has not started them (``/proc/net/tcp``: the server's
    end, established, with bytes in its receive queue)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, queues = fields[1], fields[3], fields[4]
        count += local.endswith(f":{port:04X}") and state == "01" and queues[-8:] != "00000000"
    return count


def ran(ledger: Path) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for path in ledger.glob("*.ran"):
        counts.update(path.read_text().splitlines())
    return counts


def start_node(
    spawn: Spawn, wait_until: WaitUntil, ledger: Path, worker: list[str]
) -> tuple[Proc, int]:
    port = unused_port()
    env = {
        "GRACEFUL_DELAY": "0.5",
        "GRACEFUL_DRAIN_TIMEOUT": "20",
        "GRACEFUL_INTERRUPT_TIMEOUT": "20",
        "GRACEFUL_REJECT_WHEN_DRAINING": "0",
        "LEDGER_DIR": str(ledger),
    }
    argv = [
        *(sys.executable, "-m", "gunicorn", "-c", "python:graceful.gunicorn"),
        *("--bind", f"127.0.0.1:{port}", "--workers", "2", *worker),
        *("--graceful-timeout", "20", "--chdir", str(APPS), "nginx_ledger_app:app"),
    ]
    proc = spawn(argv, env=env, name="node")
    wait_answering(port, timeout=30, process=proc)
    return proc, port


@pytest.mark.skipif(sys.platform != "linux", reason="the listen queue is served on Linux only")
@pytest.mark.parametrize(
    ("worker", "slots", "signum"),
    [
        pytest.param(["-k", "sync"], 2, signal.SIGTERM, id="sync-SIGTERM"),
        pytest.param(["-k", "gthread", "--threads", "2"], 4, signal.SIGTERM, id="gthread-SIGTERM"),
        pytest.param(["-k", "sync"], 2, signal.SIGINT, id="sync-SIGINT"),
    ],
)
def test_connections_queued_at_the_stop_are_served_not_reset(
    spawn: Spawn,
    wait_until: WaitUntil,
    tmp_path: Path,
    worker: list[str],
    slots: int,
    signum: signal.Signals,
) -> None:
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    proc, port = start_node(spawn, wait_until, ledger, worker)
    load = Callers(proc, port)
    load.start_callers()
    wait_until(lambda: load.answered() >= ANSWERED_BEFORE, timeout=60, message="answers")
    load.start_slow_clients(slots)
    wait_until(
        lambda: waiting(port) >= CALLERS // 2,
        timeout=30,
        message="callers queued behind the slow clients",
    )

    proc.send_signal(signum)
    wait_until(lambda: STOPPING in proc.output(), timeout=30, message=lambda: proc.output())
    threading.Timer(HOLD_AFTER_HAND_OVER, load.release.set).start()
    code = proc.wait(60)
    outcomes = load.join()

    check_answered_or_refused(outcomes, ledger, code, proc)
    slow = [o for o in outcomes if "-slow-" in o.order]
    assert [o.kind for o in slow] == ["answered"] * slots, slow


def check_answered_or_refused(outcomes: list[Outcome], ledger: Path, code: int, proc: Proc) -> None:
    """Every connection was answered or never opened, every answered POST ran once and
    nothing else ran; the node exited 0."""
    kinds = collections.Counter(o.kind for o in outcomes)
    counts = ran(ledger)
    resets = [
        f"{o.order}: {o.detail} (ran {counts[o.order]}x)" for o in outcomes if o.kind == "reset"
    ]
    refused = [o.seconds for o in outcomes if o.kind == "refused"]
    summary = (
        f"outcomes {dict(kinds)}, {sum(counts.values())} POSTs ran, exit {code}; refused "
        f"connections took {min(refused, default=0):.2f}-{max(refused, default=0):.2f}s"
    )
    print(summary)  # shown with -rA: the figures of the run
    assert code == 0, summary + "\n" + proc.output()[-3000:]
    assert not resets, f"{summary}; reset after the request was written: {resets[:10]}"
    twice = sorted(order for order, n in counts.items() if n > 1)
    assert not twice, f"{summary}; ran twice: {twice[:10]}"
    answered = {o.order for o in outcomes if o.kind == "answered"}
    assert all(counts[order] == 1 for order in answered), summary
    never_answered = sorted(set(counts) - answered)
    assert not never_answered, f"{summary}; ran without an answer: {never_answered[:10]}"


@pytest.mark.skipif(sys.platform != "linux", reason="the listen queue is served on Linux only")
def test_a_uvicorn_node_serves_what_queued_while_its_loop_was_busy_at_the_stop(
    spawn: Spawn, wait_until: WaitUntil, tmp_path: Path
) -> None:
    """uvicorn accepts on its event loop: while the loop is busy (CPU-bound work in an async
    app) new connections wait in the listen queue, and closing the listener reset them (seen
    behind nginx as a rare 502 on a POST at the end of a drain). Here the app blocks its loop
    for 0.3 s once the node is stopping, so the queue is certain to hold connections then."""
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    port = unused_port()
    env = {
        "GRACEFUL_DELAY": "0.2",
        "GRACEFUL_DRAIN_TIMEOUT": "20",
        "LEDGER_DIR": str(ledger),
        "BLOCK_AT_STOP": "0.3",
    }
    argv = [
        *(sys.executable, "-m", "uvicorn", "pool_ledger_app:asgi_app_blocking_at_stop"),
        *("--app-dir", str(APPS), "--host", "127.0.0.1", "--port", str(port)),
    ]
    proc = spawn(argv, env=env, name="node")
    wait_answering(port, timeout=30, process=proc)
    load = Callers(proc, port)
    load.start_callers()
    wait_until(lambda: load.answered() >= ANSWERED_BEFORE, timeout=60, message="answers")

    proc.send_signal(signal.SIGTERM)
    code = proc.wait(60)
    outcomes = load.join()

    check_answered_or_refused(outcomes, ledger, code, proc)
    assert "listen queue served before the listeners close" in proc.output(), proc.output()


@pytest.mark.skipif(sys.platform != "linux", reason="the listen queue is served on Linux only")
def test_a_second_sigint_during_the_wait_for_the_queue_stops_at_once(
    spawn: Spawn, wait_until: WaitUntil, tmp_path: Path
) -> None:
    """The wait for the queue is part of the stop: a forced stop ends it. The slow clients hold
    both workers until the master has exited, so only a stop that does not wait can exit."""
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    proc, port = start_node(spawn, wait_until, ledger, ["-k", "sync"])
    load = Callers(proc, port)
    load.start_slow_clients(2)
    load.start_callers()
    wait_until(lambda: waiting(port) >= CALLERS // 2, timeout=30, message="callers queued")

    proc.send_signal(signal.SIGTERM)
    wait_until(lambda: STOPPING in proc.output(), timeout=30, message=lambda: proc.output())
    proc.send_signal(signal.SIGINT)
    code = proc.wait(30)  # the slow clients still hold their requests back
    assert not load.release.is_set()
    load.join()

    output = proc.output()
    assert "SIGINT: stopping at once" in output, output
    assert "listen queue served" not in output, output  # the wait did not complete
    assert code == 0, output


def unix_ends(path: Path, state: str) -> int:
    """The server's ends of connections to the UNIX socket at ``path`` (``/proc/net/unix``:
    they carry the listener's path) in ``state``: "02" queued, "03" accepted."""
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    return sum(line.split()[-1] == str(path) and line.split()[5] == state for line in lines)


def post_on_unix(path: Path, order: str, hold: threading.Event | None) -> Outcome:
    line, rest = request_parts(0, order)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(READ_TIMEOUT)
        sock.connect(str(path))
        return send_parts(sock, order, line, rest, hold)


@pytest.mark.skipif(sys.platform != "linux", reason="the listen queue is served on Linux only")
def test_a_unix_socket_s_queue_is_served_once_no_new_connection_comes(
    spawn: Spawn, wait_until: WaitUntil, tmp_path: Path
) -> None:
    """A UNIX listener cannot refuse new connections while it stays open, but what it queued
    is served before it closes, as long as the proxy has stopped sending (the drain's delay)."""
    ledger, path = tmp_path / "ledger", tmp_path / "node.sock"
    ledger.mkdir()
    env = {"GRACEFUL_DELAY": "0.5", "LEDGER_DIR": str(ledger)}
    argv = [
        *(sys.executable, "-m", "gunicorn", "-c", "python:graceful.gunicorn"),
        *("--bind", f"unix:{path}", "--workers", "2", "-k", "sync"),
        *("--chdir", str(APPS), "nginx_ledger_app:app"),
    ]
    proc = spawn(argv, env=env, name="node")
    wait_until(lambda: "phase starting -> serving" in proc.output(), timeout=30)
    release, outcomes = threading.Event(), []

    def run(order: str, hold: threading.Event | None) -> None:
        outcomes.append(post_on_unix(path, order, hold))

    clients = [threading.Thread(target=run, args=(f"slow-{n}", release)) for n in range(2)]
    clients += [threading.Thread(target=run, args=(f"queued-{n}", None)) for n in range(5)]
    for client in clients[:2]:
        client.start()
    wait_until(lambda: unix_ends(path, "03") == 2, message="both workers busy")
    for client in clients[2:]:
        client.start()
    wait_until(lambda: unix_ends(path, "02") == 5, message="5 connections queued")

    proc.send_signal(signal.SIGTERM)
    wait_until(lambda: STOPPING in proc.output(), timeout=30, message=lambda: proc.output())
    threading.Timer(HOLD_AFTER_HAND_OVER, release.set).start()
    assert proc.wait(60) == 0, proc.output()
    for client in clients:
        client.join(READ_TIMEOUT)

    assert sorted((o.order, o.kind, o.detail) for o in outcomes) == [
        *((f"queued-{n}", "answered", "201") for n in range(5)),
        *((f"slow-{n}", "answered", "201") for n in range(2)),
    ]
    assert sorted(ran(ledger)) == sorted(o.order for o in outcomes)


@pytest.mark.skipif(sys.platform != "linux", reason="the listen queue is served on Linux only")
@pytest.mark.parametrize(
    ("interface", "workers"),
    [("asgi", 1), ("wsgi", 1), ("asgi", 2)],
    ids=["asgi", "wsgi", "asgi-workers"],
)
def test_a_granian_worker_serves_what_queued_on_its_listener_at_the_stop(
    spawn: Spawn, wait_until: WaitUntil, tmp_path: Path, interface: str, workers: int
) -> None:
    """On Linux each Granian worker listens on a socket of its own (SO_REUSEPORT) and closes
    it as its Rust server stops: what the kernel queued on it then was reset. ``--backpressure
    2`` lets a worker hold two connections: the slow clients take them, so the callers'
    connections wait in the queue when the node stops."""
    pytest.importorskip("granian", reason="pip install 'graceful-drain[granian]'")
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    port = unused_port()
    env = {
        "GRACEFUL_DELAY": "0.5",
        "GRACEFUL_DRAIN_TIMEOUT": "20",
        "LEDGER_DIR": str(ledger),
        "PYTHONPATH": str(APPS),
    }
    argv = [
        *(sys.executable, "-m", "granian", "--interface", interface),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)),
        *("--backpressure", "2", f"pool_ledger_app:{interface}_app"),
    ]
    proc = spawn(argv, env=env, cwd=APPS, name="node")
    wait_until(lambda: proc.output().count("Started worker-") >= workers, timeout=30)
    wait_answering(port, timeout=30, process=proc)
    load = Callers(proc, port)
    load.start_callers()
    wait_until(lambda: load.answered() >= ANSWERED_BEFORE, timeout=60, message="answers")
    load.start_slow_clients(2 * workers)
    wait_until(
        lambda: waiting(port) >= CALLERS // 2,
        timeout=30,
        message="callers queued behind the slow clients",
    )

    proc.send_signal(signal.SIGTERM)
    wait_until(
        lambda: proc.output().count(STOPPING) >= workers,
        timeout=30,
        message=lambda: proc.output(),
    )
    threading.Timer(HOLD_AFTER_HAND_OVER, load.release.set).start()
    code = proc.wait(60)
    outcomes = load.join()

    check_answered_or_refused(outcomes, ledger, code, proc)
    assert proc.output().count("listen queue served before the listeners close") == workers, (
        proc.output()
    )
