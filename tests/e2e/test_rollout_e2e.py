"""``graceful rollout`` end to end: three real nodes behind real nginx or HAProxy, under load.

Each test starts three nodes serving ``tests/e2e/apps/load_app.py`` (started and restarted by
``tests/e2e/apps/node_ctl.py``, the restart command the rollout runs: SIGTERM, wait for the
exit, start the next version), a front on 127.0.0.1, and 32 callers through it with keep-alive
(``rollout_harness.Load``: GETs, POSTs with unique ids, 3-second requests, bounded streams).
While the load runs every node is restarted into version ``v2``:

- without the library (plain gunicorn, SIGTERM and start): the harness sees failed requests;
- by ``graceful rollout`` (a real subprocess): no request fails, every acknowledged POST was
  processed exactly once, every node answers ``v2`` from a new process and is back in rotation.

"No request fails" is for callers that follow one retry rule (the harness's, Go's
``net/http``'s): a request whose *reused* keep-alive connection closed before any byte of an
answer is sent once more on a fresh connection (GET, or POST with an ``Idempotency-Key``). nginx
reloads (``--lb nginx``) close idle client connections, so such retries happen there; the tests
count them, print the count, and check that each one had no byte of an answer on a reused
connection. In reject mode nginx is never reloaded and no request needs a retry.

Without nginx or HAProxy these tests skip, except under CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import wait_until as poll_until
from rollout_harness import (
    BACKEND,
    CallerConnection,
    Cluster,
    Load,
    LoadReport,
    RolloutRun,
    answered_retries,
    run_rollout,
    start_haproxy,
    start_nginx,
)
from rollout_harness import (
    required_binary as binary,
)

from graceful._balancers import nginx as nginx_ctl
from graceful.haproxy import RuntimeAPI
from graceful.rollout import READINESS_SETTLE

if TYPE_CHECKING:
    from conftest import Spawn, WaitUntil

pytestmark = pytest.mark.e2e

TOKEN = "rollout-e2e-Token-7f3"
NODES = 3
#: Acknowledged POSTs before the restarts begin, and again after the last one.
WARM_UP = 60
COOL_DOWN = 60
#: The library's settings on every node. The delay only has to outlast HAProxy's check
#: (inter 500ms fall 1); nginx learns of a cut from the rollout, not from the delay.
NODE_ENV = {
    "GRACEFUL_DELAY": "1",
    "GRACEFUL_DRAIN_TIMEOUT": "15",
    "GRACEFUL_TOKEN": TOKEN,
}
REJECT_ENV = {**NODE_ENV, "GRACEFUL_REJECT_WHEN_DRAINING": "1"}


MakeCluster = Callable[[str, dict[str, str]], Cluster]


@pytest.fixture
def make_cluster(tmp_path: Path, wait_until: WaitUntil) -> Iterator[MakeCluster]:
    """Start three ready nodes of a kind; at teardown every process node_ctl started for them
    (the first ones and every restart) is killed, and their logs printed."""
    clusters: list[Cluster] = []

    def make(kind: str, env: dict[str, str]) -> Cluster:
        cluster = Cluster(tmp_path / f"nodes-{len(clusters)}", kind, NODES, env)
        clusters.append(cluster)
        cluster.start()
        cluster.wait_ready(wait_until)
        return cluster

    try:
        yield make
    finally:
        for cluster in clusters:
            killed = cluster.kill_all()
            sys.stdout.write(f"--- nodes of {cluster.state} (killed {killed}):\n{cluster.logs()}\n")


def wait_acked(load: Load, wait_until: WaitUntil, count: int, what: str) -> None:
    target = load.acked_count() + count
    wait_until(
        lambda: load.acked_count() >= target,
        timeout=30,
        interval=0.05,
        message=lambda: f"{count} POSTs acknowledged {what} ({load.snapshot()})",
    )


def figures(label: str, report: LoadReport, run: RolloutRun | None = None) -> str:
    """One line of figures for the report (printed: ``pytest -s`` or a failure shows it)."""
    took = "" if run is None else f", rollout {run.seconds:.1f}s exit {run.returncode}"
    line = (
        f"FIGURES {label}: sent {report.sent} {report.by_kind}, failures {len(report.failures)}, "
        f"stale-connection retries {len(report.retries)}, acked {len(report.acked)}, "
        f"load {report.seconds:.1f}s{took}"
    )
    print(line)
    return line


def assert_exactly_once(cluster: Cluster, report: LoadReport) -> None:
    recorded = collections.Counter(cluster.recorded_ids())
    lost = [oid for oid in report.acked if recorded[oid] == 0]
    twice = sorted(oid for oid, count in recorded.items() if count > 1)
    assert not lost, f"acknowledged but never processed: {lost[:10]}"
    assert not twice, f"processed more than once: {twice[:10]}"
    assert len(report.acked) >= WARM_UP + COOL_DOWN


def assert_new_versions(
    cluster: Cluster, before: list[tuple[str, int]], masters: list[int | None]
) -> None:
    """Every node answers v2, from another process than before, started by its restart."""
    after = cluster.versions()
    assert [version for version, _ in before] == ["v1"] * NODES
    assert [version for version, _ in after] == ["v2"] * NODES, after
    for (_, old_pid), (_, new_pid), node in zip(before, after, cluster.nodes, strict=True):
        assert new_pid != old_pid, f"node {node.index} still answers from pid {old_pid}"
    now = [node.pid() for node in cluster.nodes]
    assert None not in masters and None not in now, (masters, now)
    assert all(old != new for old, new in zip(masters, now, strict=True)), (masters, now)


def assert_in_rotation_after(cluster: Cluster, report: LoadReport, since: int) -> None:
    """Each node processed some of the POSTs acknowledged after the rollout: back in rotation."""
    late = set(report.acked[since:])
    for node in cluster.nodes:
        assert late & cluster.ids_of(node), f"node {node.index} got no POST after the rollout"


def roll_under_load(
    label: str,
    cluster: Cluster,
    url: str,
    lb_args: list[str],
    tmp_path: Path,
    wait_until: WaitUntil,
    *,
    extra_context: Callable[[], str],
    after_rollout: Callable[[], None] = lambda: None,
) -> tuple[RolloutRun, LoadReport]:
    """Roll every node of ``cluster`` (``graceful rollout`` with ``lb_args``, each node
    verified on ``/version``) while :class:`Load` calls ``url``, and assert the rollout was
    lossless: it went through, no call failed, every acknowledged POST ran exactly once, every
    node runs a new version in a new process and is back in rotation. ``after_rollout`` runs
    once the rollout went through, before the cool-down; ``extra_context`` is added to the
    assertion messages; the FIGURES line is labelled ``label``."""
    before, masters = cluster.versions(), [node.pid() for node in cluster.nodes]
    load = Load(url).start()
    try:
        wait_acked(load, wait_until, WARM_UP, "before the rollout")
        run = run_rollout(
            cluster, lb_args, tmp_path / "rollout.json", token=TOKEN, extra=["--verify", "/version"]
        )
        if run.returncode == 0:
            after_rollout()
        acked_at_end = load.acked_count()
        if run.returncode == 0:
            wait_acked(load, wait_until, COOL_DOWN, "after the rollout")
    finally:
        report = load.stop()
    figures(label, report, run)
    context = f"{run.describe()}\n{report.summary()}\n{extra_context()}"
    assert run.returncode == 0, context
    assert report.failures == [], context
    assert_exactly_once(cluster, report)
    assert_new_versions(cluster, before, masters)
    assert_in_rotation_after(cluster, report, acked_at_end)
    assert run.log is not None and run.log.get("ok") is True, run.log
    return run, report


# -- 1. without the library: the harness sees the failures ---------------------------------


def test_a_naive_restart_of_every_node_behind_nginx_fails_requests(
    make_cluster: MakeCluster, spawn: Spawn, tmp_path: Path, wait_until: WaitUntil
) -> None:
    """No library anywhere: plain gunicorn (its own SIGTERM stop), nginx with upstream
    keep-alive and its own retry rules (the library's snippet is part of the library), each
    node restarted in turn by the same node_ctl. POSTs that nginx had written into a keep-alive
    connection the stopping node closed come back 502: the harness must see them, or its zeros
    below prove nothing. (The shipped snippet does not resend them either: nginx cannot tell
    whether the app ran a POST it had sent.)"""
    nginx = binary("nginx")
    cluster = make_cluster("plain-gunicorn", {})
    front = start_nginx(spawn, wait_until, nginx, tmp_path / "nginx", cluster.nodes, snippet=False)
    before, masters = cluster.versions(), [node.pid() for node in cluster.nodes]
    load = Load(front.url).start()
    try:
        wait_acked(load, wait_until, WARM_UP, "before the restarts")
        for node in cluster.nodes:
            # SIGTERM and start: no drain, nobody tells nginx; next node once this one serves.
            cluster.ctl("restart", node.index)
            wait_until(
                lambda: node.version()[0] == "v2",  # noqa: B023 (called before the next loop)
                timeout=40,
                message=functools.partial(cluster.log, node),
            )
        wait_acked(load, wait_until, COOL_DOWN, "after the restarts")
    finally:
        report = load.stop()
    figures("naive restart, nginx, plain gunicorn", report)
    assert_new_versions(cluster, before, masters)
    assert report.failures, "a naive restart under load failed nothing: the harness is blind\n" + (
        report.summary()
    )


# -- 2-4. graceful rollout behind nginx ----------------------------------------------------


@pytest.mark.parametrize("mode", ["nginx", "reject"])
@pytest.mark.parametrize("kind", ["gunicorn", "uvicorn"])
def test_a_rollout_behind_nginx_under_load_fails_nothing_and_processes_every_post_once(
    kind: str,
    mode: str,
    make_cluster: MakeCluster,
    spawn: Spawn,
    tmp_path: Path,
    wait_until: WaitUntil,
) -> None:
    """``nginx``: the rollout cuts each node with the upstream controller (``down``, reload)
    and puts it back (``up``, reload). Each reload closes nginx's idle client keep-alive
    connections; a caller that writes its next request into one at that instant gets no answer
    at all, and the harness sends that request once more on a fresh connection (GET, or POST
    with an ``Idempotency-Key``: the one retry rule of :class:`rollout_harness.Load`). Zero
    failures here means zero for callers that do this: the test counts those retries (printed in
    the FIGURES line), and asserts that every one got no byte of an answer on a reused
    connection (never a retry after a response) and that no POST was processed twice.
    ``reject``: nodes in reject mode, nginx with the shipped retry rules, ``--lb none``: the
    draining node's 503s (every method but POST, PATCH and LOCK, which it serves) are retried
    by nginx, nginx is never reloaded, and no caller needs a retry at all (asserted: zero)."""
    nginx = binary("nginx")
    cluster = make_cluster(kind, NODE_ENV if mode == "nginx" else REJECT_ENV)
    front = start_nginx(spawn, wait_until, nginx, tmp_path / "nginx", cluster.nodes)
    upstream_before = front.upstream_file.read_text()
    workers_before = front.workers()
    lb_args = front.rollout_args() if mode == "nginx" else ["--lb", "none"]
    run, report = roll_under_load(
        f"rollout --lb {'none' if mode == 'reject' else mode}, {kind}",
        cluster,
        front.url,
        lb_args,
        tmp_path,
        wait_until,
        extra_context=lambda: f"nginx errors:\n{front.errors()}",
    )
    context = f"{run.describe()}\n{report.summary()}\nnginx errors:\n{front.errors()}"
    if mode == "nginx":
        print(f"stale-connection retries after nginx reloads: {len(report.retries)}")
        assert answered_retries(report.retries) == [], context  # all unanswered, all reused
        # Every server line up again: the file is back as it was; nginx was reloaded.
        assert front.upstream_file.read_text() == upstream_before
        # Reloaded: what the controller guarantees, not a race (an old worker may still be
        # listed while it shuts down).
        assert front.workers() - workers_before
        assert all(nginx_ctl._quitting(pid) for pid in workers_before)
    else:
        assert report.retries == [], "no reload happened: no stale connection to retry"
        # Reject mode at work: draining nodes refused requests, nginx sent them on.
        assert front.retried_after_503(), "no request was refused by a draining node"
        assert front.proc.alive() and front.workers() == workers_before, "nginx was reloaded"
        assert front.upstream_file.read_text() == upstream_before


# -- 5. graceful rollout behind HAProxy ----------------------------------------------------


@pytest.mark.parametrize("lb", ["haproxy", "readiness"])
def test_a_rollout_behind_haproxy_under_load_fails_nothing_and_processes_every_post_once(
    lb: str, make_cluster: MakeCluster, spawn: Spawn, tmp_path: Path, wait_until: WaitUntil
) -> None:
    """``haproxy``: the rollout drains each server through the runtime API and sets it ready
    again. ``readiness``: no runtime command at all, HAProxy's own ``/readyz`` checks take the
    draining node out (it drains through its control route; no reject mode) and back in."""
    haproxy = binary("haproxy")
    cluster = make_cluster("gunicorn", NODE_ENV)
    front = start_haproxy(spawn, wait_until, haproxy, tmp_path / "haproxy", cluster.nodes)
    api = RuntimeAPI(str(front.socket))
    lb_args = ["--lb", lb]
    if lb == "haproxy":
        lb_args += ["--haproxy-socket", str(front.socket), "--haproxy-backend", BACKEND]

    def all_up() -> None:
        for name in front.servers.values():  # readiness: the last node rises on its own
            api.wait_for_state(BACKEND, name, admin="ready", operational="up", timeout=10)

    run, _ = roll_under_load(
        f"rollout --lb {lb}, gunicorn, haproxy",
        cluster,
        front.url,
        lb_args,
        tmp_path,
        wait_until,
        extra_context=lambda: f"haproxy:\n{front.proc.output()[-3000:]}",
        after_rollout=all_up,
    )
    assert run.log is not None
    # readiness: after each node, time for HAProxy's rise 2 x inter 500ms before the next one.
    events = run.log["events"]
    assert isinstance(events, list)
    settles = [event["index"] for event in events if event["step"] == "settle"]
    if lb == "readiness":
        assert run.log["settle"] == READINESS_SETTLE and settles == [0, 1, 2], run.log
    else:
        assert run.log["settle"] == 0 and settles == [], run.log


# -- the harness's one retry rule, against a scripted server ---------------------------------


class ScriptedServer:
    """A raw HTTP/1.1 server on 127.0.0.1: ``script[(connection, request)]`` says what the
    ``request``-th request (from 0) on the ``connection``-th connection gets: ``"answer"``
    (200 ``ok``, kept alive), ``"close"`` (closed without a byte), ``"cut"`` (the headers and
    part of the body, then closed), ``"reset"`` (the first bytes of a status line, then a
    reset). Anything not in the script is answered."""

    def __init__(self, script: dict[tuple[int, int], str]) -> None:
        self.script = script
        self.client_received: Callable[[], int] = lambda: 0  # bytes the client has read
        self.requests: list[tuple[int, int, bytes]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.port: int = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        for number in range(10):  # bounded: a test opens a few connections at most
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                self.serve_connection(conn, number)

    def serve_connection(self, conn: socket.socket, number: int) -> None:
        buffer, sent = b"", 0
        for index in range(100):
            while b"\r\n\r\n" not in buffer:
                data = conn.recv(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buffer) < length:
                buffer += conn.recv(65536)
            self.requests.append((number, index, head.split(b"\r\n")[0]))
            buffer = buffer[length:]
            action = self.script.get((number, index), "answer")
            if action == "close":
                return
            if action == "cut":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok")
                return
            if action == "reset":
                conn.sendall(b"HTTP/1.1 2")
                sent += 10  # read by the client before the reset, which would discard them
                poll_until(lambda: self.client_received() >= sent, timeout=5)  # noqa: B023
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return  # closed with SO_LINGER 0: a reset
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            conn.sendall(answer)
            sent += len(answer)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() under way
        self.listener.close()
        self.thread.join(15)
        assert not self.thread.is_alive()


def exchange(server: ScriptedServer, *calls: tuple[str, dict[str, str]]) -> Load:
    """Send ``calls`` (method, headers) in turn on one caller connection of a load."""
    load = Load(f"http://127.0.0.1:{server.port}", timeout=10)
    caller = CallerConnection(load, 0)
    server.client_received = lambda: 0 if caller.conn is None else caller.conn.received
    try:
        for method, headers in calls:
            body = b"id=1" if method == "POST" else None
            answer = caller.send(method, "/", body, headers, method)
            if answer is not None:
                assert answer == (200, b"ok")
    finally:
        caller.close()
        server.close()
    return load


GET: tuple[str, dict[str, str]] = ("GET", {})
POST: tuple[str, dict[str, str]] = ("POST", {})
KEYED_POST: tuple[str, dict[str, str]] = ("POST", {"Idempotency-Key": "1"})


@pytest.mark.parametrize("second", [GET, KEYED_POST], ids=["GET", "POST-with-key"])
def test_the_load_resends_once_what_a_reused_connection_lost_before_any_answer(
    second: tuple[str, dict[str, str]],
) -> None:
    server = ScriptedServer({(0, 1): "close"})
    load = exchange(server, GET, second)
    assert (len(load.retries), load.failures) == (1, [])
    assert [(c, i) for c, i, _ in server.requests] == [(0, 0), (0, 1), (1, 0)]
    [retry] = load.retries
    assert (retry.reused, retry.answer_bytes) == (True, 0)
    assert answered_retries(load.retries) == []


@pytest.mark.parametrize(
    ("script", "calls"),
    [
        ({(0, 1): "close"}, (GET, POST)),  # not idempotent, no key: never resent
        ({(0, 0): "close"}, (GET,)),  # a fresh connection: not a stale one
        ({(0, 1): "cut"}, (GET, GET)),  # part of the answer came: never resent
        ({(0, 1): "reset"}, (GET, GET)),  # part of a status line came: never resent
        ({(0, 1): "close", (1, 0): "close"}, (GET, GET)),  # resent once, not twice
    ],
    ids=["POST-without-key", "fresh-connection", "answer-begun", "status-begun", "only-once"],
)
def test_the_load_counts_a_failure_it_may_not_resend(
    script: dict[tuple[int, int], str], calls: tuple[tuple[str, dict[str, str]], ...]
) -> None:
    server = ScriptedServer(script)
    load = exchange(server, *calls)
    assert answered_retries(load.retries) == []  # never resent after an answer began
    assert len(load.failures) == 1, load.failures
    assert len(load.retries) == (1 if len(script) == 2 else 0)
