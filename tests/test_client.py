"""The drain-aware clients against real servers on 127.0.0.1: each retry rule (and the POST that
must not be sent twice), ``NoNodeAvailable``, the fall back to draining nodes, each way a node
leaves rotation (push notice, in-band header, refused connection) and comes back (probe, push).

One set of behaviour tests for the three clients (``graceful.client.Pool`` for requests, and
httpx's ``Client`` and ``AsyncClient`` over ``graceful.httpx``'s transports): ``make_pool`` is
parametrized over them (:mod:`_clients`). What only the requests pool has (its session, its
verbs, its path check) is tested at the end, on it alone.

Real nodes are ``tests/e2e/apps/load_app.py`` under wsgiref (graceful middleware, control routes
with a token, ``GET /version`` answers with the process id, ``POST /orders`` records each id in
``<pid>.ids``); push notices come from the same app under uvicorn (``asgi_app``), a server that
holds event streams whatever its settings. Where no graceful node can behave a certain way
(closing a connection before any answer, holding an answer, ``Connection: close``), a small
in-process fake server does (or a raw socket server, :mod:`_raw_node`), and counts what it
received. A connect timeout is a real listener whose accept queue is full.
"""

from __future__ import annotations

import dataclasses
import http.server
import itertools
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from _clients import KINDS, Answer, Client, make_client
from _raw_node import Exchange, Handler, RawNode, answer, hold
from conftest import Proc, Spawn, closed_at_end, unused_port, wait_until

from graceful import signals
from graceful.client import NodeState, NodeStatus, NoNodeAvailable, Pool

APPS = Path(__file__).parent / "e2e" / "apps"
TOKEN = "client-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NO_PROBE = 60.0  # a probe interval no test lasts: what changes a node is not a probe
NODE_ENV = {"GRACEFUL_TOKEN": TOKEN, "GRACEFUL_DELAY": "0.2", "GRACEFUL_DRAIN_TIMEOUT": "2"}


# -- real nodes ------------------------------------------------------------------------------


@dataclasses.dataclass
class Node:
    url: str
    proc: Proc
    records: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ids(self) -> list[str]:
        path = self.records / f"{self.pid}.ids"
        return path.read_text().split() if path.exists() else []

    def control(self, action: str) -> None:
        response = requests.post(f"{self.url}/-/graceful/{action}", headers=AUTH, timeout=5)
        assert response.status_code == 200, response.text


def node_argv(port: int, server: str = "wsgiref") -> list[str]:
    if server == "uvicorn":
        return [
            *(sys.executable, "-m", "uvicorn", "load_app:asgi_app", "--app-dir", str(APPS)),
            *("--host", "127.0.0.1", "--port", str(port), "--no-access-log"),
        ]
    return [sys.executable, str(APPS / "load_app.py"), "--port", str(port)]


def ready(url: str) -> bool:
    try:
        return requests.get(url + "/readyz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def wait_ready(nodes: list[Node]) -> None:
    for node in nodes:
        wait_ready_one(node)


def wait_ready_one(node: Node) -> None:
    wait_until(
        lambda: ready(node.url),
        timeout=20,
        message=lambda: f"{node.url} ready; output:\n{node.proc.output()}",
    )


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Node]]:
    """Two healthy nodes for the tests that never drain them (ids are unique per test)."""
    records = tmp_path_factory.mktemp("shared-records")
    nodes = []
    try:
        for n in range(2):
            port = unused_port()
            env = {**NODE_ENV, "LOAD_RECORD_DIR": str(records)}
            proc = Proc(node_argv(port), records / f"node-{n}.log", env=env)
            nodes.append(Node(f"http://127.0.0.1:{port}", proc, records))
        wait_ready(nodes)
        yield nodes
    finally:
        for node in nodes:
            node.proc.stop()


StartNodes = Callable[..., list[Node]]


@pytest.fixture
def start_nodes(spawn: Spawn, tmp_path: Path) -> StartNodes:
    """Start ``count`` nodes of this test's own (stopped at teardown), optionally on ``ports``."""

    def start(
        count: int = 1, *, ports: list[int] | None = None, server: str = "wsgiref", **env: str
    ) -> list[Node]:
        nodes = []
        for port in ports or [unused_port() for _ in range(count)]:
            extra = {**NODE_ENV, "LOAD_RECORD_DIR": str(tmp_path), **env}
            proc = spawn(node_argv(port, server), env=extra, name="node")
            nodes.append(Node(f"http://127.0.0.1:{port}", proc, tmp_path))
        wait_ready(nodes)
        return nodes

    return start


# -- fake nodes ------------------------------------------------------------------------------


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


class Fake:
    """An in-process server on 127.0.0.1 that behaves one way and counts what it received.

    ``close``: reads the request, closes the connection without any answer. ``hold``: answers
    only once ``release`` is set. ``connection-close``: answers 200 with ``Connection: close``.
    ``app-503``: 503 with ``Graceful-State: draining`` and ``Retry-After``, as the app's own 503
    reaches a caller through a draining node's middleware. ``rejected``: the middleware's own
    rejection (reject mode), marked ``Graceful-Rejected: 1``. ``stall-body``: 200 with a
    ``Content-Length`` of 10 and 4 bytes of it, the rest only once ``release`` is set.
    Anything else (``answer``): answers 200 ``fake`` and keeps the connection.
    """

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.received: list[tuple[str, str, bytes]] = []
        self.headers: list[dict[str, str]] = []  # each request's headers, lower-case names
        self.release = threading.Event()
        self.holding = threading.Event()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are two writes

            def do_GET(self) -> None:
                fake.handle(self)

            do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

            def do_HEAD(self) -> None:
                fake.received.append(("HEAD", self.path, b""))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,))
        self.thread.start()

    def handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        self.received.append((handler.command, handler.path, body))
        self.headers.append({k.lower(): v for k, v in handler.headers.items()})
        if self.behaviour == "close":
            handler.close_connection = True  # no answer at all: the socket just closes
            return
        if self.behaviour == "hold":
            self.holding.set()
            self.release.wait(10)  # bounded: teardown sets it
        if self.behaviour in ("app-503", "rejected"):
            handler.send_response(503)
            handler.send_header("Content-Length", "8")
            handler.send_header("Retry-After", "1")
            handler.send_header("Graceful-State", "draining")
            if self.behaviour == "rejected":
                handler.send_header("Graceful-Rejected", "1")
            handler.end_headers()
            handler.wfile.write(b"app: 503" if self.behaviour == "app-503" else b"rejected")
            return
        if self.behaviour == "stall-body":
            handler.send_response(200)
            handler.send_header("Content-Length", "10")
            handler.end_headers()
            handler.wfile.write(b"part")
            handler.wfile.flush()
            self.holding.set()
            self.release.wait(10)
            handler.wfile.write(b"of it!")
            return
        handler.send_response(200)
        handler.send_header("Content-Length", "4")
        if self.behaviour == "connection-close":
            handler.send_header("Connection", "close")
            handler.close_connection = True
        handler.end_headers()
        handler.wfile.write(b"fake")

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def fake() -> Iterator[Callable[[str], Fake]]:
    with closed_at_end(Fake) as make:
        yield make


# -- pools -----------------------------------------------------------------------------------

MakePool = Callable[..., Client]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """Which client: ``requests`` (the pool), ``httpx`` or ``httpx-async`` (the transports)."""
    kind: str = request.param
    return kind


@pytest.fixture
def make_pool(kind: str) -> Iterator[MakePool]:
    """Make a client of each kind in turn over the given nodes (no watch, no probe in time,
    unless asked)."""
    made: list[Client] = []

    def pool(*urls: str, **kwargs: Any) -> Client:
        kwargs.setdefault("watch", False)
        kwargs.setdefault("probe_interval", NO_PROBE)
        made.append(make_client(kind, list(urls), **kwargs))
        return made[-1]

    try:
        yield pool
    finally:
        for client in made:
            client.dispose()


@pytest.fixture
def make_requests_pool() -> Iterator[Callable[..., Pool]]:
    """The requests pool alone, for what only it has."""

    def pool(*urls: str, **kwargs: Any) -> Pool:
        kwargs.setdefault("watch", False)
        kwargs.setdefault("probe_interval", NO_PROBE)
        return Pool(list(urls), **kwargs)

    with closed_at_end(pool) as make:
        yield make


def status(pool: Client | Pool, url: str) -> NodeStatus:
    return next(node for node in pool.nodes if node.url == url)


def watching(pool: Client | Pool) -> str:
    """What the pool's events watchers are doing, where the pool says (a failure's detail)."""
    for holder in (pool, getattr(pool, "_transport", None), getattr(pool, "transport", None)):
        watches = getattr(holder, "_watches", None)
        if watches is not None:
            return f"watchers: {watches!r}"
    return "(the watchers' state is not known)"


def refused_url() -> str:
    return f"http://127.0.0.1:{unused_port()}"  # nothing listens there


@pytest.fixture
def unanswered_url() -> Iterator[str]:
    """A node whose connections time out: a real listener on 127.0.0.1 that never accepts, its
    accept queue (``listen(0)``) filled by one connection, so the kernel drops every further
    SYN and a connect neither succeeds nor is refused."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    queued: list[socket.socket] = []
    try:
        for _ in range(8):  # Linux queues backlog + 1; stop at the first connect that hangs
            probe = socket.socket()
            probe.settimeout(0.2)
            try:
                probe.connect(("127.0.0.1", port))
            except TimeoutError:
                probe.close()
                break
            queued.append(probe)
        else:
            pytest.fail("the accept queue never filled: every connect succeeded")
        yield f"http://127.0.0.1:{port}"
    finally:
        for one in queued:
            one.close()
        listener.close()


def served_by(response: Answer | requests.Response) -> int:
    assert response.status_code == 200, response.text
    pid: int = response.json()["pid"]
    return pid


def new_id() -> str:
    return uuid.uuid4().hex


# -- retry rules -----------------------------------------------------------------------------


def assert_sent_once_to(node: Node, pool: Client, method: str) -> None:
    """A GET or a POST made through ``pool`` was served by ``node`` (a POST exactly once)."""
    if method == "GET":
        assert served_by(pool.get("/version")) == node.pid
    else:
        oid = new_id()
        assert pool.post("/orders", data={"id": oid}).status_code == 201
        assert node.ids().count(oid) == 1


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_refused_connection_goes_to_the_next_node_whatever_the_method(
    method: str, shared: list[Node], make_pool: MakePool
) -> None:
    good = shared[0]
    dead = refused_url()
    pool = make_pool(dead, good.url)  # round robin starts with the first node: the dead one

    assert_sent_once_to(good, pool, method)

    assert status(pool, dead).state is NodeState.DOWN
    assert status(pool, dead).reason == f"refused ({pool.refused})"
    assert status(pool, good.url).state is NodeState.IN_SERVICE


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_connect_timeout_goes_to_the_next_node_whatever_the_method_and_says_so(
    method: str, shared: list[Node], unanswered_url: str, make_pool: MakePool
) -> None:
    good = shared[0]
    pool = make_pool(unanswered_url, good.url, timeout=(0.3, 10))  # round robin: the first

    assert_sent_once_to(good, pool, method)

    silent = status(pool, unanswered_url)
    assert (silent.state, silent.reason) == (NodeState.DOWN, "connect timeout (0.3s)")
    assert status(pool, good.url).state is NodeState.IN_SERVICE


def test_no_node_available_says_connect_timeout_not_refused(
    unanswered_url: str, make_pool: MakePool
) -> None:
    pool = make_pool(unanswered_url, timeout=(0.3, 10))

    with pytest.raises(pool.NoNodeAvailable) as raised:
        pool.get("/x")
    assert (
        str(raised.value) == f"no node could take the request: {unanswered_url} (connect timeout)"
    )
    assert "refused" not in str(raised.value)

    with pytest.raises(pool.NoNodeAvailable) as raised:  # now it knows: down, and why
        pool.get("/x")
    assert f"{unanswered_url} (down: connect timeout (0.3s))" in str(raised.value)


def test_a_rejection_in_reject_mode_goes_to_the_next_node_and_a_post_is_served_once(
    shared: list[Node], start_nodes: StartNodes, make_pool: MakePool
) -> None:
    """A real draining node in reject mode: it rejects a GET (marked ``Graceful-Rejected``) and
    the pool sends it to the next node; it serves a POST (never rejected), exactly once."""
    (rejecting,) = start_nodes(GRACEFUL_REJECT_WHEN_DRAINING="1")
    good = shared[0]
    rejecting.control("drain")
    direct = requests.get(rejecting.url + "/version", timeout=5)
    assert (direct.status_code, direct.headers.get("Graceful-State")) == (503, "draining")
    assert direct.headers.get("Graceful-Rejected") == "1"
    pool = make_pool(rejecting.url, good.url)  # it does not know: watch=False, no request yet

    assert served_by(pool.get("/version")) == good.pid

    assert status(pool, rejecting.url).state is NodeState.DRAINING
    assert status(pool, rejecting.url).reason == "response: draining (Graceful-State: draining)"
    unaware = make_pool(rejecting.url, good.url)
    oid = new_id()
    assert unaware.post("/orders", data={"id": oid}).status_code == 201
    assert (rejecting.ids(), oid in good.ids()) == ([oid], False)


@pytest.mark.parametrize("method", ["GET", "PUT", "POST", "PATCH"])
def test_an_app_503_from_a_draining_node_is_returned_to_the_caller_and_never_sent_again(
    method: str, shared: list[Node], fake: Callable[[str], Fake], make_pool: MakePool
) -> None:
    """``Graceful-State: draining`` is on every answer of a draining node, the app's own 503s
    included: only the middleware's mark says the app never saw the request."""
    app_503, good = fake("app-503"), shared[0]
    pool = make_pool(app_503.url, good.url)
    oid = new_id()

    response = pool.request(method, "/orders", data={"id": oid})

    assert (response.status_code, response.text) == (503, "app: 503")
    assert app_503.received == [(method, "/orders", f"id={oid}".encode())]
    assert oid not in good.ids()
    assert status(pool, app_503.url).state is NodeState.DRAINING  # it still says it drains
    assert served_by(pool.get("/version")) == good.pid


def test_app_503s_from_every_node_while_all_drain_are_answers_not_no_node_available(
    fake: Callable[[str], Fake], make_pool: MakePool
) -> None:
    nodes = [fake("app-503") for _ in range(3)]
    pool = make_pool(*(node.url for node in nodes))

    answers = [pool.post("/orders", data={"id": str(n)}).status_code for n in range(6)]

    assert answers == [503] * 6
    assert sorted(body for node in nodes for _, _, body in node.received) == sorted(
        f"id={n}".encode() for n in range(6)
    )


@pytest.mark.parametrize("method", ["GET", "POST", "PATCH"])
def test_a_rejection_marked_graceful_rejected_goes_to_the_next_node_whatever_the_method(
    method: str, fake: Callable[[str], Fake], make_pool: MakePool
) -> None:
    rejecting, other = fake("rejected"), fake("answer")
    pool = make_pool(rejecting.url, other.url)

    response = pool.request(method, "/orders", data={"id": "r-1"})

    assert response.text == "fake"
    assert rejecting.received == other.received == [(method, "/orders", b"id=r-1")]
    assert status(pool, rejecting.url).state is NodeState.DRAINING


@pytest.mark.parametrize(
    ("method", "headers", "options"),
    [
        ("GET", {}, {}),
        ("PUT", {}, {}),
        ("POST", {"Idempotency-Key": "k-1"}, {"resend_with_idempotency_key": True}),
    ],
    ids=["GET", "PUT", "POST with Idempotency-Key, resend_with_idempotency_key=True"],
)
def test_a_connection_closed_before_an_answer_goes_to_the_next_node_when_replayable(
    method: str,
    headers: dict[str, str],
    options: dict[str, Any],
    shared: list[Node],
    fake: Callable[[str], Fake],
    make_pool: MakePool,
) -> None:
    closing, good = fake("close"), shared[0]
    pool = make_pool(closing.url, good.url, **options)
    oid = new_id()

    response = pool.request(method, "/orders", data={"id": oid}, headers=headers)

    assert len(closing.received) == 1
    assert closing.received[0][:2] == (method, "/orders")
    if method == "POST":
        assert response.status_code == 201
        assert good.ids().count(oid) == 1
    else:
        assert response.status_code == 404  # the good node has no such route: it answered
    # A closed connection is no sign of a drain: the node stays in rotation.
    assert status(pool, closing.url).state is NodeState.IN_SERVICE


@pytest.mark.parametrize(
    ("method", "headers"),
    [("POST", {}), ("POST", {"Idempotency-Key": "k-3"}), ("PATCH", {"Idempotency-Key": "k-4"})],
    ids=["POST", "POST with Idempotency-Key", "PATCH with Idempotency-Key"],
)
def test_by_default_a_post_whose_connection_closed_before_an_answer_is_not_sent_again(
    method: str,
    headers: dict[str, str],
    shared: list[Node],
    fake: Callable[[str], Fake],
    make_pool: MakePool,
) -> None:
    """Whatever its headers: it may have reached the app (resend_with_idempotency_key is off)."""
    closing, good = fake("close"), shared[0]
    pool = make_pool(closing.url, good.url)
    assert pool.resend_with_idempotency_key is False
    oid = new_id()

    with pytest.raises(pool.Closed) as raised:
        pool.request(method, "/orders", data={"id": oid}, headers=headers)

    assert not isinstance(raised.value, pool.NoNodeAvailable)  # the caller's own error, as it was
    assert closing.received == [(method, "/orders", f"id={oid}".encode())]  # received once
    assert oid not in good.ids()  # and never sent to the other node


@pytest.mark.parametrize(
    ("method", "headers"),
    [("GET", {}), ("POST", {"Idempotency-Key": "k-2"})],
    ids=["GET", "POST with Idempotency-Key"],
)
def test_a_read_timeout_is_never_sent_again(
    method: str, headers: dict[str, str], fake: Callable[[str], Fake], make_pool: MakePool
) -> None:
    holding, other = fake("hold"), fake("connection-close")
    pool = make_pool(holding.url, other.url, resend_with_idempotency_key=True)

    with pytest.raises(pool.ReadTimeout):
        pool.request(method, "/slow", headers=headers, timeout=(3, 0.3))

    assert len(holding.received) == 1
    assert other.received == []
    assert [node.inflight for node in pool.nodes] == [0, 0]


# -- a hung node: read timeouts ----------------------------------------------------------------


@pytest.fixture
def hung() -> Iterator[RawNode]:
    """A real socket server that accepts every connection, reads the request, never answers."""
    node = RawNode(default=hold)
    try:
        yield node
    finally:
        node.close()


def test_consecutive_read_timeouts_take_a_hung_node_out_of_rotation(
    hung: RawNode, shared: list[Node], make_pool: MakePool
) -> None:
    good = shared[0]
    pool = make_pool(hung.url, good.url, timeout=(3, 1.0))  # round robin: the hung one first
    assert pool.read_timeouts_to_down == 3

    outcomes: list[int | str] = []
    timed_out_urls: list[str] = []
    for _ in range(12):
        try:
            outcomes.append(served_by(pool.get("/version")))
        except pool.ReadTimeout as exc:
            outcomes.append("read timeout")
            request = getattr(exc, "request", None)
            timed_out_urls.append(str(request and request.url))

    assert outcomes == ["read timeout", good.pid] * 3 + [good.pid] * 6
    if pool.kind == "requests":  # httpx names the client's URL (the service's), not the node's
        assert timed_out_urls == [f"{hung.url}/version"] * 3
    assert len(hung.to("/version")) == 3  # none after the third: out of rotation
    out = status(pool, hung.url)
    assert (out.state, out.reason) == (NodeState.DOWN, "read timeout (3 in a row, 1s)")
    assert [node.inflight for node in pool.nodes] == [0, 0]


def test_an_answer_from_the_node_starts_its_read_timeout_count_again(
    fake: Callable[[str], Fake], make_pool: MakePool
) -> None:
    holding = fake("hold")
    pool = make_pool(holding.url, read_timeouts_to_down=2)
    with pytest.raises(pool.ReadTimeout):
        pool.get("/slow", timeout=(3, 0.3))
    holding.release.set()  # it answers now
    assert pool.get("/fast").text == "fake"
    holding.release.clear()
    with pytest.raises(pool.ReadTimeout):
        pool.get("/slow", timeout=(3, 0.3))
    assert status(pool, holding.url).state is NodeState.IN_SERVICE  # one in a row, not two


def test_a_post_that_timed_out_on_a_hung_node_is_never_sent_again(
    hung: RawNode, shared: list[Node], make_pool: MakePool
) -> None:
    good = shared[0]
    pool = make_pool(hung.url, good.url, timeout=(3, 1.0), read_timeouts_to_down=1)
    oid = new_id()

    with pytest.raises(pool.ReadTimeout):
        pool.post("/orders", data={"id": oid})

    assert [request.body for request in hung.to("/orders")] == [f"id={oid}".encode()]
    assert oid not in good.ids()
    assert status(pool, hung.url).state is NodeState.DOWN  # and the next call goes elsewhere
    assert served_by(pool.get("/version")) == good.pid


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_read_timeout_in_the_middle_of_the_body_is_a_read_timeout_too(
    method: str, fake: Callable[[str], Fake], make_pool: MakePool
) -> None:
    """requests raises a ``ConnectionError`` when the body stalls (headers came), httpx a
    ``ReadTimeout``: the app has the request, so it is not sent again, and it counts as a read
    timeout of the node."""
    stalling, other = fake("stall-body"), fake("answer")
    pool = make_pool(stalling.url, other.url, read_timeouts_to_down=1)

    with pytest.raises(pool.BodyStall) as raised:
        pool.request(method, "/slow", timeout=(3, 0.3))

    assert not isinstance(raised.value, pool.NoNodeAvailable)
    assert len(stalling.received) == 1
    assert other.received == []
    out = status(pool, stalling.url)
    assert (out.state, out.reason) == (NodeState.DOWN, "read timeout (0.3s)")


def test_read_timeouts_to_down_must_be_at_least_one(make_pool: MakePool) -> None:
    with pytest.raises(ValueError, match="read_timeouts_to_down must be at least 1, not 0"):
        make_pool(refused_url(), read_timeouts_to_down=0)


@pytest.mark.parametrize("seconds", [0, -1.0, float("nan"), float("inf")])
def test_probe_timeout_must_be_positive_seconds(seconds: float, make_pool: MakePool) -> None:
    with pytest.raises(ValueError, match="probe_timeout must be > 0 seconds"):
        make_pool(refused_url(), probe_timeout=seconds)


# -- probes a node cannot abuse ---------------------------------------------------------------


def trickle(exchange: Exchange) -> None:
    """200, then a chunked body of one byte every 0.2 s that never ends."""
    exchange.head("200 OK", [("Transfer-Encoding", "chunked")])
    while exchange.send(b"1\r\n.\r\n"):
        if exchange.node.closing.wait(0.2):
            return


def readyz(handler: Handler) -> dict[str, Handler]:
    return {"/readyz": handler}


READY = answer("200 OK", [("Content-Type", "application/health+json")], b'{"status":"pass"}')


@pytest.fixture
def raw_nodes() -> Iterator[Callable[..., RawNode]]:
    with closed_at_end(RawNode) as make:
        yield make


def down_pool(make_pool: MakePool, count: int, **kwargs: Any) -> tuple[Client, list[int]]:
    """A pool over ``count`` ports nothing listens on yet, every node of it down (refused)."""
    ports = [unused_port() for _ in range(count)]
    pool = make_pool(*(f"http://127.0.0.1:{port}" for port in ports), **kwargs)
    with pytest.raises(pool.NoNodeAvailable):
        pool.get("/x")
    assert [node.state for node in pool.nodes] == [NodeState.DOWN] * count
    return pool, ports


def test_a_probe_answer_that_never_ends_neither_holds_up_the_prober_nor_blocks_readmission(
    raw_nodes: Callable[..., RawNode], make_pool: MakePool
) -> None:
    pool, (endless_port, late_port) = down_pool(make_pool, 2, probe_interval=0.3)
    endless = raw_nodes(readyz(trickle), port=endless_port)
    wait_until(lambda: endless.to("/readyz"), timeout=10, message="a probe of the endless one")
    raw_nodes(readyz(READY), port=late_port)

    wait_until(
        lambda: [node.state for node in pool.nodes] == [NodeState.IN_SERVICE] * 2,
        timeout=10,
        message=lambda: f"both back: {pool.nodes}",
    )


def test_a_hung_probe_does_not_hold_up_the_probes_of_other_nodes(
    raw_nodes: Callable[..., RawNode], make_pool: MakePool
) -> None:
    pool, (hung_port, late_port) = down_pool(make_pool, 2, probe_interval=0.3, probe_timeout=30)
    hung = raw_nodes({}, default=hold, port=hung_port)
    wait_until(lambda: hung.to("/readyz"), timeout=10, message="a probe of the hung one")
    late = raw_nodes(readyz(READY), port=late_port)

    wait_until(lambda: pool.nodes[1].state is NodeState.IN_SERVICE, timeout=10)

    assert pool.nodes[0].state is NodeState.DOWN
    assert len(hung.to("/readyz")) == 1  # its probe still hangs: no second one meanwhile
    assert late.to("/readyz")


def test_a_probe_does_not_follow_a_redirect(
    raw_nodes: Callable[..., RawNode], make_pool: MakePool
) -> None:
    elsewhere = raw_nodes(readyz(READY))
    pool, (port,) = down_pool(make_pool, 1, probe_interval=0.3)
    raw_nodes(readyz(answer("302 Found", [("Location", elsewhere.url + "/readyz")])), port=port)

    wait_until(lambda: pool.nodes[0].state is NodeState.DRAINING, timeout=10)

    assert pool.nodes[0].reason == "probe: not ready (302)"
    assert elsewhere.requests == []


def test_probes_keep_no_cookies(raw_nodes: Callable[..., RawNode], make_pool: MakePool) -> None:
    """A node cannot grow the pool's memory, or follow it about, with cookies."""
    count = itertools.count()

    def cookie(exchange: Exchange) -> None:
        exchange.respond("503 Service Unavailable", [("Set-Cookie", f"c{next(count)}=1")])

    pool, (port,) = down_pool(make_pool, 1, probe_interval=0.1)
    node = raw_nodes(readyz(cookie), port=port)

    wait_until(lambda: len(node.to("/readyz")) >= 5, timeout=10)

    if isinstance(pool.sender, Pool):  # the httpx transports' probes have no cookie jar
        assert len(pool.sender._side.cookies) == 0
    assert [r.headers.get("cookie") for r in node.to("/readyz")] == [None] * len(node.to("/readyz"))


@pytest.mark.parametrize("max_attempts", [1, 2, 3])
def test_at_most_max_attempts_sends(
    max_attempts: int, fake: Callable[[str], Fake], make_pool: MakePool
) -> None:
    closing = [fake("close") for _ in range(4)]
    kwargs = {} if max_attempts == 3 else {"max_attempts": max_attempts}  # 3 is the default
    pool = make_pool(*(one.url for one in closing), **kwargs)

    with pytest.raises(pool.NoNodeAvailable) as raised:
        pool.get("/x")

    assert sum(len(one.received) for one in closing) == max_attempts
    assert str(raised.value).count("connection closed before an answer") == max_attempts


def test_max_attempts_must_be_at_least_one(make_pool: MakePool) -> None:
    with pytest.raises(ValueError, match="max_attempts must be at least 1, not 0"):
        make_pool(refused_url(), max_attempts=0)


# -- no node available, and the fall back to draining nodes ----------------------------------


def test_no_node_available_names_each_node_and_why(
    shared: list[Node], start_nodes: StartNodes, make_pool: MakePool
) -> None:
    dead_1, dead_2 = refused_url(), refused_url()
    (draining,) = start_nodes(GRACEFUL_REJECT_WHEN_DRAINING="1")
    draining.control("drain")
    pool = make_pool(dead_1, dead_2, draining.url)

    with pytest.raises(pool.NoNodeAvailable) as raised:
        pool.get("/version")
    message = str(raised.value)
    assert message.startswith("no node could take the request: ")
    assert f"{dead_1} (connection refused)" in message
    assert f"{dead_2} (connection refused)" in message
    assert f"{draining.url} (rejected while draining)" in message

    # Now that it knows: every node is down or draining; the draining one is still tried.
    with pytest.raises(pool.NoNodeAvailable) as raised:
        pool.get("/version")
    message = str(raised.value)
    assert f"{dead_1} (down: refused ({pool.refused}))" in message
    assert f"{dead_2} (down: refused ({pool.refused}))" in message
    assert f"{draining.url} (rejected while draining)" in message


def test_no_node_available_is_raised_at_once_when_every_node_is_down(
    make_pool: MakePool,
) -> None:
    dead = refused_url()
    pool = make_pool(dead)
    with pytest.raises(pool.NoNodeAvailable):
        pool.get("/x")
    with pytest.raises(pool.NoNodeAvailable, match=rf"down: refused \({pool.refused}\)"):
        pool.get("/x")


def test_when_every_node_is_draining_the_draining_nodes_still_serve(
    start_nodes: StartNodes, make_pool: MakePool
) -> None:
    nodes = start_nodes(2)
    for node in nodes:
        node.control("drain")
    pool = make_pool(*(node.url for node in nodes))

    pids = {served_by(pool.get("/version")) for _ in range(6)}

    assert [node.state for node in pool.nodes] == [NodeState.DRAINING] * 2
    assert pids <= {node.pid for node in nodes}
    oid = new_id()
    assert pool.post("/orders", data={"id": oid}).status_code == 201
    assert sum(node.ids().count(oid) for node in nodes) == 1


def test_least_inflight_sends_new_requests_to_the_node_with_fewer_in_flight(
    fake: Callable[[str], Fake], make_pool: MakePool
) -> None:
    holding, other = fake("hold"), fake("answer")
    pool = make_pool(holding.url, other.url, balance="least_inflight")
    held: list[Answer] = []
    call = threading.Thread(target=lambda: held.append(pool.get("/held")))
    call.start()  # both idle: the first node
    try:
        wait_until(lambda: status(pool, holding.url).inflight == 1, timeout=5)
        answers = [pool.get(f"/next/{n}").text for n in range(6)]  # round robin: 3 would hold
        assert answers == ["fake"] * 6
        assert [path for _, path, _ in other.received] == [f"/next/{n}" for n in range(6)]
        assert [path for _, path, _ in holding.received] == ["/held"]
    finally:
        holding.release.set()
        call.join(10)
    assert [response.text for response in held] == ["fake"]
    assert [node.inflight for node in pool.nodes] == [0, 0]


# -- leaving rotation in band, coming back by probe ------------------------------------------


def test_a_response_saying_graceful_state_draining_takes_the_node_out(
    shared: list[Node], start_nodes: StartNodes, make_pool: MakePool
) -> None:
    (draining,) = start_nodes()
    good = shared[0]
    draining.control("drain")
    pool = make_pool(draining.url, good.url)

    first = pool.get("/version")
    assert served_by(first) == draining.pid  # it still serves: in-flight and this one
    assert first.headers["Graceful-State"] == "draining"
    assert status(pool, draining.url).state is NodeState.DRAINING

    assert {served_by(pool.get("/version")) for _ in range(6)} == {good.pid}


def test_a_response_with_connection_close_takes_the_node_out(
    shared: list[Node], fake: Callable[[str], Fake], make_pool: MakePool
) -> None:
    closing, good = fake("connection-close"), shared[0]
    pool = make_pool(closing.url, good.url)

    assert pool.get("/version").text == "fake"
    assert status(pool, closing.url).state is NodeState.DRAINING
    assert status(pool, closing.url).reason == "response: draining (Connection: close)"

    assert {served_by(pool.get("/version")) for _ in range(6)} == {good.pid}
    assert len(closing.received) == 1


def test_the_probe_readmits_a_node_once_its_readyz_passes(
    shared: list[Node], start_nodes: StartNodes, make_pool: MakePool
) -> None:
    interval = 0.3
    good, port = shared[0], unused_port()
    late = f"http://127.0.0.1:{port}"
    pool = make_pool(late, good.url, probe_interval=interval)
    assert served_by(pool.get("/version")) == good.pid  # refused by the node not yet started
    assert status(pool, late).state is NodeState.DOWN

    (node,) = start_nodes(ports=[port])  # returns once its /readyz passes
    ready_at = time.monotonic()
    wait_until(lambda: status(pool, late).state is NodeState.IN_SERVICE, timeout=10)
    back_after = time.monotonic() - ready_at

    assert status(pool, late).reason == "probe: ready"
    assert back_after <= interval + 1.0
    assert node.pid in {served_by(pool.get("/version")) for _ in range(4)}


# -- push notices ----------------------------------------------------------------------------


def test_watch_takes_a_drained_node_out_and_a_resume_readmits_it_without_a_probe(
    shared: list[Node], start_nodes: StartNodes, make_pool: MakePool
) -> None:
    (node,) = start_nodes(server="uvicorn")
    good = shared[0]
    pool = make_pool(node.url, good.url, watch=True)  # probe_interval 60 s: no probe in time
    changes: list[NodeStatus] = []

    def receiver(sender: object, node: NodeStatus) -> None:
        changes.append(node)

    signals.node_changed.connect(receiver, sender=pool.sender)
    try:
        node.control("drain")
        wait_until(lambda: changes, timeout=10, message="the push notice")
        assert changes[0].url == node.url
        assert changes[0].state is NodeState.DRAINING
        assert changes[0].reason == "notice: draining (drained by control route)"
        assert status(pool, node.url).state is NodeState.DRAINING

        assert {served_by(pool.get("/version")) for _ in range(6)} == {good.pid}

        node.control("resume")
        wait_until(
            lambda: status(pool, node.url).state is NodeState.IN_SERVICE,
            timeout=10,
            message=lambda: f"the resume notice: {status(pool, node.url)}, {watching(pool)}",
        )
    finally:
        signals.node_changed.disconnect(receiver, sender=pool.sender)
    assert status(pool, node.url).reason == "notice: serving (resumed by control route)"
    assert [change.state for change in changes] == [NodeState.DRAINING, NodeState.IN_SERVICE]
    assert node.pid in {served_by(pool.get("/version")) for _ in range(4)}


def test_a_node_flapping_between_draining_and_serving_ends_as_its_last_notice_says(
    start_nodes: StartNodes, make_pool: MakePool
) -> None:
    (node,) = start_nodes(server="uvicorn")
    pool = make_pool(node.url, watch=True)
    changes: list[NodeStatus] = []

    def receiver(sender: object, node: NodeStatus) -> None:
        changes.append(node)

    signals.node_changed.connect(receiver, sender=pool.sender)
    slow: list[Answer] = []
    # One request in flight through all of it (the slow endpoint's sleep IS the behaviour).
    call = threading.Thread(target=lambda: slow.append(pool.get("/slow?seconds=1.5")))
    call.start()
    try:
        wait_until(lambda: status(pool, node.url).inflight == 1, timeout=5)
        node.control("drain")
        wait_until(lambda: changes, timeout=10, message="the first push notice")  # subscribed
        for action in ("resume", "drain", "resume", "drain"):
            node.control(action)
        wait_until(lambda: len(changes) == 5, timeout=10, message=lambda: f"5 changes: {changes}")
        assert status(pool, node.url).state is NodeState.DRAINING
        assert status(pool, node.url).inflight == 1
    finally:
        signals.node_changed.disconnect(receiver, sender=pool.sender)
        call.join(10)
    assert [change.state for change in changes] == [
        NodeState.DRAINING,
        NodeState.IN_SERVICE,
        NodeState.DRAINING,
        NodeState.IN_SERVICE,
        NodeState.DRAINING,
    ]
    assert [response.status_code for response in slow] == [200]
    assert status(pool, node.url).inflight == 0
    assert served_by(pool.get("/version")) == node.pid  # the only node: draining, it serves


# -- what the pool reports, and what it refuses ----------------------------------------------


def test_pool_nodes_report_state_inflight_last_change_and_reason(
    fake: Callable[[str], Fake], make_pool: MakePool
) -> None:
    holding = fake("hold")
    dead = refused_url()
    before = time.monotonic()
    pool = make_pool(holding.url + "/", dead)  # a trailing slash is dropped
    after = time.monotonic()

    nodes = pool.nodes
    assert [(n.url, n.state, n.inflight, n.reason) for n in nodes] == [
        (holding.url, NodeState.IN_SERVICE, 0, "new"),
        (dead, NodeState.IN_SERVICE, 0, "new"),
    ]
    assert all(before <= n.changed_at <= after for n in nodes)

    call = threading.Thread(target=pool.get, args=("/held",))
    call.start()
    try:
        wait_until(lambda: status(pool, holding.url).inflight == 1, timeout=5)
    finally:
        holding.release.set()
        call.join(10)
    assert status(pool, holding.url).inflight == 0

    pool.get("/next")  # round robin: the dead node, refused, then the holding one
    down = status(pool, dead)
    assert (down.state, down.inflight, down.reason) == (
        NodeState.DOWN,
        0,
        f"refused ({pool.refused})",
    )
    assert down.changed_at > after


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/x", "https://example.com/", "orders/1", ""])
def test_requests_take_a_path_not_a_url(
    url: str, fake: Callable[[str], Fake], make_requests_pool: Callable[..., Pool]
) -> None:
    node = fake("connection-close")
    pool = make_requests_pool(node.url)
    with pytest.raises(ValueError, match="Pool requests take a path like /orders/1"):
        pool.get(url)
    assert node.received == []


def test_a_path_may_carry_a_url_in_its_query(
    fake: Callable[[str], Fake], make_pool: MakePool
) -> None:
    node = fake("connection-close")
    pool = make_pool(node.url)
    assert pool.get("/callback?next=http://example.com/x").status_code == 200
    assert node.received == [("GET", "/callback?next=http://example.com/x", b"")]


@pytest.mark.parametrize(
    "node", ["127.0.0.1:8000", "ftp://127.0.0.1:8000", "http://", "http://127.0.0.1:8000/?a=1"]
)
def test_a_node_is_a_base_url(node: str, make_pool: MakePool) -> None:
    with pytest.raises(ValueError, match="a node is a base URL like http://"):
        make_pool(node)


def test_a_closed_pool_refuses_requests_and_stops_its_threads(
    shared: list[Node], make_pool: MakePool
) -> None:
    pool = make_pool(shared[0].url, shared[1].url, watch=True)
    assert pool.get("/version").status_code == 200

    pool.close()

    with pytest.raises(RuntimeError, match=pool.closed_message):
        pool.get("/version")
    wait_until(
        lambda: not pool.background(),
        timeout=5,
        message=lambda: f"threads or tasks stopped: {pool.background()}",
    )


def test_one_pool_shared_by_threads_loses_and_duplicates_nothing(
    shared: list[Node], make_pool: MakePool
) -> None:
    pool = make_pool(*(node.url for node in shared), watch=True)
    ids = [new_id() for _ in range(8 * 15)]
    chunks = [ids[i::8] for i in range(8)]
    pids: list[int] = []
    errors: list[BaseException] = []
    counter = itertools.count()

    def work(mine: list[str]) -> None:
        try:
            for oid in mine:
                assert pool.post("/orders", data={"id": oid}).status_code == 201
                if next(counter) % 2:
                    pids.append(served_by(pool.get("/version")))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(chunk,)) for chunk in chunks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert errors == []
    wanted = set(ids)
    recorded = [oid for node in shared for oid in node.ids() if oid in wanted]
    assert sorted(recorded) == sorted(ids)  # each acknowledged POST processed exactly once
    posted_to = {node.pid for node in shared if wanted.intersection(node.ids())}
    assert set(pids) | posted_to == {node.pid for node in shared}  # both nodes served
    assert [(n.state, n.inflight) for n in pool.nodes] == [(NodeState.IN_SERVICE, 0)] * 2


# -- a pool has a session; it is not one -----------------------------------------------------


def test_a_pool_holds_its_session_and_each_verb_takes_a_path(
    fake: Callable[[str], Fake], make_requests_pool: Callable[..., Pool]
) -> None:
    node = fake("answer")
    pool = make_requests_pool(node.url)
    assert not isinstance(pool, requests.Session)
    pool.session.headers["X-Caller"] = "billing"  # what the calls' session sends, the calls send

    answers = [
        pool.get("/a", params={"q": "1"}),
        pool.post("/b", json={"id": 1}),
        pool.put("/c", data=b"c"),
        pool.patch("/d", data=b"d"),
        pool.delete("/e"),
        pool.options("/f"),
        pool.head("/g"),
        pool.request("get", "/h"),
    ]

    assert [a.status_code for a in answers] == [200] * 8
    assert [(method, path) for method, path, _ in node.received] == [
        ("GET", "/a?q=1"),
        ("POST", "/b"),
        ("PUT", "/c"),
        ("PATCH", "/d"),
        ("DELETE", "/e"),
        ("OPTIONS", "/f"),
        ("HEAD", "/g"),
        ("GET", "/h"),
    ]
    assert node.received[1][2] == b'{"id": 1}'
    assert [h.get("x-caller") for h in node.headers] == ["billing"] * 7  # HEAD is not recorded
    with pytest.raises(ValueError, match="take a path like /orders/1"):
        pool.get(node.url + "/a")


def test_a_pool_is_a_context_manager_that_stops_its_threads_and_refuses_calls_after(
    fake: Callable[[str], Fake],
) -> None:
    node = fake("answer")
    with Pool([node.url], watch=True, probe_interval=NO_PROBE) as pool:
        assert pool.get("/x").status_code == 200
    wait_until(lambda: not any(t.is_alive() for t in pool._threads), timeout=10)
    with pytest.raises(RuntimeError, match="closed"):
        pool.get("/x")


def test_no_node_available_is_a_graceful_error_and_a_requests_connection_error(
    make_requests_pool: Callable[..., Pool],
) -> None:
    from graceful._core.errors import GracefulError

    pool = make_requests_pool(refused_url())
    with pytest.raises(NoNodeAvailable) as raised:
        pool.get("/x")
    assert isinstance(raised.value, GracefulError)
    assert isinstance(raised.value, requests.ConnectionError)
