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
  it, sends SIGTERM and reports the requests that were lost.

::

    def test_drains_while_serving(graceful_drain_during_request):
        outcome = graceful_drain_during_request(myapp.app, "/orders/1")
        assert outcome.status == 200
        assert outcome.phase_in_flight is Phase.DRAINING   # the request held the drain open
        assert outcome.phase_after is Phase.DRAINED


    def test_sigterm_loses_nothing(graceful_live_server):
        report = graceful_live_server("myapp:app", server="gunicorn", path="/orders/1")
        assert report.lost == 0 and report.exit_code == 0, report.summary()
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import pytest
import requests

from ._core.config import Config
from ._runtime.lifecycle import Lifecycle, Phase, get_lifecycle, set_lifecycle

__all__ = [
    "FakeClock",
    "LiveDrainReport",
    "RequestDrain",
    "drain_during_request",
    "live_drain",
]


class FakeClock:
    """A monotonic clock that moves only when told to: ``clock.advance(2.5)``."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        self.now += seconds


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
        status, response_headers, response_body = call(
            app, method, path, query, body, pairs, on_in_flight
        )
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


def _call_wsgi(
    app: Any,
    method: str,
    path: str,
    query: str,
    body: bytes,
    headers: list[tuple[str, str]],
    on_in_flight: Callable[[], None],
) -> _Answer:
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


def _call_asgi(
    app: Any,
    method: str,
    path: str,
    query: str,
    body: bytes,
    headers: list[tuple[str, str]],
    on_in_flight: Callable[[], None],
) -> _Answer:
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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


class _Server:
    """A server process in its own process group, its output in a temporary file."""

    def __init__(self, argv: list[str], env: Mapping[str, str], cwd: str | None) -> None:
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(  # noqa: S603 - our own argv
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")

    def stop(self) -> None:
        """Kill the whole process group (workers too) and reap it."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self.log.close()


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
    _started: list[_Server] | None = None,
) -> LiveDrainReport:
    """Start ``app`` (an import string, ``"module:attribute"``) under ``server`` on 127.0.0.1,
    send ``GET path`` from ``callers`` keep-alive clients, SIGTERM the server after
    ``load_seconds``, and report.

    The callers act like a load balancer's: they stop sending at the first failed ``/readyz``
    probe (every 100 ms) and never retry; a request that got no answer or a 5xx is lost. The
    server gets ``GRACEFUL_DELAY`` and ``GRACEFUL_DRAIN_TIMEOUT`` from ``delay`` and
    ``drain_timeout``; ``args`` are added to its command line (e.g. ``("-k", "gthread")``).
    """
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    settings = {
        **os.environ,
        "GRACEFUL_DELAY": str(delay),
        "GRACEFUL_DRAIN_TIMEOUT": str(drain_timeout),
        "PYTHONUNBUFFERED": "1",
        "NO_PROXY": "127.0.0.1",
        "no_proxy": "127.0.0.1",
        **(env or {}),
    }
    proc = _Server(_server_argv(app, server, port, workers, args), settings, cwd)
    if _started is not None:
        _started.append(proc)
    try:
        _wait_ready(proc, url, startup_timeout)
        return _SigtermUnderLoad(proc, url, path).run(callers, load_seconds, max_seconds)
    finally:
        if _started is None:
            proc.stop()


def _wait_ready(proc: _Server, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise AssertionError(
                f"the server exited with {proc.popen.returncode}:\n{proc.output()}"
            )
        with contextlib.suppress(requests.RequestException):
            if requests.get(url + "/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.05)  # the poll interval, bounded by the deadline
    raise AssertionError(f"/readyz not 200 within {timeout:g}s:\n{proc.output()}")


class _SigtermUnderLoad:
    def __init__(self, proc: _Server, url: str, path: str) -> None:
        self.proc, self.url, self.path = proc, url, path
        self.lock = threading.Lock()
        self.sent = self.sent_after = 0
        self.failures: list[str] = []
        self.signal_at: float | None = None
        self.readyz_failed_at: float | None = None
        self.stop_sending = threading.Event()
        self.done = threading.Event()

    def run(self, callers: int, load_seconds: float, max_seconds: float) -> LiveDrainReport:
        deadline = time.monotonic() + max_seconds
        threads = [threading.Thread(target=self.caller, daemon=True) for _ in range(callers)]
        prober = threading.Thread(target=self.probe, daemon=True)
        for thread in [*threads, prober]:
            thread.start()
        self.stop_sending.wait(load_seconds)  # the load before the signal IS the scenario
        self.signal_at = time.monotonic()
        self.proc.popen.send_signal(signal.SIGTERM)
        exit_code: int | None = None
        with contextlib.suppress(subprocess.TimeoutExpired):
            exit_code = self.proc.popen.wait(max(0.1, deadline - time.monotonic()))
        exited_at = time.monotonic()
        self.stop_sending.set()
        self.done.set()
        for thread in [*threads, prober]:
            thread.join(15)
        return LiveDrainReport(
            sent=self.sent,
            failures=list(self.failures),
            sent_after_signal=self.sent_after,
            readyz_failed_after=(
                None if self.readyz_failed_at is None else self.readyz_failed_at - self.signal_at
            ),
            exit_code=exit_code,
            exited_after=None if exit_code is None else exited_at - self.signal_at,
            output=self.proc.output(),
        )

    def caller(self) -> None:
        with requests.Session() as session:
            while not self.stop_sending.is_set():
                with self.lock:
                    self.sent += 1
                    self.sent_after += self.signal_at is not None
                try:
                    response = session.get(self.url + self.path, timeout=(5, 15))
                except requests.RequestException as exc:
                    self.fail(f"{type(exc).__name__}: {exc}")
                    continue
                if response.status_code >= 500:
                    self.fail(f"status {response.status_code}")

    def fail(self, why: str) -> None:
        with self.lock:
            self.failures.append(f"GET {self.path}: {why}"[:300])

    def probe(self) -> None:
        while not self.done.is_set():
            try:
                ready = requests.get(self.url + "/readyz", timeout=2).status_code == 200
            except requests.RequestException:
                ready = False
            if not ready and self.signal_at is not None:
                self.readyz_failed_at = time.monotonic()
                self.stop_sending.set()
                return
            self.done.wait(0.1)  # the probe interval IS the behaviour (a health check period)


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
def graceful_live_server() -> Iterator[Callable[..., LiveDrainReport]]:
    """:func:`live_drain`; every server it started is killed at teardown."""
    started: list[_Server] = []

    def run(app: str, **options: Any) -> LiveDrainReport:
        return live_drain(app, _started=started, **options)

    try:
        yield run
    finally:
        for proc in started:
            proc.stop()
