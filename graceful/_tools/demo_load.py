"""The load and the rounds of ``graceful demo`` (:mod:`graceful._tools.demo`): callers through
requests, the client pool or nginx, and what they saw.

Imported only when the demo runs: it needs requests (``pip install 'graceful-drain[client]'``),
which a server's install does not bring.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from .demo import (
    IN_PLACE_RESTARTS,
    PACE,
    REQUEST_TIMEOUT,
    START_TIMEOUT,
    THREADS,
    Cluster,
    Nginx,
    Processes,
    Progress,
    RoundName,
    Settings,
)
from .demo_html import Restart, RoundTrace, Sample
from .demo_recorder import ID_HEADER, ran_twice

if TYPE_CHECKING:
    from .demo_user_app import UserApp

__all__ = [
    "FAILED_STATUSES",
    "Load",
    "RoundResult",
    "failure_kind",
    "run_round",
    "through",
    "tuned_retry",
    "wait_in_service",
]

#: ``--app``: the statuses that count as failed (a proxy's, or a server's with no app to ask);
#: any other is the app's own answer.
FAILED_STATUSES = frozenset({502, 503, 504})

# -- the load -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    seconds: float
    failure: str | None
    #: When it was sent, in seconds since the load started (``--report``'s plot).
    at: float = 0.0


def failure_kind(exc: BaseException) -> str:
    from .._client.pool import NoNodeAvailable

    if isinstance(exc, NoNodeAvailable) or type(exc).__name__ == "NoNodeAvailable":
        return "no node available"
    httpx_kind = _httpx_failure_kind(exc)
    if httpx_kind is not None:
        return httpx_kind
    if _from_grpc(exc):
        from .demo_grpc import failure_kind as grpc_kind

        return grpc_kind(exc) or type(exc).__name__
    if isinstance(exc, requests.Timeout):
        return "timeout"
    if isinstance(exc, requests.ConnectionError):
        text = repr(exc)
        if "NewConnectionError" in text or "Connection refused" in text:
            return "connection refused"
        if "RemoteDisconnected" in text or "reset" in text.lower() or "Aborted" in text:
            return "connection closed"
        return "connection error"
    return type(exc).__name__


def _from_grpc(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("grpc")


def _httpx_failure_kind(exc: BaseException) -> str | None:
    """The kind of an httpx failure (``--via httpx``); None for any other exception."""
    if not type(exc).__module__.startswith("httpx"):
        return None
    import httpx

    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connection refused"
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        return "connection closed"
    return type(exc).__name__


class Load:
    """``THREADS`` callers, each alternating ``GET /items/<n>`` and ``POST /items`` (an id in
    the body and an ``Idempotency-Key``; the id starts with ``tag``, the round's name), until
    :meth:`stop`. With ``app`` (``--app``): ``GET --path``, and ``POST --post-path`` (a JSON
    body ``{"id": ...}`` and the id in :data:`ID_HEADER`) when there is one.

    Every request's outcome is kept (:meth:`samples`: ``--report``'s plot); a round's load is
    bounded (``--duration``, at most 600 s, each caller pausing :data:`PACE` between two
    requests), and so is that list."""

    def __init__(
        self,
        call: Callable[[str, str, dict[str, Any]], Any],
        tag: str = "",
        app: UserApp | None = None,
    ) -> None:
        self.call = call
        self.tag = tag
        self.app = app
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._caller, args=(n,), name=f"demo-load-{n}", daemon=True)
            for n in range(THREADS)
        ]
        self.started = 0.0
        self.seconds = 0.0

    def start(self) -> Load:
        self.started = time.monotonic()
        for thread in self.threads:
            thread.start()
        return self

    def _caller(self, number: int) -> None:
        for turn in itertools.count():
            if self.stopping.is_set():
                return
            method, path, kwargs = self._next(number, turn)
            began = time.monotonic()
            failure: str | None = None
            try:
                response = self.call(method, path, kwargs)
                response.close()
                if self._failed(response.status_code):
                    failure = f"HTTP {response.status_code}"
            except Exception as exc:  # every failure is counted, by kind
                failure = failure_kind(exc)
            with self.lock:
                self.outcomes.append(
                    Outcome(time.monotonic() - began, failure, began - self.started)
                )
            self.stopping.wait(PACE)

    def _next(self, number: int, turn: int) -> tuple[str, str, dict[str, Any]]:
        """Caller ``number``'s request of ``turn``."""
        oid = f"{self.tag}-{uuid.uuid4().hex}" if self.tag else uuid.uuid4().hex
        if self.app is not None:
            if turn % 2 and self.app.post_path is not None:
                kwargs = {"json": {"id": oid}, "headers": {ID_HEADER: oid}}
                return "POST", self.app.post_path, kwargs
            return "GET", self.app.path, {}
        if turn % 2:
            return "POST", "/items", {"data": {"id": oid}, "headers": {"Idempotency-Key": oid}}
        return "GET", f"/items/{number}-{turn}", {}

    def _failed(self, status: int) -> bool:
        if self.app is not None:
            return status in FAILED_STATUSES
        return status not in (200, 201)

    def elapsed(self) -> float:
        """Seconds since the load started: the clock of the round's plot."""
        return time.monotonic() - self.started

    def samples(self) -> list[Sample]:
        """Each request: when it was sent, its latency, failed or not."""
        with self.lock:
            return [Sample(o.at, o.seconds * 1000, o.failure is not None) for o in self.outcomes]

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return len(self.outcomes), sum(1 for o in self.outcomes if o.failure)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(REQUEST_TIMEOUT[0] + REQUEST_TIMEOUT[1] + 5)
        self.seconds = time.monotonic() - self.started


def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclasses.dataclass
class RoundResult:
    sent: int
    failed: int
    failures: dict[str, int]
    p50_ms: float
    p99_ms: float
    wall_s: float
    restarts: int
    #: ``--app``: how many POST ids the recorder saw reach the app more than once; None: not
    #: counted (the demo's own app).
    ran_twice: int | None = None

    @classmethod
    def of(cls, load: Load, restarts: int, twice: int | None = None) -> RoundResult:
        with load.lock:
            outcomes = list(load.outcomes)
        kinds = Counter(o.failure for o in outcomes if o.failure)
        latencies = [o.seconds * 1000 for o in outcomes]
        return cls(
            sent=len(outcomes),
            failed=sum(kinds.values()),
            failures=dict(kinds.most_common()),
            p50_ms=round(percentile(latencies, 0.50), 1),
            p99_ms=round(percentile(latencies, 0.99), 1),
            wall_s=round(load.seconds, 1),
            restarts=restarts,
            ran_twice=twice,
        )


def run_round(
    settings: Settings,
    processes: Processes,
    folder: Path,
    label: RoundName,
    progress: Progress,
    interrupted: threading.Event,
) -> tuple[RoundResult, RoundTrace]:
    """One round: ``naive`` (no library), ``tuned`` (no library; the proxy's or the client's
    best settings) or ``graceful``; its figures, and its trace for ``--report`` (each request,
    when each node was signalled and was ready again, the commands)."""
    graceful = label == "graceful"
    one = settings.via == "direct"  # --nodes 1: restarted in place, called directly
    ledger: Path | None = None
    app_options: dict[str, Any] = {}
    if settings.app is not None:
        from .demo_user_app import node_app, node_env

        ledger = folder / f"ledger-{label}"
        ledger.mkdir()
        app_options = {
            "app": node_app(settings.app),
            "env": node_env(folder, ledger),
            "probe": settings.app.path,
        }
    cluster = Cluster(
        processes,
        folder,
        settings.server,
        graceful,
        settings.nodes,
        grpc=settings.via == "grpc",
        in_place=one,
        label=label,
        **app_options,
    )
    closing: list[Callable[[], None]] = []
    what = f"1 {settings.server} node" if one else f"{settings.nodes} {settings.server} nodes"
    progress.set(label, f"starting {what}")
    for node in cluster.nodes:
        cluster.start(node)
    for node in cluster.nodes:
        cluster.wait_ready(node, interrupted)
    front: subprocess.Popen[bytes] | None = None
    pool: Any = None
    seen: Any = None  # --via grpc: the processes the calls reached
    call: Callable[[str, str, dict[str, Any]], Any]
    if one:
        call = _session_caller(cluster.nodes[0].url)
    elif settings.via == "nginx" and settings.nginx is not None:
        nginx = Nginx(processes, settings.nginx, folder)
        progress.set(label, "starting nginx")
        probe = None if settings.app is None else settings.app.path
        front = nginx.start(cluster.nodes, label, probe)
        call = _session_caller(nginx.url)
    elif settings.via == "httpx":
        call, pool = _httpx_caller(cluster, label, settings.nodes)
    elif settings.via == "grpc":
        from .demo_grpc import caller

        call, close_channel, seen = caller([node.port for node in cluster.nodes], graceful)
        closing.append(close_channel)
    elif graceful:
        from .._client.pool import Pool

        pool = Pool(
            [node.url for node in cluster.nodes],
            probe_interval=0.2,
            timeout=REQUEST_TIMEOUT,
            max_attempts=settings.nodes + 1,
        )

        def call(method: str, path: str, kwargs: dict[str, Any]) -> requests.Response:
            response: requests.Response = pool.request(method, path, **kwargs)
            return response

    else:
        # Naive: no retries. Tuned: retries where nothing was sent (a refused connection).
        retries: Any = tuned_retry() if label == "tuned" else 0
        session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(max_retries=retries, pool_maxsize=32)
        session.mount("http://", adapter)
        turn = itertools.count()

        def call(method: str, path: str, kwargs: dict[str, Any]) -> requests.Response:
            node = cluster.nodes[next(turn) % len(cluster.nodes)]  # round-robin
            return session.request(method, node.url + path, timeout=REQUEST_TIMEOUT, **kwargs)

    load = Load(call, label, settings.app).start()
    restarts = 0
    marks: list[Restart] = []
    try:
        started = time.monotonic()
        progress.set(label, "load running", load)
        warm_up = min(2.0, settings.duration * 0.15)
        if interrupted.wait(warm_up):
            raise KeyboardInterrupt
        if one:
            restarts = _restart_in_place(
                cluster, graceful, label, warm_up, progress, interrupted, load, marks
            )
        else:
            for node in cluster.nodes:
                progress.set(label, f"restarting node {node.index + 1}/{settings.nodes}")
                signalled = load.elapsed()
                cluster.stop(node)
                cluster.start(node)
                cluster.wait_ready(node, interrupted)
                if pool is not None:  # back in the pool's rotation before the next one goes
                    wait_in_service(pool, node.url, interrupted)
                if seen is not None and graceful and node.proc is not None:
                    wait_reached(seen, node.proc.pid, interrupted)  # back in the channel's
                marks.append(Restart(f"node {node.index + 1}", signalled, load.elapsed()))
                restarts += 1
        progress.set(label, f"{'the node' if one else 'every node'} restarted; load running")
        left = max(1.0, settings.duration - (time.monotonic() - started))
        if interrupted.wait(left):
            raise KeyboardInterrupt
    finally:
        load.stop()
        if pool is not None:
            pool.close()
        for close in closing:
            close()
        for node in cluster.nodes:
            if node.proc is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(node.proc.pid, signal.SIGKILL)
        if front is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(front.pid, signal.SIGKILL)
    result = RoundResult.of(load, restarts, None if ledger is None else ran_twice(ledger))
    commands = [node.command for node in cluster.nodes]
    return result, RoundTrace(load.samples(), marks, commands, through(settings, label))


def through(settings: Settings, label: RoundName) -> str:
    """How the round's load reached the nodes, for ``--report``: with ``--via nginx``, which
    nginx configuration; else the callers' client and its settings."""
    graceful = label == "graceful"
    if settings.via == "direct":
        return "The callers call the one node directly: a requests.Session each, no retries."
    if settings.via == "nginx":
        if label == "naive":
            return (
                "Through nginx with its defaults (each server max_fails=1 fail_timeout=10s; a "
                "POST that reached a node never sent to another), upstream keep-alive; not "
                "the library's snippet."
            )
        return (
            "Through nginx with the library's snippet, integrations/nginx/graceful-proxy.conf "
            "(proxy_next_upstream error timeout http_503), and max_fails=0 on every server."
        )
    if settings.via == "grpc":
        if graceful:
            return "One channel from graceful.grpc.channel."
        return "One plain gRPC channel, round-robin over the nodes."
    if settings.via == "httpx":
        if graceful:
            return "An httpx.Client over graceful.httpx.PoolTransport."
        retries = 3 if label == "tuned" else 0
        return f"A plain httpx.Client, round-robin, httpx.HTTPTransport(retries={retries})."
    if graceful:
        return "graceful.client.Pool (requests)."
    if label == "tuned":
        return (
            "A requests.Session, round-robin, retrying connection errors only: urllib3 "
            "Retry(total=3, connect=3, read=0, status=0, other=0, allowed_methods=None)."
        )
    return "A plain requests.Session, round-robin, no retries."


def _session_caller(base: str) -> Callable[[str, str, dict[str, Any]], requests.Response]:
    """Calls to ``base`` (nginx, or ``--nodes 1``'s node): a plain ``requests.Session`` per
    caller thread, keep-alive, no retries."""
    sessions = threading.local()

    def call(method: str, path: str, kwargs: dict[str, Any]) -> requests.Response:
        session = getattr(sessions, "session", None)
        if session is None:
            session = sessions.session = requests.Session()
            session.mount("http://", requests.adapters.HTTPAdapter(max_retries=0))
        response: requests.Response = session.request(
            method, base + path, timeout=REQUEST_TIMEOUT, **kwargs
        )
        return response

    return call


def _restart_in_place(
    cluster: Cluster,
    graceful: bool,
    label: str,
    pause: float,
    progress: Progress,
    interrupted: threading.Event,
    load: Load,
    marks: list[Restart],
) -> int:
    """``--nodes 1``: restart the node :data:`IN_PLACE_RESTARTS` times, ``pause`` seconds
    apart: naively (SIGTERM, wait for the exit, start again), or in place with ``graceful
    reload``; each restart's times (``load``'s clock) added to ``marks``. Returns how many
    restarts were done."""
    node = cluster.nodes[0]
    for number in range(1, IN_PLACE_RESTARTS + 1):
        step = f"restart {number}/{IN_PLACE_RESTARTS}"
        if graceful:
            progress.set(label, f"{step}: graceful reload")

            def say(line: str, step: str = step) -> None:
                progress.set(label, f"{step}: {line}")

            signalled = load.elapsed()
            cluster.reload(node, say)
        else:
            progress.set(label, f"{step}: SIGTERM, wait for the exit, start again")
            signalled = load.elapsed()
            cluster.stop(node)
            cluster.start(node)
            cluster.wait_ready(node, interrupted)
        marks.append(Restart(f"restart {number}", signalled, load.elapsed()))
        if number < IN_PLACE_RESTARTS and interrupted.wait(pause):
            raise KeyboardInterrupt  # the next deploy comes a little later
    return IN_PLACE_RESTARTS


def tuned_retry() -> Any:
    """The tuned round's retries for requests (urllib3): a connection refused or timed out at
    connect was never sent, so it is sent again, up to 3 times, POSTs too; a read error (the
    request may have run) and a status are not retried."""
    from urllib3.util.retry import Retry

    return Retry(
        total=3,
        connect=3,
        read=0,
        status=0,
        other=0,
        allowed_methods=None,
        backoff_factor=0,
    )


def _httpx_caller(
    cluster: Cluster, label: RoundName, nodes: int
) -> tuple[Callable[[str, str, dict[str, Any]], Any], Any]:
    """``--via httpx``: the call of one round, and what holds the nodes' states (the
    graceful round's ``PoolTransport``; closed with the round) or None. Naive: a plain
    ``httpx.Client``; tuned: one whose transport retries failed connects (``retries=3``)."""
    import httpx

    timeout = httpx.Timeout(REQUEST_TIMEOUT[1], connect=REQUEST_TIMEOUT[0])
    if label == "graceful":
        from .._client.httpx_sync import PoolTransport

        transport = PoolTransport(
            [node.url for node in cluster.nodes], probe_interval=0.2, max_attempts=nodes + 1
        )
        client = httpx.Client(transport=transport, base_url="http://demo", timeout=timeout)

        def call(method: str, path: str, kwargs: dict[str, Any]) -> httpx.Response:
            return client.request(method, path, **kwargs)

        return call, transport
    retries = 3 if label == "tuned" else 0
    plain = httpx.Client(timeout=timeout, transport=httpx.HTTPTransport(retries=retries))
    turn = itertools.count()

    def call_plain(method: str, path: str, kwargs: dict[str, Any]) -> httpx.Response:
        node = cluster.nodes[next(turn) % len(cluster.nodes)]  # round-robin
        return plain.request(method, node.url + path, **kwargs)

    return call_plain, None


def wait_reached(seen: Any, pid: int, interrupted: threading.Event) -> None:
    """Until a call reached process ``pid`` (bounded by :data:`START_TIMEOUT`)."""
    deadline = time.monotonic() + START_TIMEOUT
    while pid not in seen and time.monotonic() < deadline:
        if interrupted.wait(0.05):
            raise KeyboardInterrupt


def wait_in_service(pool: Any, url: str, interrupted: threading.Event) -> None:
    from .._client.pool import NodeState

    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        states = {status.url: status.state for status in pool.nodes}
        if states.get(url) is NodeState.IN_SERVICE:
            return
        if interrupted.wait(0.05):
            raise KeyboardInterrupt
