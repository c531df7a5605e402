"""Rollout: failed requests, naive against graceful, through nginx and through the client pool.

Two parts, each with the naive way and the graceful way in the same run:

- **nginx** (reuses ``tests/e2e/rollout_harness.py``): three nodes behind nginx on 127.0.0.1,
  32 callers through it with keep-alive (GETs, POSTs with unique ids, 3-second requests,
  bounded streams; the harness's one retry rule: a GET or keyed POST lost on a *reused*
  connection before any answer is resent once, as Go's client does). Naive: plain gunicorn,
  nginx's own retry rules, each node restarted by SIGTERM and start. Graceful: gunicorn with
  the library's hooks and middleware, the shipped nginx snippet, ``graceful rollout --lb nginx``.
- **client pool**: three uvicorn nodes serving ``tests/e2e/apps/pool_app.py`` behind the
  middleware (SIGTERM drains, ``GRACEFUL_DELAY=1``); each in turn gets SIGTERM, exits, and is
  started again on its port. Two sets of callers run through the same restarts at once: a
  plain ``requests.Session`` going round the node URLs (no retries), and one
  ``graceful.client.Pool`` (events watched, ``/readyz`` probed every second). Each sends
  ``GET /orders/<id>`` and ``POST /orders`` in turn; an exception or a wrong answer is a failure.

Goal: zero failed requests for graceful. The figure line gives each count.

    python benchmarks/rollout_failures.py [--parts nginx,pool] [--warm-up 40]

Without nginx the nginx part is skipped, with a note in the output.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import itertools
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _folder in (ROOT / "tests", ROOT / "tests" / "e2e"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

import requests  # noqa: E402

from graceful.client import Pool  # noqa: E402
from graceful.testing import Process, Processes, child_env, free_port, poll_until, wait_answering  # noqa: E402

# The tests' harness, found through sys.path above (mypy does not look there: Any).
rh: Any = importlib.import_module("rollout_harness")
wait_until = poll_until

TOKEN = "rollout-bench-Token-51c"
NODE_ENV = {"GRACEFUL_DELAY": "1", "GRACEFUL_DRAIN_TIMEOUT": "15", "GRACEFUL_TOKEN": TOKEN}
APPS = ROOT / "tests" / "e2e" / "apps"


@contextlib.contextmanager
def spawner(folder: Path) -> Iterator[Callable[..., Process]]:
    """The tests' ``spawn`` fixture outside pytest (the environment is :func:`child_env` plus
    ``env``); every process stopped on the way out."""
    with Processes(folder) as procs:

        def spawn(argv: Sequence[str], env: Mapping[str, str] | None = None, **how: Any) -> Process:
            return procs.start(argv, env=child_env(env), **how)

        yield spawn


def wait_acked(load: rh.Load, count: int) -> None:
    target = load.acked_count() + count
    wait_until(lambda: load.acked_count() >= target, timeout=60, interval=0.05)


# -- nginx -----------------------------------------------------------------------------------


def nginx_naive(nginx: str, tmp: Path, warm_up: int) -> rh.LoadReport:
    tmp.mkdir(parents=True, exist_ok=True)
    cluster = rh.Cluster(tmp / "naive-nodes", "plain-gunicorn", 3)
    try:
        with spawner(tmp) as spawn:
            cluster.start()
            cluster.wait_ready(wait_until)
            front = rh.start_nginx(
                spawn, wait_until, nginx, tmp / "naive-nginx", cluster.nodes, snippet=False
            )
            load = rh.Load(front.url, max_seconds=120).start()
            try:
                wait_acked(load, warm_up)
                for node in cluster.nodes:
                    cluster.ctl("restart", node.index)  # SIGTERM and start; nobody tells nginx
                    wait_until(
                        lambda: node.version()[0] == "v2",  # noqa: B023
                        timeout=40,
                        message=lambda: cluster.log(node),  # noqa: B023
                    )
                wait_acked(load, warm_up)
            finally:
                report = load.stop()
    finally:
        cluster.kill_all()
    return report


def nginx_graceful(nginx: str, tmp: Path, warm_up: int) -> tuple[rh.LoadReport, int]:
    tmp.mkdir(parents=True, exist_ok=True)
    cluster = rh.Cluster(tmp / "graceful-nodes", "gunicorn", 3, NODE_ENV)
    try:
        with spawner(tmp) as spawn:
            cluster.start()
            cluster.wait_ready(wait_until)
            front = rh.start_nginx(spawn, wait_until, nginx, tmp / "graceful-nginx", cluster.nodes)
            load = rh.Load(front.url, max_seconds=150).start()
            try:
                wait_acked(load, warm_up)
                run = rh.run_rollout(
                    cluster, front.rollout_args(), tmp / "rollout.json", token=TOKEN
                )
                if run.returncode != 0:
                    print(run.describe())
                wait_acked(load, warm_up)
            finally:
                report = load.stop()
    finally:
        cluster.kill_all()
    return report, run.returncode


# -- client pool -----------------------------------------------------------------------------


@dataclasses.dataclass
class Callers:
    """``count`` threads calling through ``call`` (GET and POST in turn) until stopped."""

    name: str
    call: Callable[[str, str, str], requests.Response]  # (method, path, id) -> response
    count: int = 8
    max_calls: int = 20_000
    sent: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(self.count)
        ]
        self.deadline = time.monotonic() + 180

    def start(self) -> Callers:
        for thread in self.threads:
            thread.start()
        return self

    def _run(self, n: int) -> None:
        for i in range(self.max_calls):
            if self.stopping.is_set() or time.monotonic() > self.deadline:
                return
            oid = f"{self.name}{n}-{i}"
            try:
                if i % 2:
                    response = self.call("GET", f"/orders/{oid}", oid)
                    ok = response.status_code == 200 and response.text == f"order {oid}\n"
                else:
                    response = self.call("POST", "/orders", oid)
                    ok = response.status_code == 201 and response.text == f"created {oid}\n"
                failure = None if ok else f"{response.status_code} {response.text[:60]!r}"
            except requests.RequestException as exc:
                failure = f"{type(exc).__name__}: {str(exc)[:120]}"
            with self.lock:
                self.sent += 1
                if failure is not None:
                    self.failures.append(f"{oid}: {failure}")

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(60)


def round_robin(urls: list[str]) -> Callable[[str, str, str], requests.Response]:
    """A plain session going round the nodes, no retries: what a caller without the pool does."""
    session = requests.Session()
    lock = threading.Lock()
    turns = itertools.cycle(urls)

    def call(method: str, path: str, oid: str) -> requests.Response:
        with lock:
            url = next(turns)
        data = {"id": oid} if method == "POST" else None
        return session.request(method, url + path, data=data, timeout=(3.05, 20))

    return call


def through_pool(pool: Pool) -> Callable[[str, str, str], requests.Response]:
    def call(method: str, path: str, oid: str) -> requests.Response:
        data = {"id": oid} if method == "POST" else None
        return pool.request(method, path, data=data, timeout=(3.05, 20))

    return call


def pool_part(tmp: Path, calls_between: int) -> tuple[Callers, Callers]:
    tmp.mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in range(3)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]

    def argv(port: int) -> list[str]:
        return [
            *(sys.executable, "-m", "uvicorn", "pool_app:asgi_app", "--app-dir", str(APPS)),
            *("--host", "127.0.0.1", "--port", str(port), "--no-access-log"),
            *("--timeout-keep-alive", "120"),
        ]

    with spawner(tmp) as spawn:
        lives: list[Process] = []

        def start(index: int) -> Process:
            record = tmp / f"pool-node{index}-{len(lives)}"
            record.mkdir()
            env = {**NODE_ENV, "GRACEFUL_DRAIN_TIMEOUT": "10", "POOL_RECORD_DIR": str(record)}
            proc = spawn(argv(ports[index]), env=env, name=f"pool-node{index}")
            lives.append(proc)
            return proc

        current = [start(index) for index in range(3)]
        for proc, port in zip(current, ports, strict=True):
            wait_answering(port, "/readyz", timeout=30, process=proc)
        pool = Pool(urls, probe_interval=1.0)
        naive = Callers("rr", round_robin(urls)).start()
        graceful = Callers("pool", through_pool(pool)).start()
        try:
            for index, port in enumerate(ports):
                target = naive.sent + graceful.sent + calls_between
                wait_until(lambda: naive.sent + graceful.sent >= target, timeout=60)  # noqa: B023
                old = current[index]
                old.send_signal(signal.SIGTERM)
                old.wait(30)
                current[index] = start(index)
                wait_answering(port, "/readyz", timeout=30, process=current[index])
            target = naive.sent + graceful.sent + calls_between
            wait_until(lambda: naive.sent + graceful.sent >= target, timeout=60)
        finally:
            naive.stop()
            graceful.stop()
            pool.close()
    return naive, graceful


# -- the run ---------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--parts", default="nginx,pool")
    parser.add_argument("--warm-up", type=int, default=40, help="POSTs before and after")
    parser.add_argument("--calls-between", type=int, default=600, help="pool: calls per turn")
    args = parser.parse_args()
    parts = [part for part in args.parts.split(",") if part]
    figures: list[str] = []
    graceful_failures = 0
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="rollout-failures-") as folder:
        tmp = Path(folder)
        if "nginx" in parts:
            nginx = rh.find_binary("nginx")
            if nginx is None:
                print("nginx is not installed: the nginx part is skipped")
                figures.append("nginx skipped (not installed)")
            else:
                naive = nginx_naive(nginx, tmp / "naive", args.warm_up)
                print("naive restart behind nginx:", brief(naive), sep="\n", flush=True)
                graceful, code = nginx_graceful(nginx, tmp / "graceful", args.warm_up)
                print(f"graceful rollout behind nginx (exit {code}):", brief(graceful), sep="\n")
                graceful_failures += len(graceful.failures) + (code != 0)
                rows.append(("nginx", describe(naive), describe(graceful)))
                figures.append(
                    f"nginx naive {len(naive.failures)}/{naive.sent}, "
                    f"graceful {len(graceful.failures)}/{graceful.sent}"
                )
        if "pool" in parts:
            rr, pool = pool_part(tmp / "pool", args.calls_between)
            for callers in (rr, pool):
                print(f"{callers.name}: {callers.sent} calls, {len(callers.failures)} failed")
                for failure in callers.failures[:5]:
                    print(f"  {failure}")
            graceful_failures += len(pool.failures)
            rows.append(
                (
                    "client pool",
                    f"{len(rr.failures)} of {rr.sent} (round-robin session)",
                    f"{len(pool.failures)} of {pool.sent} (Pool)",
                )
            )
            figures.append(
                f"pool naive {len(rr.failures)}/{rr.sent}, "
                f"graceful {len(pool.failures)}/{pool.sent}"
            )
    print("\n| through | naive: failed of sent | graceful: failed of sent |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {' | '.join(row)} |")
    print()
    met = "met" if graceful_failures == 0 else "not met"
    print(
        f"failed requests during a rolling restart: {'; '.join(figures)} (goal 0 graceful: {met})"
    )
    return 0


def brief(report: Any) -> str:
    """The harness's summary, its first five failures and retries only, each line cut."""
    lines = report.summary().splitlines()
    failures = [line for line in lines if line.startswith("  failure")][:5]
    retries = [line for line in lines if line.startswith("  retry")][:5]
    return "\n".join(line[:160] for line in [lines[0], *failures, *retries])


def describe(report: Any) -> str:
    return f"{len(report.failures)} of {report.sent} ({len(report.retries)} resent)"


if __name__ == "__main__":
    sys.exit(main())
