"""graceful.client.Pool end to end: a rolling SIGTERM restart of three real nodes under load.

Three server nodes on 127.0.0.1 serve ``tests/e2e/apps/pool_app.py`` behind the middleware:
``python -m uvicorn`` (the middleware takes over SIGTERM: it drains), or gunicorn gthread with
``-c python:graceful.gunicorn`` (gthread: the sync worker closes every connection, and
``Connection: close`` takes a node out of the pool's rotation). One :class:`Pool` is shared by
16 threads sending ``GET /orders/<id>`` and ``POST /orders`` (unique ids, no Idempotency-Key:
never resent once it may have been sent). Each node in turn gets SIGTERM, must exit 0, and is
started again on the same port; the load runs throughout.

No new request reaches a node after the pool took it out, checked exactly: the pool's
``node_changed`` signal for the change out carries ``changed_at`` and ``inflight``, the number of
requests the pool had picked that node for and not yet finished at that instant (picking and the
change happen under the pool's lock). The test mounts an adapter on the pool (:class:`Sends`)
that records, for every request, the node it was handed to and when its answer (or error) came
back, and stamps ``X-Sent-At`` on it as it goes out. Every request to the node still unanswered
at ``changed_at``, or sent after it (until the node is back), must be one of those ``inflight``:
a request picked after the change would be one more. ``time.monotonic`` is the pool's clock and
the adapter's, so the times compare.
"""

from __future__ import annotations

import collections
import dataclasses
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests
from conftest import unused_port
from requests.adapters import HTTPAdapter

from graceful import signals
from graceful.client import NodeState, NodeStatus, Pool

if TYPE_CHECKING:
    from conftest import Proc, Spawn, WaitUntil

pytestmark = [
    pytest.mark.e2e,
    # A pool thread that dies (a watcher on a stream cut mid-read) fails the test.
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]

APPS = Path(__file__).parent / "apps"
DELAY = 1.0
PROBE_INTERVAL = 1.0
NODES = 3
CALLERS = 16
#: Bounds on the load: calls per caller, and seconds in all (the restarts end it sooner).
MAX_CALLS = 20_000
MAX_LOAD_SECONDS = 120.0
#: Bound on one call: connecting, then waiting for the answer (a busy 2-core machine).
CALL_TIMEOUT = (3.05, 20.0)
#: The servers' idle keep-alive timeout, longer than the test. With gunicorn's default (2 s) a
#: POST sent on a pooled connection just as the server closes it for being idle is reset unread,
#: a race of keep-alive itself, in steady state too, not of a drain (about 2 POSTs in 900 when
#: callers idle ~2 s between calls); the pool must not resend such a POST (it may have been
#: processed, for all the caller knows), so the call fails. A drain closes connections through
#: ``Connection: close`` and the server's own stop, which this leaves as they are.
KEEP_ALIVE = 120
#: Calls made before the first restart and between two restarts.
CALLS_BETWEEN = 1000


# -- the nodes -------------------------------------------------------------------------------


@dataclasses.dataclass
class Life:
    """One process serving one node, from its start to its exit."""

    proc: Proc
    record_dir: Path
    ready_at: float | None = None
    """When the test first saw its ``/readyz`` answer 200 (the answer arrived)."""
    signal_at: float | None = None
    exited_at: float | None = None

    def served(self) -> list[tuple[float | None, bool, str]]:
        """``(X-Sent-At, draining on arrival, "METHOD path")`` of every request it served."""
        rows = []
        for path in sorted(self.record_dir.glob("*.served")):
            for line in path.read_text().splitlines():
                sent, draining, request = line.split(" ", 2)
                rows.append((None if sent == "-" else float(sent), draining == "1", request))
        return rows

    def ids(self) -> list[str]:
        return [
            line
            for path in sorted(self.record_dir.glob("*.ids"))
            for line in path.read_text().splitlines()
        ]


@dataclasses.dataclass
class Node:
    port: int
    lives: list[Life] = dataclasses.field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def life(self) -> Life:
        return self.lives[-1]


def argv_for(server: str, port: int) -> list[str]:
    if server == "uvicorn":
        return [
            *(sys.executable, "-m", "uvicorn", "pool_app:asgi_app", "--app-dir", str(APPS)),
            *("--host", "127.0.0.1", "--port", str(port), "--no-access-log"),
            *("--timeout-keep-alive", str(KEEP_ALIVE)),
        ]
    return [
        *(sys.executable, "-m", "gunicorn", "-c", "python:graceful.gunicorn"),
        *("--bind", f"127.0.0.1:{port}", "--workers", "2", "-k", "gthread", "--threads", "8"),
        *("--chdir", str(APPS), "--graceful-timeout", "20", "--keep-alive", str(KEEP_ALIVE)),
        "pool_app:wsgi_app",
    ]


class Cluster:
    def __init__(self, server: str, spawn: Spawn, tmp_path: Path, wait_until: WaitUntil) -> None:
        self.server = server
        self.spawn = spawn
        self.tmp_path = tmp_path
        self.wait_until = wait_until
        self.nodes = [Node(unused_port()) for _ in range(NODES)]

    def start(self, node: Node) -> Life:
        """Start a process for ``node`` (its next life); wait for it with :meth:`ready`."""
        record_dir = self.tmp_path / f"node{node.port}-life{len(node.lives)}"
        record_dir.mkdir()
        settings = {
            "GRACEFUL_DELAY": str(DELAY),
            "GRACEFUL_DRAIN_TIMEOUT": "10",
            "POOL_RECORD_DIR": str(record_dir),
        }
        proc = self.spawn(argv_for(self.server, node.port), env=settings, name=self.server)
        node.lives.append(Life(proc, record_dir))
        return node.life

    def ready(self, node: Node) -> float:
        """Poll the node's ``/readyz`` on fresh connections; when it first answered 200."""
        life = node.life

        def answered_ready() -> float | None:
            if not life.proc.alive():
                pytest.fail(f"{self.server} exited:\n{life.proc.output()}")
            ok = requests.get(node.url + "/readyz", timeout=2).status_code == 200
            return time.monotonic() if ok else None

        life.ready_at = self.wait_until(
            answered_ready, timeout=30, message=lambda: f"{node.url} ready:\n{life.proc.output()}"
        )
        return life.ready_at

    def stop(self, node: Node) -> None:
        """SIGTERM: the node drains and must exit 0 (bounded: delay + drain + a margin)."""
        life = node.life
        life.signal_at = time.monotonic()
        life.proc.send_signal(signal.SIGTERM)
        assert life.proc.wait(DELAY + 15) == 0, life.proc.output()
        life.exited_at = time.monotonic()


# -- the load --------------------------------------------------------------------------------


class Load:
    """``CALLERS`` threads sharing one pool: GET and POST in turn, every call checked."""

    def __init__(self, pool: Pool, began: float) -> None:
        self.pool = pool
        self.stop = threading.Event()
        self.began = began  # failures are timed from it
        self.deadline = self.began + MAX_LOAD_SECONDS
        self.calls = [0] * CALLERS
        self.acked: list[list[str]] = [[] for _ in range(CALLERS)]
        self.failures: list[str] = []
        self.threads = [
            threading.Thread(target=self.caller, args=(n,), name=f"caller-{n}", daemon=True)
            for n in range(CALLERS)
        ]
        for thread in self.threads:
            thread.start()

    @property
    def total(self) -> int:
        return sum(self.calls)

    def caller(self, n: int) -> None:
        for i in range(MAX_CALLS):
            if self.stop.is_set() or time.monotonic() > self.deadline:
                return
            oid = f"c{n}-{i}"
            sent_at = time.monotonic()  # when the caller called the pool
            try:
                if i % 2:
                    response = self.pool.get(f"/orders/{oid}", timeout=CALL_TIMEOUT)
                    ok = response.status_code == 200 and response.text == f"order {oid}\n"
                else:
                    response = self.pool.post("/orders", data={"id": oid}, timeout=CALL_TIMEOUT)
                    ok = response.status_code == 201 and response.text == f"created {oid}\n"
                    if ok:
                        self.acked[n].append(oid)
                if not ok:
                    self.failures.append(f"{oid}: {response.status_code} {response.text!r}")
            except requests.RequestException as exc:
                at = time.monotonic() - self.began
                where = exc.request.url if exc.request is not None else "?"
                sent = sent_at - self.began
                self.failures.append(
                    f"{oid} (sent {sent:+.3f}s, failed {at:+.3f}s, {where}): {exc!r}"
                )
            self.calls[n] += 1

    def finish(self) -> list[str]:
        """Stop the callers and wait for them; the names of any still running."""
        self.stop.set()
        for thread in self.threads:
            thread.join(sum(CALL_TIMEOUT) * 3 + 5)  # at most one call, and its retries, left
        return [thread.name for thread in self.threads if thread.is_alive()]


# -- what the pool saw ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Send:
    node: str
    sent: float
    """When the pool handed the request to the connection to ``node`` (after it picked it)."""
    returned: float
    """When the answer's headers, or the error, came back (before the pool counts it done)."""


class Sends(HTTPAdapter):
    """The pool's own adapter (its pool size, no urllib3 retries) that records every send."""

    def __init__(self, pool_connections: int) -> None:
        super().__init__(pool_connections=pool_connections, pool_maxsize=32, max_retries=0)
        self.seen: list[Send] = []
        self._lock = threading.Lock()

    def send(
        self, request: requests.PreparedRequest, *args: Any, **kwargs: Any
    ) -> requests.Response:
        node = "/".join((request.url or "").split("/", 3)[:3])  # http://host:port
        sent = time.monotonic()
        request.headers["X-Sent-At"] = repr(sent)
        try:
            return super().send(request, *args, **kwargs)
        finally:
            returned = time.monotonic()
            with self._lock:
                self.seen.append(Send(node, sent, returned))

    def to(self, node: str) -> list[Send]:
        with self._lock:
            return [send for send in self.seen if send.node == node]


class Changes:
    """Every ``node_changed`` signal of one pool."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.seen: list[NodeStatus] = []
        self._lock = threading.Lock()
        signals.node_changed.connect(self.receive, sender=pool, weak=False)

    def receive(self, sender: Any, node: NodeStatus) -> None:
        with self._lock:
            self.seen.append(node)

    def close(self) -> None:
        signals.node_changed.disconnect(self.receive, sender=self.pool)

    def first(self, url: str, after: float, *, back: bool) -> NodeStatus | None:
        """The first change of ``url`` at or after ``after``: into service (``back``), or out."""
        with self._lock:
            seen = list(self.seen)
        for status in seen:
            into_service = status.state is NodeState.IN_SERVICE
            if status.url == url and status.changed_at >= after and into_service == back:
                return status
        return None

    def log(self, since: float) -> str:
        with self._lock:
            seen = list(self.seen)
        return "\n".join(
            f"  {s.changed_at - since:+8.3f}s {s.url} -> {s.state.value} ({s.reason})" for s in seen
        )


@dataclasses.dataclass
class Restart:
    """One node's turn: its old life, what the pool saw, its new life."""

    node: Node
    old: Life
    new: Life
    out: NodeStatus
    """The pool's change out, with the requests in flight to the node at that instant."""
    back: NodeStatus
    sends: list[Send]
    """Every request the pool handed to the node's URL, over the whole test."""

    @property
    def taken_out_by(self) -> str:
        if self.out.reason.startswith("notice: draining"):
            return "push notice"
        if self.out.reason.startswith("response: draining"):
            return "in-band response"
        return "other"

    @property
    def out_after_signal(self) -> float:
        assert self.old.signal_at is not None
        return self.out.changed_at - self.old.signal_at

    @property
    def readmitted_after_ready(self) -> float:
        assert self.new.ready_at is not None
        return self.back.changed_at - self.new.ready_at

    def after_out(self) -> list[Send]:
        """Requests to the node unanswered when the pool took it out, or sent after that until
        it was back: at most the ``inflight`` of the change out, or some were picked after it."""
        out, back = self.out.changed_at, self.back.changed_at
        return [send for send in self.sends if send.returned > out and send.sent < back]

    def summary(self) -> str:
        old = self.old.served()
        draining = [sent for sent, flag, _ in old if flag and sent is not None]
        latest = max(draining, default=None)
        margin = "n/a" if latest is None else f"{(latest - self.out.changed_at) * 1000:+.1f} ms"
        assert self.old.exited_at is not None and self.old.signal_at is not None
        return (
            f"{self.node.url}: out {self.out_after_signal * 1000:.1f} ms after SIGTERM by "
            f"{self.taken_out_by} ({self.out.reason}) with {self.out.inflight} in flight, "
            f"{len(self.after_out())} unanswered or sent after it; {len(draining)} requests "
            f"served while draining, the latest sent {margin} from the pool's 'out'; exited "
            f"{self.old.exited_at - self.old.signal_at:.2f} s after SIGTERM; back in rotation "
            f"{self.readmitted_after_ready * 1000:+.0f} ms after turning ready ({self.back.reason})"
        )


def rolling_restart(cluster: Cluster, load: Load, changes: Changes) -> list[Restart]:
    """SIGTERM each node in turn, start it again, wait until the pool has it back."""
    restarts = []
    for node in cluster.nodes:
        old = node.life
        cluster.stop(node)
        assert old.signal_at is not None
        new = cluster.start(node)
        cluster.ready(node)
        out = changes.first(node.url, old.signal_at, back=False)
        assert out is not None, f"the pool never took {node.url} out:\n{changes.log(old.signal_at)}"
        back = cluster.wait_until(
            lambda: changes.first(node.url, out.changed_at, back=True),  # noqa: B023 - called here
            timeout=PROBE_INTERVAL + 10,
            message=lambda: f"{node.url} back in rotation:\n{changes.log(old.signal_at or 0)}",  # noqa: B023
        )
        restarts.append(Restart(node, old, new, out, back, []))
        before = load.total
        # Load on all three nodes again before the next turn.
        cluster.wait_until(
            lambda: load.total >= before + CALLS_BETWEEN,  # noqa: B023 - called here
            timeout=30,
            message="more calls",
        )
    return restarts


@pytest.fixture
def cluster_of(spawn: Spawn, tmp_path: Path, wait_until: WaitUntil) -> Callable[[str], Cluster]:
    """Three nodes of one server kind, started together, each ready."""

    def make(server: str) -> Cluster:
        cluster = Cluster(server, spawn, tmp_path, wait_until)
        for node in cluster.nodes:
            cluster.start(node)
        for node in cluster.nodes:
            cluster.ready(node)
        return cluster

    return make


@pytest.mark.parametrize("watch", [True, False], ids=["watch", "no-watch"])
@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_rolling_sigterm_restart_fails_no_call_and_processes_each_post_once(
    cluster_of: Callable[[str], Cluster], server: str, watch: bool, wait_until: WaitUntil
) -> None:
    """Each node in turn: SIGTERM, exit 0, start again; the pool's 16 callers never notice.

    Zero failed calls; every acknowledged POST recorded exactly once across all nodes (and
    nothing recorded that was not acknowledged); the pool takes each node out on its own word
    within the delay (with ``watch=True`` the push notice or an in-band draining response,
    whichever came first, and the figures say which; without, in band), and picks it for no
    request after that (see the module doc); each restarted node is back in rotation within
    ``probe_interval`` + 1 s of turning ready.
    """
    cluster = cluster_of(server)
    urls = [node.url for node in cluster.nodes]
    began = time.monotonic()
    pool = Pool(urls, probe_interval=PROBE_INTERVAL, watch=watch)
    sends = Sends(len(urls))
    pool.mount("http://", sends)
    changes = Changes(pool)
    load: Load | None = None
    try:
        load = Load(pool, began)
        wait_until(
            lambda: load is not None and load.total >= CALLS_BETWEEN,
            timeout=30,
            message="the calls before the first restart",
        )
        restarts = rolling_restart(cluster, load, changes)
    finally:
        still_running = [] if load is None else load.finish()
        pool.close()
        changes.close()
    restarts = [dataclasses.replace(r, sends=sends.to(r.node.url)) for r in restarts]
    assert load is not None
    assert not still_running, f"callers still running: {still_running}"

    acked = [oid for ids in load.acked for oid in ids]
    recorded = collections.Counter(
        oid for node in cluster.nodes for life in node.lives for oid in life.ids()
    )
    per_node = {node.url: [len(life.served()) for life in node.lives] for node in cluster.nodes}
    summary = "\n".join(
        [
            f"{server}, watch={watch}: {load.total} calls in {time.monotonic() - began:.1f} s, "
            f"{len(load.failures)} failed, {len(acked)} POSTs acknowledged, "
            f"{sum(recorded.values())} ids recorded",
            f"requests served per node (per life): {per_node}",
            "taken out by: "
            + ", ".join(f"{r.node.url} {r.taken_out_by}" for r in restarts)
            + f" ({sum(r.taken_out_by == 'push notice' for r in restarts)} of {len(restarts)} "
            "by push notice)",
            *(restart.summary() for restart in restarts),
            "pool's node changes (from the start of the load):",
            changes.log(began),
            *(f"  failure: {failure}" for failure in load.failures[:20]),
        ]
    )
    print(summary)  # the figures, shown with -s or when the test fails

    assert not load.failures, summary
    assert len(acked) >= 100, "too few POSTs to prove anything\n" + summary
    duplicates = sorted(oid for oid, count in recorded.items() if count > 1)
    assert not duplicates, f"recorded more than once: {duplicates[:10]}\n{summary}"
    lost = [oid for oid in acked if oid not in recorded]
    assert not lost, f"acknowledged, never recorded: {lost[:10]}\n{summary}"
    assert set(recorded) == set(acked), summary  # nothing processed that the caller lost
    unstamped = [
        row for n in cluster.nodes for life in n.lives for row in life.served() if row[0] is None
    ]
    assert not unstamped, f"requests without X-Sent-At: {unstamped[:5]}"  # all were checked
    for restart in restarts:
        assert restart.old.served(), summary
        # The pool heard it from the node itself (push notice, or in band with watch=False)
        # while the node still served: within the delay, not from a refused connection.
        heard = ("push notice", "in-band response") if watch else ("in-band response",)
        assert restart.taken_out_by in heard, summary
        assert restart.out_after_signal < DELAY, summary
        after = restart.after_out()
        assert len(after) <= restart.out.inflight, (
            f"{restart.node.url}: {len(after)} requests unanswered at 'out' or sent after it, "
            f"but only {restart.out.inflight} were in flight: the pool picked it after 'out'\n"
            f"{summary}"
        )
        assert restart.old.exited_at is not None
        assert restart.back.changed_at > restart.old.exited_at, summary  # not the old process
        assert restart.readmitted_after_ready <= PROBE_INTERVAL + 1.0, summary
