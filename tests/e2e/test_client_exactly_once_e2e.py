"""Exactly-once POSTs through :class:`graceful.client.Pool` while every node drains.

Four real nodes serve ``tests/e2e/apps/pool_ledger_app.py``: uvicorn and gunicorn gthread,
each plainly and in reject mode (``GRACEFUL_REJECT_WHEN_DRAINING=1``), all drained over the control
route (they keep serving: a drain without a stop). The app keeps a ledger of every POST it ran
and answers its own ``503`` to the POSTs that ask for one (``fail=1``) while the node drains;
some of those 503s carry a forged ``Graceful-Rejected`` header (``forge=1``), which the
middleware must strip. The middleware's own rejection (reject mode) is marked
``Graceful-Rejected``, and only that is sent to another node.

What must hold: every POST ran at most once; every POST the pool answered 201 ran exactly once;
every POST got the app's own answer (201, or the app's 503) and never ``NoNodeAvailable``, though
every node drains; every GET got 200 (a reject-mode node rejects it, marked, and the pool sends
it on).
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests
from conftest import unused_port, wait_until

from graceful.client import NodeState, Pool

if TYPE_CHECKING:
    from conftest import Proc, Spawn, WaitUntil

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]

APPS = Path(__file__).parent / "apps"
TOKEN = "exactly-once-test-token"
CALLERS = 6
CALLS_EACH = 30
CALL_TIMEOUT = (3.05, 20.0)


@dataclasses.dataclass
class Node:
    name: str
    url: str
    proc: Proc
    ledger: Path

    def ran(self) -> list[str]:
        return [
            line for path in self.ledger.glob("*.ran") for line in path.read_text().splitlines()
        ]


def argv_for(server: str, port: int) -> list[str]:
    if server == "uvicorn":
        return [
            *(sys.executable, "-m", "uvicorn", "pool_ledger_app:asgi_app"),
            *("--app-dir", str(APPS)),
            *("--host", "127.0.0.1", "--port", str(port), "--no-access-log"),
            *("--timeout-keep-alive", "120"),
        ]
    return [
        *(sys.executable, "-m", "gunicorn", "-c", "python:graceful.gunicorn"),
        *("--bind", f"127.0.0.1:{port}", "--workers", "2", "-k", "gthread", "--threads", "8"),
        *("--chdir", str(APPS), "--keep-alive", "120"),
        "pool_ledger_app:wsgi_app",
    ]


@pytest.fixture
def cluster(spawn: Spawn, tmp_path: Path, wait_until: WaitUntil) -> list[Node]:
    """uvicorn, uvicorn in reject mode, gunicorn gthread, gunicorn gthread in reject mode."""
    nodes = []
    for server, reject in (("uvicorn", 0), ("uvicorn", 1), ("gunicorn", 0), ("gunicorn", 1)):
        name = f"{server}{' reject' if reject else ''}"
        port = unused_port()
        ledger = tmp_path / f"ledger-{port}"
        ledger.mkdir()
        env = {
            "GRACEFUL_TOKEN": TOKEN,
            "GRACEFUL_DELAY": "0.2",
            "GRACEFUL_REJECT_WHEN_DRAINING": str(reject),
            "LEDGER_DIR": str(ledger),
        }
        proc = spawn(argv_for(server, port), env=env, name=name.replace(" ", "-"))
        nodes.append(Node(name, f"http://127.0.0.1:{port}", proc, ledger))
    for node in nodes:
        wait_until(
            lambda: readyz(node) == 200,  # noqa: B023 - called here
            timeout=30,
            message=lambda: f"{node.name} ready:\n{node.proc.output()}",  # noqa: B023
        )
    return nodes


def readyz(node: Node) -> int:
    return requests.get(node.url + "/readyz", timeout=5).status_code


def drain(node: Node) -> None:
    """Drain ``node`` and wait until every process of it sees the drain (a gunicorn worker
    follows its master's within a poll, later on a busy machine): the app's own 503 depends on
    it."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    response = requests.post(node.url + "/-/graceful/drain", headers=auth, timeout=10)
    assert response.status_code == 200, response.text
    status = requests.get(node.url + "/-/graceful/status", headers=auth, timeout=10).json()
    pids, seen = set(status["inflight_by_worker"]), set()

    def every_process_drains() -> bool:
        # A new connection each time, so that every worker gets to answer; a POST, which reject
        # mode serves.
        pid, answer = requests.post(
            node.url + "/draining", headers={"Connection": "close"}, timeout=5
        ).text.split()
        if answer == "yes":
            seen.add(pid)
        return pids <= seen

    wait_until(every_process_drains, timeout=20, interval=0.005, message=f"{node.name} drains")


@dataclasses.dataclass
class Outcomes:
    posts: dict[str, str] = dataclasses.field(default_factory=dict)
    """Order id -> ``201``, ``app 503`` or what else came back."""
    gets: list[str] = dataclasses.field(default_factory=list)
    """Every GET that did not get its 200."""
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def post(self, pool: Pool, order_id: str, form: dict[str, str]) -> None:
        try:
            response = pool.post("/orders", data={"id": order_id, **form}, timeout=CALL_TIMEOUT)
            if (response.status_code, response.text) == (201, f"created {order_id}\n"):
                outcome = "201"
            elif (response.status_code, response.text) == (503, f"app: 503 {order_id}\n"):
                outcome = "app 503"
            else:
                outcome = f"{response.status_code} {response.text!r} {dict(response.headers)}"
        except requests.RequestException as exc:
            outcome = repr(exc)
        with self.lock:
            self.posts[order_id] = outcome

    def get(self, pool: Pool, order_id: str) -> None:
        try:
            response = pool.get(f"/orders/{order_id}", timeout=CALL_TIMEOUT)
            ok = (response.status_code, response.text) == (200, f"order {order_id}\n")
            failure = None if ok else f"GET {order_id}: {response.status_code} {response.text!r}"
        except requests.RequestException as exc:
            failure = f"GET {order_id}: {exc!r}"
        if failure is not None:
            with self.lock:
                self.gets.append(failure)


def form_for(n: int) -> dict[str, str]:
    """Every third POST asks the app for its own 503 while draining; every sixth forges the mark."""
    if n % 6 == 0:
        return {"fail": "1", "forge": "1"}
    if n % 3 == 0:
        return {"fail": "1"}
    return {}


def load(pool: Pool, outcomes: Outcomes, prefix: str) -> None:
    def caller(c: int) -> None:
        for i in range(CALLS_EACH):
            order_id = f"{prefix}-{c}-{i}"
            outcomes.post(pool, order_id, form_for(i))
            outcomes.get(pool, order_id)

    threads = [threading.Thread(target=caller, args=(c,)) for c in range(CALLERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CALLS_EACH * sum(CALL_TIMEOUT) * 2)
    assert not any(thread.is_alive() for thread in threads), "callers still running"


def each_node_first(cluster: list[Node], outcomes: Outcomes, prefix: str) -> None:
    """One POST of each kind and one GET with each node first in line (a pool that knows
    nothing yet: round robin starts with it), so every node sees every case."""
    for n, node in enumerate(cluster):
        others = [other.url for other in cluster if other is not node]
        with Pool([node.url, *others], watch=False, probe_interval=60) as pool:
            for kind, form in enumerate(({}, {"fail": "1"}, {"fail": "1", "forge": "1"})):
                outcomes.post(pool, f"{prefix}-{n}-{kind}", form)
        with Pool([node.url, *others], watch=False, probe_interval=60) as pool:
            outcomes.get(pool, f"{prefix}-{n}")


def check(cluster: list[Node], outcomes: Outcomes) -> Callable[[str], str]:
    ran = collections.Counter(oid for node in cluster for oid in node.ran())
    where = {oid: node.name for node in cluster for oid in node.ran()}

    def summary(title: str) -> str:
        counts = collections.Counter(outcomes.posts.values())
        per_node = {node.name: len(node.ran()) for node in cluster}
        return f"{title}\noutcomes: {dict(counts)}\nran per node: {per_node}"

    twice = sorted(oid for oid, count in ran.items() if count > 1)
    assert not twice, summary(f"ran more than once: {twice[:10]}")
    unknown = set(ran) - set(outcomes.posts)
    assert not unknown, summary(f"ran, never sent: {sorted(unknown)[:10]}")
    odd = {oid: what for oid, what in outcomes.posts.items() if what not in ("201", "app 503")}
    assert not odd, summary(f"neither the app's 201 nor its 503: {list(odd.items())[:5]}")
    for oid, what in outcomes.posts.items():
        assert ran[oid] == 1, summary(f"{oid} ({what}, {where.get(oid)}) ran {ran[oid]} times")
    assert not outcomes.gets, summary(f"GETs failed: {outcomes.gets[:5]}")
    return summary


def test_every_post_runs_at_most_once_and_every_201_exactly_once_while_all_nodes_drain(
    cluster: list[Node],
) -> None:
    outcomes = Outcomes()
    with Pool([node.url for node in cluster], probe_interval=0.5) as pool:
        load(pool, outcomes, "serving")  # nothing drains: the app answers 201 to all
        assert set(outcomes.posts.values()) == {"201"}

        for node in cluster:
            drain(node)
        for node in cluster:
            assert readyz(node) == 503
        load(pool, outcomes, "draining")
        states = [status.state for status in pool.nodes]
    each_node_first(cluster, outcomes, "first")

    summary = check(cluster, outcomes)
    print(summary("all good"))
    assert states == [NodeState.DRAINING] * len(cluster)
    draining = {oid: what for oid, what in outcomes.posts.items() if oid.startswith("draining")}
    for n in range(CALLS_EACH):
        expected = "app 503" if form_for(n) else "201"
        assert {draining[f"draining-{c}-{n}"] for c in range(CALLERS)} == {expected}
    for n, node in enumerate(cluster):
        assert f"first-{n}-0" in node.ran(), summary(f"{node.name} ran its first POST")
        assert outcomes.posts[f"first-{n}-1"] == "app 503", summary(node.name)
        assert outcomes.posts[f"first-{n}-2"] == "app 503", summary(node.name)
