"""A pytest plugin to prove, in your own CI, that your app drains without losing a request.

Installed with graceful-drain (entry point ``pytest11``); it only adds fixtures, so it changes
nothing unless a test asks for one:

- ``graceful_clock``: a fake monotonic clock, ``.advance(seconds)`` moves it on;
- ``graceful_lifecycle``: a fresh :class:`~graceful.Lifecycle` on that clock, installed as the
  process-wide one for the test (middleware built during the test uses it);
- ``graceful_drain_during_request``: :func:`drain_during_request`, which calls a WSGI or ASGI
  app in process and starts a drain while the request is in flight;
- ``graceful_live_server``: :func:`live_drain` with its processes killed at teardown: starts
  your app under gunicorn (with ``graceful.gunicorn``) or uvicorn on 127.0.0.1, puts load on
  it, sends SIGTERM and reports the requests that were lost;
- ``graceful_cluster``: starts :class:`graceful.testing.Cluster` (N nodes of your app on
  127.0.0.1), ended at teardown: restart them in turn under load spread as a load balancer
  with health checks spreads it, with a ledger of every request and of the POSTs your app ran.

::

    def test_drains_while_serving(graceful_drain_during_request):
        outcome = graceful_drain_during_request(myapp.app, "/orders/1")
        assert outcome.status == 200
        assert outcome.phase_in_flight is Phase.DRAINING   # the request held the drain open
        assert outcome.phase_after is Phase.DRAINED


    def test_sigterm_loses_nothing(graceful_live_server):
        report = graceful_live_server("myapp:app", server="gunicorn", path="/orders/1")
        assert report.lost == 0 and report.exit_code == 0, report.summary()


    def test_a_rolling_restart_loses_nothing(graceful_cluster):
        cluster = graceful_cluster("myapp:app", server="gunicorn", nodes=3)
        report = cluster.restart_under_load("/", post_path="/orders")
        report.assert_lossless()   # nothing failed, every POST ran once, every exit 0
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import io
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import pytest

from ._core.config import Config
from ._runtime.lifecycle import Lifecycle, Phase, get_lifecycle, set_lifecycle
from .testing import (
    Call,
    Cluster,
    DrainResult,
    FakeClock,
    Load,
    drain_under_load,
    free_port,
)

__all__ = [
    "FakeClock",
    "LiveDrainReport",
    "RequestDrain",
    "drain_during_request",
    "live_drain",
]


# -- in process: a drain that starts while a request is in flight --------------------------


@dataclasses.dataclass
class RequestDrain:
    """What happened to a request during which a drain started."""

    status: int
    """The response's status (0 when the app sent none)."""
    headers: list[tuple[str, str]]
    body: bytes
    inflight_at_drain: int
    """In flight on the node when the drain started (the request itself included)."""
    phase_in_flight: Phase
    """The phase once the drain's delay was over, the request still in flight: ``DRAINING``
    when the request held the drain open, as it should."""
    phase_after: Phase
    """The phase once the response was complete: ``DRAINED`` when nothing else held it."""

    def header(self, name: str) -> str | None:
        """The first response header called ``name`` (any case)."""
        wanted = name.lower()
        return next((v for k, v in self.headers if k.lower() == wanted), None)

    @property
    def served(self) -> bool:
        """The request was answered, and not with a server error."""
        return 100 <= self.status < 500


def _find_lifecycle(app: Any) -> Lifecycle:
    """The lifecycle of graceful's middleware around ``app`` (also Flask's ``app.wsgi_app``)."""
    for candidate in (app, getattr(app, "wsgi_app", None)):
        found = getattr(candidate, "lifecycle", None)
        if isinstance(found, Lifecycle):
            return found
    return get_lifecycle()


def _is_asgi(app: Any) -> bool:
    if inspect.isfunction(app) or inspect.ismethod(app):
        return inspect.iscoroutinefunction(app)
    return inspect.iscoroutinefunction(type(app).__call__)


def drain_during_request(
    app: Any,
    path: str = "/",
    *,
    method: str = "GET",
    query: str = "",
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    lifecycle: Lifecycle | None = None,
    interface: Literal["auto", "wsgi", "asgi"] = "auto",
    resume: bool = True,
) -> RequestDrain:
    """Call ``app`` (WSGI or ASGI, wrapped in graceful's middleware) in process; start a drain
    when the app begins its response, the request still in flight; report what happened.

    Once the drain has started, the lifecycle is moved past the drain's delay (with ``now=``,
    no waiting) while the request is still in flight, and again once it has completed. The
    lifecycle is the middleware's (found on ``app`` or Flask's ``app.wsgi_app``) unless given,
    else the process-wide one. With ``resume`` the node is resumed at the end, so the app can
    serve the next test.
    """
    lifecycle = lifecycle if lifecycle is not None else _find_lifecycle(app)
    found: dict[str, Any] = {}

    def on_in_flight() -> None:
        start = lifecycle.clock()
        found["inflight"] = lifecycle.node_inflight()
        lifecycle.drain("pytest: drain during a request", now=start)
        end = lifecycle.delay_ends_at()
        found["past"] = past = (start if end is None else end) + 0.001
        found["in_flight"] = lifecycle.tick(past)

    given = {name.lower(): value for name, value in (headers or {}).items()}
    pairs = [("host", "testserver")] if "host" not in given else []
    pairs += given.items()
    asgi = _is_asgi(app) if interface == "auto" else interface == "asgi"
    call = _call_asgi if asgi else _call_wsgi
    try:
        request = _Request(method, path, query, body, pairs)
        status, response_headers, response_body = call(app, request, on_in_flight)
        if "in_flight" not in found:
            raise AssertionError(f"{method} {path}: the app never started a response")
        after = lifecycle.tick(max(lifecycle.clock(), found["past"] + 0.001))
    finally:
        if resume and lifecycle.phase in (Phase.DRAINING, Phase.DRAINED):
            lifecycle.resume("pytest: drain test over")
    return RequestDrain(
        status=status,
        headers=response_headers,
        body=response_body,
        inflight_at_drain=found["inflight"],
        phase_in_flight=found["in_flight"],
        phase_after=after,
    )


_Answer = tuple[int, list[tuple[str, str]], bytes]


@dataclasses.dataclass(frozen=True)
class _Request:
    method: str
    path: str
    query: str
    body: bytes
    headers: list[tuple[str, str]]


def _call_wsgi(app: Any, request: _Request, on_in_flight: Callable[[], None]) -> _Answer:
    method, path, query, body, headers = dataclasses.astuple(request)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for name, value in headers:
        key = name.upper().replace("-", "_")
        if key == "CONTENT_TYPE":
            environ[key] = value
        else:
            environ[f"HTTP_{key}"] = value
    answer: dict[str, Any] = {"status": 0, "headers": []}
    chunks: list[bytes] = []

    def start_response(
        status: str, response_headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        if not answer["status"]:
            on_in_flight()
        answer["status"], answer["headers"] = int(status.split()[0]), list(response_headers)
        return chunks.append

    result: Iterable[bytes] = app(environ, start_response)
    try:
        for chunk in result:
            chunks.append(chunk)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return answer["status"], answer["headers"], b"".join(chunks)


def _call_asgi(app: Any, request: _Request, on_in_flight: Callable[[], None]) -> _Answer:
    method, path, query, body, headers = dataclasses.astuple(request)
    answer: dict[str, Any] = {"status": 0, "headers": []}
    chunks: list[bytes] = []

    async def run() -> None:
        complete = asyncio.Event()
        body_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await complete.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                on_in_flight()
                answer["status"] = message["status"]
                answer["headers"] = [
                    (k.decode("latin-1"), v.decode("latin-1"))
                    for k, v in message.get("headers", ())
                ]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    complete.set()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
        }
        try:
            await app(scope, receive, send)
        finally:
            complete.set()

    asyncio.run(run())
    return answer["status"], answer["headers"], b"".join(chunks)


# -- a live server: SIGTERM under load -------------------------------------------------------


@dataclasses.dataclass
class LiveDrainReport:
    """What callers behind a load balancer saw while the server drained on SIGTERM."""

    sent: int
    """Requests the callers sent (readiness probes not counted)."""
    failures: list[str]
    """``"GET path: error"`` for each request that got no answer or a 5xx."""
    sent_after_signal: int
    """Requests sent after SIGTERM, before the load balancer saw ``/readyz`` fail."""
    readyz_failed_after: float | None
    """Seconds from SIGTERM to the first failed ``/readyz`` probe (None: never failed)."""
    exit_code: int | None
    """The server's exit status (None: still running at ``max_seconds``)."""
    exited_after: float | None
    """Seconds from SIGTERM to the server's exit."""
    output: str
    """The server's stdout and stderr."""
    ledger: DrainResult | None = None
    """Every request of the run (:class:`graceful.testing.DrainResult`)."""

    @classmethod
    def of(cls, result: DrainResult) -> LiveDrainReport:
        return cls(
            sent=result.sent,
            failures=result.failures,
            sent_after_signal=result.sent_after_signal,
            readyz_failed_after=result.ready_failed_after,
            exit_code=result.exit_code,
            exited_after=result.exit_after_signal,
            output=result.output,
            ledger=result,
        )

    @property
    def lost(self) -> int:
        return len(self.failures)

    def summary(self) -> str:
        lines = [
            f"sent {self.sent} ({self.sent_after_signal} after SIGTERM), lost {self.lost}; "
            f"/readyz failed after {self.readyz_failed_after}s; exit {self.exit_code} "
            f"after {self.exited_after}s",
            *(f"  {failure}" for failure in self.failures[:20]),
            "--- server output (last 3000 characters):",
            self.output[-3000:],
        ]
        return "\n".join(lines)


def _server_argv(app: str, server: str, port: int, workers: int, args: Sequence[str]) -> list[str]:
    if server == "gunicorn":
        return [
            *(sys.executable, "-m", "gunicorn", "-c", "python:graceful.gunicorn"),
            *("--bind", f"127.0.0.1:{port}", "--workers", str(workers), *args, app),
        ]
    if server == "uvicorn":
        many = ("--workers", str(workers)) if workers > 1 else ()
        return [
            *(sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1"),
            *("--port", str(port), *many, *args),
        ]
    raise ValueError(f"server must be 'gunicorn' or 'uvicorn', not {server!r}")


def live_drain(
    app: str,
    *,
    server: Literal["gunicorn", "uvicorn"] = "gunicorn",
    path: str = "/",
    workers: int = 2,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    callers: int = 4,
    load_seconds: float = 1.0,
    delay: float = 1.0,
    drain_timeout: float = 10.0,
    startup_timeout: float = 30.0,
    max_seconds: float = 60.0,
) -> LiveDrainReport:
    """Start ``app`` (an import string, ``"module:attribute"``) under ``server`` on 127.0.0.1,
    send ``GET path`` from ``callers`` keep-alive clients, SIGTERM the server after
    ``load_seconds``, and report; the server's process group is ended on return.

    The callers act like a load balancer's: they stop sending at the first failed ``/readyz``
    probe (every 100 ms) and never retry; a request that got no answer or a 5xx is lost. The
    server gets ``GRACEFUL_DELAY`` and ``GRACEFUL_DRAIN_TIMEOUT`` from ``delay`` and
    ``drain_timeout``; ``args`` are added to its command line (e.g. ``("-k", "gthread")``).
    This is :func:`graceful.testing.drain_under_load` with a server's command line.
    """
    port = free_port()
    settings = {
        **os.environ,
        "GRACEFUL_DELAY": str(delay),
        "GRACEFUL_DRAIN_TIMEOUT": str(drain_timeout),
        "PYTHONUNBUFFERED": "1",
        "NO_PROXY": "127.0.0.1",
        "no_proxy": "127.0.0.1",
        **(env or {}),
    }
    load = Load(
        call=Call(path=path), callers=callers, seconds=load_seconds, max_seconds=max_seconds
    )
    argv = _server_argv(app, server, port, workers, args)
    result = drain_under_load(
        argv, port, load, env=settings, cwd=cwd, startup_timeout=startup_timeout
    )
    return LiveDrainReport.of(result)


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def graceful_clock() -> FakeClock:
    """A fake monotonic clock: ``graceful_clock.advance(seconds)``."""
    return FakeClock()


@pytest.fixture
def graceful_lifecycle(graceful_clock: FakeClock) -> Iterator[Lifecycle]:
    """A fresh lifecycle on ``graceful_clock`` (delay 1 s, drain timeout 5 s), the process-wide
    one for the duration of the test."""
    from ._runtime import lifecycle as module

    previous = module._default
    lifecycle = Lifecycle(Config(delay=1.0, drain_timeout=5.0), clock=graceful_clock)
    set_lifecycle(lifecycle)
    try:
        yield lifecycle
    finally:
        set_lifecycle(previous)


@pytest.fixture
def graceful_drain_during_request() -> Callable[..., RequestDrain]:
    """:func:`drain_during_request`."""
    return drain_during_request


@pytest.fixture
def graceful_live_server() -> Callable[..., LiveDrainReport]:
    """:func:`live_drain`: each server it starts is ended (its whole process group) before it
    returns, also when the run failed."""
    return live_drain


@pytest.fixture
def graceful_cluster() -> Iterator[Callable[..., Cluster]]:
    """Start a :class:`graceful.testing.Cluster`: ``graceful_cluster(app, **options)`` takes
    its arguments and returns it started (every node ready); each one started is closed at
    teardown (its loads stopped, every node's process group ended), also when the test failed.
    """
    clusters: list[Cluster] = []

    def start(app: str, **options: Any) -> Cluster:
        cluster = Cluster(app, **options)
        clusters.append(cluster)
        return cluster.start()

    try:
        yield start
    finally:
        for cluster in clusters:
            cluster.close()
