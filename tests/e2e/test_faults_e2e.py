"""Faults with real processes: signals at awkward moments, an events subscriber that never
reads, a client pool whose every node restarts at once, nginx failing to reload mid-rollout.

Every process binds 127.0.0.1 on a free port and is killed at teardown (the ``spawn`` fixture,
or the cluster's recorded pids for nodes a restart command started). Without nginx the rollout
test skips, except under CI (``CI`` set), where it fails.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests
from conftest import unused_port
from rollout_harness import Cluster, Load, find_binary, start_nginx

from graceful._tools import cli as cli
from graceful._tools import rollout as rollout
from graceful.client import NodeState, NoNodeAvailable, Pool

if TYPE_CHECKING:
    from conftest import Proc, Spawn, WaitUntil

pytestmark = pytest.mark.e2e

APPS = Path(__file__).parent / "apps"
SIGNAL_SERVER = APPS / "signal_server.py"

#: A uvicorn node run by ``graceful.uvicorn.run`` (SIGTERM drains), written to a file by the
#: tests: ``python fault_server.py PORT [ready]``. Without ``ready`` the node stays STARTING
#: (``auto_ready=False``, nothing marks it ready). One JSON line per phase change and around
#: each ``/slow`` request. ``/flap?n=N&size=S`` drains and resumes the node N times with a
#: reason of S bytes and answers the length of every events subscriber's queue and the RSS.
FAULT_SERVER = """
import asyncio, json, logging, sys, time
from urllib.parse import parse_qs

import graceful
import graceful.uvicorn
from graceful import signals

lifecycle = graceful.Lifecycle(graceful.Config.from_env())


def emit(event, **fields):
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


def on_phase(sender, **kwargs):
    emit("phase", new=str(kwargs["new"]), reason=kwargs["reason"][:40])


signals.phase_changed.connect(on_phase, sender=lifecycle)


def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


async def app(scope, receive, send):
    assert scope["type"] == "http"
    path, query = scope["path"], parse_qs(scope["query_string"].decode())
    body = b"ok"
    if path == "/slow":
        seconds = float(query["seconds"][0])
        emit("begin", path=path)
        await asyncio.sleep(seconds)  # the slow request IS the behaviour under test
        emit("end", path=path)
    elif path == "/flap":
        size = int(query.get("size", ["10"])[0])
        for number in range(int(query["n"][0])):
            reason = f"{number:08d}".ljust(size, "x")  # a new string for every notice
            lifecycle.drain(reason)
            lifecycle.resume(reason)
        queues = [len(s._queue) for s in list(lifecycle.events._subscribers)]
        body = json.dumps({"queues": queues, "rss_kb": rss_kb()}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    ready = sys.argv[2:] == ["ready"]
    if ready:
        lifecycle.mark_ready()
    graceful.uvicorn.run(
        graceful.ASGIMiddleware(app, lifecycle, auto_ready=False),
        lifecycle=lifecycle,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        lifespan="off",
        log_level="warning",
    )
"""


class Server:
    """A server process printing JSON event lines; its URL."""

    def __init__(self, proc: Proc, url: str, wait_until: WaitUntil) -> None:
        self.proc = proc
        self.url = url
        self.wait_until = wait_until
        wait_until(
            lambda: requests.get(url + "/livez", timeout=2).status_code == 200,
            timeout=30,
            message=lambda: f"{url}/livez; output:\n{proc.output()}",
        )

    def events(self) -> list[dict[str, Any]]:
        lines = self.proc.output().splitlines()
        return [json.loads(line) for line in lines if line.startswith('{"event"')]

    def phases(self) -> list[str]:
        return [item["new"] for item in self.events() if item["event"] == "phase"]

    def wait_for(self, event: str, **fields: str) -> None:
        def found() -> bool:
            if not self.proc.alive():
                pytest.fail(f"server exited before {event} {fields}:\n{self.proc.output()}")
            return any(
                item["event"] == event and fields.items() <= item.items() for item in self.events()
            )

        self.wait_until(found, timeout=20, message=f"{event} {fields} in the output")

    def readyz(self) -> requests.Response:
        return requests.get(self.url + "/readyz", timeout=5)


class Slow(threading.Thread):
    """``GET url`` in a thread: ``response`` or ``error`` once it is over."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.response: requests.Response | None = None
        self.error: Exception | None = None
        self.start()

    def run(self) -> None:
        try:
            self.response = requests.get(self.url, timeout=60)
        except requests.RequestException as exc:
            self.error = exc


StartServer = Callable[..., Server]


@pytest.fixture
def start_server(spawn: Spawn, wait_until: WaitUntil, tmp_path: Path) -> StartServer:
    """``kind``: "uvicorn" (FAULT_SERVER through graceful.uvicorn.run) or "wsgiref"
    (``apps/signal_server.py``, ``install_signal_handlers``); settings as GRACEFUL_*."""
    script = tmp_path / "fault_server.py"
    script.write_text(FAULT_SERVER)

    def start(kind: str, *, ready: bool = True, **settings: float) -> Server:
        env = {f"GRACEFUL_{name.upper()}": str(value) for name, value in settings.items()}
        if kind == "uvicorn":
            free = unused_port()
            argv = [sys.executable, str(script), str(free), *(["ready"] if ready else [])]
            proc = spawn(argv, env=env, name="fault-server")
            return Server(proc, f"http://127.0.0.1:{free}", wait_until)
        assert ready, "signal_server.py is ready from the start"
        proc = spawn([sys.executable, str(SIGNAL_SERVER)], env=env, name="signal-server")

        def port() -> int | None:
            for line in proc.output().splitlines():
                if line.startswith('{"event": "listening"'):
                    found: int = json.loads(line)["port"]
                    return found
            return None

        listening = wait_until(port, timeout=20, message=lambda: f"listening:\n{proc.output()}")
        return Server(proc, f"http://127.0.0.1:{listening}", wait_until)

    return start


# -- signals ---------------------------------------------------------------------------------


def test_sigterm_while_still_starting_stops_without_the_delay_after_the_request_in_flight(
    start_server: StartServer,
) -> None:
    delay = 30.0  # only a stop that skips the delay ends the process in time
    node = start_server("uvicorn", ready=False, delay=delay, drain_timeout=30)
    readyz = node.readyz()
    assert (readyz.status_code, readyz.json()["output"]) == (503, "starting")
    slow = Slow(node.url + "/slow?seconds=1.5")
    node.wait_for("begin")
    sent = time.monotonic()

    node.proc.send_signal(signal.SIGTERM)

    assert node.proc.wait(20) == 0
    elapsed = time.monotonic() - sent
    assert elapsed < delay / 2, f"{elapsed:.1f}s: the delay of a drain was waited for"
    slow.join(10)
    assert slow.response is not None, slow.error
    assert (slow.response.status_code, slow.response.text) == (200, "ok")
    events = [item["event"] for item in node.events()]
    assert "end" in events  # the request in flight was finished
    # Never ready, so never drained: STARTING goes straight to STOPPING.
    assert node.phases()[:1] == ["stopping"], node.proc.output()
    assert "draining" not in node.phases()


@pytest.mark.parametrize("kind", ["uvicorn", "wsgiref"])
def test_sigterm_twice_is_one_drain_that_still_waits_for_the_request_in_flight(
    kind: str, start_server: StartServer
) -> None:
    delay = 0.5
    node = start_server(kind, delay=delay, drain_timeout=30)
    slow = Slow(node.url + "/slow?seconds=3")
    node.wait_for("begin")

    node.proc.send_signal(signal.SIGTERM)
    node.wait_for("phase", new="draining")
    node.proc.send_signal(signal.SIGTERM)  # a second SIGTERM, impatient deploy tooling
    assert node.readyz().status_code == 503

    assert node.proc.wait(30) == 0
    slow.join(10)
    assert slow.response is not None, slow.error
    assert slow.response.status_code == 200
    assert "SIGTERM ignored: already stopping" in node.proc.output()
    phases = node.phases()
    assert phases[phases.index("draining") :] == ["draining", "drained", "stopping"], phases
    events = [item["event"] for item in node.events()]
    assert "end" in events  # the slow request ran to its end before the process went


# -- an events subscriber that never reads --------------------------------------------------


def test_an_events_subscriber_that_never_reads_keeps_the_servers_memory_bounded(
    start_server: StartServer,
) -> None:
    node = start_server("uvicorn", delay=1)
    port = int(node.url.rsplit(":", 1)[1])
    reader = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small: the server fills it
    reader.connect(("127.0.0.1", port))
    try:
        reader.sendall(b"GET /-/graceful/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        # The stream is open once the node counts a subscriber (the first flap reports it).
        size = 4096  # each notice carries a 4 KB reason: an unbounded queue shows in the RSS

        def flap(n: int) -> dict[str, Any]:
            answer: dict[str, Any] = requests.get(
                f"{node.url}/flap?n={n}&size={size}", timeout=60
            ).json()
            return answer

        first = node.wait_until(lambda: flap(1)["queues"] and flap(500), timeout=20)
        rounds = [flap(2_000) for _ in range(5)]  # 20,000 more notices, none read
    finally:
        reader.close()

    grown_kb = rounds[-1]["rss_kb"] - first["rss_kb"]
    print(
        f"FIGURES events subscriber that never reads: RSS {first['rss_kb']} kB after 1,000 "
        f"notices, {rounds[-1]['rss_kb']} kB after 21,000 (+{grown_kb} kB); queue lengths "
        f"{[r['queues'] for r in rounds]}"
    )
    assert all(len(r["queues"]) == 1 and r["queues"][0] <= 16 for r in rounds), rounds
    # 20,000 notices of 4 KB would be 80 MB; bounded queues hold 16 of them (64 KB).
    assert grown_kb < 16_000, rounds
    assert node.proc.alive()


# -- sites of several nodes ------------------------------------------------------------------

TOKEN = "faults-e2e-Token-9c1"
NODE_ENV = {"GRACEFUL_DELAY": "0.5", "GRACEFUL_DRAIN_TIMEOUT": "15", "GRACEFUL_TOKEN": TOKEN}


@pytest.fixture
def cluster_of(tmp_path: Path, wait_until: WaitUntil) -> Iterator[Callable[[str], Cluster]]:
    """Three ready nodes of a kind (``rollout_harness.Cluster``); at teardown every process
    node_ctl started for them is killed, and their logs printed."""
    clusters: list[Cluster] = []

    def make(kind: str) -> Cluster:
        cluster = Cluster(tmp_path / f"nodes-{len(clusters)}", kind, 3, NODE_ENV)
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


def wait_acked(load: Load, wait_until: WaitUntil, count: int) -> None:
    target = load.acked_count() + count
    wait_until(
        lambda: load.acked_count() >= target,
        timeout=30,
        interval=0.05,
        message=lambda: f"{count} more POSTs acknowledged ({load.snapshot()})",
    )


# -- a client pool whose every node restarts at once ----------------------------------------


class Caller(threading.Thread):
    """``GET /ping`` through the pool in a loop (bounded), sorting the outcomes."""

    def __init__(self, pool: Pool) -> None:
        super().__init__(daemon=True)
        self.pool = pool
        self.stopping = threading.Event()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.other_errors: list[str] = []
        self.lock = threading.Lock()
        self.start()

    def count(self, outcome: str) -> int:
        with self.lock:
            return self.outcomes[outcome]

    def run(self) -> None:
        deadline = time.monotonic() + 120
        for _ in range(200_000):
            if self.stopping.is_set() or time.monotonic() > deadline:
                return
            try:
                response = self.pool.get("/ping")
            except NoNodeAvailable:
                outcome = "no node"
                time.sleep(0.01)  # pacing while every node is down: the caller's own back-off
            except requests.RequestException as exc:
                outcome = "error"
                self.other_errors.append(repr(exc)[:200])
            else:
                ok = (response.status_code, response.content) == (200, b"pong")
                outcome = "ok" if ok else "error"
                if not ok:
                    self.other_errors.append(f"{response.status_code} {response.content!r:.80}")
            with self.lock:
                self.outcomes[outcome] += 1

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)
        assert not self.is_alive(), "the caller is stuck"


def test_a_pool_whose_every_node_restarts_at_once_raises_no_node_available_then_recovers(
    cluster_of: Callable[[str], Cluster], wait_until: WaitUntil
) -> None:
    cluster = cluster_of("uvicorn")
    with Pool(cluster.urls, probe_interval=0.2, watch=True, timeout=(1.0, 10.0)) as pool:
        caller = Caller(pool)
        try:
            wait_until(lambda: caller.count("ok") >= 100, timeout=30, message="calls before")
            pids = [node.pid() for node in cluster.nodes]
            assert None not in pids
            for pid in pids:  # every node at once
                os.kill(pid, signal.SIGTERM)  # type: ignore[arg-type]
            wait_until(
                lambda: all(node.pid() is None for node in cluster.nodes),
                timeout=30,
                message=lambda: f"every node to exit after its drain:\n{cluster.logs()}",
            )
            # Every node is gone: a call fails at once, naming every node.
            started = time.monotonic()
            with pytest.raises(NoNodeAvailable) as raised:
                pool.get("/ping")
            assert time.monotonic() - started < 5
            for node in cluster.nodes:
                assert node.url in str(raised.value)
            no_node_before = caller.count("no node")
            wait_until(lambda: caller.count("no node") > no_node_before, message="no node")
            assert all(status.state is not NodeState.IN_SERVICE for status in pool.nodes)

            for node in cluster.nodes:  # back on the same ports
                cluster.ctl("start", node.index)
            ok_before = caller.count("ok")
            wait_until(
                lambda: all(s.state is NodeState.IN_SERVICE for s in pool.nodes),
                timeout=40,
                interval=0.05,
                message=lambda: f"every node back in service: {pool.nodes}\n{cluster.logs()}",
            )
            wait_until(lambda: caller.count("ok") >= ok_before + 100, message="calls after")
        finally:
            caller.stop()
        answered = {pool.get("/version").json()["pid"] for _ in range(30)}

    print(f"FIGURES pool, every node restarted at once: {dict(caller.outcomes)}")
    assert not caller.other_errors, caller.other_errors[:5]
    now = {node.pid() for node in cluster.nodes}
    assert len(answered) == 3 and answered <= now, (answered, now)  # all three new processes


# -- nginx failing to reload mid-rollout ----------------------------------------------------


def nginx_binary() -> str:
    """nginx; absent: a failure under CI (CI installs it), else a skip."""
    found = find_binary("nginx")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed; CI must install it (.ci/run)")
        pytest.skip("nginx is not installed")
    return found


def test_nginx_failing_to_reload_mid_rollout_stops_it_with_the_node_kept_in_service_and_no_loss(
    cluster_of: Callable[[str], Cluster],
    spawn: Spawn,
    tmp_path: Path,
    wait_until: WaitUntil,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The first node is rolled (cut, drained, restarted, given back); then someone breaks
    nginx.conf, so the second node's cut fails ``nginx -t``. The rollout must stop (exit 10)
    with the upstream file as it was, the second node never drained and still in rotation, the
    third untouched, and the load through nginx must lose nothing."""
    nginx = nginx_binary()
    cluster = cluster_of("gunicorn")
    front = start_nginx(spawn, wait_until, nginx, tmp_path / "nginx", cluster.nodes)
    first, second, third = cluster.nodes
    upstream_before = front.upstream_file.read_bytes()
    masters_before = [node.pid() for node in cluster.nodes]
    broken = "this_is_not_a_directive;\n"

    restore = rollout.NginxBalancer.restore

    def restore_then_break_the_conf(self: rollout.NginxBalancer, node: rollout.Node) -> str:
        done = restore(self, node)
        if node.address == first.address:  # between the first node's restore and the next cut
            with front.conf.open("a") as conf:
                conf.write(broken)
        return done

    monkeypatch.setattr(rollout.NginxBalancer, "restore", restore_then_break_the_conf)
    load = Load(front.url, callers=16).start()
    try:
        wait_acked(load, wait_until, 40)
        argv = ["rollout", *(arg for url in cluster.urls for arg in ("--node", url))]
        argv += ["--restart", cluster.restart_command(), *front.rollout_args(), "--token", TOKEN]
        code = cli.main(argv)
        out = capsys.readouterr().out
        after_failure = load.acked_count()
        wait_acked(load, wait_until, 60)  # the load goes on through nginx after the failure
    finally:
        report = load.stop()
    print(out)
    print(
        f"FIGURES nginx reload failing mid-rollout: sent {report.sent} {report.by_kind}, "
        f"failures {len(report.failures)}, stale-connection retries {len(report.retries)}, "
        f"acked {len(report.acked)}"
    )

    assert code == cli.ROLLOUT_STOPPED == 10, out
    assert "cut: FAILED: nginx: " in out and "this_is_not_a_directive" in out, out
    assert out.count("nginx reloaded") == 2, out  # the first node's cut and restore only
    assert front.upstream_file.read_bytes() == upstream_before  # rolled back: every server up
    # The first node was rolled; the second (the failed cut) and the third were not touched.
    versions = [version for version, _ in cluster.versions()]
    masters = [node.pid() for node in cluster.nodes]
    assert versions == ["v2", "v1", "v1"], versions
    assert masters[0] != masters_before[0] and masters[1:] == masters_before[1:], masters
    assert second.get("/readyz")[0] == 200  # never drained
    # Still in rotation: POSTs acknowledged after the failure reached every node, the second too.
    late = set(report.acked[after_failure:])
    for node in (first, second, third):
        assert late & cluster.ids_of(node), f"node {node.index} got no POST after the failure"
    assert not report.failures, report.summary()
    recorded = collections.Counter(cluster.recorded_ids())
    assert [oid for oid in report.acked if recorded[oid] != 1] == [], "lost or duplicated POSTs"
    assert front.proc.alive() and front.workers(), front.errors()
