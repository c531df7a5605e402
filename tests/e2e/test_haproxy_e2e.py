"""Real HAProxy in front of two real uvicorn nodes serving ``load_app`` with the middleware.

The HAProxy configuration is ``integrations/haproxy/haproxy.cfg`` itself, with its addresses and
socket path swapped for free ports and a path under ``tmp_path``; HAProxy runs in the foreground
(``-db``) in its own process group and is stopped at teardown. Which node served a POST is read
from the node's own record directory (``load_app`` appends each id it processed there).

Without the ``haproxy`` binary these tests skip, except under CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pytest
import requests
from conftest import unused_port
from rollout_harness import required_binary, spawn_haproxy

from graceful._tools import cli as cli
from graceful.haproxy import RuntimeAPI

if TYPE_CHECKING:
    from conftest import Proc, Spawn, WaitUntil

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "integrations" / "haproxy" / "haproxy.cfg"
APPS = Path(__file__).parent / "apps"
TOKEN = "haproxy-e2e-Token-9d2"
DELAY = 1.0  # longer than the check interval (500 ms) times fall (1): see the example config
BACKEND = "app"
NAMES = ("node1", "node2")


@pytest.fixture(scope="module")
def haproxy_bin() -> str:
    return required_binary("haproxy")


@dataclass
class Node:
    name: str
    proc: Proc
    url: str
    record_dir: Path

    def ready(self) -> bool:
        return requests.get(self.url + "/readyz", timeout=2).status_code == 200

    def describe(self) -> str:
        return f"{self.name} ready; its output:\n{self.proc.output()}"

    def recorded(self) -> list[str]:
        return [
            line
            for path in self.record_dir.glob("*.ids")
            for line in path.read_text().splitlines()
            if line
        ]


@dataclass
class Site:
    url: str
    api: RuntimeAPI
    nodes: dict[str, Node]
    haproxy: Proc
    config: Path = field(repr=False)

    def wait_in_rotation(self, name: str, timeout: float = 10.0) -> None:
        self.api.wait_for_state(BACKEND, name, admin="ready", operational="up", timeout=timeout)


class StartSite(Protocol):
    def __call__(self) -> Site: ...


def site_config(example: str, *, frontend: int, nodes: list[int], socket_path: Path) -> str:
    """The example configuration, every address and the socket path replaced (each exactly once)."""
    replacements = {
        "127.0.0.1:8080": f"127.0.0.1:{frontend}",
        "127.0.0.1:8001": f"127.0.0.1:{nodes[0]}",
        "127.0.0.1:8002": f"127.0.0.1:{nodes[1]}",
        "/run/haproxy/admin.sock": str(socket_path),
    }
    for old, new in replacements.items():
        assert example.count(old) == 1, f"{old!r} is not in the example exactly once"
        example = example.replace(old, new)
    return example


def free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(unused_port())
    return sorted(ports)


@pytest.fixture
def start_site(haproxy_bin: str, spawn: Spawn, tmp_path: Path, wait_until: WaitUntil) -> StartSite:
    def start() -> Site:
        frontend, *ports = free_ports(3)
        nodes: dict[str, Node] = {}
        for name, port in zip(NAMES, ports, strict=True):
            record_dir = tmp_path / f"record-{name}"
            record_dir.mkdir()
            argv = [
                *(sys.executable, "-m", "uvicorn", "load_app:asgi_app", "--app-dir", str(APPS)),
                *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"),
            ]
            env = {
                "GRACEFUL_DELAY": str(DELAY),
                "GRACEFUL_DRAIN_TIMEOUT": "10",
                "GRACEFUL_TOKEN": TOKEN,
                "LOAD_RECORD_DIR": str(record_dir),
            }
            proc = spawn(argv, env=env, name=name)
            nodes[name] = Node(name, proc, f"http://127.0.0.1:{port}", record_dir)
        for node in nodes.values():
            wait_until(node.ready, timeout=20, message=node.describe)
        text = site_config(
            EXAMPLE.read_text(), frontend=frontend, nodes=ports, socket_path=tmp_path / "admin.sock"
        )
        haproxy, api = spawn_haproxy(spawn, wait_until, haproxy_bin, tmp_path, text)
        site = Site(f"http://127.0.0.1:{frontend}", api, nodes, haproxy, tmp_path / "haproxy.cfg")
        for name in NAMES:
            site.wait_in_rotation(name)
        return site

    return start


def post_orders(url: str, count: int) -> list[str]:
    """``count`` POSTs through HAProxy on one keep-alive session; every one must answer 201."""
    ids = [f"seq-{uuid.uuid4().hex}" for _ in range(count)]
    with requests.Session() as session:
        for oid in ids:
            answer = session.post(url + "/orders", data={"id": oid}, timeout=10)
            assert answer.status_code == 201, (oid, answer.status_code, answer.text)
    return ids


def test_the_example_config_is_valid_for_haproxy(haproxy_bin: str, tmp_path: Path) -> None:
    checked = subprocess.run(
        [haproxy_bin, "-c", "-f", str(EXAMPLE)], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    directives = {
        " ".join(line.split("#", 1)[0].split()) for line in EXAMPLE.read_text().splitlines()
    }
    for needed in (
        "option httpchk GET /readyz",
        "http-check expect status 200",
        "default-server check inter 500ms fall 1 rise 2",
        "retry-on conn-failure empty-response 503",
        "option redispatch 1",
        "stats socket /run/haproxy/admin.sock mode 600 level admin",
    ):
        assert needed in directives, f"{needed!r} is not a directive of the example"


def test_runtime_drain_sends_no_new_requests_and_ready_brings_them_back(
    start_site: StartSite,
) -> None:
    site = start_site()
    node1, node2 = site.nodes["node1"], site.nodes["node2"]
    post_orders(site.url, 10)
    assert node1.recorded() and node2.recorded(), "round robin reaches both nodes"

    site.api.set_state(BACKEND, "node1", "drain")
    state = site.api.server_state(BACKEND, "node1")
    assert (state.admin, state.status) == ("drain", "DRAIN")
    before = len(node1.recorded())
    ids = post_orders(site.url, 20)
    assert len(node1.recorded()) == before, "a drained server got new requests"
    assert set(ids) <= set(node2.recorded())

    site.api.set_state(BACKEND, "node1", "ready")
    site.wait_in_rotation("node1")
    ids = post_orders(site.url, 20)
    assert set(ids) & set(node1.recorded()), "node1 is back in rotation"
    assert set(ids) <= set(node1.recorded()) | set(node2.recorded())


def test_haproxy_checks_take_a_node_draining_through_its_control_route_out_and_back(
    start_site: StartSite,
) -> None:
    site = start_site()
    node1, node2 = site.nodes["node1"], site.nodes["node2"]
    auth = {"Authorization": f"Bearer {TOKEN}"}

    drained_at = time.monotonic()
    answer = requests.post(node1.url + "/-/graceful/drain", headers=auth, timeout=5)
    assert answer.status_code == 200, answer.text
    # inter 500ms, fall 1: HAProxy's own check sees /readyz fail within about half a second.
    state = site.api.wait_for_state(BACKEND, "node1", operational="down", timeout=5)
    taken_out = time.monotonic() - drained_at
    assert state.admin == "ready", "no runtime command was sent: only the checks acted"
    assert taken_out < 3.0, taken_out

    before = len(node1.recorded())
    ids = post_orders(site.url, 20)
    assert len(node1.recorded()) == before, "a node failing its readiness check got requests"
    assert set(ids) <= set(node2.recorded())

    resumed_at = time.monotonic()
    answer = requests.post(node1.url + "/-/graceful/resume", headers=auth, timeout=5)
    assert answer.status_code == 200, answer.text
    site.wait_in_rotation("node1", timeout=5)  # rise 2: two passing checks, about a second
    assert time.monotonic() - resumed_at < 4.0
    ids = post_orders(site.url, 20)
    assert set(ids) & set(node1.recorded()), "node1 is back in rotation"


@dataclass
class Load:
    """8 callers through HAProxy, each on its own keep-alive session: GET /ping, POST /orders."""

    url: str
    callers: int = 8
    max_rounds: int = 2000  # per caller: the loop is bounded even if ``stop`` never comes
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: int = 0
    slow_done: int = 0
    acked: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for number in range(self.callers):
            thread = threading.Thread(target=self._caller, args=(number,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _caller(self, number: int) -> None:
        with requests.Session() as session:
            for round_ in range(self.max_rounds):
                if self.stop.is_set():
                    return
                oid = f"load-{number}-{round_}-{uuid.uuid4().hex[:8]}"
                for method, path, expected in (("GET", "/ping", 200), ("POST", "/orders", 201)):
                    data = {"id": oid} if method == "POST" else None
                    try:
                        answer = session.request(
                            method, self.url + path, data=data, timeout=(5, 15)
                        )
                        status: int | str = answer.status_code
                    except requests.RequestException as exc:
                        status = repr(exc)
                    with self.lock:
                        self.sent += 1
                        if status != expected:
                            self.failures.append(f"{method} {path}: {status}")
                        elif method == "POST":
                            self.acked.append(oid)

    def slow(self) -> None:
        """One 1.5 s request, in flight while its node is drained (the sleep is the behaviour)."""
        try:
            status: int | str = requests.get(self.url + "/slow?seconds=1.5", timeout=15).status_code
        except requests.RequestException as exc:
            status = repr(exc)
        with self.lock:
            self.sent += 1
            self.slow_done += 1
            if status != 200:
                self.failures.append(f"GET /slow: {status}")

    def acked_count(self) -> int:
        with self.lock:
            return len(self.acked)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        assert not any(t.is_alive() for t in self.threads), "a caller is stuck"


def test_drain_then_sigterm_under_load_through_haproxy_loses_nothing(
    start_site: StartSite, wait_until: WaitUntil
) -> None:
    site = start_site()
    node1, node2 = site.nodes["node1"], site.nodes["node2"]
    load = Load(site.url)
    load.start()
    try:
        wait_until(lambda: load.acked_count() >= 40, timeout=20, message="load under way")
        assert node1.recorded(), "node1 served before its drain"
        # Slow requests in flight on node1 when it is drained: node2 is briefly out of
        # rotation so that HAProxy has no choice, and back once node1 holds them.
        site.api.set_state(BACKEND, "node2", "drain")
        slow = [threading.Thread(target=load.slow, daemon=True) for _ in range(4)]
        for thread in slow:
            thread.start()
        wait_until(
            lambda: (site.api.server_state(BACKEND, "node1").sessions or 0) >= 4,
            timeout=5,
            message="slow requests in flight on node1",
        )
        site.api.set_state(BACKEND, "node2", "ready")

        site.api.set_state(BACKEND, "node1", "drain")
        # What node1 still has in flight through HAProxy finishes; then it may stop.
        site.api.wait_for_state(BACKEND, "node1", max_sessions=0, timeout=10)
        served_by_node1 = len(node1.recorded())
        node1.proc.send_signal(signal.SIGTERM)
        assert node1.proc.wait(DELAY + 15) == 0, node1.proc.output()
        site.api.wait_for_state(BACKEND, "node1", operational="down", timeout=5)

        for thread in slow:
            thread.join(15)
        after_stop = load.acked_count()
        wait_until(lambda: load.acked_count() >= after_stop + 40, timeout=20, message="more load")
    finally:
        load.finish()

    assert load.failures == [], f"{len(load.failures)} of {load.sent} failed: {load.failures[:10]}"
    assert len(node1.recorded()) == served_by_node1, "node1 got requests after its drain"
    recorded = node1.recorded() + node2.recorded()
    assert len(recorded) == len(set(recorded)), "an order was processed twice"
    assert set(load.acked) <= set(recorded), "an acknowledged order was not recorded"
    assert load.slow_done == 4
    assert load.sent >= 160


def test_rollout_drains_each_server_in_haproxy_and_gives_it_back(
    start_site: StartSite, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = start_site()
    states = tmp_path / "states"
    # The 'restart' records what HAProxy says of every server while it runs (no real restart:
    # without a token nothing drains the node itself, so it stays ready).
    code = (
        "import sys\nfrom graceful.haproxy import RuntimeAPI\n"
        "servers = RuntimeAPI(sys.argv[1]).servers('app')\n"
        "line = ' '.join(s.server + '=' + s.admin for s in servers)\n"
        "open(sys.argv[2], 'a').write(line + '\\n')\n"
    )
    restart = f"{sys.executable} -c {shlex.quote(code)} {site.api.socket_path} {states}"
    nodes = [arg for node in site.nodes.values() for arg in ("--node", node.url)]
    args = ["rollout", *nodes, "--lb", "haproxy", "--haproxy-socket", site.api.socket_path]

    assert cli.main([*args, "--haproxy-backend", BACKEND, "--restart", restart]) == 0

    out = capsys.readouterr().out
    assert out.count("no sessions left") == 2 and out.count("ready and up") == 2, out
    assert states.read_text().splitlines() == ["node1=drain node2=ready", "node1=ready node2=drain"]
    for name in NAMES:
        assert site.api.server_state(BACKEND, name).in_rotation


def test_rollout_refuses_a_backend_or_node_haproxy_does_not_know(
    start_site: StartSite, capsys: pytest.CaptureFixture[str]
) -> None:
    site = start_site()
    first, second = (node.url for node in site.nodes.values())
    args = ["rollout", "--lb", "haproxy", "--haproxy-socket", site.api.socket_path]
    args += ["--restart", "true", "--node", first]
    assert cli.main([*args, "--node", second, "--haproxy-backend", "nope"]) == 10
    assert "haproxy: HAProxy has no backend 'nope'" in capsys.readouterr().out
    # The same node by another name: HAProxy knows 127.0.0.1, not localhost.
    by_name = second.replace("127.0.0.1", "localhost")
    assert cli.main([*args, "--node", by_name, "--haproxy-backend", BACKEND]) == 10
    out = capsys.readouterr().out
    assert f"has no server at localhost:{by_name.rsplit(':', 1)[1]}" in out
    for name in NAMES:
        assert site.api.server_state(BACKEND, name).in_rotation
