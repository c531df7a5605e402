"""graceful.httpx end to end: a rolling SIGTERM restart of three real nodes under load, through
``httpx.Client`` + ``PoolTransport`` (threads) and ``httpx.AsyncClient`` + ``AsyncPoolTransport``
(tasks), over HTTP/1.1 (uvicorn) and HTTP/2 (Hypercorn, h2c with prior knowledge). Over HTTP/2
each thread has a client of its own: httpcore's HTTP/2 connection is not safe to share between
threads (``KeyError``, ``LocalProtocolError``, the server's ``PROTOCOL_ERROR``), with or without
graceful.

The nodes serve ``tests/e2e/apps/pool_ledger_app.py``: each ``POST /orders`` the app runs is a
line in its ledger. Each node in turn gets SIGTERM, must exit 0, and is started again on its
port; the load runs through all of it. What must hold: no call failed, every POST answered 201
is in the ledgers exactly once, and nothing is in them twice.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from conftest import unused_port, wait_until

from graceful.httpx import AsyncPoolTransport, NodeState, PoolTransport

if TYPE_CHECKING:
    from conftest import Proc, Spawn

pytestmark = pytest.mark.e2e

APPS = Path(__file__).parent / "apps"
NODES = 3
DELAY = 0.5
CALLERS = 6
#: Bounds on the load: calls per caller, and seconds in all (the restarts end it sooner).
MAX_CALLS = 20_000
MAX_SECONDS = 180.0
#: Answers the load must get before the first restart and between two restarts.
BETWEEN = 30
TIMEOUT = httpx.Timeout(20.0, connect=3.05)


class Cluster:
    """Three nodes on ports of their own, one ledger folder for all (a file per process)."""

    def __init__(self, server: str, spawn: Spawn, tmp_path: Path) -> None:
        self.server = server
        self.spawn = spawn
        self.ledger = tmp_path / "ledger"
        self.ledger.mkdir()
        self.ports = [unused_port() for _ in range(NODES)]
        self.procs: dict[int, Proc] = {}

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    def argv(self, port: int) -> list[str]:
        if self.server == "hypercorn":
            app = 'pool_ledger_app:__getattr__("asgi_app")'
            config = self.ledger.parent / "hypercorn.toml"
            # Hypercorn closes a connection after 1,000 requests with a GOAWAY sent whatever
            # streams are open, and httpcore fails every open stream on a GOAWAY (at or below
            # its last-stream-id) without reading its answer: a failure of no drain's making.
            config.write_text("keep_alive_max_requests = 1000000\n")
            return [
                *(sys.executable, "-m", "graceful.hypercorn", app),
                *("--bind", f"127.0.0.1:{port}", "--config", str(config)),
            ]
        return [
            *(sys.executable, "-m", "uvicorn", "pool_ledger_app:asgi_app", "--app-dir", str(APPS)),
            *("--host", "127.0.0.1", "--port", str(port), "--no-access-log"),
        ]

    def start(self, port: int) -> None:
        env = {
            "GRACEFUL_DELAY": str(DELAY),
            "GRACEFUL_DRAIN_TIMEOUT": "10",
            "LEDGER_DIR": str(self.ledger),
            "PYTHONPATH": str(APPS),
        }
        self.procs[port] = self.spawn(self.argv(port), env=env, name=f"{self.server}-{port}")
        wait_until(
            lambda: self.ready(port),
            timeout=30,
            message=lambda: f"{port} ready:\n{self.procs[port].output()}",
        )

    def ready(self, port: int) -> bool:
        if not self.procs[port].alive():
            pytest.fail(f"{self.server} exited:\n{self.procs[port].output()}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, port: int) -> None:
        """SIGTERM: the node drains and must exit 0 (bounded: delay + drain + a margin)."""
        proc = self.procs[port]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DELAY + 15) == 0, proc.output()

    def ran(self) -> collections.Counter[str]:
        lines = (line for path in self.ledger.glob("*.ran") for line in path.read_text().split())
        return collections.Counter(lines)


@pytest.fixture
def cluster(request: pytest.FixtureRequest, spawn: Spawn, tmp_path: Path) -> Cluster:
    server: str = request.param
    if server == "hypercorn":
        pytest.importorskip("hypercorn", reason="pip install 'graceful-drain[hypercorn]'")
        pytest.importorskip("h2", reason="HTTP/2 needs h2")
    made = Cluster(server, spawn, tmp_path)
    for port in made.ports:
        made.start(port)
    return made


class Load:
    """What the callers got: every POST answered 201, every failure, how many answers."""

    def __init__(self) -> None:
        self.acked: list[str] = []
        self.failures: list[str] = []
        self.answers = 0
        self.stop = threading.Event()
        self.deadline = time.monotonic() + MAX_SECONDS
        self.lock = threading.Lock()

    def going(self, calls: int) -> bool:
        return calls < MAX_CALLS and not self.stop.is_set() and time.monotonic() < self.deadline

    def record(self, order: str, method: str, response: httpx.Response | None, error: str) -> None:
        with self.lock:
            self.answers += 1
            if response is None:
                self.failures.append(f"{method} {order}: {error}")
            elif method == "POST" and response.status_code == 201:
                self.acked.append(order)
            elif method == "GET" and response.status_code == 200:
                pass
            else:
                self.failures.append(f"{method} {order}: {response.status_code} {response.text!r}")

    def wait_for(self, more: int) -> None:
        """Until the load got ``more`` answers than it has now (it runs meanwhile)."""
        target = self.answers + more

        def progress() -> str:
            spent = time.monotonic() - self.deadline + MAX_SECONDS
            return f"{more} more answers ({self.answers} so far, {spent:.0f}s of {MAX_SECONDS:g})"

        wait_until(lambda: self.answers >= target, timeout=20, message=progress)


def rolling_restart(cluster: Cluster, load: Load, states: Callable[[], list[NodeState]]) -> None:
    load.wait_for(BETWEEN)
    for port in cluster.ports:
        cluster.stop(port)
        cluster.start(port)
        wait_until(
            lambda: set(states()) == {NodeState.IN_SERVICE},
            timeout=10,
            message=lambda: f"every node back in rotation: {states()}",
        )
        load.wait_for(BETWEEN)
    load.stop.set()


def check(cluster: Cluster, load: Load) -> None:
    assert not load.failures, "\n".join(load.failures[:10])
    ran = cluster.ran()
    twice = sorted(order for order, count in ran.items() if count > 1)
    assert not twice, f"ran more than once: {twice[:10]}"
    missing = [order for order in load.acked if ran[order] != 1]
    assert not missing, f"answered 201, not in a ledger: {missing[:10]}"
    assert len(load.acked) >= NODES * BETWEEN // 2
    print(f"{load.answers} answers, {len(load.acked)} POSTs acknowledged, {sum(ran.values())} ran")


def options(cluster: Cluster) -> dict[str, object]:
    """The transport's: h2c with prior knowledge for Hypercorn's nodes."""
    http2 = {"http1": False, "http2": True} if cluster.server == "hypercorn" else {}
    return {"probe_interval": 0.3, **http2}


@pytest.mark.parametrize("cluster", ["uvicorn", "hypercorn"], indirect=True)
def test_httpx_client_threads_through_a_rolling_restart_lose_nothing_and_post_once(
    cluster: Cluster,
) -> None:
    """Over HTTP/1.1 the threads share one client; over HTTP/2 each thread has its own (an
    httpcore HTTP/2 connection is not safe to share between threads)."""
    load = Load()
    shared = cluster.server != "hypercorn"
    transports = [
        PoolTransport(cluster.urls, **options(cluster)) for _ in range(1 if shared else CALLERS)
    ]
    clients = [
        httpx.Client(transport=transport, base_url="http://orders", timeout=TIMEOUT)
        for transport in transports
    ]

    def caller(client: httpx.Client, number: int) -> None:
        calls = 0
        while load.going(calls):
            order = f"sync-{number}-{calls}"
            for method in ("POST", "GET"):
                response, error = None, ""
                try:
                    if method == "POST":
                        response = client.post("/orders", data={"id": order})
                    else:
                        response = client.get(f"/orders/{order}")
                except httpx.HTTPError as exc:
                    error = repr(exc)
                load.record(order, method, response, error)
            calls += 1

    def states() -> list[NodeState]:
        return [node.state for transport in transports for node in transport.nodes]

    threads = [
        threading.Thread(target=caller, args=(clients[0 if shared else n], n))
        for n in range(CALLERS)
    ]
    for thread in threads:
        thread.start()
    try:
        rolling_restart(cluster, load, states)
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(30)
        for client in clients:
            client.close()
    check(cluster, load)


@pytest.mark.parametrize("cluster", ["uvicorn", "hypercorn"], indirect=True)
def test_httpx_async_client_tasks_through_a_rolling_restart_lose_nothing_and_post_once(
    cluster: Cluster,
) -> None:
    load = Load()

    async def caller(client: httpx.AsyncClient, number: int) -> None:
        calls = 0
        while load.going(calls):
            order = f"async-{number}-{calls}"
            for method in ("POST", "GET"):
                response, error = None, ""
                try:
                    if method == "POST":
                        response = await client.post("/orders", data={"id": order})
                    else:
                        response = await client.get(f"/orders/{order}")
                except httpx.HTTPError as exc:
                    error = repr(exc)
                load.record(order, method, response, error)
            calls += 1

    async def main() -> None:
        transport = AsyncPoolTransport(cluster.urls, **options(cluster))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://orders", timeout=TIMEOUT
        ) as client:
            callers = [asyncio.create_task(caller(client, n)) for n in range(CALLERS)]
            try:
                states = lambda: [n.state for n in transport.nodes]  # noqa: E731
                await asyncio.to_thread(rolling_restart, cluster, load, states)
            finally:
                load.stop.set()
                await asyncio.wait_for(asyncio.gather(*callers), 30)

    asyncio.run(main())
    check(cluster, load)
