"""systemd socket activation: a restart on one machine, without a balancer, loses nothing.

Under a ``.socket`` unit (``integrations/systemd/graceful-app.socket``) systemd binds the
listening socket and keeps it while the service restarts: it passes its copy to each new
process as fd 3 (``LISTEN_FDS=1``, ``LISTEN_PID``). gunicorn reads that itself;
``python -m graceful.uvicorn`` serves it as with ``--fd 3``. The old process drains and stops
accepting without closing or filtering what systemd holds, so connections that arrive during
the restart wait in the listen queue and the new process serves them.

- ``systemd-socket-activate`` (systemd's own tool; a full systemd cannot run here) starts each
  server on the socket it binds, and the server answers there.
- The restart: the test holds the listening socket as systemd does and starts each process on
  it (fd 3, ``LISTEN_PID`` its own pid). Keep-alive and new-connection callers (GETs and POSTs)
  run throughout; the old process gets SIGTERM; once it has exited, every caller's next
  request is waiting in the held socket's queue, and only then is the new process started.
  Nothing fails, nothing is refused or reset, every POST ran once, those sent while no
  process ran were served by the new one, and the socket never got a filter.
- The control: the same restart with a plain ``--bind`` (the server's own socket) refuses
  connections in the gap.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import http.client
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

import pytest
from conftest import child_env, unused_port

from graceful._servers.backlog import block_new_connections, queued
from graceful.testing import ExitWatch, ProcessExited, failure_kind, wait_answering

if TYPE_CHECKING:
    from conftest import Spawn, WaitUntil

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(sys.platform != "linux", reason="systemd socket activation is Linux's"),
]

APPS = Path(__file__).parent / "apps"
HOST = "127.0.0.1"
GUNICORN = [
    *(sys.executable, "-m", "gunicorn", "-c", "python:graceful.gunicorn"),
    *("-k", "gthread", "--threads", "4", "--workers", "2", "--graceful-timeout", "20"),
    *("--chdir", str(APPS), "pool_ledger_app:wsgi_app"),
]
UVICORN = [sys.executable, "-m", "graceful.uvicorn", "pool_ledger_app:asgi_app"]
SERVERS = {
    "gunicorn-gthread": GUNICORN,
    "uvicorn": [*UVICORN, "--app-dir", str(APPS)],
    "uvicorn-workers": [*UVICORN, "--app-dir", str(APPS), "--workers", "2"],
}
ENV = {"GRACEFUL_DELAY": "0.3", "GRACEFUL_DRAIN_TIMEOUT": "10"}

#: The callers: name, keep-alive or a new connection for each request, and what they send
#: (POST, GET, or the two in turn): a POST is certain to be among the requests of the gap.
CALLER_KINDS = [
    *((f"keepalive-{n}", True, "both") for n in range(3)),
    ("new-post", False, "POST"),
    ("new-get", False, "GET"),
    ("new-both", False, "both"),
]
CALLERS = len(CALLER_KINDS)
MAX_REQUESTS = 3000  # per caller
MAX_SECONDS = 60.0
REQUEST_TIMEOUT = 30.0  # a request waits in the queue while the new process starts
RETRY_PAUSE = 0.05
ANSWERED_BEFORE = 30
ANSWERED_AFTER = 30
SO_GET_FILTER = 26  # SO_ATTACH_FILTER's number reads the attached classic BPF filter back
#: Linux's shortest delayed ACK: what a response waits without TCP_NODELAY (Nagle).
NAGLE_DELAY = 0.040

#: Starts a command with the socket on descriptor ``argv[1]`` as systemd does: as fd 3, with
#: ``LISTEN_FDS=1`` and ``LISTEN_PID`` the command's pid (it runs in this very process).
INHERIT = """\
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="graceful-app")
os.execv(sys.argv[2], sys.argv[2:])
"""


def server_argv(server: str, port: int) -> list[str]:
    """The server's command with its own address given, as in the shipped service unit (a
    socket passed by systemd wins over it)."""
    argv = SERVERS[server]
    if server.startswith("gunicorn"):
        return [*argv[:-1], "--bind", f"{HOST}:{port}", argv[-1]]
    return [*argv, "--host", HOST, "--port", str(port)]


def filtered(sock: socket.socket) -> bool:
    """Whether a classic BPF filter is attached to ``sock`` (its instructions read back)."""
    return bool(sock.getsockopt(socket.SOL_SOCKET, SO_GET_FILTER, 64 * 8))


# -- a server process on a socket this test holds --------------------------------------------


class Node:
    """A server process in its own session, its output in ``log``; given ``held``, started on
    that socket as systemd starts a service (see :data:`INHERIT`)."""

    def __init__(
        self, argv: Sequence[str], log: Path, env: Mapping[str, str], held: socket.socket | None
    ) -> None:
        self.log = log
        self._out: IO[bytes] = log.open("wb")
        fds: tuple[int, ...] = ()
        if held is not None:
            fds = (held.fileno(),)
            argv = [sys.executable, "-c", INHERIT, str(held.fileno()), *argv]
        self.started_at = time.monotonic()
        self.popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=child_env(env),
            cwd=APPS,
            pass_fds=fds,
            start_new_session=True,  # its own process group: stop() ends its workers too
        )
        self.watch = ExitWatch(self.popen)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def running(self) -> bool:
        """True while it runs; :class:`ProcessExited` (ends a wait at once) once it exited."""
        if self.popen.poll() is not None:
            raise ProcessExited(f"exited with {self.popen.returncode}:\n{self.output()[-3000:]}")
        return True

    def stop(self) -> None:
        """SIGTERM its group, SIGKILL what is left after 5 s, reap it (by its pid)."""
        for signum, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.popen.pid, signum)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # workers that outlived their master
        self.watch.close()
        self._out.close()


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    """The test's server processes; each is stopped at teardown, its output printed."""
    started: list[Node] = []
    try:
        yield started
    finally:
        for node in started:
            node.stop()
            sys.stdout.write(f"--- output of {node.popen.args!r} ({node.popen.returncode})\n")
            sys.stdout.write(node.output())


# -- the callers -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Outcome:
    caller: str
    method: str
    order: str
    sent_at: float
    ended_at: float  # when the answer was read, or the request failed
    status: int | None
    failure: str | None  # None: the answer expected (GET 200, POST 201)
    detail: str = ""


class Callers:
    """Keep-alive callers (one connection each, a new one only once the server closed it, as a
    proxy's pool does) and new-connection callers, GETs and POSTs in turn; they never resend a
    request, and stop at :meth:`join` or after :data:`MAX_REQUESTS` or :data:`MAX_SECONDS`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.prefix = secrets.token_hex(3)
        self.lock = threading.Lock()
        self.outcomes: list[Outcome] = []
        self.stopping = threading.Event()
        #: Callers waiting for an answer, and when they sent the request.
        self.waiting: dict[str, float] = {}
        self.deadline = time.monotonic() + MAX_SECONDS
        self.threads = [
            threading.Thread(target=self.call, args=kind, daemon=True) for kind in CALLER_KINDS
        ]
        for thread in self.threads:
            thread.start()

    def call(self, name: str, keep_alive: bool, sends: str) -> None:
        connection: http.client.HTTPConnection | None = None
        try:
            for number in range(MAX_REQUESTS):
                if self.stopping.is_set() or time.monotonic() > self.deadline:
                    return
                if connection is not None and dropped(connection):
                    connection.close()  # closed by the server while idle: a new one
                    connection = None
                if connection is None:
                    connection = http.client.HTTPConnection(
                        HOST, self.port, timeout=REQUEST_TIMEOUT
                    )
                post = sends == "POST" or (sends == "both" and number % 2 == 1)
                outcome, reusable = self.send(connection, name, number, keep_alive, post)
                self.record(outcome)
                if not (keep_alive and reusable):
                    connection.close()
                    connection = None
                if outcome.failure is not None:
                    # A client's pause before its next try: the behaviour, and what bounds a
                    # run of refusals (the control).
                    self.stopping.wait(RETRY_PAUSE)
        finally:
            if connection is not None:
                connection.close()

    def send(
        self,
        connection: http.client.HTTPConnection,
        name: str,
        number: int,
        keep_alive: bool,
        post: bool,
    ) -> tuple[Outcome, bool]:
        order = f"{self.prefix}-{name}-{number}"
        method, path = ("POST", "/orders") if post else ("GET", f"/orders/{order}")
        body = f"id={order}".encode() if post else None
        headers = {"Content-Type": "application/x-www-form-urlencoded"} if post else {}
        if not keep_alive:
            headers["Connection"] = "close"
        sent_at = time.monotonic()
        with self.lock:
            self.waiting[name] = sent_at
        try:
            connection.request(method, path, body, headers)
            response = connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as exc:
            text = f"{type(exc).__name__}: {exc}"[:200]
            failed = Outcome(
                name, method, order, sent_at, time.monotonic(), None, failure_kind(exc), text
            )
            return failed, False
        expected = 201 if post else 200
        failure = None if response.status == expected else f"status {response.status}"
        outcome = Outcome(name, method, order, sent_at, time.monotonic(), response.status, failure)
        return outcome, not response.will_close

    def record(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)
            self.waiting.pop(outcome.caller, None)

    def seen(self) -> list[Outcome]:
        with self.lock:
            return list(self.outcomes)

    def answered_since(self, moment: float) -> int:
        return sum(o.failure is None and o.sent_at >= moment for o in self.seen())

    def callers_sent_since(self, moment: float) -> int:
        """Callers that sent a request at ``moment`` or later (answered or not yet)."""
        with self.lock:
            sent = {o.caller for o in self.outcomes if o.sent_at >= moment}
            return len(sent | {name for name, at in self.waiting.items() if at >= moment})

    def join(self) -> list[Outcome]:
        self.stopping.set()
        for thread in self.threads:
            thread.join(REQUEST_TIMEOUT + 5)
        return self.seen()


def dropped(connection: http.client.HTTPConnection) -> bool:
    """An idle keep-alive connection the server has closed (it reads as ready: EOF)."""
    sock = connection.sock
    return sock is not None and bool(select.select([sock], [], [], 0)[0])


def ran(ledger: Path, files: set[str] | None = None) -> collections.Counter[str]:
    """How many times the app ran each POST (in ``files`` of the ledger, when given)."""
    counts: collections.Counter[str] = collections.Counter()
    for path in ledger.glob("*.ran"):
        if files is None or path.name in files:
            counts.update(path.read_text().splitlines())
    return counts


# -- the restart -------------------------------------------------------------------------------


@dataclasses.dataclass
class Restart:
    outcomes: list[Outcome]
    old_exit: int
    old_exited_at: float
    new_started_at: float
    queued_in_gap: int | None
    old_files: set[str]
    summary: str


def restart_under_load(
    nodes: list[Node],
    tmp_path: Path,
    wait_until: WaitUntil,
    server: str,
    port: int,
    held: socket.socket | None,
) -> Restart:
    """Start ``server`` on ``port`` (on ``held`` when given), run the callers, SIGTERM it, and
    once it has exited and every caller met the gap, start the next one; stop the callers
    once the new one answered :data:`ANSWERED_AFTER` requests.

    Every caller met the gap: on ``held``, each one's request waits in the socket's queue
    (sent once the old process closed its copy, which may be before it exited); on the
    server's own socket, each one sent a request after the exit (a connection attempt
    dropped by the old process's filter first ends, refused, on its retry)."""
    ledger = tmp_path / "ledger"
    ledger.mkdir(exist_ok=True)
    env = {**ENV, "LEDGER_DIR": str(ledger)}
    argv = server_argv(server, port)

    def start(name: str) -> Node:
        nodes.append(Node(argv, tmp_path / f"{name}.log", env, held))
        return nodes[-1]

    old = start("old")
    callers = Callers(port)
    try:
        wait_until(
            lambda: old.running() and callers.answered_since(0.0) >= ANSWERED_BEFORE,
            timeout=30,
            message=lambda: f"answers from the old process; {old.output()[-2000:]}",
        )
        old.popen.send_signal(signal.SIGTERM)
        old_exit = old.popen.wait(30)
        old_exited_at = old.watch.wait(5)
        assert old_exited_at is not None

        def every_caller_met_the_gap() -> bool:
            if held is not None:
                return (queued(held) or 0) >= CALLERS
            return callers.callers_sent_since(old_exited_at) >= CALLERS

        wait_until(
            every_caller_met_the_gap,
            timeout=15,
            message=lambda: f"every caller to try while no process runs ({queued_in(held)})",
        )
        queued_in_gap = None if held is None else queued(held)
        old_files = {path.name for path in ledger.glob("*.ran")}
        new = start("new")
        wait_until(
            lambda: new.running() and callers.answered_since(new.started_at) >= ANSWERED_AFTER,
            timeout=30,
            message=lambda: f"answers from the new process; {new.output()[-2000:]}",
        )
    finally:
        outcomes = callers.join()
    kinds = collections.Counter(o.failure or "answered" for o in outcomes)
    gap = in_gap(outcomes, old_exited_at, new.started_at)
    summary = (
        f"{server}: {len(outcomes)} requests {dict(kinds)}; old exited {old_exit}; "
        f"{len(gap)} under way while no process ran ({queued_in_gap} queued on the held "
        f"socket, the longest took {max((o.ended_at - o.sent_at for o in gap), default=0):.2f}s);"
        f" the new one started {new.started_at - old_exited_at:.3f}s after the old one exited"
    )
    print(summary)  # shown with -rA: the figures of the run
    new.popen.send_signal(signal.SIGTERM)
    assert new.popen.wait(30) == 0, new.output()[-3000:]
    return Restart(
        outcomes, old_exit, old_exited_at, new.started_at, queued_in_gap, old_files, summary
    )


def in_gap(outcomes: list[Outcome], old_exited_at: float, new_started_at: float) -> list[Outcome]:
    """The requests under way while no process ran: sent before the new one started, ended
    after the old one exited."""
    return [o for o in outcomes if o.sent_at < new_started_at and o.ended_at > old_exited_at]


def queued_in(held: socket.socket | None) -> str:
    return "" if held is None else f"{queued(held)} queued on the held socket"


@pytest.fixture
def held() -> Iterator[socket.socket]:
    """A listening socket on 127.0.0.1 that the test holds, as systemd's ``.socket`` unit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((HOST, 0))
        sock.listen(128)
        yield sock
    finally:
        sock.close()


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_a_restart_on_a_held_socket_refuses_resets_and_loses_nothing(
    nodes: list[Node], tmp_path: Path, wait_until: WaitUntil, held: socket.socket, server: str
) -> None:
    port = held.getsockname()[1]
    run = restart_under_load(nodes, tmp_path, wait_until, server, port, held)

    failures = [o for o in run.outcomes if o.failure is not None]
    assert not failures, f"{run.summary}; failed: {failures[:10]}"
    assert run.old_exit == 0, run.summary
    # While no process ran, every caller's request waited in the held socket's queue...
    assert run.queued_in_gap is not None and run.queued_in_gap >= CALLERS, run.summary
    assert not filtered(held), "a filter was attached to the socket systemd holds"
    # ...and the new process answered each of them.
    gap = in_gap(run.outcomes, run.old_exited_at, run.new_started_at)
    assert len(gap) >= CALLERS and all(o.failure is None for o in gap), run.summary
    # Each POST ran exactly once; those of the gap ran in the new process.
    posts = {o.order for o in run.outcomes if o.method == "POST"}
    counts = ran(tmp_path / "ledger")
    assert set(counts) == posts, f"{run.summary}; ran but not sent: {set(counts) - posts}"
    assert all(n == 1 for n in counts.values()), [k for k, n in counts.items() if n > 1]
    new_files = {p.name for p in (tmp_path / "ledger").glob("*.ran")} - run.old_files
    gap_posts = {o.order for o in gap if o.method == "POST"}
    assert gap_posts and gap_posts <= set(ran(tmp_path / "ledger", new_files)), run.summary


@pytest.mark.parametrize("server", ["gunicorn-gthread", "uvicorn"])
def test_control_the_same_restart_on_the_servers_own_socket_refuses_connections(
    nodes: list[Node], tmp_path: Path, wait_until: WaitUntil, server: str
) -> None:
    """Without a socket held across the restart the port is closed between the two processes:
    what the test above proves is the held socket's doing, and the callers can see it fail."""
    run = restart_under_load(nodes, tmp_path, wait_until, server, unused_port(), None)

    refused = [o for o in run.outcomes if o.failure == "connection refused"]
    assert refused, run.summary
    counts = ran(tmp_path / "ledger")
    assert all(n == 1 for n in counts.values()), run.summary  # refused: never ran


# -- systemd-socket-activate -----------------------------------------------------------------


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_systemd_socket_activate_starts_the_server_on_its_socket(
    spawn: Spawn, tmp_path: Path, server: str
) -> None:
    """``systemd-socket-activate -l ADDRESS`` binds the socket and, at the first connection,
    runs the server in its own process with it as fd 3 (``LISTEN_FDS=1``, ``LISTEN_PID``), and
    passes on only the environment it is told to (``-E``). Keep-alive requests are not held
    back by Nagle's algorithm (uvicorn's ``--fd`` alone sets no ``TCP_NODELAY``)."""
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate is not installed (Debian: the systemd package)")
    port, ledger = unused_port(), tmp_path / "ledger"
    ledger.mkdir()
    env = {**ENV, "LEDGER_DIR": str(ledger), "PYTHONUNBUFFERED": "1"}
    passed = [part for name, value in env.items() for part in ("-E", f"{name}={value}")]
    # The server's own address is another port: were the socket not taken, nothing answers.
    argv = [tool, "-l", f"{HOST}:{port}", *passed, *server_argv(server, unused_port())]
    proc = spawn(argv, cwd=APPS, name="activated")

    wait_answering(port, "/orders/first", timeout=30, process=proc)
    connection = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        connection.request(
            "POST",
            "/orders",
            b"id=activated",
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        response = connection.getresponse()
        assert (response.status, response.read()) == (201, b"created activated\n")
    finally:
        connection.close()
    assert ran(ledger) == {"activated": 1}
    assert keep_alive_request_seconds(port) < NAGLE_DELAY / 2  # TCP_NODELAY on the connections
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.output()[-3000:]
    assert "Communication attempt on fd 3" in proc.output(), proc.output()[-3000:]


def keep_alive_request_seconds(port: int, count: int = 21) -> float:
    """The median time of ``count`` GETs in a row on one keep-alive connection."""
    connection = http.client.HTTPConnection(HOST, port, timeout=10)
    times = []
    try:
        for number in range(count):
            started = time.monotonic()
            connection.request("GET", f"/orders/{number}")
            response = connection.getresponse()
            assert (response.status, response.will_close) == (200, False)
            response.read()
            times.append(time.monotonic() - started)
    finally:
        connection.close()
    return sorted(times)[count // 2]


# -- the probes the tests rely on ------------------------------------------------------------


def test_the_filter_probe_sees_a_filter(held: socket.socket) -> None:
    """:func:`filtered` reads back what :mod:`graceful._servers.backlog` attaches (a probe that
    never saw one would pass the tests above)."""
    assert not filtered(held)
    other = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with other:
        other.bind((HOST, 0))
        other.listen(8)
        assert block_new_connections(other)
        assert filtered(other)
