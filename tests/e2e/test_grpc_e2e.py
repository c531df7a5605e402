"""Rolling restarts of three gRPC servers under load, through ``graceful.grpc.channel``.

Three server processes serve ``tests/e2e/apps/grpc_ledger_server.py`` (two on ``grpc.server``,
one on ``grpc.aio.server``); each is restarted in turn (SIGTERM, its exit awaited, a new one
started on the same port) while client threads call its non-idempotent unary ``Create`` (each
execution written to a ledger) and its server-streaming ``List`` through one channel over the
three nodes.

With graceful (``graceful.grpc.serve`` / ``serve_async``): no RPC fails, every acknowledged
``Create`` ran exactly once, nothing ran twice, each server exits 0 and the restarted one is
used again. Without it (``server.start(); server.wait_for_termination()``, SIGTERM kills): RPCs
fail, so the first test can fail.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from conftest import unused_port, wait_until

import graceful.grpc

if TYPE_CHECKING:
    from conftest import Proc, Spawn

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]

APP = Path(__file__).parent / "apps" / "grpc_ledger_server.py"
SERVICE = "ledger.Orders"
CHUNKS = 8  # grpc_ledger_server.CHUNKS
MODES = ("sync", "aio", "sync")
UNARY_CALLERS = 4
STREAM_CALLERS = 3
MAX_CALLS_EACH = 2000  # a bound: the load stops long before
LOAD_LIMIT = 180.0  # seconds: a bound on the load, whatever happens
CALL_TIMEOUT = 10.0
ENV = {"GRACEFUL_DELAY": "0.5", "GRACEFUL_DRAIN_TIMEOUT": "5"}


@dataclasses.dataclass
class Node:
    port: int
    mode: str
    proc: Proc


class Cluster:
    def __init__(self, spawn: Spawn, ledger: Path, *, plain: bool) -> None:
        self.spawn, self.ledger, self.plain = spawn, ledger, plain
        self.nodes = [self.start(unused_port(), mode) for mode in MODES]

    def start(self, port: int, mode: str) -> Node:
        argv = [sys.executable, str(APP), str(port), mode] + (["--plain"] if self.plain else [])
        env = {**ENV, "LEDGER_DIR": str(self.ledger)}
        proc = self.spawn(argv, env=env, name=f"{mode}-{port}")
        node = Node(port, mode, proc)
        wait_until(lambda: self.answers(node), 15, message=f"{mode} node on {port} answering")
        return node

    def answers(self, node: Node) -> bool:
        node.proc.check_running()
        with grpc.insecure_channel(f"127.0.0.1:{node.port}") as channel:
            ping: Any = channel.unary_unary(f"/{SERVICE}/Ping")
            return bool(ping(b"", timeout=1) == b"pong")

    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{node.port}" for node in self.nodes]

    def restart(self, index: int) -> int:
        """SIGTERM node ``index``, wait for its exit, start it again; its exit status."""
        old = self.nodes[index]
        old.proc.send_signal(signal.SIGTERM)
        status = old.proc.wait(15)
        self.nodes[index] = self.start(old.port, old.mode)
        return status

    def ran(self, pid: int | None = None) -> list[str]:
        paths = self.ledger.glob("*.ran" if pid is None else f"{pid}.ran")
        return [line for path in paths for line in path.read_text().splitlines()]


class Load:
    """Client threads calling ``Create`` and ``List`` through one graceful channel."""

    def __init__(self, addresses: list[str]) -> None:
        self.channel = graceful.grpc.channel(addresses)
        self.acked: list[str] = []
        self.failed: list[str] = []
        self.streams = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.deadline = time.monotonic() + LOAD_LIMIT
        self.threads = [
            threading.Thread(target=self.create, args=(n,), daemon=True)
            for n in range(UNARY_CALLERS)
        ] + [threading.Thread(target=self.list, daemon=True) for _ in range(STREAM_CALLERS)]
        for thread in self.threads:
            thread.start()

    def running(self, calls: int) -> bool:
        return (
            not self.stop.is_set() and calls < MAX_CALLS_EACH and time.monotonic() < self.deadline
        )

    def create(self, caller: int) -> None:
        call: Any = self.channel.unary_unary(f"/{SERVICE}/Create")
        calls = 0
        while self.running(calls):
            order = f"{caller}-{calls}"
            calls += 1
            try:
                answer = call(order.encode(), timeout=CALL_TIMEOUT)
            except grpc.RpcError as exc:
                with self.lock:
                    self.failed.append(f"Create {order}: {exc.code()} {exc.details()}")
                continue
            with self.lock:
                if answer == b"created " + order.encode():
                    self.acked.append(order)
                else:
                    self.failed.append(f"Create {order}: answered {answer!r}")

    def list(self) -> None:
        call: Any = self.channel.unary_stream(f"/{SERVICE}/List")
        calls = 0
        while self.running(calls):
            calls += 1
            try:
                got = list(call(b"", timeout=CALL_TIMEOUT))
            except grpc.RpcError as exc:
                with self.lock:
                    self.failed.append(f"List: {exc.code()} {exc.details()}")
                continue
            with self.lock:
                if len(got) == CHUNKS:
                    self.streams += 1
                else:
                    self.failed.append(f"List: {len(got)} of {CHUNKS} messages")

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(CALL_TIMEOUT + 5)
        self.channel.close()


def test_rolling_restarts_lose_no_rpc_and_run_each_create_exactly_once(
    spawn: Spawn, tmp_path: Path
) -> None:
    cluster = Cluster(spawn, tmp_path, plain=False)
    load = Load(cluster.addresses())
    try:
        wait_until(lambda: len(load.acked) > 50, 15, message="the load running")
        for index in range(len(cluster.nodes)):
            assert cluster.restart(index) == 0
            ran_there = functools.partial(cluster.ran, cluster.nodes[index].proc.pid)
            wait_until(ran_there, 15, message="the restarted node used again")
    finally:
        load.finish()
    assert load.failed == []
    ran = collections.Counter(cluster.ran())
    assert [order for order, times in ran.items() if times > 1] == []
    assert [order for order in load.acked if ran[order] != 1] == []
    assert load.streams > 0 and len(load.acked) > 100


def test_without_graceful_the_same_restarts_fail_rpcs(spawn: Spawn, tmp_path: Path) -> None:
    cluster = Cluster(spawn, tmp_path, plain=True)
    load = Load(cluster.addresses())
    try:
        wait_until(lambda: len(load.acked) > 50, 15, message="the load running")
        for index in range(len(cluster.nodes)):
            assert cluster.restart(index) == -signal.SIGTERM
    finally:
        load.finish()
    assert load.failed, "the restarts of plain gRPC servers failed no RPC"
