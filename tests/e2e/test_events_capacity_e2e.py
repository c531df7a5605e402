"""Events streams never take a node's capacity from requests and probes (issue 10, item 1).

Real servers on 127.0.0.1 serving ``tests/e2e/apps/load_app.py``:

- gunicorn sync workers answer every events request at once with ``204 Graceful-Events: off``
  (a stream would hold the worker's only thread);
- gthread workers hold at most ``threads // 4`` streams each, and the node (all workers) at
  most ``events_max_subscribers``: past either, 503 with ``Retry-After``;
- uvicorn workers under gunicorn share the node-wide cap too; plain uvicorn serves requests
  whatever the number of streams;
- a client that closes its stream frees its slot within a second or two, gthread and a WSGI
  server that is not gunicorn (wsgiref, threaded) included.

Streams are raw sockets: a test reads the status line and headers only, with a bound, and keeps
the socket open for as long as the stream must stay open. Every socket is closed at teardown.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pytest
import requests

from graceful.testing import wait_answering

if TYPE_CHECKING:
    from conftest import Proc, Spawn, WaitUntil

pytestmark = pytest.mark.e2e

APPS = Path(__file__).parent / "apps"
TOKEN = "events-capacity-Token-7f3"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EVENTS = "/-/graceful/events"
#: Bounds on one answer: generous, since the machine may be busy; a worker held by a stream
#: never answers at all, so these only decide how long a failing run takes.
ANSWER_TIMEOUT = 10.0
#: How long a closed stream may keep its slot before the test fails. A release takes a second
#: or two; before the fix it took the next heartbeat (15 s by default) and one more write.
RELEASE_DEADLINE = 8.0


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    sock: socket.socket


class Streams:
    """Events requests on raw sockets, kept open until :meth:`close_all`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.open: list[Answer] = []

    def request(self) -> Answer:
        """Send ``GET /-/graceful/events`` and read the answer's head (bounded)."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=ANSWER_TIMEOUT)
        head = b""
        try:
            sock.sendall(f"GET {EVENTS} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)  # bounded by the socket's timeout
                if not chunk:
                    break
                head += chunk
        except TimeoutError:
            sock.close()
            raise AssertionError(
                f"no answer to {EVENTS} within {ANSWER_TIMEOUT:g}s: every worker is held"
            ) from None
        except BaseException:
            sock.close()
            raise
        lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        if not lines[0].startswith("HTTP/"):
            sock.close()
            raise AssertionError(f"not an HTTP answer: {head[:200]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        answer = Answer(int(lines[0].split()[1]), headers, sock)
        self.open.append(answer)
        return answer

    def admitted(self) -> list[Answer]:
        return [answer for answer in self.open if answer.status == 200]

    def close(self, answer: Answer) -> None:
        """Close like a client that read everything so far (a FIN, not a reset)."""
        answer.sock.setblocking(False)
        with contextlib.suppress(OSError):
            while answer.sock.recv(65536):
                pass
        answer.sock.close()
        self.open.remove(answer)

    def close_all(self) -> None:
        for answer in self.open:
            answer.sock.close()
        self.open.clear()


MakeStreams = Callable[[int], Streams]


@pytest.fixture
def streams() -> Iterator[MakeStreams]:
    """``streams(port)``: a :class:`Streams`; every socket it opened is closed at teardown."""
    holder: list[Streams] = []

    def make(port: int) -> Streams:
        holder.append(Streams(port))
        return holder[-1]

    try:
        yield make
    finally:
        for each in holder:
            each.close_all()


@dataclass
class Node:
    proc: Proc
    url: str
    port: int


class StartNode(Protocol):
    def __call__(
        self,
        argv_for: Callable[[int], list[str]],
        *,
        workers: int = ...,
        env: dict[str, str] | None = ...,
    ) -> Node: ...


@pytest.fixture
def start_node(spawn: Spawn, tmp_path: Path, free_port: int, wait_until: WaitUntil) -> StartNode:
    """Start ``argv_for(port)`` on a free port and wait until every worker is ready."""

    def start(
        argv_for: Callable[[int], list[str]],
        *,
        workers: int = 1,
        env: dict[str, str] | None = None,
    ) -> Node:
        settings = {"GRACEFUL_TOKEN": TOKEN, "LOAD_RECORD_DIR": str(tmp_path), **(env or {})}
        argv = argv_for(free_port)
        proc = spawn(argv, env=settings, name=argv[2])
        url = f"http://127.0.0.1:{free_port}"

        def ready() -> bool:
            if not proc.alive():
                pytest.fail(f"{argv[:3]} exited with {proc.popen.returncode}:\n{proc.output()}")
            children = _children(proc.pid)
            return (workers == 1 or len(children) == workers) and all(
                requests.get(url + "/readyz", timeout=2).status_code == 200
                for _ in range(workers * 3)
            )

        wait_until(ready, timeout=30, message=lambda: f"{argv[:3]} ready:\n{proc.output()}")
        return Node(proc, url, free_port)

    return start


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(p) for p in children.read().split()]


def gunicorn(
    workers: int, *args: str, app: str = "load_app:wsgi_app"
) -> Callable[[int], list[str]]:
    """gunicorn with graceful's hooks serving ``app`` (a function of the port)."""

    def argv(port: int) -> list[str]:
        return [
            *(sys.executable, "-m", "gunicorn", "-c", "python:graceful.gunicorn"),
            *("--bind", f"127.0.0.1:{port}", "--workers", str(workers)),
            *("--chdir", str(APPS), "--graceful-timeout", "5", *args, app),
        ]

    return argv


def node_subscribers(url: str) -> int:
    """The node's open events streams (all workers), from the status route."""
    response = requests.get(url + "/-/graceful/status", headers=AUTH, timeout=ANSWER_TIMEOUT)
    assert response.status_code == 200, response.text
    count: int = response.json()["events_subscribers"]
    return count


def assert_requests_unaffected(url: str, count: int = 20) -> None:
    """``count`` real requests and as many probes, four at a time: every one answers 200."""

    def one(path: str) -> str:
        try:
            response = requests.get(url + path, timeout=ANSWER_TIMEOUT)
        except requests.RequestException as exc:
            return f"{path}: {type(exc).__name__}"
        return "ok" if response.status_code == 200 else f"{path}: {response.status_code}"

    paths = ["/ping", "/readyz"] * count
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(one, paths))
    failures = [outcome for outcome in outcomes if outcome != "ok"]
    assert not failures, f"{len(failures)} of {len(paths)} failed: {failures[:10]}"


def open_until_admitted(streams: Streams, wanted: int, attempts: int = 60) -> None:
    """Open streams until ``wanted`` are admitted (each connection lands on some worker)."""
    for _ in range(attempts):
        if len(streams.admitted()) >= wanted:
            return
        answer = streams.request()
        assert answer.status in (200, 503), answer
        if answer.status == 503:
            streams.close(answer)
    assert len(streams.admitted()) >= wanted, f"{wanted} streams never admitted"


def assert_full(answer: Answer) -> None:
    assert answer.status == 503, answer
    assert answer.headers.get("content-type") == "application/health+json", answer.headers
    assert int(answer.headers["retry-after"]) >= 1, answer.headers


# -- gunicorn sync ----------------------------------------------------------------------------


def test_sync_workers_answer_events_at_once_with_204_and_keep_serving(
    start_node: StartNode, streams: MakeStreams
) -> None:
    node = start_node(gunicorn(2, "-k", "sync"), workers=2)
    opened = streams(node.port)
    answers = [opened.request() for _ in range(6)]  # three times the workers
    for answer in answers:
        assert answer.status == 204, answer
        assert answer.headers.get("graceful-events") == "off", answer.headers
        assert answer.headers.get("cache-control") == "no-store", answer.headers
    assert_requests_unaffected(node.url)
    assert node_subscribers(node.url) == 0


# -- gunicorn gthread -------------------------------------------------------------------------

GTHREAD = ("-k", "gthread", "--threads", "8")


def test_gthread_node_wide_cap_holds_and_requests_all_succeed(
    start_node: StartNode, streams: MakeStreams
) -> None:
    # Two workers of 8 threads: 2 streams each at most (8 // 4), and 3 for the whole node.
    env = {"GRACEFUL_EVENTS_MAX_SUBSCRIBERS": "3"}
    node = start_node(gunicorn(2, *GTHREAD), workers=2, env=env)
    opened = streams(node.port)
    # A burst of 12 at once: never more than the cap admitted, whatever the race.
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        burst = list(pool.map(lambda _: opened.request(), range(12)))
    admitted = [answer for answer in burst if answer.status == 200]
    for answer in burst:
        if answer.status != 200:
            assert_full(answer)
    assert 1 <= len(admitted) <= 3, [answer.status for answer in burst]
    assert node_subscribers(node.url) == len(admitted)
    open_until_admitted(opened, 3)
    assert node_subscribers(node.url) == 3
    # The node is full: every worker refuses, whichever gets the connection.
    for _ in range(12):
        assert_full(opened.request())
    assert node_subscribers(node.url) == 3
    assert_requests_unaffected(node.url)


def test_gthread_worker_share_leaves_most_threads_to_requests(
    start_node: StartNode, streams: MakeStreams
) -> None:
    # One worker of 8 threads, the default cap (100): 2 streams, then 503.
    node = start_node(gunicorn(1, *GTHREAD), workers=1)
    opened = streams(node.port)
    answers = [opened.request() for _ in range(12)]
    assert [answer.status for answer in answers] == [200, 200] + [503] * 10
    assert_requests_unaffected(node.url)


def test_gthread_with_few_threads_answers_204(start_node: StartNode, streams: MakeStreams) -> None:
    node = start_node(gunicorn(1, "-k", "gthread", "--threads", "3"))
    answer = streams(node.port).request()
    assert answer.status == 204, answer
    assert answer.headers.get("graceful-events") == "off", answer.headers


def test_gthread_closed_stream_frees_its_slot_within_seconds(
    start_node: StartNode, streams: MakeStreams, wait_until: WaitUntil
) -> None:
    env = {"GRACEFUL_EVENTS_MAX_SUBSCRIBERS": "2", "GRACEFUL_EVENTS_HEARTBEAT": "15"}
    node = start_node(gunicorn(1, *GTHREAD), workers=1, env=env)
    opened = streams(node.port)
    open_until_admitted(opened, 2)
    assert_full(opened.request())
    released = _close_one_and_time_release(opened, node.url, wait_until, remaining=1)
    print(f"FIGURES gthread: a closed events stream released its slot in {released:.2f}s")
    assert opened.request().status == 200  # the slot is free again


# -- a WSGI server that is not gunicorn (wsgiref, one thread a connection) ---------------------

#: A threaded wsgiref server (``python server.py PORT``). wsgiref says ``wsgi.multithread``
#: False even under ThreadingMixIn (the middleware would answer 204); this one runs a thread a
#: connection, so it says so.
THREADED_WSGIREF = """
import socketserver, sys
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import graceful


def ping(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "4")])
    return [b"pong"]


app = graceful.WSGIMiddleware(ping)


def threaded(environ, start_response):
    environ["wsgi.multithread"] = True
    return app(environ, start_response)


class Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


server = Server(("127.0.0.1", int(sys.argv[1])), Quiet)
server.set_app(threaded)
server.serve_forever(poll_interval=0.05)
"""


def test_threaded_wsgiref_closed_stream_frees_its_slot_within_seconds(
    spawn: Spawn, free_port: int, tmp_path: Path, streams: MakeStreams, wait_until: WaitUntil
) -> None:
    script = tmp_path / "threaded_wsgiref.py"
    script.write_text(THREADED_WSGIREF)
    env = {"GRACEFUL_TOKEN": TOKEN, "GRACEFUL_EVENTS_HEARTBEAT": "15"}
    proc = spawn([sys.executable, str(script), str(free_port)], env=env, name="wsgiref")
    url = f"http://127.0.0.1:{free_port}"
    wait_answering(free_port, timeout=30, process=proc)
    opened = streams(free_port)
    for _ in range(3):
        assert opened.request().status == 200
    released = _close_one_and_time_release(opened, url, wait_until, remaining=2)
    print(f"FIGURES wsgiref (threaded): a closed stream released its slot in {released:.2f}s")
    assert_requests_unaffected(url)


def test_single_threaded_wsgiref_answers_204(
    spawn: Spawn, free_port: int, tmp_path: Path, streams: MakeStreams, wait_until: WaitUntil
) -> None:
    # load_app's own runner: wsgiref, which says wsgi.multithread False.
    env = {"GRACEFUL_TOKEN": TOKEN, "LOAD_RECORD_DIR": str(tmp_path)}
    argv = [sys.executable, str(APPS / "load_app.py"), "--port", str(free_port)]
    proc = spawn(argv, env=env, name="wsgiref")
    url = f"http://127.0.0.1:{free_port}"
    wait_answering(free_port, timeout=30, process=proc)
    answer = streams(free_port).request()
    assert answer.status == 204, answer
    assert answer.headers.get("graceful-events") == "off", answer.headers
    assert_requests_unaffected(url)


def _close_one_and_time_release(
    opened: Streams, url: str, wait_until: WaitUntil, remaining: int
) -> float:
    assert node_subscribers(url) == remaining + 1
    closed_at = time.monotonic()
    opened.close(opened.admitted()[0])
    wait_until(
        lambda: node_subscribers(url) == remaining,
        timeout=RELEASE_DEADLINE,
        interval=0.1,
        message=f"the closed stream's slot to be released ({remaining} left)",
    )
    return time.monotonic() - closed_at


# -- uvicorn ----------------------------------------------------------------------------------


def test_uvicorn_workers_share_the_node_wide_cap(
    start_node: StartNode, streams: MakeStreams
) -> None:
    env = {"GRACEFUL_EVENTS_MAX_SUBSCRIBERS": "3"}
    argv = gunicorn(2, "-k", "uvicorn_worker.UvicornWorker", app="load_app:asgi_app")
    node = start_node(argv, workers=2, env=env)
    opened = streams(node.port)
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        burst = list(pool.map(lambda _: opened.request(), range(24)))
    assert len([answer for answer in burst if answer.status == 200]) <= 3
    assert node_subscribers(node.url) <= 3
    open_until_admitted(opened, 3)
    for _ in range(12):
        assert_full(opened.request())
    assert node_subscribers(node.url) == 3
    assert_requests_unaffected(node.url)


def test_plain_uvicorn_serves_requests_whatever_the_number_of_streams(
    start_node: StartNode, streams: MakeStreams, wait_until: WaitUntil
) -> None:
    env = {"GRACEFUL_EVENTS_MAX_SUBSCRIBERS": "60"}
    uvicorn = [sys.executable, "-m", "uvicorn", "load_app:asgi_app", "--app-dir", str(APPS)]
    node = start_node(lambda port: [*uvicorn, "--host", "127.0.0.1", "--port", str(port)], env=env)
    opened = streams(node.port)
    answers = [opened.request() for _ in range(70)]
    assert [answer.status for answer in answers] == [200] * 60 + [503] * 10
    assert_requests_unaffected(node.url)
    assert node_subscribers(node.url) == 60
    opened.close_all()
    wait_until(
        lambda: node_subscribers(node.url) == 0,
        timeout=RELEASE_DEADLINE,
        message="every closed stream released",
    )
